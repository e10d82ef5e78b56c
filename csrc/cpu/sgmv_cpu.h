// Native CPU multi-LoRA kernels (backend "cpu"): shrink, expand, and both fused in one call.
//
// Design. The batch metadata groups rows by adapter slot (seg_info [2, S]: start, length of each
// slot's rows inside sorted_tokens). One call walks the slots that have rows; for each slot it
// processes its rows in blocks of up to 4 and, per block,
//   shrink  h[m, j] = x[row_m] . A[slot, j]      for j < rank: each A row is read ONCE per block
//           and dotted with the block's x rows in one pass (4 running sums, SIMD over K);
//   expand  y[row_m, col + n] += scale * sum_j h[m, j] * B[slot, n, j]: with B stored rank-major
//           ([S, R, N] storage seen as an [S, N, R] view, what the adapter pool keeps) the output
//           is walked in chunks of 64 columns whose accumulators stay in registers while the
//           rank rows of B stream past (SIMD over N), then y is updated once; with the usual
//           [S, N, R] layout, a short dot over the rank per output column.
// So a forward reads each active adapter's r rows of A and B once per block of 4 rows, does
// r*(K+N) multiply-adds per row, and never materialises a gathered copy of the weights. All
// arithmetic is fp32; 16-bit outputs are rounded once (round to nearest even, as torch does).
// Rows with slot -1 are in no segment: never read or written. Whatever the metadata holds, no
// access is out of bounds (docs/kernels.md): slots outside [0, S) cannot occur (the loop is over
// [0, S); token_slots and tile_info are not read), each segment is clipped to [0, T) of
// sorted_tokens, row ids outside [0, T) are skipped, ranks clamp to [0, R]. Corrupt metadata
// that lists a row in two segments may give it wrong values (two units, maybe two threads,
// update it), never an access outside x, y, h or the weights.
//
// Threads. A call's units (slice, slot with rows) are listed in memory order and claimed one at
// a time by the threads of the call (bindings_cpu.cpp runs them in PyTorch's own OpenMP team;
// small calls stay on the calling thread). A unit is computed whole by one thread, so the result
// is the same bits for any number of threads and any claiming order. A thread's next unit's
// weights are prefetched a few cache lines per step of the current unit's arithmetic
// (Prefetcher), so memory and arithmetic overlap. Prefill-like batches are routed to PyTorch's threaded GEMMs by
// the Python side (ops/cpu_ext.py).
#pragma once

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <vector>


namespace openlora {
namespace cpu {

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2 };  // same codes as the CUDA binding
enum Op : int { kAdd = 0, kShrink = 1, kExpand = 2 };
constexpr int kBlockRows = 4;

struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };

inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// IEEE half <-> float, exact in the widening direction, round-to-nearest-even when narrowing.
inline float to_f32(f16 h) {
  const uint32_t exp_mask = 0x7c00u << 13;
  uint32_t o = static_cast<uint32_t>(h.bits & 0x7fffu) << 13;
  const uint32_t e = o & exp_mask;
  o += (127u - 15u) << 23;
  if (e == exp_mask) {
    o += (128u - 16u) << 23;                                   // inf / nan
  } else if (e == 0) {
    o += 1u << 23;                                             // zero / subnormal: renormalise
    o = f32_bits(bits_f32(o) - bits_f32(113u << 23));
  }
  return bits_f32(o | (static_cast<uint32_t>(h.bits & 0x8000u) << 16));
}

inline f16 to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint16_t o;
  if (x >= (127u + 16u) << 23) {                                // overflow, inf, nan
    o = x > (255u << 23) ? 0x7e00 : 0x7c00;
  } else if (x < (113u << 23)) {                                // half subnormal or zero:
    const float magic = bits_f32(((127u - 15u) + (23u - 10u) + 1u) << 23);
    o = static_cast<uint16_t>(f32_bits(bits_f32(x) + magic) - f32_bits(magic));  // FPU rounds (RNE)
  } else {
    const uint32_t odd = (x >> 13) & 1u;
    x += ((15u - 127u) << 23) + 0xfffu + odd;                   // rebias, round half to even
    o = static_cast<uint16_t>(x >> 13);
  }
  return f16{static_cast<uint16_t>(o | (sign >> 16))};
}

