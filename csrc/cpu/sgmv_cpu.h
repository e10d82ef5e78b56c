// Native CPU multi-LoRA kernels (backend "cpu"): what the binding and the kernels share.
//
// Layout of the sources (each a small translation unit, so that a build compiles them in
// parallel and none is slow; docs/kernels.md, "The native CPU kernel"):
//   sgmv_cpu.h          this file: number formats, the call's arguments (Args), its work units
//   sgmv_cpu_kernels.h  the kernels, written once, ISA-neutral
//   sgmv_cpu_isa.inc    one instruction set x one dtype of them (a `#pragma GCC target` region)
//   kernels_<isa>_<dtype>.cpp  x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the target's
//                       baseline (SSE2 on x86-64, NEON on arm64), each for f32, f16 and bf16
//                       (except f16 on v4: those CPUs run the v3 fp16 kernels); the v3 and
//                       baseline 16-bit files also hold the fp32-activation kernels for weights
//                       stored in their dtype (adapter_dtype: run_f32_wbf16 / run_f32_wf16;
//                       x86-64-v4 CPUs run v3's); the v3 and baseline fp16 files also the
//                       bf16-activation kernels for fp16 weights (run_bf16_wf16)
//   kernels_<isa>_e4m3.cpp  x86-64-v3 and baseline: the kernels for fp8 (e4m3) weights with fp32,
//                       fp16 and bf16 activations (run_<dtype>_we4m3; x86-64-v4 CPUs run v3's)
//   bindings_cpu.cpp    the Python module (plain C API, no pybind11: it compiles in about a
//                       second and a call costs less), work units, threads, ISA choice at load
//                       time, and the batch-metadata build
//
// Design of one call. The batch metadata groups rows by adapter slot (seg_info [2, S]: start,
// length of each slot's rows inside sorted_tokens). A call is cut into units (slice, slot, a
// run of at most kUnitRows of its rows); the threads claim runs of consecutive units (guided: half a thread's share of what is left, down to one). A unit first
// computes h = x A^T for its rows (blocks of up to 4 rows: each A row is read once per block
// and dotted with the block's x rows in one SIMD pass), then the expand y += scale * h B^T:
//   * B rank-major ([S, R, N] storage seen as an [S, N, R] view, what the adapter pool keeps):
//     the output is walked in chunks whose accumulators stay in vector registers while the
//     rank rows of B stream past (SIMD over N), then y is read and written once;
//   * the usual [S, N, R] B (vLLM's too) for a unit of at most kDotRows rows: eight columns at a
//     time, each column's products accumulated along the rank in a vector, the eight vectors
//     summed across lanes by one 8 x 8 register transpose;
//   * any other case (the usual layout for longer units, strided views, a 16-bit rank-major B
//     for units of kPanelRows rows or more): a panel of output columns of B is first written
//     to a rank-major fp32 scratch (8 x 8 register transposes for the usual layout, a plain
//     conversion for a rank-major one), then the same register-blocked chunks read it. The
//     panel is made once per unit, so rows of a long segment share it.
// The shrink of a unit of at least kPanelRows rows (or of a strided A / x) runs the same way
// with the roles swapped: A^T as an fp32 [K, r] panel, the x rows as coefficients.
// So a forward reads each active adapter's r rows of A and B once per unit, does r*(K+N)
// multiply-adds per row, and never materialises a gathered copy of the weights. All
// arithmetic is fp32; 16-bit outputs are rounded once (round to nearest even, as torch does).
// A row's result is the same bits whatever the unit cuts and the threads, and whatever the B
// layout except in units of at most kDotRows rows of the usual layout (lanes summed in another
// order).
// Rows with slot -1 are in no segment: never read or written. Whatever the metadata holds, no
// access is out of bounds (docs/kernels.md): slots outside [0, S) cannot occur (the loop is over
// [0, S); token_slots and tile_info are not read), each segment is clipped to [0, T) of
// sorted_tokens, row ids outside [0, T) are skipped, ranks clamp to [0, R]. Corrupt metadata
// that lists a row in two segments may give it wrong values (two units, maybe two threads,
// update it), never an access outside x, y, h or the weights.
#pragma once

#include <cstdint>
#include <cstring>

