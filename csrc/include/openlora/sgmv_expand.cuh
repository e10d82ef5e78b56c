// Tensor-core SGMV expand for prefill-like tiles (block_m 16, 32, 64; fp16 / bf16; sm_80+):
//   y[row, col_i + n] += scale[s] * sum_{j < rank} h[i, row, j] * B_i[s, n, j]
//
// Grid (G tiles, cdiv(max N_i, 128) column tiles, n_slices), 128 threads (4 warps).
// CTA tile: BM rows x 128 output columns; the rank is the reduction axis, 64 at a time:
//   shared  hs[BM][64+8] (h rows gathered through sorted_tokens, fp32 rounded to x's dtype for
//           the tensor cores) and bs[128][64+8] (B rows n, rank entries j < rank by cp.async with
//           partial zero fill: entries at or past the slot's rank are never read).
//   warps   warp w owns 32 output columns: (BM/16) x 4 mma.m16n8k16 per k16 step of the rank;
//           k16 steps at or past the rank are skipped. fp32 accumulators in registers.
//   end     each accumulator is scaled and added into y in fp32, rounded once, masked by row
//           validity and by the slice's width. No two CTAs touch the same element: no atomics.
// Rank-0 slots exit at once. B's layout decides how bs is filled: rank-contiguous rows (the
// standard [S, N, R], vec_r) by 16-byte cp.async along the rank, as [n][rank]; column-contiguous
// rows (the pool's rank-major storage seen as [S, N, R], vec_n) by 16-byte cp.async along n, as
// [rank][n] (bts), read back through ldmatrix .trans, so neither layout takes strided 2-byte loads;
// otherwise (no 16-byte alignment) by scalar loads. With vec_y two adjacent output columns are one
// 4-byte read-modify-write of y.
#pragma once

#include "openlora/mma.cuh"