inline float to_f32(bf16 b) { return bits_f32(static_cast<uint32_t>(b.bits) << 16); }

inline bf16 to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet nan
  return bf16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline float to_f32(float f) { return f; }

template <typename T> inline T from_f32(float f);
template <> inline float from_f32<float>(float f) { return f; }
template <> inline f16 from_f32<f16>(float f) { return to_f16(f); }
template <> inline bf16 from_f32<bf16>(float f) { return to_bf16(f); }

// Everything one call needs (pointers are raw addresses of tensors; strides in elements). The
// per-slice arrays (a, b, widths, b_ss) are owned by the caller (bindings_cpu.cpp's Plan): a
// call copies this struct without allocating.
struct Args {
  int op = kAdd;
  int64_t T = 0, K = 0, R = 0, S = 0;
  const void* x = nullptr; int64_t sx_t = 0, sx_k = 1;
  void* y = nullptr; int64_t sy_t = 0, sy_n = 1;
  void* h = nullptr; int h_dtype = kF32; int64_t sh_n = 0, sh_t = 0, sh_r = 1;   // [n, T, R]
  const void* const* a = nullptr; int64_t n_a = 0; int64_t a_ss = 0, a_sr = 0, a_sk = 1;   // n_a slices [S, R, K]
  const void* const* b = nullptr; const int64_t* widths = nullptr; const int64_t* b_ss = nullptr;
  int64_t n_b = 0; int64_t b_sn = 0, b_sr = 0;                                            // n_b slices [S, N_i, R]
  const float* scal = nullptr;
  const void* ranks = nullptr; bool ranks64 = false; int64_t s_rn = 0, s_rs = 0;
  const int32_t* sorted = nullptr;      // [T]
  const int32_t* seg = nullptr;         // [2, S]: start, length
};

inline int slot_rank(const Args& p, int64_t slice, int64_t s) {
  int64_t r = p.R;
  if (p.ranks != nullptr) {
    const int64_t off = slice * p.s_rn + s * p.s_rs;
    r = p.ranks64 ? static_cast<const int64_t*>(p.ranks)[off] : static_cast<const int32_t*>(p.ranks)[off];
  }
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(r, 0), p.R));
}

inline float load_h(const Args& p, int64_t off) {
  switch (p.h_dtype) {
    case kF16: return to_f32(static_cast<const f16*>(p.h)[off]);
    case kBF16: return to_f32(static_cast<const bf16*>(p.h)[off]);
    default: return static_cast<const float*>(p.h)[off];
  }
}

