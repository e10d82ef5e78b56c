// The native CPU kernels, written once for every instruction set (see sgmv_cpu.h for the design).
//
// Included by sgmv_cpu_isa.inc (for each kernels_<isa>_<dtype>.cpp) inside namespace
// openlora::cpu::<isa> and, for the x86-64 levels, inside a `#pragma GCC target` region:
// everything defined here is compiled for that instruction set. So this file uses no std templates (an instantiation compiled for AVX-512
// could be the one the linker keeps for every caller), only builtins and its own helpers.
// The including file defines:
//   kVecBytes    bytes of one vector register the expand's accumulators use (64 / 32 / 16)
//   kAccVecs     vector registers of accumulators one output chunk keeps (half of them)
//   kDotJB4      A rows per dot block when the block has 4 x rows (register budget)
// (this file is included once per translation unit; no include guard on purpose)

#if defined(__GNUC__) && !defined(__clang__)
#define OLK_UNROLL _Pragma("GCC unroll 16")
#else
#define OLK_UNROLL
#endif

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T>
constexpr int64_t lines_of(int64_t elems) { return (elems * static_cast<int64_t>(sizeof(T)) + 63) / 64; }

// A weight as the kernels compute with it: its value, except fp8 e4m3's value * 2^-8 (see
// e4m3_bits_to_f32), whose 2^8 per side is w_unit, multiplied into the scales (scale_h).
template <typename TW> static inline float wval(TW v) { return to_f32(v); }
static inline float wval(e4m3 v) { return to_f32(v) * (1.f / 256.f); }
template <typename TW> static inline float w_unit(const TW*) { return 1.f; }
static inline float w_unit(const e4m3*) { return 256.f; }

// ------------------------------------------------------------------ eight-float vectors
// GCC / Clang vector extensions: the same source becomes AVX-512 / AVX2 / SSE / NEON code.
// (Older compilers, without __builtin_shufflevector, build scalar loops in their place.)
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)   // (__builtin_shufflevector)
#define OLK_VEC 1
// The ISA's own width for the expand's accumulators (kVecBytes from the including file).
constexpr int kW = kVecBytes / 4;
typedef float vfw __attribute__((vector_size(kVecBytes)));
typedef uint32_t vuw __attribute__((vector_size(kVecBytes)));
typedef uint16_t vhw __attribute__((vector_size(kVecBytes / 2)));

static inline vfw loadw(const float* p) { vfw v; std::memcpy(&v, p, sizeof(v)); return v; }
static inline vfw loadw(const bf16* p) {
  vhw h; std::memcpy(&h, p, sizeof(h));
  const vuw u = __builtin_convertvector(h, vuw) << 16;
  vfw f; std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename VU, typename VF>
static inline VF f16_bits_to_f32(VU w) {   // to_f32(f16) on every lane, the same bits
  const VU exp_mask = VU{} + (0x7c00u << 13);
  VU o = (w & 0x7fffu) << 13;
  const VU e = o & exp_mask;
  o += (127u - 15u) << 23;
  const VU is_inf = (VU)(e == exp_mask);
  const VU is_sub = (VU)(e == 0u);
  o += is_inf & ((128u - 16u) << 23);
  VF f, magic;
  const VU m = VU{} + (113u << 23), o1 = o + (1u << 23);
  std::memcpy(&f, &o1, sizeof(f));
  std::memcpy(&magic, &m, sizeof(f));
  f -= magic;
  VU sub;
  std::memcpy(&sub, &f, sizeof(sub));
  o = (is_sub & sub) | (~is_sub & o);
  o |= (w & 0x8000u) << 16;
  std::memcpy(&f, &o, sizeof(f));
  return f;
}
#if OLK_F16C
// x86-64-v3 and up have F16C: vcvtph2ps widens eight halves exactly (the same values as to_f32)
static inline vfw loadw(const f16* p) {
  if (kVecBytes == 32) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    vfw f; std::memcpy(&f, &v, 32);
    return f;
  }
  vhw h; std::memcpy(&h, p, sizeof(h));
  return f16_bits_to_f32<vuw, vfw>(__builtin_convertvector(h, vuw));
}
#else
static inline vfw loadw(const f16* p) {
  vhw h; std::memcpy(&h, p, sizeof(h));
  return f16_bits_to_f32<vuw, vfw>(__builtin_convertvector(h, vuw));
}
#endif
#else
constexpr int kW = 4;
#endif
#if defined(OLK_VEC)
typedef float vf8 __attribute__((vector_size(32)));
typedef uint32_t vu8 __attribute__((vector_size(32)));
typedef uint16_t vh8 __attribute__((vector_size(16)));

static inline vf8 as_f(vu8 u) { vf8 f; std::memcpy(&f, &u, 32); return f; }

static inline vf8 load8(const float* p) { vf8 v; std::memcpy(&v, p, 32); return v; }
static inline vf8 load8(const bf16* p) {
  vh8 h; std::memcpy(&h, p, 16);
  return as_f(__builtin_convertvector(h, vu8) << 16);
}
static inline vf8 load8(const f16* p) {
#if OLK_F16C
  const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vf8 f; std::memcpy(&f, &v, 32);
  return f;
#else
  vh8 h; std::memcpy(&h, p, 16);
  return f16_bits_to_f32<vu8, vf8>(__builtin_convertvector(h, vu8));
#endif
}

