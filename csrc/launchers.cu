// Thin launchers of the SGMV kernels: argument validation, the launch plan (kernel choice by
// dtype and block_m, grid, 16-byte-load legality), dtype / tile-size dispatch, error checks.
//
// Kernel choice (the batch metadata's block_m decides, as in the Triton backend):
//   block_m 1, 2, 4                 CUDA-core kernel (sgmv_fused.cuh), BM = block_m
//   block_m 16, 32, 64, fp16/bf16   tensor-core shrink / expand (sgmv_shrink.cuh, sgmv_expand.cuh)
//   block_m >= 16, fp32             CUDA-core kernel, 4 rows at a time (correct, not fast)
//   Op::kFused with block_m >= 16   CUDA-core fused kernel, 4 rows at a time (the Python side
//                                   runs tensor-core shrink + expand instead)
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "openlora/launchers.h"
#include "openlora/sgmv_expand.cuh"
#include "openlora/sgmv_fused.cuh"
#include "openlora/sgmv_shrink.cuh"

namespace openlora {
namespace {

#define OLK_STR2(...) #__VA_ARGS__
#define OLK_STR(...) OLK_STR2(__VA_ARGS__)

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) {
    throw CudaError("openlora_kernels CUDA error in " + what + ": " + cudaGetErrorName(err) + " (" +
                    cudaGetErrorString(err) + ")");
  }
}

// The message is built only when the check fails (a call pays the compare alone).
#define require(ok, msg)                                  \
  do {                                                    \
    if (!(ok)) throw std::invalid_argument(msg);          \
  } while (0)

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::max(lo, std::min(hi, v)); }

const char* dtype_name(DType dt) {
  switch (dt) {
    case DType::kFloat16: return "float16";
    case DType::kBFloat16: return "bfloat16";
    default: return "float32";
  }
}

int64_t dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* ptr) { return (reinterpret_cast<std::uintptr_t>(ptr) & 15u) == 0; }

// 16-byte loads along K from x and every A: unit inner stride, 16-byte aligned rows and slots.
bool vec_k_ok(const SgmvParams& p, int64_t esz) {
  const int64_t v = 16 / esz;
  bool ok = p.sx_k == 1 && aligned16(p.x) && (p.sx_t * esz) % 16 == 0 && p.K % v == 0;
  for (int i = 0; i < p.n_slices && ok; ++i) {
    const SliceArgs& s = p.slices[i];
    ok = s.a_sk == 1 && aligned16(s.a) && (s.a_ss * esz) % 16 == 0 && (s.a_sr * esz) % 16 == 0;
  }
  return ok;
}

// 16-byte loads along R from every B (vectors start at multiples of 16 bytes, never pass R).
// Not in the packed form: a slot's ranks then start at any row.
bool vec_r_ok(const SgmvParams& p, int64_t esz) {
  bool ok = !p.has_offs;
  for (int i = 0; i < p.n_slices && ok; ++i) {
    const SliceArgs& s = p.slices[i];
    ok = s.b_sr == 1 && aligned16(s.b) && (s.b_ss * esz) % 16 == 0 && (s.b_sn * esz) % 16 == 0;
  }
  return ok;
}

// 16-byte loads along N from every B (the pool's column-contiguous B: unit stride over n, 16-byte
// aligned slots and rank rows; a vector starts at a multiple of 8 columns, so it is aligned too).
bool vec_n_ok(const SgmvParams& p, int64_t esz) {
  bool ok = true;
  for (int i = 0; i < p.n_slices && ok; ++i) {
    const SliceArgs& s = p.slices[i];
    ok = s.b_sn == 1 && aligned16(s.b) && (s.b_ss * esz) % 16 == 0 && (s.b_sr * esz) % 16 == 0;
  }
  return ok;
}

// Two adjacent columns of y as one 4-byte access (16-bit y): unit column stride, 4-byte aligned
// base and rows, even first column of every slice (pairs start at even columns of a slice).
bool vec_y_ok(const SgmvParams& p, int64_t esz) {
  bool ok = esz == 2 && p.sy_n == 1 && reinterpret_cast<std::uintptr_t>(p.y) % 4 == 0 && (p.sy_t * esz) % 4 == 0;
  for (int i = 0; i < p.n_slices && ok; ++i) ok = p.slices[i].col % 2 == 0;
  return ok;
}

