// CUDA-core SGMV kernel for decode-like tiles (block_m 1, 2, 4): shrink and expand FUSED in one
// launch, the rank-r intermediate kept on chip. The same template also runs shrink-only and
// expand-only (for lora_shrink / lora_expand on such tiles, and every float32 launch).
//
// Grid (G tiles, chunks, n_slices), 256 threads (8 warps). CTA (g, c, i) owns tile g of the
// batch metadata (<= block_m rows of ONE slot s, rank r = ranks[i, s]) and slice i:
//
//   shrink  warp w computes h[m, j] = x[row_m] . A_i[s, j] for j = w*JU, ... < r: its lanes
//           stride over K with 16-byte loads of A and x (fp32 FMAs), then a warp reduction.
//           Only the r rows of A that exist are read: a slot of rank r costs r, rank 0 nothing.
//           fused: h goes to shared memory h_s [BM][R] fp32 (never to global memory).
//           shrink-only: chunk c takes warps c*8.. of the rank rows, writes h to global.
//   expand  thread n (of chunk c's columns) reads row n of B_i[s] (16-byte loads over the
//           first r entries), dots it with h_s (broadcast reads) and adds scale * dot into
//           y[row_m, col_i + n] in fp32, rounded once. expand-only loads h_s from global h.
//
// Tiles with more than BM rows (float32 prefill tiles) are processed BM rows at a time.
// Rows with slot -1 are in no tile: never read, never written. Loads of rows outside [0, T) are
// masked (load_row), slots outside [0, S) are dropped (load_tile), ranks clamped to [0, R].
#pragma once

#include "openlora/common.cuh"

namespace openlora {
namespace simt {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Rank rows one warp accumulates at once (independent 16-byte loads in flight per k step).
template <int BM>
struct RankUnroll {
  static constexpr int value = BM == 1 ? 4 : 2;
};

// h[m, j] = x[rows[m]] . A[slot, j] for the rank rows j of this warp (j0 = first * JU, step
// step * JU). Writes h_s[m * R + j] when h_s is given, else global h (shrink-only).
template <typename T, int BM>
OLK_DEVICE void shrink_rows(const SgmvParams& p, const SliceArgs& sl, int slot, int rank, int gsid,
                            const int64_t (&rows)[BM], int first, int step, float* h_s) {
  using DT = DTypeTraits<T>;
  constexpr int V = DT::kVec;
  constexpr int JU = RankUnroll<BM>::value;
  const int lane = threadIdx.x & 31;
  const T* x = static_cast<const T*>(p.x);
  const T* a_slot = static_cast<const T*>(sl.a) + slot_base(p, slot, sl.a_ss, sl.a_sr);

  for (int j0 = first * JU; j0 < rank; j0 += step * JU) {
    float acc[BM][JU];
#pragma unroll
    for (int m = 0; m < BM; ++m)
#pragma unroll
      for (int u = 0; u < JU; ++u) acc[m][u] = 0.f;

    if (p.vec_k) {
#pragma unroll 2
      for (int64_t k = static_cast<int64_t>(lane) * V; k < p.K; k += 32 * V) {
        float xf[BM][V];
#pragma unroll
        for (int m = 0; m < BM; ++m) {
          if (rows[m] >= 0) {
            DT::unpack(load16(x + rows[m] * p.sx_t + k), xf[m]);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) xf[m][e] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < JU; ++u) {
          if (j0 + u < rank) {
            float af[V];
            DT::unpack(load16(a_slot + (j0 + u) * sl.a_sr + k), af);
#pragma unroll
            for (int m = 0; m < BM; ++m)
#pragma unroll
              for (int e = 0; e < V; ++e) acc[m][u] = fmaf(xf[m][e], af[e], acc[m][u]);
          }
        }
      }
    } else {
      for (int64_t k = lane; k < p.K; k += 32) {
        float xf[BM];
#pragma unroll
        for (int m = 0; m < BM; ++m) xf[m] = rows[m] >= 0 ? load_float(x + rows[m] * p.sx_t + k * p.sx_k) : 0.f;
#pragma unroll
        for (int u = 0; u < JU; ++u) {
          if (j0 + u < rank) {
            const float av = load_float(a_slot + (j0 + u) * sl.a_sr + k * sl.a_sk);
#pragma unroll
            for (int m = 0; m < BM; ++m) acc[m][u] = fmaf(xf[m], av, acc[m][u]);
          }
        }
      }
    }

#pragma unroll
    for (int m = 0; m < BM; ++m)
#pragma unroll
      for (int u = 0; u < JU; ++u) acc[m][u] = warp_sum(acc[m][u]);
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < BM; ++m) {
#pragma unroll
        for (int u = 0; u < JU; ++u) {
          if (j0 + u >= rank || rows[m] < 0) continue;
          if (h_s != nullptr) {
            h_s[m * p.R + j0 + u] = acc[m][u];
          } else {
            p.h[gsid * p.sh_n + rows[m] * p.sh_t + (j0 + u) * p.sh_r] = acc[m][u];
          }
        }
      }
    }
  }
}