// fp8 e4m3 weights are read as value * 2^-8 (wval below; the 2^8 rides on the scales, scale_h:
// powers of two, so the same bits as the values themselves). That unit is what F16C widens
// without a multiply: the fp16 bits of value * 2^-8 are the e4m3 byte's bits moved up by 7
// (fp16's exponent bias is 8 more than e4m3's; e4m3 subnormals become fp16 subnormals).
//
// The baseline's conversion (no F16C; also the widths F16C does not serve): value * 2^-8 of each
// e4m3 byte (in 32-bit lanes) built in fp32 bits: the exponent rebiased by 112, subnormals
// renormalised by a subtraction of 2^-14, NaN (S.1111.111) kept.
template <typename VU, typename VF>
static inline VF e4m3_bits_to_f32(VU w) {
  const VU mag = w & 0x7fu;
  VU o = (mag << 20) + (112u << 23);
  const VU is_sub = (VU)((mag & 0x78u) == 0u);
  const VU is_nan = (VU)(mag == 0x7fu);
  const VU o1 = o + (1u << 23), m = VU{} + (113u << 23);
  VF f, magic;
  std::memcpy(&f, &o1, sizeof(f));
  std::memcpy(&magic, &m, sizeof(f));
  f -= magic;                                   // subnormals: 2^-14 (1 + m / 8) - 2^-14, exact
  VU sub;
  std::memcpy(&sub, &f, sizeof(sub));
  o = (is_sub & sub) | (~is_sub & o);
  o = (is_nan & 0x7fc00000u) | (~is_nan & o);
  o |= (w & 0x80u) << 24;
  std::memcpy(&f, &o, sizeof(f));
  return f;
}
#if OLK_F16C
// fp16 bits of value * 2^-8 of each e4m3 byte, sign-extended into 16-bit lanes (v): shifted up by
// 7 (the sign lands in bits 15 and 14, the mask clears 14), then NaN's (magnitude 0x7f) exponent
// filled up to fp16's NaN: adding 0x80 carries into bit 14 for that magnitude only.
static inline __m256i e4m3_f16_bits(__m256i v) {
  const __m256i h = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16(static_cast<short>(0xbf80)));
  const __m256i nan = _mm256_and_si256(_mm256_add_epi16(h, _mm256_set1_epi16(0x80)), _mm256_set1_epi16(0x4000));
  return _mm256_or_si256(h, nan);
}
static inline __m128i e4m3_f16_bits(__m128i v) {
  const __m128i h = _mm_and_si128(_mm_slli_epi16(v, 7), _mm_set1_epi16(static_cast<short>(0xbf80)));
  const __m128i nan = _mm_and_si128(_mm_add_epi16(h, _mm_set1_epi16(0x80)), _mm_set1_epi16(0x4000));
  return _mm_or_si128(h, nan);
}
static inline vf8 as_vf8(__m256 v) { vf8 f; std::memcpy(&f, &v, 32); return f; }
// sixteen weights (as value * 2^-8): elements 0-7 and 8-15
static inline void load16_e4m3(const e4m3* p, vf8& lo, vf8& hi) {
  const __m256i h = e4m3_f16_bits(_mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  lo = as_vf8(_mm256_cvtph_ps(_mm256_castsi256_si128(h)));
  hi = as_vf8(_mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)));
}
#endif
typedef uint8_t vb8 __attribute__((vector_size(8)));
static inline vf8 load8(const e4m3* p) {     // eight weights, as value * 2^-8
#if OLK_F16C
  return as_vf8(_mm256_cvtph_ps(e4m3_f16_bits(_mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))))));
#else
  vb8 b;
  std::memcpy(&b, p, 8);
  return e4m3_bits_to_f32<vu8, vf8>(__builtin_convertvector(b, vu8));
#endif
}
typedef uint8_t vbw __attribute__((vector_size(kW)));
static inline vfw loadw(const e4m3* p) {
#if OLK_F16C
  if (kW == 8) {
    const vf8 v = load8(p);
    vfw f;
    std::memcpy(&f, &v, sizeof(f) < sizeof(v) ? sizeof(f) : sizeof(v));
    return f;
  }
#endif
  vbw b;
  std::memcpy(&b, p, sizeof(b));
  return e4m3_bits_to_f32<vuw, vfw>(__builtin_convertvector(b, vuw));
}