namespace openlora {
namespace cpu {

enum DType : int { kF16 = 0, kBF16 = 1, kF32 = 2,    // same codes as the CUDA binding
                   kE4M3 = 3 };                       // (weights only: fp8 storage with scales)
enum Op : int { kAdd = 0, kShrink = 1, kExpand = 2 };
constexpr int kBlockRows = 4;      // rows sharing one pass over the weights
constexpr int64_t kUnitRows = 32;  // rows of one work unit (a multiple of kBlockRows)
constexpr int64_t kPanelCols = 256;  // output columns of one B panel (a multiple of 8)
constexpr int kDotRows = 3;          // units of at most this many rows read the usual [N, R] B directly
constexpr int kMaxDotRank = 512;     // (when the rank is at most this)
constexpr int kPanelRows = 8;        // units of at least this many rows shrink through an A^T panel
                                     // (so do all units when A or x is strided along K)

struct f16 { uint16_t bits; };
struct bf16 { uint16_t bits; };
struct e4m3 { uint8_t bits; };   // fp8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no inf

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

// fp8 e4m3fn -> float, exact (every e4m3 value is a float; S.1111.111 is NaN, as in torch):
// the exponent rebiased by 120, subnormals (exponent 0) renormalised by a subtraction of 2^-6.
inline float to_f32(e4m3 v) {
  const uint32_t mag = v.bits & 0x7fu;
  uint32_t o = (mag << 20) + (120u << 23);
  if (mag < 8u) o = f32_bits(bits_f32(o + (1u << 23)) - bits_f32(121u << 23));
  if (mag == 0x7fu) o = 0x7fc00000u;
  return bits_f32(o | (static_cast<uint32_t>(v.bits & 0x80u) << 24));
}

template <typename T> inline T from_f32(float f);
template <> inline float from_f32<float>(float f) { return f; }
template <> inline f16 from_f32<f16>(float f) { return to_f16(f); }
template <> inline bf16 from_f32<bf16>(float f) { return to_bf16(f); }

// Everything one call needs (pointers are raw addresses of tensors; strides in elements). The
// per-slice arrays are owned by the caller (bindings_cpu.cpp's Plan): a call copies this struct
// without allocating. Each slice has its own strides, so per-slice buffers of any layout (the
// pool's rank-major views of unequal widths, vLLM's per-slice stacks) are used as they are.
struct Args {
  int op = kAdd;
  int64_t T = 0, K = 0, R = 0, S = 0;
  // x and y have the call's dtype; a and b that of the weights (the same, a 16-bit storage dtype
  // with fp32 x / y, fp16 with bf16 x / y, or fp8 e4m3 with any: the kernel is picked by the
  // pair, bindings_cpu.cpp)
  const void* x = nullptr; int64_t sx_t = 0, sx_k = 1;
  void* y = nullptr; int64_t sy_t = 0, sy_n = 1;
  void* h = nullptr; int h_dtype = kF32; int64_t sh_n = 0, sh_t = 0, sh_r = 1;   // [n, T, R]
  const void* const* a = nullptr; int64_t n_a = 0;                      // n_a slices [S, R, K]
  const int64_t* a_ss = nullptr; const int64_t* a_sr = nullptr; const int64_t* a_sk = nullptr;
  const void* const* b = nullptr; const int64_t* widths = nullptr; int64_t n_b = 0;  // n_b slices [S, N_i, R]
  const int64_t* b_ss = nullptr; const int64_t* b_sn = nullptr; const int64_t* b_sr = nullptr;
  const float* scal = nullptr;
  const void* ranks = nullptr; bool ranks64 = false; int64_t s_rn = 0, s_rs = 0;
  // Packed addressing (optional): slot s's rank rows start at row offs[s] of one buffer of `rows`
  // rows per slice (the slot strides are then 0). Offsets are clamped to [0, rows] and ranks to
  // rows - offset, so no offset makes a read out of bounds.
  const void* offs = nullptr; bool offs64 = false; int64_t rows = 0;
  // Weight scales per rank row (optional; fp8 storage requires them), float32, one pointer and two
  // strides (slot, rank) per slice: a_sc for lora_a (the shrink's h_j *= a_sc(s, j)), b_sc for
  // lora_b (the expand reads b_sc(s, j) * h_j). Addressed like the weights' rank rows: slot s,
  // rank j at slot * ss + (roff + j) * sr (packed: a slot stride of 0 and the unit's row offset).
  const float* const* a_sc = nullptr; const int64_t* a_sc_ss = nullptr; const int64_t* a_sc_sr = nullptr;
  const float* const* b_sc = nullptr; const int64_t* b_sc_ss = nullptr; const int64_t* b_sc_sr = nullptr;
  const int32_t* sorted = nullptr;      // [T]
  const int32_t* seg = nullptr;         // [2, S]: start, length
};

// A run of one slot's rows (positions [start, start + len) of sorted_tokens) for one slice.
struct Unit {
  int64_t slice, slot, col, start, len;
  int rank;
  int64_t roff;   // first row of the slot in a packed buffer (0 when not packed)
};

// Per-thread scratch the binding allocates (sizes: scratch_floats()); the kernels allocate nothing.
struct Scratch {
  int64_t* rows = nullptr;   // [kUnitRows] row ids of the unit
  float* h = nullptr;        // [kUnitRows, R] the unit's h
  float* panel = nullptr;    // [R, kPanelCols] B panel (rank-major fp32)
  float* apanel = nullptr;   // [K, Rp] A^T as fp32 (shrink / add only)
  float* xrows = nullptr;    // [kBlockRows, K] x rows as fp32 (same)
  float* hpad = nullptr;     // [kBlockRows, Rp] a block's h from the A^T panel (same)
};

inline int64_t padded_rank(int64_t R) { return (R + 15) / 16 * 16; }   // Rp: whole vectors of any ISA

inline bool a_needs_panel(const Args& p) {   // (any shrink of a unit of kPanelRows rows does)
  return p.op != kExpand;
}

// (rows, floats) of one thread's scratch for a call.
inline void scratch_size(const Args& p, int64_t* n_rows, int64_t* n_floats) {
  const int64_t R = p.R > 0 ? p.R : 1;
  *n_rows = kUnitRows;
  int64_t f = kUnitRows * R + R * kPanelCols + 16;
  if (a_needs_panel(p)) f += padded_rank(R) * p.K + kBlockRows * p.K + kBlockRows * padded_rank(R) + 16;
  *n_floats = f;
}

inline Scratch scratch_at(const Args& p, int64_t* rows, float* f) {
  const int64_t R = p.R > 0 ? p.R : 1;
  Scratch s;
  s.rows = rows;
  s.h = f;
  s.panel = f + kUnitRows * R;
  if (a_needs_panel(p)) {
    s.apanel = s.panel + R * kPanelCols;
    s.xrows = s.apanel + padded_rank(R) * p.K;
    s.hpad = s.xrows + kBlockRows * p.K;
  }
  return s;
}

// The kernels of one instruction set and dtype: claim units from `next` until none is left.
// `stride`: how many threads claim in turn (run_claimed sizes the runs by it).
using RunFn = void (*)(const Args& p, const Unit* units, int64_t n, int64_t* next, int64_t stride, const Scratch& s);
using dtype_f16 = f16;
using dtype_bf16 = bf16;
using dtype_f32 = float;
using dtype_e4m3 = e4m3;

// x86-64-v4 / v3 kernels are built with GCC 11+ on x86-64 (#pragma GCC target("arch=...")); with
// another compiler or target their entry points are stubs and only the baseline runs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define OLK_X86_LEVELS 1
#endif

#define OLK_DECLARE_ISA(ns)                                                                          \
  namespace ns {                                                                                     \
  void run_f16(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);               \
  void run_bf16(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);              \
  void run_f32(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);               \
  void run_f32_wf16(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);          \
  void run_f32_wbf16(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);         \
  void run_bf16_wf16(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);         \
  void run_f16_we4m3(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);         \
  void run_bf16_we4m3(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);        \
  void run_f32_we4m3(const Args&, const Unit*, int64_t, int64_t*, int64_t, const Scratch&);         \
  }
OLK_DECLARE_ISA(v4)      // kernels_v4_*.cpp (no fp16, no mixed pairs: x86-64-v4 CPUs run v3's)
OLK_DECLARE_ISA(v3)      // kernels_v3_*.cpp
OLK_DECLARE_ISA(base)    // kernels_base_*.cpp
#undef OLK_DECLARE_ISA

}  // namespace cpu
}  // namespace openlora