void validate_sizes(Op op, DType dt, int block_m, const SgmvParams& p) {
  const int o = static_cast<int>(op), d = static_cast<int>(dt);
  require(o >= 0 && o <= 2, "op: expected 0 (fused), 1 (shrink) or 2 (expand), got " + std::to_string(o));
  require(d >= 0 && d <= 2, "dtype: expected 0 (float16), 1 (bfloat16) or 2 (float32), got " + std::to_string(d));
  require(block_m == 1 || block_m == 2 || block_m == 4 || block_m == 16 || block_m == 32 || block_m == 64,
          "block_m: expected one of 1, 2, 4, 16, 32, 64, got " + std::to_string(block_m));
  require(p.n_slices >= 1 && p.n_slices <= kMaxSlices,
          "slices: expected 1 to " + std::to_string(kMaxSlices) + " slices per launch, got " + std::to_string(p.n_slices));
  require(p.slice_base >= 0, "slice_base: must be >= 0");
  require(p.G >= 0 && p.T >= 0 && p.K >= 0 && p.R >= 0 && p.S >= 0, "G, T, K, R, S: sizes must be >= 0");
  require(p.G <= 0x7fffffff, "G: more than 2^31 - 1 tiles");
  for (int i = 0; i < p.n_slices; ++i) {
    require(p.slices[i].n >= 0 && p.slices[i].col >= 0,
            "slices[" + std::to_string(i) + "]: width and first column must be >= 0");
  }
}

// Only checked when there is work to do (an empty tensor may have a null data pointer).
void validate_pointers(Op op, const SgmvParams& p) {
  require(p.tile_info != nullptr && p.sorted_tokens != nullptr, "tile_info, sorted_tokens: null pointer");
  const bool reads_x = op != Op::kExpand, writes_y = op != Op::kShrink;
  if (reads_x) require(p.x != nullptr, "x: null pointer");
  if (writes_y) require(p.y != nullptr && p.scal != nullptr, "y, scalings: null pointer");
  if (op != Op::kFused) require(p.h != nullptr, "h: null pointer");
  if (p.has_ranks) require(p.ranks != nullptr, "ranks: null pointer");
  for (int i = 0; i < p.n_slices; ++i) {
    if (reads_x) require(p.slices[i].a != nullptr, "slices[" + std::to_string(i) + "]: lora_a is a null pointer");
    if (writes_y) require(p.slices[i].b != nullptr, "slices[" + std::to_string(i) + "]: lora_b is a null pointer");
  }
}

bool uses_tensor_cores(Op op, DType dt, int block_m) {
  return op != Op::kFused && dt != DType::kFloat32 && block_m >= 16;
}

int64_t max_width(const SgmvParams& p) {
  int64_t n = 0;
  for (int i = 0; i < p.n_slices; ++i) n = std::max(n, p.slices[i].n);
  return n;
}

}  // namespace