// Transposes the 8 x 8 block r[c][l] into o[l][c] (24 shuffles).
static inline void transpose8(const vf8 r[8], vf8 o[8]) {
  vf8 t[8], u[8];
  OLK_UNROLL
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  OLK_UNROLL
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  OLK_UNROLL
  for (int i = 0; i < 4; ++i) {
    o[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    o[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
template <typename A, typename B> struct same_type { static constexpr bool value = false; };
template <typename A> struct same_type<A, A> { static constexpr bool value = true; };

// [sum of a[0]'s lanes, ..., sum of a[7]'s lanes]: pairwise (horizontal-add) sums within the
// 128-bit halves, then the two halves added (21 operations, a transpose and adds would be 31).
static inline vf8 hadd8(vf8 a, vf8 b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
static inline vf8 lane_sums8(const vf8 a[8]) {
  const vf8 u0 = hadd8(hadd8(a[0], a[1]), hadd8(a[2], a[3]));
  const vf8 u1 = hadd8(hadd8(a[4], a[5]), hadd8(a[6], a[7]));
  return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
}


// (Pair16: see "decode: weights read in 16-element pairs" below)
template <typename TW> struct Pair16 {
  static constexpr bool kEvenOdd = false;
  static inline void load(const TW* p, vf8& lo, vf8& hi) { lo = load8(p); hi = load8(p + 8); }
};
template <> struct Pair16<bf16> {
  static constexpr bool kEvenOdd = true;
  static inline void load(const bf16* p, vf8& lo, vf8& hi) {
    vu8 u;
    std::memcpy(&u, p, 32);
    lo = as_f(u << 16);
    hi = as_f(u & 0xffff0000u);
  }
};
template <> struct Pair16<e4m3> {   // elements 0-7 and 8-15 (as value * 2^-8): one 16-byte load
  static constexpr bool kEvenOdd = false;
  static inline void load(const e4m3* p, vf8& lo, vf8& hi) {
#if OLK_F16C
    load16_e4m3(p, lo, hi);
#else
    lo = load8(p);
    hi = load8(p + 8);
#endif
  }
};

#endif

// ------------------------------------------------------------------------------ prefetch

// Software prefetch of the NEXT unit's weights, spread over the current unit's arithmetic: every
// step() asks for a few more cache lines (into L2) of the next slot's A rows, then its B rows. So
// the next adapter streams in from L3 / DRAM while this one computes, instead of a burst of a
// thousand prefetches that stalls the core until the memory queue drains (measured: a cold call
// then cost fetch + compute instead of about the larger of the two). A unit's rows are [rank]
// runs of K (A) or N (B) elements at a row stride; the walk covers the span from the first row's
// start to the last row's end (for padded rows a few lines more: still inside the tensor, and a
// prefetch never faults). Two plain byte ranges keep step() to a compare and a prefetch per line.
struct Prefetcher {
  const char* p = nullptr; const char* e = nullptr;      // range being walked
  const char* p2 = nullptr; const char* e2 = nullptr;    // the one after it (empty: none)

  template <typename T>
  void reset(const Args& q, const Unit* u) {
    p = e = p2 = e2 = nullptr;
    if (u == nullptr || u->rank <= 0) return;
    const int64_t sz = static_cast<int64_t>(sizeof(T));
    const int64_t i = u->slice;
    // (lengths in elements, computed before any pointer: an empty tensor may have a null base)
    if (q.op != kExpand && q.a_sk[i] == 1 && q.K > 0 && q.a[i] != nullptr) {
      p = static_cast<const char*>(q.a[i]) + (u->slot * q.a_ss[i] + u->roff * q.a_sr[i]) * sz;
      e = p + ((u->rank - 1) * q.a_sr[i] + q.K) * sz;
    }
    const int64_t w = q.op != kShrink ? q.widths[i] : 0;
    if (w > 0 && q.b[i] != nullptr) {
      const char* b0 = static_cast<const char*>(q.b[i]) + (u->slot * q.b_ss[i] + u->roff * q.b_sr[i]) * sz;
      if (q.b_sn[i] == 1) {          // rank-major: rank runs of N
        p2 = b0; e2 = b0 + ((u->rank - 1) * q.b_sr[i] + w) * sz;
      } else if (q.b_sr[i] == 1) {   // [N, R]: N runs of R, of which the first rank are read
        p2 = b0; e2 = b0 + ((w - 1) * q.b_sn[i] + u->rank) * sz;
      }
    }
    if (p >= e) { p = p2; e = e2; p2 = e2 = nullptr; }
  }
  inline void step(int64_t lines) {
    const char* a = p;
    const char* ae = e;
    for (; lines > 0; --lines) {
      if (a >= ae) {
        if (p2 >= e2) break;
        a = p2; ae = e2; e = e2; p2 = e2 = nullptr;
      }
      __builtin_prefetch(a, 0, 2);
      a += 64;
    }
    p = a;
  }
  void finish() { step(INT64_MAX); }
};

// ------------------------------------------------------------------------------- shrink

// out[m * JB + j] = sum_k x_m[k] * a_j[k] for the MB x rows of a block and JB rows of A (row j at
// a + j * a_sr), in one pass over k (contiguous case). MB * JB independent sums (vector
// accumulators), so the loop runs at the FMA rate instead of one FMA latency per vector.
template <typename TX, typename TA, int MB, int JB>
static inline void dot_block(const TX* const* xr, const TA* a, int64_t a_sr, int64_t K, float* out) {
  float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
  float s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f, s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;
  const TX* x0 = xr[0];
  const TX* x1 = xr[MB > 1 ? 1 : 0];
  const TX* x2 = xr[MB > 2 ? 2 : 0];
  const TX* x3 = xr[MB > 3 ? 3 : 0];
  const TA* a0 = a;
  const TA* a1 = a + (JB > 1 ? a_sr : 0);
  const TA* a2 = a + (JB > 2 ? 2 * a_sr : 0);
  const TA* a3 = a + (JB > 3 ? 3 * a_sr : 0);
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t k = 0; k < K; ++k) {
    const float v0 = wval(a0[k]);
    const float v1 = JB > 1 ? wval(a1[k]) : 0.f;
    const float v2 = JB > 2 ? wval(a2[k]) : 0.f;
    const float v3 = JB > 3 ? wval(a3[k]) : 0.f;
    const float w0 = to_f32(x0[k]);
    s00 += w0 * v0; if (JB > 1) s01 += w0 * v1; if (JB > 2) s02 += w0 * v2; if (JB > 3) s03 += w0 * v3;
    if (MB > 1) {
      const float w1 = to_f32(x1[k]);
      s10 += w1 * v0; if (JB > 1) s11 += w1 * v1; if (JB > 2) s12 += w1 * v2; if (JB > 3) s13 += w1 * v3;
    }
    if (MB > 2) {
      const float w2 = to_f32(x2[k]);
      s20 += w2 * v0; if (JB > 1) s21 += w2 * v1; if (JB > 2) s22 += w2 * v2; if (JB > 3) s23 += w2 * v3;
    }
    if (MB > 3) {
      const float w3 = to_f32(x3[k]);
      s30 += w3 * v0; if (JB > 1) s31 += w3 * v1; if (JB > 2) s32 += w3 * v2; if (JB > 3) s33 += w3 * v3;
    }
  }
  const float sums[4][4] = {{s00, s01, s02, s03}, {s10, s11, s12, s13}, {s20, s21, s22, s23}, {s30, s31, s32, s33}};
  OLK_UNROLL
  for (int m = 0; m < MB; ++m) {
    OLK_UNROLL
    for (int j = 0; j < JB; ++j) out[m * JB + j] = sums[m][j];
  }
}

// h[m * hs + j] = x_m . a_j for j < rank (A rows contiguous along K, at a + j * a_sr).
template <typename TX, typename TA, int MB>
static void shrink_block(const TX* const* xr, const TA* a, int64_t a_sr, int64_t K, int rank, float* h,
                         int64_t hs, Prefetcher& pf) {
  constexpr int JB = MB == 4 ? kDotJB4 : 4;
  float out[kBlockRows * 4];
  const int64_t step = lines_of<TA>(K);
  int j = 0;
  for (; j + JB <= rank; j += JB) {
    dot_block<TX, TA, MB, JB>(xr, a + j * a_sr, a_sr, K, out);
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) {
      OLK_UNROLL
      for (int jj = 0; jj < JB; ++jj) h[m * hs + j + jj] = out[m * JB + jj];
    }
    pf.step(JB * step);
  }
  for (; j < rank; ++j) {
    dot_block<TX, TA, MB, 1>(xr, a + j * a_sr, a_sr, K, out);
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) h[m * hs + j] = out[m];
    pf.step(step);
  }
}

template <typename TX, typename TA>
static void shrink_rows(const TX* const* xr, int n, const TA* a, int64_t a_sr, int64_t K, int rank, float* h,
                        int64_t hs, Prefetcher& pf) {
  if (n == 4) {
    shrink_block<TX, TA, 4>(xr, a, a_sr, K, rank, h, hs, pf);
  } else {
    int m = 0;
    if (n - m >= 2) { shrink_block<TX, TA, 2>(xr + m, a, a_sr, K, rank, h + m * hs, hs, pf); m += 2; }
    if (n - m >= 1) shrink_block<TX, TA, 1>(xr + m, a, a_sr, K, rank, h + m * hs, hs, pf);
  }
}

// ------------------------------------------------------------------------- weight panels

// P[j * ldp + c] = w[(c0 + c) * s_c + j * s_j] as fp32, for c < nc, j < rank: rank-major fp32
// rows from a slot's weights of any strides. Contiguous along j (the usual [N, R] B, A for its
// [K, R] transpose): 8 x 8 register transposes; contiguous along c: converted rows.
template <typename TW>
static void make_panel(const TW* w, int64_t s_c, int64_t s_j, int64_t c0, int64_t nc, int rank, float* P,
                       int64_t ldp) {
  if (s_c == 1) {
    for (int j = 0; j < rank; ++j) {
      const TW* src = w + j * s_j + c0;
      float* dst = P + j * ldp;
      int64_t c = 0;
#if defined(OLK_VEC)
      if (same_type<TW, e4m3>::value)    // (fp8: the vector conversion, eight at a time)
        for (; c + 8 <= nc; c += 8) {
          const vf8 v = load8(src + c);
          std::memcpy(dst + c, &v, 32);
        }
#endif
#pragma omp simd
      for (int64_t cc = c; cc < nc; ++cc) dst[cc] = wval(src[cc]);
    }
    return;
  }
  int64_t c = 0;
#if defined(OLK_VEC)
  if (s_j == 1) {
    vf8 r[8], o[8];
    for (; c + 8 <= nc; c += 8) {
      const TW* col = w + (c0 + c) * s_c;
      int j = 0;
      for (; j + 8 <= rank; j += 8) {
        OLK_UNROLL
        for (int i = 0; i < 8; ++i) r[i] = load8(col + i * s_c + j);
        transpose8(r, o);
        OLK_UNROLL
        for (int l = 0; l < 8; ++l) std::memcpy(P + (j + l) * ldp + c, &o[l], 32);
      }
      for (; j < rank; ++j) {
        OLK_UNROLL
        for (int i = 0; i < 8; ++i) P[j * ldp + c + i] = wval(col[i * s_c + j]);
      }
    }
  }
#endif
  for (; c < nc; ++c) {
    const TW* col = w + (c0 + c) * s_c;
    for (int j = 0; j < rank; ++j) P[j * ldp + c] = wval(col[j * s_j]);
  }
}

// -------------------------------------------------------------------------------- expand

// y_m[n * sy_n] += scale * acc_m[n] for n < nc (y_m = yr[m] + col * sy_n): y read and written once.
template <typename TY, int MB, int NCMAX>
static inline void update_y(TY* const* yr, int64_t col, int64_t sy_n, int64_t nc, float scale,
                            const float (&acc)[MB][NCMAX]) {
  OLK_UNROLL
  for (int m = 0; m < MB; ++m) {
    TY* y = yr[m] + col * sy_n;
    if (sy_n == 1) {
#pragma omp simd
      for (int64_t n = 0; n < nc; ++n) y[n] = from_f32<TY>(to_f32(y[n]) + scale * acc[m][n]);
    } else {
      for (int64_t n = 0; n < nc; ++n) y[n * sy_n] = from_f32<TY>(to_f32(y[n * sy_n]) + scale * acc[m][n]);
    }
  }
}

#if defined(OLK_VEC)
// Columns [0, NC) of the block's y rows += scale * sum_j h[m * hs + j] * w_j[n] (w_j = w + j * w_sr,
// contiguous along n). The MB x NC accumulators are vector registers (NC / kW of them per row)
// kept across the rank loop; each rank row of w is loaded (and converted) once for the MB rows.
// (Vector types and unroll pragmas rather than loops left to the optimiser: -O2 keeps such
// loops' accumulators in memory, and -O3 doubles the compile time.)
template <typename TY, typename TW, int MB, int NC>
static inline void expand_chunk(const TW* w, int64_t w_sr, int rank, const float* h, int64_t hs, TY* const* yr,
                                int64_t col, int64_t sy_n, float scale, Prefetcher& pf) {
  constexpr int V = NC / kW;
  vfw acc[MB][V];
  OLK_UNROLL
  for (int m = 0; m < MB; ++m) {
    OLK_UNROLL
    for (int v = 0; v < V; ++v) acc[m][v] = vfw{};
  }
  for (int j = 0; j < rank; ++j) {
    const TW* wrow = w + j * w_sr;
    vfw b[V];
    if (same_type<TW, e4m3>::value && kW == 8 && V % 2 == 0) {   // fp8: sixteen columns per conversion
      OLK_UNROLL
      for (int v = 0; v < V; v += 2) {
        vf8 lo, hi;
        Pair16<e4m3>::load(reinterpret_cast<const e4m3*>(wrow) + v * kW, lo, hi);
        std::memcpy(&b[v], &lo, sizeof(vfw) < 32 ? sizeof(vfw) : 32);
        std::memcpy(&b[v + 1], &hi, sizeof(vfw) < 32 ? sizeof(vfw) : 32);
      }
    } else {
      OLK_UNROLL
      for (int v = 0; v < V; ++v) b[v] = loadw(wrow + v * kW);
    }
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) {
      const float c = h[m * hs + j];
      OLK_UNROLL
      for (int v = 0; v < V; ++v) acc[m][v] += c * b[v];
    }
    pf.step(lines_of<TW>(NC));
  }
  if (sizeof(TY) == 4 && sy_n == 1) {      // fp32 y: updated in vector registers
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) {
      float* y = reinterpret_cast<float*>(yr[m] + col);
      OLK_UNROLL
      for (int v = 0; v < V; ++v) {
        vfw yv = loadw(y + v * kW);
        yv += scale * acc[m][v];
        std::memcpy(y + v * kW, &yv, sizeof(vfw));
      }
    }
    return;
  }
  float out[MB][NC];
  OLK_UNROLL
  for (int m = 0; m < MB; ++m) {
    OLK_UNROLL
    for (int v = 0; v < V; ++v) std::memcpy(&out[m][v * kW], &acc[m][v], sizeof(vfw));
  }
  update_y<TY, MB, NC>(yr, col, sy_n, NC, scale, out);
}
#else
template <typename TY, typename TW, int MB, int NC>
static inline void expand_chunk(const TW* w, int64_t w_sr, int rank, const float* h, int64_t hs, TY* const* yr,
                                int64_t col, int64_t sy_n, float scale, Prefetcher& pf) {
  float acc[MB][NC];
  for (int m = 0; m < MB; ++m)
#pragma omp simd
    for (int n = 0; n < NC; ++n) acc[m][n] = 0.f;
  for (int j = 0; j < rank; ++j) {
    const TW* wrow = w + j * w_sr;
    float c[MB];
    for (int m = 0; m < MB; ++m) c[m] = h[m * hs + j];
#pragma omp simd
    for (int n = 0; n < NC; ++n) {
      const float bv = wval(wrow[n]);
      for (int m = 0; m < MB; ++m) acc[m][n] += c[m] * bv;
    }
    pf.step(lines_of<TW>(NC));
  }
  update_y<TY, MB, NC>(yr, col, sy_n, NC, scale, acc);
}
#endif

