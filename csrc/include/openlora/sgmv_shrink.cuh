// Tensor-core SGMV shrink for prefill-like tiles (block_m 16, 32, 64; fp16 / bf16; sm_80+):
//   h[i, row, j] = x[row] . A_i[s, j]   for the rows of one tile of slot s and j < rank.
//
// Grid (G tiles, cdiv(R, 32) rank chunks, n_slices * split_k), 128 threads (4 warps).
// CTA tile: BM rows x 32 rank columns, K in steps of 64 through a 3-stage cp.async pipeline:
//   shared  xs[3][BM][64+8], as[3][32][64+8] (x rows gathered through sorted_tokens; A rows
//           j >= rank and K past the end are zero-filled, never read from memory). The 8-element
//           row padding makes the ldmatrix row addresses hit distinct banks.
//   warps   split each 64-wide K step: warp w multiplies its k16 slice, (BM/16) x 4 mma.m16n8k16
//           per step into fp32 registers; n8 tiles at or past the rank are skipped.
//   end     the four warps' partial sums are added through shared memory (fixed order, so the
//           result is deterministic) and written to h; with split_k > 1 the CTAs of one tile
//           add their K ranges into h with fp32 atomics (h is zero-filled by the caller).
// A CTA whose rank chunk starts at or past the slot's rank exits: a slot of rank r costs r.
// Without 16-byte alignment (vec_k = 0) the same tiles are filled by scalar loads.
#pragma once

#include "openlora/mma.cuh"