// One slot's rows of one slice.
struct Unit {
  int64_t slice, slot, col, start, len;
  int rank;
};

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
    if (q.op != kExpand && q.a_sk == 1) {
      p = static_cast<const char*>(q.a[u->slice]) + u->slot * q.a_ss * sz;
      e = p + ((u->rank - 1) * q.a_sr + q.K) * sz;
    }
    if (q.op != kShrink && q.b_sn == 1) {
      p2 = static_cast<const char*>(q.b[u->slice]) + u->slot * q.b_ss[u->slice] * sz;
      e2 = p2 + ((u->rank - 1) * q.b_sr + q.widths[u->slice]) * sz;
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

template <typename T>
constexpr int64_t lines_of(int64_t elems) { return (elems * static_cast<int64_t>(sizeof(T)) + 63) / 64; }

// out[m * JB + j] = sum_k x_m[k] * a_j[k] for the MB x rows of a block and JB rows of A (row j at
// a + j * a_sr), in one pass over k (contiguous case). MB * JB independent sums (vector
// accumulators), so the loop runs at the FMA rate instead of one FMA latency per vector.
template <typename T, int MB, int JB>
inline void dot_block(const T* const* xr, const T* a, int64_t a_sr, int64_t K, float* out) {
  float s00 = 0.f, s01 = 0.f, s02 = 0.f, s03 = 0.f, s10 = 0.f, s11 = 0.f, s12 = 0.f, s13 = 0.f;
  float s20 = 0.f, s21 = 0.f, s22 = 0.f, s23 = 0.f, s30 = 0.f, s31 = 0.f, s32 = 0.f, s33 = 0.f;
  const T* x0 = xr[0];
  const T* x1 = xr[MB > 1 ? 1 : 0];
  const T* x2 = xr[MB > 2 ? 2 : 0];
  const T* x3 = xr[MB > 3 ? 3 : 0];
  const T* a0 = a;
  const T* a1 = a + (JB > 1 ? a_sr : 0);
  const T* a2 = a + (JB > 2 ? 2 * a_sr : 0);
  const T* a3 = a + (JB > 3 ? 3 * a_sr : 0);
#pragma omp simd reduction(+ : s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)
  for (int64_t k = 0; k < K; ++k) {
    const float v0 = to_f32(a0[k]);
    const float v1 = JB > 1 ? to_f32(a1[k]) : 0.f;
    const float v2 = JB > 2 ? to_f32(a2[k]) : 0.f;
    const float v3 = JB > 3 ? to_f32(a3[k]) : 0.f;
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
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < JB; ++j) out[m * JB + j] = sums[m][j];
}

// Columns [n0, n0 + NC) of y[rows[m]] += scale * sum_j c[m][j] * b[j][n] for rank-major B (row j
// of b at b + j * b_sr, contiguous along n). The NC x MB accumulators stay in registers across
// the rank loop (NC is a compile-time constant for full chunks), and y is read and written once.
template <typename T, int MB, int NC>
inline void expand_chunk(const T* b, int64_t b_sr, int rank, const float* h_blk, int64_t R, T* const* yr,
                         float scale, Prefetcher& pf) {
  float acc[MB][NC];  // full chunk: a constant-size block the compiler keeps in vector registers
  for (int m = 0; m < MB; ++m)
#pragma omp simd
    for (int n = 0; n < NC; ++n) acc[m][n] = 0.f;
  for (int j = 0; j < rank; ++j) {
    const T* brow = b + j * b_sr;
    float c[MB];
    for (int m = 0; m < MB; ++m) c[m] = h_blk[m * R + j];
#pragma omp simd
    for (int n = 0; n < NC; ++n) {
      const float bv = to_f32(brow[n]);
      for (int m = 0; m < MB; ++m) acc[m][n] += c[m] * bv;
    }
    pf.step(lines_of<T>(NC));
  }
  for (int m = 0; m < MB; ++m) {
    T* y = yr[m];
#pragma omp simd
    for (int n = 0; n < NC; ++n) y[n] = from_f32<T>(to_f32(y[n]) + scale * acc[m][n]);
  }
}

// The last, partial chunk (nc < NC columns).
template <typename T, int MB, int NC>
inline void expand_tail(const T* b, int64_t b_sr, int rank, const float* h_blk, int64_t R, int64_t nc,
                        T* const* yr, float scale, Prefetcher& pf) {
  float acc[MB][NC] = {};
  for (int j = 0; j < rank; ++j) {
    const T* brow = b + j * b_sr;
    for (int m = 0; m < MB; ++m) {
      const float c = h_blk[m * R + j];
#pragma omp simd
      for (int64_t n = 0; n < nc; ++n) acc[m][n] += c * to_f32(brow[n]);
    }
    pf.step(lines_of<T>(nc));
  }
  for (int m = 0; m < MB; ++m) {
    T* y = yr[m];
#pragma omp simd
    for (int64_t n = 0; n < nc; ++n) y[n] = from_f32<T>(to_f32(y[n]) + scale * acc[m][n]);
  }
}

// h_blk[m * R + j] = x[rows[m]] . A[slot, j], j < rank.
template <typename T, int MB>
void shrink_block(const Args& p, const T* a_slot, int rank, const int64_t* rows, float* h_blk, Prefetcher& pf) {
  const T* x = static_cast<const T*>(p.x);
  const T* xr[kBlockRows];
  for (int m = 0; m < MB; ++m) xr[m] = x + rows[m] * p.sx_t;
  if (p.sx_k == 1 && p.a_sk == 1) {
    float out[kBlockRows * 4];
    const int64_t step = lines_of<T>(p.K);
    int j = 0;
    for (; j + 4 <= rank; j += 4) {
      dot_block<T, MB, 4>(xr, a_slot + j * p.a_sr, p.a_sr, p.K, out);
      for (int m = 0; m < MB; ++m)
        for (int jj = 0; jj < 4; ++jj) h_blk[m * p.R + j + jj] = out[m * 4 + jj];
      pf.step(4 * step);
    }
    for (; j < rank; ++j) {
      dot_block<T, MB, 1>(xr, a_slot + j * p.a_sr, p.a_sr, p.K, out);
      for (int m = 0; m < MB; ++m) h_blk[m * p.R + j] = out[m];
      pf.step(step);
    }
    return;
  }
  for (int j = 0; j < rank; ++j) {
    const T* arow = a_slot + j * p.a_sr;
    for (int m = 0; m < MB; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < p.K; ++k) s += to_f32(xr[m][k * p.sx_k]) * to_f32(arow[k * p.a_sk]);
      h_blk[m * p.R + j] = s;
    }
  }
}