// The last, partial chunk (nc < kW columns).
template <typename TY, typename TW, int MB>
static void expand_tail(const TW* w, int64_t w_sr, int rank, const float* h, int64_t hs, int64_t nc, TY* const* yr,
                        int64_t col, int64_t sy_n, float scale) {
  float acc[MB][kW] = {};
  for (int j = 0; j < rank; ++j) {
    const TW* wrow = w + j * w_sr;
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) {
      const float c = h[m * hs + j];
      for (int64_t n = 0; n < nc; ++n) acc[m][n] += c * wval(wrow[n]);
    }
  }
  update_y<TY, MB, kW>(yr, col, sy_n, nc, scale, acc);
}

#if defined(OLK_VEC)
// expand_chunk for bf16 weights, NC = 16 * V columns: each rank row of w loaded as V pairs (even
// and odd columns), accumulated as such, the accumulators re-interleaved into column order once
// per chunk. Per column the same products in the same order as expand_chunk's: the same bits.
template <typename TY, int MB, int V>
static inline void expand_chunk_pairs(const bf16* w, int64_t w_sr, int rank, const float* h, int64_t hs,
                                      TY* const* yr, int64_t col, int64_t sy_n, float scale, Prefetcher& pf) {
  vf8 ae[MB][V], ao[MB][V];
  OLK_UNROLL
  for (int m = 0; m < MB; ++m)
    OLK_UNROLL
    for (int v = 0; v < V; ++v) ae[m][v] = ao[m][v] = vf8{};
  for (int j = 0; j < rank; ++j) {
    const bf16* wrow = w + j * w_sr;
    vf8 be[V], bo[V];
    OLK_UNROLL
    for (int v = 0; v < V; ++v) Pair16<bf16>::load(wrow + 16 * v, be[v], bo[v]);
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) {
      const float c = h[m * hs + j];
      OLK_UNROLL
      for (int v = 0; v < V; ++v) {
        ae[m][v] += c * be[v];
        ao[m][v] += c * bo[v];
      }
    }
    pf.step(lines_of<bf16>(16 * V));
  }
  float out[MB][16 * V];
  OLK_UNROLL
  for (int m = 0; m < MB; ++m) {
    OLK_UNROLL
    for (int v = 0; v < V; ++v) {
      const vf8 lo = __builtin_shufflevector(ae[m][v], ao[m][v], 0, 8, 1, 9, 2, 10, 3, 11);
      const vf8 hi = __builtin_shufflevector(ae[m][v], ao[m][v], 4, 12, 5, 13, 6, 14, 7, 15);
      if (sizeof(TY) == 4 && sy_n == 1) {      // fp32 y: updated in vector registers
        float* y = reinterpret_cast<float*>(yr[m] + col) + 16 * v;
        vf8 y0 = load8(y), y1 = load8(y + 8);
        y0 += scale * lo;
        y1 += scale * hi;
        std::memcpy(y, &y0, 32);
        std::memcpy(y + 8, &y1, 32);
      } else {
        std::memcpy(&out[m][16 * v], &lo, 32);
        std::memcpy(&out[m][16 * v + 8], &hi, 32);
      }
    }
  }
  if (!(sizeof(TY) == 4 && sy_n == 1)) update_y<TY, MB, 16 * V>(yr, col, sy_n, 16 * V, scale, out);
}
#endif