LaunchPlan plan_launch(Op op, DType dt, int block_m, const SgmvParams& p, int sm_count) {
  validate_sizes(op, dt, block_m, p);
  require(sm_count >= 1, "sm_count: must be >= 1");
  const int64_t esz = dtype_size(dt);
  const int64_t n = p.n_slices, max_n = max_width(p);
  const int64_t ctas_wanted = 2 * static_cast<int64_t>(sm_count);
  LaunchPlan plan;
  plan.vec_k = op != Op::kExpand && vec_k_ok(p, esz);
  plan.vec_r = op != Op::kShrink && vec_r_ok(p, esz);
  plan.vec_n = op == Op::kExpand && !plan.vec_r && vec_n_ok(p, esz);
  plan.vec_y = op == Op::kExpand && vec_y_ok(p, esz);
  const bool empty = p.G == 0 || p.T == 0 || p.R == 0 || p.S == 0 || (op == Op::kShrink ? false : max_n == 0) ||
                     (op != Op::kExpand && p.K == 0);

  if (uses_tensor_cores(op, dt, block_m)) {
    plan.bm = block_m;
    if (op == Op::kShrink) {
      plan.kernel = "mma_shrink";
      plan.kind = KernelKind::kMmaShrink;
      plan.threads = mma_shrink::kThreads;
      const int64_t rchunks = cdiv(p.R, mma_shrink::BR);
      const int64_t k_tiles = std::max<int64_t>(1, cdiv(p.K, mma_shrink::BK));
      // Split K only when the tiles alone cannot fill the GPU; each split keeps >= 8 K tiles.
      const int64_t want = cdiv(ctas_wanted, std::max<int64_t>(1, p.G * rchunks * n));
      int64_t split = clamp64(want, 1, std::min<int64_t>(64, std::max<int64_t>(1, k_tiles / 8)));
      plan.k_per_split = cdiv(k_tiles, split) * mma_shrink::BK;
      split = std::max<int64_t>(1, cdiv(p.K, plan.k_per_split));
      plan.split_k = static_cast<int>(split);
      plan.grid[0] = p.G;
      plan.grid[1] = rchunks;
      plan.grid[2] = n * split;
    } else {
      plan.kernel = "mma_expand";
      plan.kind = KernelKind::kMmaExpand;
      plan.threads = mma_expand::kThreads;
      plan.grid[0] = p.G;
      plan.grid[1] = cdiv(max_n, mma_expand::BN);
      plan.grid[2] = n;
    }
  } else {
    plan.bm = block_m < 16 ? block_m : 4;
    plan.threads = simt::kThreads;
    if (op == Op::kShrink) {
      plan.kernel = "simt_shrink";
      plan.kind = KernelKind::kSimt;
      const int64_t per_cta = simt::kWarps * (plan.bm == 1 ? simt::RankUnroll<1>::value : simt::RankUnroll<2>::value);
      plan.grid[0] = p.G;
      plan.grid[1] = clamp64(cdiv(ctas_wanted, std::max<int64_t>(1, p.G * n)), 1, std::max<int64_t>(1, cdiv(p.R, per_cta)));
      plan.grid[2] = n;
    } else {
      require(p.R <= kMaxSimtRank, "R: the CUDA-core kernels support ranks up to " + std::to_string(kMaxSimtRank) +
                                       " (lora_a / lora_b have R=" + std::to_string(p.R) + ")");
      plan.kernel = op == Op::kFused ? "simt_fused" : "simt_expand";
      plan.kind = KernelKind::kSimt;
      // Spread a small batch over the GPU by splitting the columns (>= 256 per CTA): each chunk
      // recomputes the tile's small shrink (A re-read from L2) in the fused kernel.
      const int64_t chunks = clamp64(cdiv(ctas_wanted, std::max<int64_t>(1, p.G * n)), 1,
                                     std::max<int64_t>(1, cdiv(max_n, 256)));
      plan.cols_per_chunk = std::max<int64_t>(32, cdiv(cdiv(max_n, chunks), 32) * 32);
      plan.grid[0] = p.G;
      plan.grid[1] = std::max<int64_t>(1, cdiv(max_n, plan.cols_per_chunk));
      plan.grid[2] = n;
      plan.smem_bytes = static_cast<int64_t>(plan.bm) * p.R * static_cast<int64_t>(sizeof(float));
    }
  }
  require(plan.grid[1] <= 65535 && plan.grid[2] <= 65535,
          "grid: too many column or rank tiles for one launch (N_i or R too large)");
  if (empty) {
    plan.grid[0] = plan.grid[1] = plan.grid[2] = 0;
  } else {
    validate_pointers(op, p);
  }
  return plan;
}

namespace {

template <typename T>
void* simt_kernel(Op op, int bm) {
  using namespace simt;
#define OLK_SIMT(BM)                                                                      \
  if (bm == BM) {                                                                         \
    if (op == Op::kFused) return reinterpret_cast<void*>(sgmv_simt_kernel<T, BM, kFused>); \
    if (op == Op::kShrink) return reinterpret_cast<void*>(sgmv_simt_kernel<T, BM, kShrinkOnly>); \
    return reinterpret_cast<void*>(sgmv_simt_kernel<T, BM, kExpandOnly>);                 \
  }
  OLK_SIMT(1)
  OLK_SIMT(2)
  OLK_SIMT(4)
#undef OLK_SIMT
  return nullptr;
}

template <typename T>
void* mma_kernel(Op op, int bm) {
  const bool shrink = op == Op::kShrink;
  switch (bm) {
    case 16: return shrink ? reinterpret_cast<void*>(mma_shrink::sgmv_shrink_mma_kernel<T, 16>)
                           : reinterpret_cast<void*>(mma_expand::sgmv_expand_mma_kernel<T, 16>);
    case 32: return shrink ? reinterpret_cast<void*>(mma_shrink::sgmv_shrink_mma_kernel<T, 32>)
                           : reinterpret_cast<void*>(mma_expand::sgmv_expand_mma_kernel<T, 32>);
    case 64: return shrink ? reinterpret_cast<void*>(mma_shrink::sgmv_shrink_mma_kernel<T, 64>)
                           : reinterpret_cast<void*>(mma_expand::sgmv_expand_mma_kernel<T, 64>);
    default: return nullptr;
  }
}

void* select_kernel(const LaunchPlan& plan, Op op, DType dt) {
  const bool mma = plan.kind != KernelKind::kSimt;
  switch (dt) {
    case DType::kFloat16: return mma ? mma_kernel<__half>(op, plan.bm) : simt_kernel<__half>(op, plan.bm);
    case DType::kBFloat16:
      return mma ? mma_kernel<__nv_bfloat16>(op, plan.bm) : simt_kernel<__nv_bfloat16>(op, plan.bm);
    default: return mma ? nullptr : simt_kernel<float>(op, plan.bm);
  }
}

}  // namespace

