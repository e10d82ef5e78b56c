// Device helpers shared by every SGMV kernel: dtype traits, 16-byte vector loads, reading the
// batch metadata (tiles, rows, ranks) with index safety, warp reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "openlora/params.h"

#define OLK_DEVICE __device__ __forceinline__

namespace openlora {

// ---------------------------------------------------------------------------------- dtypes
// DTypeTraits<T>: kVec elements per 16-byte vector, conversions to/from fp32 (round to nearest).
template <typename T>
struct DTypeTraits;

template <>
struct DTypeTraits<float> {
  static constexpr int kVec = 4;
  OLK_DEVICE static float to_float(float v) { return v; }
  OLK_DEVICE static float from_float(float v) { return v; }
  OLK_DEVICE static void unpack(const uint4& u, float (&f)[kVec]) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};

template <>
struct DTypeTraits<__half> {
  static constexpr int kVec = 8;
  OLK_DEVICE static float to_float(__half v) { return __half2float(v); }
  OLK_DEVICE static __half from_float(float v) { return __float2half_rn(v); }
  OLK_DEVICE static void unpack(const uint4& u, float (&f)[kVec]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h2;
      *reinterpret_cast<uint32_t*>(&h2) = w[i];
      const float2 f2 = __half22float2(h2);
      f[2 * i] = f2.x;
      f[2 * i + 1] = f2.y;
    }
  }
};

template <>
struct DTypeTraits<__nv_bfloat16> {
  static constexpr int kVec = 8;
  OLK_DEVICE static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  OLK_DEVICE static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  OLK_DEVICE static void unpack(const uint4& u, float (&f)[kVec]) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> fp32 is a 16-bit shift: low half first (little endian).
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// 16-byte read-only load (the caller guarantees 16-byte alignment).
template <typename T>
OLK_DEVICE uint4 load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T>
OLK_DEVICE float load_float(const T* p) {
  return DTypeTraits<T>::to_float(*p);
}

// ------------------------------------------------------------------------ batch metadata
struct Tile {
  int slot;
  int64_t start, end;  // positions in sorted_tokens, [start, end)
};

// Tile g of tile_info [3, G]. False when the tile is unused (slot -1), names a slot outside
// [0, S) or is empty after clamping its bounds to [0, T): corrupt metadata never reaches memory.
// A tile covers at most tile_rows (block_m) sorted positions, so a CTA's work is bounded by the
// batch's tiling whatever end - start says. Every kernel starts with load_task -> load_tile and
// reads rows through load_row / load_tile_rows (ids outside [0, T) masked).
OLK_DEVICE bool load_tile(const SgmvParams& p, int64_t g, Tile& t) {
  t.slot = p.tile_info[g];
  t.start = max(static_cast<int64_t>(p.tile_info[p.G + g]), int64_t(0));
  t.end = min(min(static_cast<int64_t>(p.tile_info[2 * p.G + g]), p.T), t.start + p.tile_rows);
  return t.slot >= 0 && t.slot < p.S && t.start < t.end;
}

// Row of x / y at sorted position pos, or -1 when sorted_tokens holds an out-of-range value.
OLK_DEVICE int64_t load_row(const SgmvParams& p, int64_t pos) {
  const int64_t r = p.sorted_tokens[pos];
  return (r >= 0 && r < p.T) ? r : -1;
}

// First row of `slot` in the packed form, clamped to [0, rows] (0 when not packed).
OLK_DEVICE int64_t load_offset(const SgmvParams& p, int64_t slot) {
  if (!p.has_offs) return 0;
  const int64_t o = p.offs_i64 ? static_cast<const int64_t*>(p.offs)[slot]
                               : static_cast<int64_t>(static_cast<const int32_t*>(p.offs)[slot]);
  return min(max(o, int64_t(0)), p.rows);
}

// Element offset of `slot`'s first rank row in a slice buffer (slot stride, plus the packed
// form's row offset along the rank stride).
OLK_DEVICE int64_t slot_base(const SgmvParams& p, int64_t slot, int64_t slot_stride, int64_t rank_stride) {
  return slot * slot_stride + load_offset(p, slot) * rank_stride;
}

// Rank of `slot` for global slice `gsid`, clamped to [0, R] (R when no ranks are given), and in
// the packed form to the rows left after its offset.
OLK_DEVICE int load_rank(const SgmvParams& p, int gsid, int slot) {
  int64_t r = p.R;
  if (p.has_ranks) {
    const int64_t off = gsid * p.sr_n + slot * p.sr_s;
    r = p.ranks_i64 ? static_cast<const int64_t*>(p.ranks)[off]
                    : static_cast<int64_t>(static_cast<const int32_t*>(p.ranks)[off]);
    r = min(max(r, int64_t(0)), p.R);
  }
  if (p.has_offs) r = min(r, p.rows - load_offset(p, slot));
  return static_cast<int>(r);
}

// What one CTA works on: a tile of one slot, one slice, that slot's rank for the slice.
struct CtaTask {
  Tile t;
  int gsid;              // global slice index (ranks, h)
  int rank;              // in [0, R]
  const SliceArgs* sl;   // this launch's slice `sid`
};

// False when the CTA has nothing to do (unused / invalid tile, or a rank-0 slot).
OLK_DEVICE bool load_task(const SgmvParams& p, int64_t tile, int sid, CtaTask& c) {
  if (!load_tile(p, tile, c.t)) return false;
  c.gsid = p.slice_base + sid;
  c.sl = &p.slices[sid];
  c.rank = load_rank(p, c.gsid, c.t.slot);
  return c.rank > 0;
}

// rows_s[m] = row of sorted position t.start + m (-1 past the tile's end or when invalid), for the
// BM rows of a tensor-core tile. Ends with a barrier.
template <int BM, int THREADS>
OLK_DEVICE void load_tile_rows(const SgmvParams& p, const Tile& t, int64_t* rows_s) {
  for (int m = threadIdx.x; m < BM; m += THREADS) rows_s[m] = t.start + m < t.end ? load_row(p, t.start + m) : -1;
  __syncthreads();
}

OLK_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// y[p] = y[p] + v, in fp32, rounded once to y's dtype.
template <typename T>
OLK_DEVICE void add_to(T* p, float v) {
  *p = DTypeTraits<T>::from_float(DTypeTraits<T>::to_float(*p) + v);
}

// p[0] += v0, p[1] += v1 as one 4-byte read and write (16-bit T, p 4-byte aligned); each element
// rounded once, as add_to rounds it.
template <typename T>
OLK_DEVICE void add_pair_to(T* p, float v0, float v1) {
  static_assert(sizeof(T) == 2, "add_pair_to: 16-bit types only");
  using DT = DTypeTraits<T>;
  union Pair {
    uint32_t w;
    T e[2];
  } u;
  u.w = *reinterpret_cast<const uint32_t*>(p);
  u.e[0] = DT::from_float(DT::to_float(u.e[0]) + v0);
  u.e[1] = DT::from_float(DT::to_float(u.e[1]) + v1);
  *reinterpret_cast<uint32_t*>(p) = u.w;
}

}  // namespace openlora
