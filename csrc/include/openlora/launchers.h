// Host API of the SGMV kernels: plan a launch, run it, report errors. Plain C++ (no CUDA or
// Python headers), implemented in launchers.cu and wrapped for Python by bindings.cpp.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "openlora/params.h"

namespace openlora {

// A CUDA runtime call or a kernel launch failed; the message carries the CUDA error string.
class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What run_sgmv would launch for these arguments (a pure function of shapes, strides, pointer
// alignment and the SM count: never of tensor contents, so a CUDA graph can hold the launch).
enum class KernelKind : int { kSimt = 0, kMmaShrink = 1, kMmaExpand = 2 };

struct LaunchPlan {
  const char* kernel = "";       // simt_fused | simt_shrink | simt_expand | mma_shrink | mma_expand
  KernelKind kind = KernelKind::kSimt;
  int bm = 0;                    // rows per register tile (the kernel's BM template argument)
  int64_t grid[3] = {0, 0, 0};   // empty (0) when there is nothing to do
  int threads = 0;
  int64_t smem_bytes = 0;        // dynamic shared memory
  int vec_k = 0, vec_r = 0;      // 16-byte loads along K (x, A) / along R (B)
  int vec_n = 0, vec_y = 0;      // 16-byte loads along N (B column-contiguous) / paired y columns
  int split_k = 1;
  int64_t k_per_split = 0;
  int64_t cols_per_chunk = 0;
};

// Throws std::invalid_argument (Python ValueError) naming the bad argument.
LaunchPlan plan_launch(Op op, DType dtype, int block_m, const SgmvParams& p, int sm_count);

// Plans and launches on `stream` (a cudaStream_t as an integer; 0 = legacy default stream).
// Throws std::invalid_argument for bad arguments, CudaError for CUDA failures. No host sync.
void run_sgmv(Op op, DType dtype, int block_m, const SgmvParams& p, std::uintptr_t stream);

// The launch stub (host-side measurements and tests without a GPU): while on, run_sgmv makes no
// CUDA call; it counts each launch and keeps the last few (kernel, grid, the parameter bytes).
struct StubLaunch {
  std::string kernel;
  int64_t grid[3] = {0, 0, 0};
  int threads = 0;
  int64_t smem_bytes = 0;
  std::uintptr_t stream = 0;
  std::string params;            // the SgmvParams passed to the kernel, byte for byte
};
void set_launch_stub(bool on, int sm_count);
bool launch_stub_on();
int64_t stub_launch_count();
std::vector<StubLaunch> stub_recent_launches();

// Multiprocessor count of the current device (cached per device; the stub's while it is on).
int current_device_sm_count();

// nvcc's __CUDA_ARCH_LIST__ for launchers.cu (e.g. "800,890,900") and its version ("13.0").
std::string compiled_arch_list();
std::string nvcc_version();

}  // namespace openlora