// Columns [0, width) of the block's y rows from rank-major weights w (row j at w + j * w_sr):
// chunks whose accumulators fill half of the vector registers (kAccVecs), then of one vector,
// then a tail.
template <typename TY, typename TW, int MB>
static void expand_block(const TW* w, int64_t w_sr, int rank, const float* h, int64_t hs, TY* const* yr,
                         int64_t col, int64_t sy_n, int64_t width, float scale, Prefetcher& pf) {
  constexpr int NC = (kAccVecs / MB) * kW;
  int64_t n0 = 0;
#if defined(OLK_VEC)
  if (same_type<TW, bf16>::value && kW == 8) {    // (the pair chunks' accumulators: as many as NC's)
    constexpr int V = kAccVecs / MB / 2 > 0 ? kAccVecs / MB / 2 : 1;
    const bf16* wb = reinterpret_cast<const bf16*>(w);
    for (; n0 + 16 * V <= width; n0 += 16 * V)
      expand_chunk_pairs<TY, MB, V>(wb + n0, w_sr, rank, h, hs, yr, col + n0, sy_n, scale, pf);
  }
#endif
  for (; n0 + NC <= width; n0 += NC)
    expand_chunk<TY, TW, MB, NC>(w + n0, w_sr, rank, h, hs, yr, col + n0, sy_n, scale, pf);
  if (NC > kW)
    for (; n0 + kW <= width; n0 += kW)
      expand_chunk<TY, TW, MB, kW>(w + n0, w_sr, rank, h, hs, yr, col + n0, sy_n, scale, pf);
  if (n0 < width) expand_tail<TY, TW, MB>(w + n0, w_sr, rank, h, hs, width - n0, yr, col + n0, sy_n, scale);
}

template <typename TY, typename TW>
static void expand_rows(const TW* w, int64_t w_sr, int rank, const float* h, int64_t hs, TY* const* yr, int n,
                        int64_t col, int64_t sy_n, int64_t width, float scale, Prefetcher& pf) {
  for (int m0 = 0; m0 < n; m0 += kBlockRows) {
    const int mb = static_cast<int>(imin(kBlockRows, n - m0));
    if (mb == 4) {
      expand_block<TY, TW, 4>(w, w_sr, rank, h + m0 * hs, hs, yr + m0, col, sy_n, width, scale, pf);
    } else {
      int m = m0;
      if (m0 + mb - m >= 2) {
        expand_block<TY, TW, 2>(w, w_sr, rank, h + m * hs, hs, yr + m, col, sy_n, width, scale, pf);
        m += 2;
      }
      if (m0 + mb - m >= 1) expand_block<TY, TW, 1>(w, w_sr, rank, h + m * hs, hs, yr + m, col, sy_n, width, scale, pf);
    }
  }
}