// y[rows[m], col + n] += scale * sum_j h_blk[m * R + j] * B[slot, n, j], n < width.
template <typename T, int MB>
void expand_block(const Args& p, const T* b_slot, int64_t width, int64_t col, int rank, float scale,
                  const int64_t* rows, const float* h_blk, Prefetcher& pf) {
  T* y = static_cast<T*>(p.y);
  if (p.b_sn == 1 && p.sy_n == 1) {  // rank-major storage, contiguous y rows: register-blocked chunks
    // chunks of 64 columns, then of 16 (e.g. 688 = 10 x 64 + 3 x 16), then one partial chunk
    constexpr int NC = 64, NC_SMALL = 16;
    T* yr[kBlockRows];
    for (int64_t n0 = 0; n0 < width;) {
      for (int m = 0; m < MB; ++m) yr[m] = y + rows[m] * p.sy_t + col + n0;
      if (width - n0 >= NC) {
        expand_chunk<T, MB, NC>(b_slot + n0, p.b_sr, rank, h_blk, p.R, yr, scale, pf);
        n0 += NC;
      } else if (width - n0 >= NC_SMALL) {
        expand_chunk<T, MB, NC_SMALL>(b_slot + n0, p.b_sr, rank, h_blk, p.R, yr, scale, pf);
        n0 += NC_SMALL;
      } else {
        expand_tail<T, MB, NC_SMALL>(b_slot + n0, p.b_sr, rank, h_blk, p.R, width - n0, yr, scale, pf);
        n0 = width;
      }
    }
    return;
  }
  for (int64_t n = 0; n < width; ++n) {  // [S, N, R] layout (or any strides): a dot per column
    const T* brow = b_slot + n * p.b_sn;
    for (int m = 0; m < MB; ++m) {
      const float* hm = h_blk + m * p.R;
      float s = 0.f;
      for (int j = 0; j < rank; ++j) s += hm[j] * to_f32(brow[j * p.b_sr]);
      T* yv = y + rows[m] * p.sy_t + (col + n) * p.sy_n;
      *yv = from_f32<T>(to_f32(*yv) + scale * s);
    }
  }
}

template <typename T, int MB>
void run_block(const Args& p, int64_t slice, int64_t s, int rank, const int64_t* rows, int64_t col,
               std::vector<float>& h_blk, Prefetcher& pf) {  // h_blk: [kBlockRows, R] scratch of the calling thread
  if (p.op == kExpand) {
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < rank; ++j) h_blk[m * p.R + j] = load_h(p, slice * p.sh_n + rows[m] * p.sh_t + j * p.sh_r);
  } else {
    shrink_block<T, MB>(p, static_cast<const T*>(p.a[slice]) + s * p.a_ss, rank, rows, h_blk.data(), pf);
  }
  if (p.op == kShrink) {
    float* h = static_cast<float*>(p.h);
    for (int m = 0; m < MB; ++m)
      for (int j = 0; j < rank; ++j) h[slice * p.sh_n + rows[m] * p.sh_t + j * p.sh_r] = h_blk[m * p.R + j];
    return;
  }
  const T* b_slot = static_cast<const T*>(p.b[slice]) + s * p.b_ss[slice];
  expand_block<T, MB>(p, b_slot, p.widths[slice], col, rank, p.scal[s], rows, h_blk.data(), pf);
}

