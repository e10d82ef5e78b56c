// Kernel parameters of the SGMV kernels, shared by the host launchers and the device code.
//
// Plain C++ (no CUDA headers): bindings.cpp is compiled by the host compiler and fills these.
// All sizes and strides are in elements and int64, so no offset product can overflow int32.
// Everything is passed to the kernels BY VALUE (as a __grid_constant__ parameter): there are no
// device pointer tables, so the launch needs no host-to-device copy and is CUDA-graph capturable.
#pragma once

#include <cstdint>

namespace openlora {

// Slices (fused QKV, gate_up) handled by one launch; more are launched in groups of this size.
constexpr int kMaxSlices = 8;
// The CUDA-core kernels keep a [rows, R] fp32 intermediate in shared memory (<= 32 KiB).
constexpr int64_t kMaxSimtRank = 2048;

enum class Op : int { kFused = 0, kShrink = 1, kExpand = 2 };
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// One output slice i: lora_a[i] [S, R, K] and lora_b[i] [S, N_i, R], x's dtype.
struct SliceArgs {
  const void* a;                  // [S, R, K]   (may be null for Op::kExpand)
  const void* b;                  // [S, N_i, R] (may be null for Op::kShrink)
  int64_t a_ss, a_sr, a_sk;       // strides of A over (slot, rank, k)
  int64_t b_ss, b_sn, b_sr;       // strides of B over (slot, n, rank)
  int64_t n;                      // N_i: output columns of this slice
  int64_t col;                    // first column of this slice in y
};

struct SgmvParams {
  const void* x;                  // [T, K] fp16/bf16/fp32
  int64_t sx_t, sx_k;
  void* y;                        // [T, N] x's dtype, updated in place
  int64_t sy_t, sy_n;
  float* h;                       // [n_slices_total, T, R] fp32: shrink writes, expand reads
  int64_t sh_n, sh_t, sh_r;
  const float* scal;              // [S] fp32
  int64_t s_scal;
  const void* ranks;              // [n_slices_total, S] or [S] int32/int64 (null: R everywhere)
  int64_t sr_n, sr_s;             // sr_n = 0 for per-slot ranks
  int ranks_i64;                  // 1: ranks are int64
  int has_ranks;
  // Packed form (ops/packed.py): slot s's rank rows start at row offs[s] of each slice's buffer
  // (slot strides 0); offsets clamped to [0, rows], ranks to rows - offset (load_rank).
  const void* offs;               // [S] int32/int64, or null
  int offs_i64;
  int has_offs;
  int64_t rows;
  const int32_t* sorted_tokens;   // [T] rows sorted by slot
  const int32_t* tile_info;       // [3, G] (slot or -1, start, end) per tile
  int64_t G, T, K, R, S;
  int n_slices;                   // slices in this launch (<= kMaxSlices)
  int slice_base;                 // global index of this launch's slice 0 (ranks, h)
  // Filled by the launcher's plan (see launchers.cu), not by the caller:
  int vec_k;                      // 16-byte loads along K are legal for x and every A
  int vec_r;                      // 16-byte loads along R are legal for every B
  int vec_n;                      // 16-byte loads along N are legal for every B (column-contiguous:
                                  // the pool's rank-major [S, R, N] storage seen as [S, N, R])
  int vec_y;                      // y's columns contiguous, rows, slices' first columns and y even:
                                  // two adjacent columns are one 4-byte read-modify-write (16-bit y)
  int split_k;                    // tensor-core shrink: CTAs sharing one tile's K (fp32 atomics)
  int64_t k_per_split;            // K elements per split (multiple of the K tile)
  int64_t cols_per_chunk;         // CUDA-core fused/expand: output columns per CTA
  int64_t tile_rows;              // the metadata's block_m: no tile covers more sorted positions
  SliceArgs slices[kMaxSlices];
};

}  // namespace openlora