#if defined(OLK_VEC)
// sum_j w_c[j] * h[j] for the eight columns w_c = w + c * w_sn (j < rank): each column's products
// accumulated along the rank in a vector, then the eight vectors summed across their lanes. bf16 weights: sixteen ranks per load, the even and odd ones as two fp32
// vectors (a shift and a mask, no widening), h split the same way (he / ho: its even and odd
// entries, r16 of each).
template <typename TW>
static inline vf8 dot8_columns(const TW* w, int64_t w_sn, int rank, const float* h, const float* he,
                               const float* ho, int r16) {
  vf8 acc[8];
  OLK_UNROLL
  for (int c = 0; c < 8; ++c) acc[c] = vf8{};
  int j0 = 0;
  if (same_type<TW, bf16>::value) {
    for (; j0 < r16; j0 += 16) {
      const vf8 hev = load8(he + j0 / 2), hov = load8(ho + j0 / 2);
      OLK_UNROLL
      for (int c = 0; c < 8; ++c) {
        vu8 u;
        std::memcpy(&u, w + c * w_sn + j0, 32);
        acc[c] += as_f(u << 16) * hev + as_f(u & 0xffff0000u) * hov;
      }
    }
  }
  if (same_type<TW, e4m3>::value) {    // fp8: sixteen ranks per conversion, the same sums as below
    const int r16e = rank / 16 * 16;
    for (; j0 < r16e; j0 += 16) {
      const vf8 h0 = load8(h + j0), h1 = load8(h + j0 + 8);
      OLK_UNROLL
      for (int c = 0; c < 8; ++c) {
        vf8 lo, hi;
        Pair16<e4m3>::load(reinterpret_cast<const e4m3*>(w + c * w_sn + j0), lo, hi);
        acc[c] += lo * h0;
        acc[c] += hi * h1;
      }
    }
  }
  const int r8 = rank / 8 * 8;
  for (; j0 < r8; j0 += 8) {
    const vf8 hv = load8(h + j0);
    OLK_UNROLL
    for (int c = 0; c < 8; ++c) acc[c] += load8(w + c * w_sn + j0) * hv;
  }
  if (r8 < rank) {
    OLK_UNROLL
    for (int c = 0; c < 8; ++c) {
      float t = 0.f;
      for (int j = r8; j < rank; ++j) t += wval(w[c * w_sn + j]) * h[j];
      acc[c][0] += t;
    }
  }
  return lane_sums8(acc);
}

// Few rows and the usual [N, R] B (rows of B contiguous along the rank): dot8_columns over blocks
// of 64 columns per row (the block's B stays in L1 for the unit's other rows), y updated once
// per block. Per element about as much work as the rank-major path's (a panel would first cost
// a transpose of every element of B).
template <typename TY, typename TW>
static void expand_dot_rows(const TW* w, int64_t w_sn, int rank, const float* h, int64_t hs, TY* const* yr, int n,
                            int64_t col, int64_t sy_n, int64_t width, float scale, Prefetcher& pf) {
  constexpr int kBlk = 64;
  const int r16 = same_type<TW, bf16>::value ? rank / 16 * 16 : 0;
  float he[kBlockRows][kMaxDotRank / 2], ho[kBlockRows][kMaxDotRank / 2];
  for (int m = 0; m < n; ++m)
    for (int j = 0; j < r16; j += 2) {
      he[m][j / 2] = h[m * hs + j];
      ho[m][j / 2] = h[m * hs + j + 1];
    }
  int64_t c0 = 0;
  float out[1][kBlk];
  for (; c0 + 8 <= width; c0 += kBlk) {
    const int64_t nb = imin(kBlk, (width - c0) / 8 * 8);
    for (int m = 0; m < n; ++m) {
      for (int64_t g = 0; g < nb; g += 8) {
        const vf8 sum = dot8_columns<TW>(w + (c0 + g) * w_sn, w_sn, rank, h + m * hs, he[m], ho[m], r16);
        std::memcpy(&out[0][g], &sum, 32);
      }
      update_y<TY, 1, kBlk>(yr + m, col + c0, sy_n, nb, scale, out);
    }
    pf.step(lines_of<TW>(nb * w_sn));
    if (nb < kBlk) { c0 += nb; break; }
  }
  for (; c0 < width; ++c0) {
    const TW* wc = w + c0 * w_sn;
    for (int m = 0; m < n; ++m) {
      const float* hm = h + m * hs;
      float t = 0.f;
      for (int j = 0; j < rank; ++j) t += wval(wc[j]) * hm[j];
      TY* y = yr[m] + (col + c0) * sy_n;
      *y = from_f32<TY>(to_f32(*y) + scale * t);
    }
  }
}
#endif

#if defined(OLK_VEC)
// ------------------------------------------------------- decode: weights read in 16-element pairs
// A decode unit (fewer than kPanelRows rows) reads every weight element once for a handful of
// FMAs, so converting the weights costs as much as the arithmetic. Pair16 loads 16 elements as
// two fp32 vectors (lo, hi): bf16 without any widening (the 32-bit lanes of the 16 elements,
// shifted left by 16 and masked: the even and the odd elements), fp32 / fp16 as elements 0-7 and
// 8-15 (fp16 through F16C where the ISA has it). The fp32 rows the weights meet (x in the shrink,
// y in the expand) are arranged in the same order: x's rows once per block (pair_rows), y's
// columns re-interleaved once per output chunk.
// xs[m * K + ...] = the block's x rows as fp32, each whole 16-element block of K in TW's pair
// order (then the K % 16 tail in order). Returns the rows to read: xs's, or x's own when they are
// already fp32 in that order.
template <typename TX, typename TW>
static inline void pair_rows(const TX* const* xr, int mb, int64_t K, float* xs, const float** xf) {
  const int64_t kb = K / 16 * 16;
  for (int m = 0; m < mb; ++m) {
    if (same_type<TX, float>::value && !Pair16<TW>::kEvenOdd) {
      xf[m] = reinterpret_cast<const float*>(xr[m]);
      continue;
    }
    const TX* src = xr[m];
    float* dst = xs + m * K;
    for (int64_t k = 0; k < kb; k += 16) {
      const vf8 a = load8(src + k), b = load8(src + k + 8);
      const vf8 lo = Pair16<TW>::kEvenOdd ? __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14) : a;
      const vf8 hi = Pair16<TW>::kEvenOdd ? __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15) : b;
      std::memcpy(dst + k, &lo, 32);
      std::memcpy(dst + k + 8, &hi, 32);
    }
    for (int64_t k = kb; k < K; ++k) dst[k] = to_f32(src[k]);
    xf[m] = dst;
  }
}