// h_s[m * R + j] = h[gsid, rows[m], j] for j < rank (0 for masked rows).
template <int BM>
OLK_DEVICE void load_h(const SgmvParams& p, int rank, int gsid, const int64_t (&rows)[BM], float* h_s) {
#pragma unroll
  for (int m = 0; m < BM; ++m) {
    for (int j = threadIdx.x; j < rank; j += kThreads) {
      h_s[m * p.R + j] = rows[m] >= 0 ? p.h[gsid * p.sh_n + rows[m] * p.sh_t + j * p.sh_r] : 0.f;
    }
  }
}

// y[rows[m], col + n] += scale * sum_j h_s[m, j] * B[slot, n, j] for n in [c_lo, c_hi).
template <typename T, int BM>
OLK_DEVICE void expand_rows(const SgmvParams& p, const SliceArgs& sl, int slot, int rank,
                            const int64_t (&rows)[BM], const float* h_s, int64_t c_lo, int64_t c_hi,
                            float scale) {
  using DT = DTypeTraits<T>;
  constexpr int V = DT::kVec;
  T* y = static_cast<T*>(p.y);
  const T* b_slot = static_cast<const T*>(sl.b) + slot_base(p, slot, sl.b_ss, sl.b_sr);

  for (int64_t n = c_lo + threadIdx.x; n < c_hi; n += kThreads) {
    float acc[BM];
#pragma unroll
    for (int m = 0; m < BM; ++m) acc[m] = 0.f;
    const T* brow = b_slot + n * sl.b_sn;
    int j = 0;
    if (p.vec_r) {
#pragma unroll 2
      for (; j + V <= rank; j += V) {
        float bf[V];
        DT::unpack(load16(brow + j), bf);
#pragma unroll
        for (int e = 0; e < V; ++e)
#pragma unroll
          for (int m = 0; m < BM; ++m) acc[m] = fmaf(h_s[m * p.R + j + e], bf[e], acc[m]);
      }
    }
    for (; j < rank; ++j) {  // rank tail, or every j when 16-byte loads are not legal
      const float bv = load_float(brow + j * sl.b_sr);
#pragma unroll
      for (int m = 0; m < BM; ++m) acc[m] = fmaf(h_s[m * p.R + j], bv, acc[m]);
    }
    const int64_t col = sl.col + n;
#pragma unroll
    for (int m = 0; m < BM; ++m) {
      if (rows[m] >= 0) add_to(y + rows[m] * p.sy_t + col * p.sy_n, acc[m] * scale);
    }
  }
}

enum Mode : int { kFused = 0, kShrinkOnly = 1, kExpandOnly = 2 };

// p: see params.h. Dynamic shared memory: BM * R * 4 bytes (fused, expand-only), 0 (shrink-only).
template <typename T, int BM, int MODE>
__global__ void __launch_bounds__(kThreads, 2) sgmv_simt_kernel(const __grid_constant__ SgmvParams p) {
  extern __shared__ float h_s[];  // [BM][R] fp32
  CtaTask task;
  if (!load_task(p, blockIdx.x, blockIdx.z, task)) return;
  const Tile& t = task.t;
  const int gsid = task.gsid, rank = task.rank;
  const SliceArgs& sl = *task.sl;

  int64_t c_lo = 0, c_hi = 0;
  float scale = 1.f;
  if (MODE != kShrinkOnly) {
    c_lo = static_cast<int64_t>(blockIdx.y) * p.cols_per_chunk;
    c_hi = min(sl.n, c_lo + p.cols_per_chunk);
    if (c_lo >= c_hi) return;
    scale = p.scal[t.slot * p.s_scal];
  }
  const int warp = threadIdx.x >> 5;

  for (int64_t m0 = t.start; m0 < t.end; m0 += BM) {
    int64_t rows[BM];
#pragma unroll
    for (int m = 0; m < BM; ++m) rows[m] = m0 + m < t.end ? load_row(p, m0 + m) : -1;

    if (MODE == kShrinkOnly) {
      shrink_rows<T, BM>(p, sl, t.slot, rank, gsid, rows, blockIdx.y * kWarps + warp, gridDim.y * kWarps, nullptr);
      continue;
    }
    if (MODE == kFused) {
      shrink_rows<T, BM>(p, sl, t.slot, rank, gsid, rows, warp, kWarps, h_s);
    } else {
      load_h<BM>(p, rank, gsid, rows, h_s);
    }
    __syncthreads();
    expand_rows<T, BM>(p, sl, t.slot, rank, rows, h_s, c_lo, c_hi, scale);
    __syncthreads();  // h_s is rewritten by the next row group
  }
}

}  // namespace simt
}  // namespace openlora