template <typename T>
void process(const Args& p, const Unit& u, std::vector<float>& h_blk, Prefetcher& pf) {
  for (int64_t m0 = 0; m0 < u.len; m0 += kBlockRows) {
    int64_t rows[kBlockRows];
    int mb = 0;
    for (int64_t m = m0; m < std::min<int64_t>(u.len, m0 + kBlockRows); ++m) {
      const int64_t r = p.sorted[u.start + m];
      if (r >= 0 && r < p.T) rows[mb++] = r;
    }
    switch (mb) {
      case 1: run_block<T, 1>(p, u.slice, u.slot, u.rank, rows, u.col, h_blk, pf); break;
      case 2: run_block<T, 2>(p, u.slice, u.slot, u.rank, rows, u.col, h_blk, pf); break;
      case 3: run_block<T, 3>(p, u.slice, u.slot, u.rank, rows, u.col, h_blk, pf); break;
      case 4: run_block<T, 4>(p, u.slice, u.slot, u.rank, rows, u.col, h_blk, pf); break;
      default: break;
    }
  }
}

// The (slice, slot) units of one call with rows and a non-zero rank, in memory order of the slots
// (into `units`, cleared first: the caller reuses one vector across calls).
inline void make_units(const Args& p, std::vector<Unit>& units) {
  const int64_t n_slices = p.op == kExpand ? p.n_b : p.n_a;
  units.clear();
  if (p.T <= 0 || p.S <= 0 || p.R <= 0) return;   // nothing to do (and the metadata may be null)
  int64_t col = 0;
  for (int64_t i = 0; i < n_slices; ++i) {
    for (int64_t s = 0; s < p.S; ++s) {
      // the segment [start, start + len) clipped to [0, T) of sorted_tokens (int64: no overflow)
      const int64_t start = std::min<int64_t>(std::max<int64_t>(p.seg[s], 0), p.T);
      const int64_t end = std::min<int64_t>(std::max<int64_t>(static_cast<int64_t>(p.seg[s]) + p.seg[p.S + s], start), p.T);
      const int64_t len = end - start;
      const int rank = slot_rank(p, i, s);
      if (len <= 0 || rank == 0) continue;
      units.push_back(Unit{i, s, col, start, len, rank});
    }
    col += p.op == kShrink ? 0 : p.widths[i];
  }
}

// Weight elements a unit reads (its rank rows of A and of B): the cost the threads share.
inline int64_t unit_cost(const Args& p, const Unit& u) {
  const int64_t n = p.op == kShrink ? 0 : p.widths[u.slice];
  const int64_t k = p.op == kExpand ? 0 : p.K;
  return static_cast<int64_t>(u.rank) * (k + n) + 64;
}

// The threads of one call (or the calling thread alone, stride 1) claim units one at a time, in
// memory order, from a shared counter: a thread that is slowed down (a busy or preempted core)
// just claims fewer, nobody waits for a fixed share. While a unit computes, its thread
// prefetches the unit `stride` claims ahead (with `stride` threads claiming in turn, usually its
// own next one; otherwise it still lands in the shared L3).
template <typename T>
void run_claimed(const Args& p, const Unit* units, int64_t n, std::atomic<int64_t>& next, int64_t stride) {
  static thread_local std::vector<float> h_blk;    // [kBlockRows, R] scratch, kept across calls
  const size_t need = static_cast<size_t>(kBlockRows) * static_cast<size_t>(std::max<int64_t>(p.R, 1));
  if (h_blk.size() < need) h_blk.resize(need);
  Prefetcher pf;
  for (int64_t k = next.fetch_add(1, std::memory_order_relaxed); k < n;
       k = next.fetch_add(1, std::memory_order_relaxed)) {
    pf.finish();
    pf.reset<T>(p, k + stride < n ? &units[k + stride] : nullptr);
    process<T>(p, units[k], h_blk, pf);
  }
}

}  // namespace cpu
}  // namespace openlora