// out[m * JB + j] = x_m . a_j (MB * JB <= 8 sums): one vector accumulator per sum over the whole
// 16-element blocks, the eight summed across their lanes at once (lane_sums8), then the tail.
template <typename TW, int MB, int JB>
static inline void dot_pairs(const float* const* xf, const TW* a, int64_t a_sr, int64_t K, float* out) {
  static_assert(MB * JB <= 8, "eight accumulators");
  vf8 acc[8];
  OLK_UNROLL
  for (int i = 0; i < 8; ++i) acc[i] = vf8{};
  const int64_t kb = K / 16 * 16;
  for (int64_t k = 0; k < kb; k += 16) {
    vf8 xl[MB], xh[MB];
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) { xl[m] = load8(xf[m] + k); xh[m] = load8(xf[m] + k + 8); }
    OLK_UNROLL
    for (int j = 0; j < JB; ++j) {
      vf8 lo, hi;
      Pair16<TW>::load(a + j * a_sr + k, lo, hi);
      OLK_UNROLL
      for (int m = 0; m < MB; ++m) {
        acc[m * JB + j] += xl[m] * lo;
        acc[m * JB + j] += xh[m] * hi;
      }
    }
  }
  const vf8 sums = lane_sums8(acc);
  float t[8];
  std::memcpy(t, &sums, 32);
  if (kb < K) {
    OLK_UNROLL
    for (int m = 0; m < MB; ++m)
      OLK_UNROLL
      for (int j = 0; j < JB; ++j)
        for (int64_t k = kb; k < K; ++k) t[m * JB + j] += xf[m][k] * wval(a[j * a_sr + k]);
  }
  OLK_UNROLL
  for (int i = 0; i < MB * JB; ++i) out[i] = t[i];
}

// h[m * hs + j] = x_m . a_j for j < rank, the MB (at most 4) fp32 rows xf in pair order.
template <typename TW, int MB>
static void shrink_pairs(const float* const* xf, const TW* a, int64_t a_sr, int64_t K, int rank, float* h,
                         int64_t hs, Prefetcher& pf) {
  constexpr int JB = 8 / (MB == 3 ? 4 : MB);
  float out[8];
  const int64_t step = lines_of<TW>(K);
  int j = 0;
  for (; j + JB <= rank; j += JB) {
    dot_pairs<TW, MB, JB>(xf, a + j * a_sr, a_sr, K, out);
    OLK_UNROLL
    for (int m = 0; m < MB; ++m)
      OLK_UNROLL
      for (int jj = 0; jj < JB; ++jj) h[m * hs + j + jj] = out[m * JB + jj];
    pf.step(JB * step);
  }
  for (; j < rank; ++j) {
    dot_pairs<TW, MB, 1>(xf, a + j * a_sr, a_sr, K, out);
    OLK_UNROLL
    for (int m = 0; m < MB; ++m) h[m * hs + j] = out[m];
    pf.step(step);
  }
}

template <typename TW>
static void shrink_pair_rows(const float* const* xf, int n, const TW* a, int64_t a_sr, int64_t K, int rank,
                             float* h, int64_t hs, Prefetcher& pf) {
  switch (n) {
    case 4: shrink_pairs<TW, 4>(xf, a, a_sr, K, rank, h, hs, pf); break;
    case 3: shrink_pairs<TW, 3>(xf, a, a_sr, K, rank, h, hs, pf); break;
    case 2: shrink_pairs<TW, 2>(xf, a, a_sr, K, rank, h, hs, pf); break;
    default: shrink_pairs<TW, 1>(xf, a, a_sr, K, rank, h, hs, pf); break;
  }
}

#endif

// --------------------------------------------------------------------------------- a unit

static inline float load_h(const Args& p, int64_t off) {
  switch (p.h_dtype) {
    case kF16: return to_f32(static_cast<const f16*>(p.h)[off]);
    case kBF16: return to_f32(static_cast<const bf16*>(p.h)[off]);
    default: return static_cast<const float*>(p.h)[off];
  }
}

// h[m * hs + j] *= the weights' scales of rank j for the unit's n rows (fp8 storage: a_sc for a
// shrink, b_sc for an expand, their product for an add; nothing for a side without scales), each
// side's scale times w_unit (2^8 for e4m3, read as value * 2^-8: exact). So a scale costs a
// multiply per rank and row, never one per weight.
template <typename TW>
static inline void scale_h(const Args& p, const Unit& u, int n, float* h, int64_t hs) {
  const int64_t i = u.slice;
  const float* as = p.op != kExpand && p.a_sc != nullptr ? p.a_sc[i] : nullptr;
  const float* bs = p.op != kShrink && p.b_sc != nullptr ? p.b_sc[i] : nullptr;
  if (as == nullptr && bs == nullptr) return;
  const float unit = w_unit(static_cast<const TW*>(nullptr));
  const float unit2 = as != nullptr && bs != nullptr ? unit * unit : unit;
  int64_t sa = 0, sb = 0;
  if (as != nullptr) { as += u.slot * p.a_sc_ss[i] + u.roff * p.a_sc_sr[i]; sa = p.a_sc_sr[i]; }
  if (bs != nullptr) { bs += u.slot * p.b_sc_ss[i] + u.roff * p.b_sc_sr[i]; sb = p.b_sc_sr[i]; }
  for (int j = 0; j < u.rank; ++j) {
    const float f = (as != nullptr ? as[j * sa] : 1.f) * (bs != nullptr ? bs[j * sb] : 1.f) * unit2;
    for (int m = 0; m < n; ++m) h[m * hs + j] *= f;
  }
}