namespace openlora {
namespace mma_shrink {

constexpr int kThreads = 128;
constexpr int kWarps = 4;
constexpr int BR = 32;       // rank columns per CTA
constexpr int BK = 64;       // K per pipeline stage (one k16 slice per warp)
constexpr int kStages = 3;
constexpr int kLds = BK + 8;  // padded shared row, elements

template <typename T, int BM>
struct Smem {
  static constexpr int kPipeBytes = kStages * (BM + BR) * kLds * static_cast<int>(sizeof(T));
  static constexpr int kReduceBytes = kWarps * BM * (BR + 1) * static_cast<int>(sizeof(float));
  static constexpr int kBytes = kPipeBytes > kReduceBytes ? kPipeBytes : kReduceBytes;
};

// Gather one K stage: x rows (through rows_s) and A rows r0.. of the slot, zero-filled where masked.
template <typename T, int BM>
OLK_DEVICE void load_stage(const SgmvParams& p, const SliceArgs& sl, const T* a_slot, const int64_t* rows_s,
                           int rank, int r0, int64_t k0, int64_t k_hi, T* xs, T* as) {
  using DT = DTypeTraits<T>;
  const T* x = static_cast<const T*>(p.x);
  constexpr int kVecs = BK / 8;  // 8-element (16-byte) vectors per row
  for (int v = threadIdx.x; v < (BM + BR) * kVecs; v += kThreads) {
    const int r = v / kVecs;
    const int c = (v % kVecs) * 8;
    const int64_t k = k0 + c;
    const bool is_x = r < BM;
    const int64_t row = is_x ? rows_s[r] : static_cast<int64_t>(r0 + r - BM);
    const bool ok = (is_x ? row >= 0 : row < rank) && k < k_hi;
    const T* base = is_x ? x + (ok ? row : 0) * p.sx_t : a_slot + (ok ? row : 0) * sl.a_sr;
    const int64_t sk = is_x ? p.sx_k : sl.a_sk;
    T* dst = is_x ? xs + r * kLds + c : as + (r - BM) * kLds + c;
    if (p.vec_k) {  // K % 8 == 0 and k_hi % 8 == 0: a vector is all in or all out
      cp_async_16(dst, ok ? base + k : base, ok ? 16 : 0);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        dst[e] = (ok && k + e < k_hi) ? base[(k + e) * sk] : DT::from_float(0.f);
      }
    }
  }
}

// One K stage on the tensor cores: warp w multiplies its k16 slice of the stage.
template <typename T, int BM>
OLK_DEVICE void mma_stage(const T* xs, const T* as, int rank, int r0, float (&acc)[BM / 16][BR / 8][4]) {
  const int lane = threadIdx.x & 31;
  const int kk = (threadIdx.x >> 5) * 16;
  uint32_t af[BM / 16][4];
#pragma unroll
  for (int mi = 0; mi < BM / 16; ++mi)
    ldmatrix_x4(af[mi], xs + (mi * 16 + a_frag_row(lane)) * kLds + kk + a_frag_col(lane));
#pragma unroll
  for (int np = 0; np < BR / 16; ++np) {
    if (r0 + np * 16 >= rank) break;  // warp-uniform: no work past the slot's rank
    uint32_t bf[4];
    ldmatrix_x4(bf, as + (np * 16 + b_frag_row(lane)) * kLds + kk + b_frag_col(lane));
#pragma unroll
    for (int mi = 0; mi < BM / 16; ++mi) {
      Mma16816<T>::run(acc[mi][2 * np], af[mi], bf[0], bf[1]);
      if (r0 + np * 16 + 8 < rank) Mma16816<T>::run(acc[mi][2 * np + 1], af[mi], bf[2], bf[3]);
    }
  }
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads) sgmv_shrink_mma_kernel(const __grid_constant__ SgmvParams p) {
  static_assert(BM % 16 == 0 && BM <= 64, "BM must be 16, 32 or 64");
  __shared__ __align__(16) unsigned char smem[Smem<T, BM>::kBytes];
  __shared__ int64_t rows_s[BM];
  CtaTask task;
  if (!load_task(p, blockIdx.x, blockIdx.z / p.split_k, task)) return;
  Tile& t = task.t;
  const int gsid = task.gsid, rank = task.rank;
  const SliceArgs& sl = *task.sl;
  const int kid = blockIdx.z % p.split_k;
  const int r0 = blockIdx.y * BR;
  if (r0 >= rank) return;
  const int64_t k_lo = kid * p.k_per_split;
  const int64_t k_hi = min(p.K, k_lo + p.k_per_split);
  if (k_lo >= k_hi) return;
  t.end = min(t.end, t.start + BM);  // a tile never holds more than block_m == BM rows
  load_tile_rows<BM, kThreads>(p, t, rows_s);

  T* xs = reinterpret_cast<T*>(smem);
  T* as = xs + kStages * BM * kLds;
  const T* a_slot = static_cast<const T*>(sl.a) + slot_base(p, t.slot, sl.a_ss, sl.a_sr);
  float acc[BM / 16][BR / 8][4];
#pragma unroll
  for (int mi = 0; mi < BM / 16; ++mi)
#pragma unroll
    for (int ni = 0; ni < BR / 8; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][ni][c] = 0.f;

  const int nk = static_cast<int>((k_hi - k_lo + BK - 1) / BK);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nk) load_stage<T, BM>(p, sl, a_slot, rows_s, rank, r0, k_lo + s * BK, k_hi, xs + s * BM * kLds, as + s * BR * kLds);
    cp_async_commit();
  }
  for (int it = 0; it < nk; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` landed for every thread; stage it-1 is free to refill
    const int nxt = it + kStages - 1;
    if (nxt < nk) {
      const int s = nxt % kStages;
      load_stage<T, BM>(p, sl, a_slot, rows_s, rank, r0, k_lo + static_cast<int64_t>(nxt) * BK, k_hi,
                        xs + s * BM * kLds, as + s * BR * kLds);
    }
    cp_async_commit();
    const int s = it % kStages;
    mma_stage<T, BM>(xs + s * BM * kLds, as + s * BR * kLds, rank, r0, acc);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the reduction buffer

  float* red = reinterpret_cast<float*>(smem);  // [kWarps][BM][BR + 1]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int mi = 0; mi < BM / 16; ++mi)
#pragma unroll
    for (int ni = 0; ni < BR / 8; ++ni)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = mi * 16 + (lane >> 2) + (c >> 1) * 8;
        const int col = ni * 8 + (lane & 3) * 2 + (c & 1);
        red[(warp * BM + row) * (BR + 1) + col] = acc[mi][ni][c];
      }
  __syncthreads();
  for (int idx = threadIdx.x; idx < BM * BR; idx += kThreads) {
    const int row = idx / BR, col = idx % BR;
    const int64_t tr = rows_s[row];
    if (tr < 0 || r0 + col >= rank) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[(w * BM + row) * (BR + 1) + col];
    float* dst = p.h + gsid * p.sh_n + tr * p.sh_t + (r0 + col) * p.sh_r;
    if (p.split_k == 1) {
      *dst = sum;
    } else {
      atomicAdd(dst, sum);
    }
  }
}

}  // namespace mma_shrink
}  // namespace openlora