namespace openlora {
namespace mma_expand {

constexpr int kThreads = 128;
constexpr int kWarps = 4;
constexpr int BN = 128;        // output columns per CTA
constexpr int WN = BN / kWarps;  // per warp
constexpr int RK = 64;         // rank entries per step
constexpr int kLds = RK + 8;   // padded shared row, elements
constexpr int kLdsN = BN + 8;  // ... of the [rank][n] tile (vec_n)
constexpr int kBsElems = BN * kLds > RK * kLdsN ? BN * kLds : RK * kLdsN;

template <typename T, int BM>
OLK_DEVICE void load_rank_step(const SgmvParams& p, const SliceArgs& sl, const T* b_slot, const int64_t* rows_s,
                               int gsid, int rank, int64_t n0, int rk0, T* hs, T* bs) {
  using DT = DTypeTraits<T>;
  for (int v = threadIdx.x; v < BM * RK; v += kThreads) {
    const int r = v / RK, j = v % RK;
    const int64_t tr = rows_s[r];
    const float hv = (tr >= 0 && rk0 + j < rank) ? p.h[gsid * p.sh_n + tr * p.sh_t + (rk0 + j) * p.sh_r] : 0.f;
    hs[r * kLds + j] = DT::from_float(hv);
  }
  if (p.vec_n) {  // [rank][n]: rank row j's columns n0 .. n0 + 127, 8 at a time (16-byte aligned)
    constexpr int kNVecs = BN / 8;
    for (int v = threadIdx.x; v < RK * kNVecs; v += kThreads) {
      const int j = v / kNVecs, c = (v % kNVecs) * 8;
      const int64_t n = n0 + c;
      const int64_t left = sl.n - n;
      const int valid = rk0 + j < rank && left > 0 ? (left < 8 ? static_cast<int>(left) : 8) : 0;
      const T* src = valid > 0 ? b_slot + (rk0 + j) * sl.b_sr + n : b_slot;
      cp_async_16(bs + j * kLdsN + c, src, valid * static_cast<int>(sizeof(T)));
    }
    cp_async_commit();
    return;
  }
  constexpr int kVecs = RK / 8;
  for (int v = threadIdx.x; v < BN * kVecs; v += kThreads) {
    const int r = v / kVecs, c = (v % kVecs) * 8;
    const int64_t n = n0 + r;
    const int j = rk0 + c;
    const int valid = n < sl.n ? min(max(rank - j, 0), 8) : 0;  // entries of this vector below the rank
    const T* src = b_slot + (valid > 0 ? n * sl.b_sn : 0);
    T* dst = bs + r * kLds + c;
    if (p.vec_r) {
      cp_async_16(dst, valid > 0 ? src + j : b_slot, valid * static_cast<int>(sizeof(T)));
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = e < valid ? src[(j + e) * sl.b_sr] : DT::from_float(0.f);
    }
  }
  cp_async_commit();
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, 1) sgmv_expand_mma_kernel(const __grid_constant__ SgmvParams p) {
  static_assert(BM % 16 == 0 && BM <= 64, "BM must be 16, 32 or 64");
  __shared__ __align__(16) T hs[BM * kLds];
  __shared__ __align__(16) T bs[kBsElems];   // [BN][kLds], or [RK][kLdsN] with vec_n
  __shared__ int64_t rows_s[BM];
  CtaTask task;
  if (!load_task(p, blockIdx.x, blockIdx.z, task)) return;
  Tile& t = task.t;
  const int gsid = task.gsid, rank = task.rank;
  const SliceArgs& sl = *task.sl;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  if (n0 >= sl.n) return;
  t.end = min(t.end, t.start + BM);
  load_tile_rows<BM, kThreads>(p, t, rows_s);

  const T* b_slot = static_cast<const T*>(sl.b) + slot_base(p, t.slot, sl.b_ss, sl.b_sr);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const bool warp_active = n0 + warp * WN < sl.n;  // warp-uniform
  float acc[BM / 16][WN / 8][4];
#pragma unroll
  for (int mi = 0; mi < BM / 16; ++mi)
#pragma unroll
    for (int ni = 0; ni < WN / 8; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

  for (int rk0 = 0; rk0 < rank; rk0 += RK) {
    load_rank_step<T, BM>(p, sl, b_slot, rows_s, gsid, rank, n0, rk0, hs, bs);
    cp_async_wait<0>();
    __syncthreads();
    if (warp_active) {
#pragma unroll
      for (int ks = 0; ks < RK / 16; ++ks) {
        if (rk0 + ks * 16 >= rank) break;  // CTA-uniform
        uint32_t af[BM / 16][4];
#pragma unroll
        for (int mi = 0; mi < BM / 16; ++mi)
          ldmatrix_x4(af[mi], hs + (mi * 16 + a_frag_row(lane)) * kLds + ks * 16 + a_frag_col(lane));
#pragma unroll
        for (int np = 0; np < WN / 16; ++np) {
          uint32_t bf[4];
          if (p.vec_n)
            ldmatrix_x4_trans(bf, bs + (ks * 16 + bt_frag_k(lane)) * kLdsN + warp * WN + np * 16 + bt_frag_n(lane));
          else
            ldmatrix_x4(bf, bs + (warp * WN + np * 16 + b_frag_row(lane)) * kLds + ks * 16 + b_frag_col(lane));
#pragma unroll
          for (int mi = 0; mi < BM / 16; ++mi) {
            Mma16816<T>::run(acc[mi][2 * np], af[mi], bf[0], bf[1]);
            Mma16816<T>::run(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
          }
        }
      }
    }
    __syncthreads();  // hs / bs are refilled by the next rank step
  }

  if (!warp_active) return;
  const float scale = p.scal[t.slot * p.s_scal];
  T* y = static_cast<T*>(p.y);
  const int64_t n_lane = n0 + warp * WN + (lane & 3) * 2;   // this lane's first column (even)
  const int64_t n_end = sl.n;
  const bool pairs = p.vec_y;
#pragma unroll
  for (int mi = 0; mi < BM / 16; ++mi)
#pragma unroll
    for (int c = 0; c < 4; c += 2) {  // accumulators c, c + 1: one row, columns n, n + 1 (n even)
      const int64_t tr = rows_s[mi * 16 + (lane >> 2) + (c >> 1) * 8];
      if (tr < 0) continue;
      T* yrow = y + tr * p.sy_t + sl.col * p.sy_n;
#pragma unroll
      for (int ni = 0; ni < WN / 8; ++ni) {
        const int64_t n = n_lane + ni * 8;
        T* yp = yrow + n * p.sy_n;
        if (pairs && n + 1 < n_end) {
          add_pair_to(yp, acc[mi][ni][c] * scale, acc[mi][ni][c + 1] * scale);
        } else {
          if (n < n_end) add_to(yp, acc[mi][ni][c] * scale);
          if (n + 1 < n_end) add_to(yp + p.sy_n, acc[mi][ni][c + 1] * scale);
        }
      }
    }
}

}  // namespace mma_expand
}  // namespace openlora