// T: x's and y's dtype (the activations); TW: the weights' (their storage dtype: T, a 16-bit one
// for fp32 activations, fp16 for bf16 ones, or fp8 e4m3 for any, with scales). Weights are
// converted to fp32 where they are loaded.
template <typename T, typename TW>
static void run_unit(const Args& p, const Unit& u, const Scratch& s, Prefetcher& pf) {
  const int64_t i = u.slice, hs = p.R;
  const int rank = u.rank;
  int n = 0;                                    // the unit's rows: ids inside [0, T) only
  for (int64_t m = 0; m < imin(u.len, kUnitRows); ++m) {
    const int64_t r = p.sorted[u.start + m];
    if (r >= 0 && r < p.T) s.rows[n++] = r;
  }
  if (n == 0) return;
  float* h = s.h;                               // [n, R]: this unit's h rows
  if (p.op == kExpand) {
    for (int m = 0; m < n; ++m)
      for (int j = 0; j < rank; ++j) h[m * hs + j] = load_h(p, i * p.sh_n + s.rows[m] * p.sh_t + j * p.sh_r);
  } else {
    const TW* a_slot = static_cast<const TW*>(p.a[i]) + u.slot * p.a_ss[i] + u.roff * p.a_sr[i];
    const T* x = static_cast<const T*>(p.x);
    if (n < kPanelRows && p.a_sk[i] == 1 && p.sx_k == 1) {
      // Few rows (decode), A and x contiguous along K: dot products straight from A's rows.
      const T* xr[kBlockRows];
      for (int m0 = 0; m0 < n; m0 += kBlockRows) {
        const int mb = static_cast<int>(imin(kBlockRows, n - m0));
        for (int m = 0; m < mb; ++m) xr[m] = x + s.rows[m0 + m] * p.sx_t;
#if defined(OLK_VEC)
        const float* xf[kBlockRows];
        pair_rows<T, TW>(xr, mb, p.K, s.xrows, xf);
        shrink_pair_rows<TW>(xf, mb, a_slot, p.a_sr[i], p.K, rank, h + m0 * hs, hs, pf);
#else
        shrink_rows<T, TW>(xr, mb, a_slot, p.a_sr[i], p.K, rank, h + m0 * hs, hs, pf);
#endif
      }
    } else {
      // Many rows, or A / x strided along K: A^T as an fp32 [K, rp] panel (8 x 8 register
      // transposes for the usual A, a plain conversion for a K-major one), then the expand's
      // register-blocked chunks with the roles swapped (x rows as coefficients, ranks as output
      // columns): no horizontal sums, each x element broadcast once per chunk of ranks. The
      // panel's rows are padded with zeros to whole vectors (rp columns): no scalar tails.
      const int rp = static_cast<int>((rank + kW - 1) / kW * kW);
      make_panel<TW>(a_slot, p.a_sr[i], p.a_sk[i], 0, rank, static_cast<int>(p.K), s.apanel, rp);
      if (rp > rank)
        for (int64_t k = 0; k < p.K; ++k)
          for (int j = rank; j < rp; ++j) s.apanel[k * rp + j] = 0.f;
      float* hr[kBlockRows];
      for (int m0 = 0; m0 < n; m0 += kBlockRows) {
        const int mb = static_cast<int>(imin(kBlockRows, n - m0));
        for (int m = 0; m < mb; ++m) {
          const T* src = x + s.rows[m0 + m] * p.sx_t;
          float* dst = s.xrows + m * p.K;
          if (p.sx_k == 1) {
#pragma omp simd
            for (int64_t k = 0; k < p.K; ++k) dst[k] = to_f32(src[k]);
          } else {
            for (int64_t k = 0; k < p.K; ++k) dst[k] = to_f32(src[k * p.sx_k]);
          }
          hr[m] = s.hpad + m * rp;
          for (int j = 0; j < rp; ++j) hr[m][j] = 0.f;
        }
        expand_rows<float, float>(s.apanel, rp, static_cast<int>(p.K), s.xrows, p.K, hr, mb, 0, 1, rp, 1.f, pf);
        for (int m = 0; m < mb; ++m)
          for (int j = 0; j < rank; ++j) h[(m0 + m) * hs + j] = hr[m][j];
      }
    }
  }
  scale_h<TW>(p, u, n, h, hs);
  if (p.op == kShrink) {
    float* ho = static_cast<float*>(p.h);
    for (int m = 0; m < n; ++m)
      for (int j = 0; j < rank; ++j) ho[i * p.sh_n + s.rows[m] * p.sh_t + j * p.sh_r] = h[m * hs + j];
    return;
  }
  T* y = static_cast<T*>(p.y);
  T* yr[kUnitRows];
  for (int m = 0; m < n; ++m) yr[m] = y + s.rows[m] * p.sy_t;
  const TW* b_slot = static_cast<const TW*>(p.b[i]) + u.slot * p.b_ss[i] + u.roff * p.b_sr[i];
  const float scale = p.scal[u.slot];
  const int64_t width = p.widths[i];
  const bool rank_major = p.b_sn[i] == 1;
  if (rank_major && (sizeof(TW) == 4 || n < kPanelRows)) {   // its rows are read as they are
    expand_rows<T, TW>(b_slot, p.b_sr[i], rank, h, hs, yr, n, u.col, p.sy_n, width, scale, pf);
    return;
  }
#if defined(OLK_VEC)
  if (!rank_major && p.b_sr[i] == 1 && n <= kDotRows && rank <= kMaxDotRank) {
    expand_dot_rows<T, TW>(b_slot, p.b_sn[i], rank, h, hs, yr, n, u.col, p.sy_n, width, scale, pf);
    return;
  }
#endif
  // Any other layout, or a 16-bit B for a longer run: rank-major fp32 panels of 256 columns (the
  // usual layout transposed, a rank-major one converted once instead of in every row block);
  // the same values and the same arithmetic as the rank-major path, so the same bits.
  for (int64_t n0 = 0; n0 < width; n0 += kPanelCols) {
    const int64_t nc = imin(kPanelCols, width - n0);
    make_panel<TW>(b_slot, p.b_sn[i], p.b_sr[i], n0, nc, rank, s.panel, nc);
    expand_rows<T, float>(s.panel, nc, rank, h, hs, yr, n, u.col + n0, p.sy_n, nc, scale, pf);
  }
}

template <typename T, typename TW>
static void run_claimed(const Args& p, const Unit* units, int64_t n, int64_t* next, int64_t stride, const Scratch& s) {
  // Guided claims: a thread takes a run of consecutive units, half of its share of what is left
  // (at least one), so each thread streams through adjacent slots' weights (the hardware
  // prefetchers follow) and the last claims are single units (the threads finish together). The
  // software prefetch walks the thread's next unit: the next of its run, else where the next
  // claim will probably start.
  Prefetcher pf;
  int64_t k0 = __atomic_load_n(next, __ATOMIC_RELAXED);
  while (k0 < n) {
    int64_t c = imax(1, (n - k0) / (2 * stride));
    if (stride == 1) c = n - k0;     // (one thread: the whole call in one run)
    if (!__atomic_compare_exchange_n(next, &k0, k0 + c, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) continue;
    const int64_t k1 = imin(n, k0 + c);
    for (int64_t k = k0; k < k1; ++k) {
      pf.finish();
      const int64_t g = k + 1 < k1 ? k + 1 : __atomic_load_n(next, __ATOMIC_RELAXED);
      pf.reset<TW>(p, g < n ? &units[g] : nullptr);
      run_unit<T, TW>(p, units[k], s, pf);
    }
    k0 = __atomic_load_n(next, __ATOMIC_RELAXED);
  }
}