// ------------------------------------------------------------------------------ launch stub
// For measuring and testing the host side on a machine without a GPU: with the stub on, run_sgmv
// does everything but the CUDA calls (no device query: the stub's SM count; no launch: the launch
// is counted and the last few are kept, with the parameter struct's bytes).
namespace {
struct StubState {
  std::atomic<bool> on{false};
  int sm_count = 132;
  int64_t launches = 0;
  std::vector<StubLaunch> recent;
};
StubState& stub() {
  static StubState s;
  return s;
}
constexpr size_t kStubKeep = 32;
}  // namespace

void set_launch_stub(bool on, int sm_count) {
  StubState& s = stub();
  s.sm_count = sm_count > 0 ? sm_count : 132;
  s.launches = 0;
  s.recent.clear();
  s.on.store(on);
}

bool launch_stub_on() { return stub().on.load(std::memory_order_relaxed); }

int64_t stub_launch_count() { return stub().launches; }

std::vector<StubLaunch> stub_recent_launches() { return stub().recent; }

int current_device_sm_count() {
  if (launch_stub_on()) return stub().sm_count;
  static std::atomic<int> cache[64] = {};
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev >= 0 && dev < 64) {
    const int c = cache[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  if (dev >= 0 && dev < 64) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
}

namespace {
std::string kernel_name(const LaunchPlan& plan, DType dt) {
  return std::string(plan.kernel) + "<" + dtype_name(dt) + ", BM=" + std::to_string(plan.bm) + ">";
}
}  // namespace

void run_sgmv(Op op, DType dt, int block_m, const SgmvParams& p, std::uintptr_t stream) {
  validate_sizes(op, dt, block_m, p);
  const LaunchPlan plan = plan_launch(op, dt, block_m, p, current_device_sm_count());
  if (plan.grid[0] == 0) return;
  SgmvParams q;
  std::memcpy(&q, &p, sizeof q);   // (padding bytes included: the stub records them)
  q.vec_k = plan.vec_k;
  q.vec_r = plan.vec_r;
  q.vec_n = plan.vec_n;
  q.vec_y = plan.vec_y;
  q.split_k = plan.split_k;
  q.k_per_split = plan.k_per_split;
  q.cols_per_chunk = plan.cols_per_chunk;
  q.tile_rows = block_m;
  void* kernel = select_kernel(plan, op, dt);
  require(kernel != nullptr, "no kernel for " + kernel_name(plan, dt));
  const dim3 grid(static_cast<unsigned>(plan.grid[0]), static_cast<unsigned>(plan.grid[1]),
                  static_cast<unsigned>(plan.grid[2]));
  if (launch_stub_on()) {
    StubState& s = stub();
    ++s.launches;
    if (s.recent.size() >= kStubKeep) s.recent.erase(s.recent.begin());
    StubLaunch rec;
    rec.kernel = kernel_name(plan, dt);
    rec.grid[0] = plan.grid[0];
    rec.grid[1] = plan.grid[1];
    rec.grid[2] = plan.grid[2];
    rec.threads = plan.threads;
    rec.smem_bytes = plan.smem_bytes;
    rec.stream = stream;
    rec.params.assign(reinterpret_cast<const char*>(&q), reinterpret_cast<const char*>(&q) + sizeof(q));
    s.recent.push_back(std::move(rec));
    return;
  }
  void* args[] = {&q};
  const cudaError_t err = cudaLaunchKernel(kernel, grid, dim3(plan.threads), args,
                                           static_cast<size_t>(plan.smem_bytes), reinterpret_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) check_cuda(err, "launching " + kernel_name(plan, dt));
  const cudaError_t last = cudaGetLastError();
  if (last != cudaSuccess) check_cuda(last, "launching " + kernel_name(plan, dt));
}

std::string compiled_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return OLK_STR(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

std::string nvcc_version() { return std::to_string(__CUDACC_VER_MAJOR__) + "." + std::to_string(__CUDACC_VER_MINOR__); }

}  // namespace openlora
