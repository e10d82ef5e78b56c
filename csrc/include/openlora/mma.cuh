// PTX wrappers for the tensor-core kernels (sm_80+): mma.sync m16n8k16 with fp32 accumulators,
// ldmatrix fragment loads and cp.async global->shared copies with zero fill.
//
// Fragment layouts of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"), with
// g = lane / 4 and q = lane % 4:
//   A (16x16, row-major): a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 2q+8..), a3 (g+8, 2q+8..)
//   B (16x8, "col" = stored as [n][k]): b0 (k 2q..2q+1, n g), b1 (k 2q+8.., n g)
//   C (16x8 fp32): c0,c1 (g, 2q..2q+1), c2,c3 (g+8, 2q..2q+1)
#pragma once

#include <cstdint>

#include "openlora/common.cuh"

namespace openlora {

OLK_DEVICE uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; bytes [src_bytes, 16) of the destination are zero-filled (src_bytes = 0:
// nothing is read, `src` only has to be a valid address).
OLK_DEVICE void cp_async_16(void* smem, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(src), "r"(src_bytes)
               : "memory");
}

OLK_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
OLK_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i of every
// lane receives matrix i's elements (row lane/4, columns 2*(lane%4), +1).
OLK_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// The same with each 8x8 matrix transposed: rows given are k rows of a [k][n] tile, and register i
// of every lane receives matrix i's elements at (n = lane/4, k = 2*(lane%4), +1): the "col" B
// fragment of mma.m16n8k16 read from B stored n-contiguous.
OLK_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

template <typename T>
struct Mma16816;

template <>
struct Mma16816<__half> {
  OLK_DEVICE static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Mma16816<__nv_bfloat16> {
  OLK_DEVICE static void run(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Lane's row / column offset for ldmatrix_x4 of a 16x16 A tile stored row-major in shared memory
// (matrices: rows 0-7|8-15 x cols 0-7|8-15 -> a0, a1, a2, a3).
OLK_DEVICE int a_frag_row(int lane) { return lane & 15; }
OLK_DEVICE int a_frag_col(int lane) { return (lane >> 4) << 3; }
// ... of two adjacent n8 tiles of B stored [n][k] (registers: b0, b1 of tile 0, b0, b1 of tile 1).
OLK_DEVICE int b_frag_row(int lane) { return (lane & 7) + ((lane >> 4) << 3); }
OLK_DEVICE int b_frag_col(int lane) { return ((lane >> 3) & 1) << 3; }
// ... the same two n8 tiles with B stored [k][n], for ldmatrix_x4_trans: lane's k row and n column
// (matrix i = lane / 8: k 0-7 | 8-15 for i even | odd, n 0-7 | 8-15 for i < 2 | >= 2).
OLK_DEVICE int bt_frag_k(int lane) { return (lane & 7) + (((lane >> 3) & 1) << 3); }
OLK_DEVICE int bt_frag_n(int lane) { return (lane >> 4) << 3; }

}  // namespace openlora
