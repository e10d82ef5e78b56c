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
struct LaunchPlan {
  std::string kernel;            // simt_fused | simt_shrink | simt_expand | mma_shrink | mma_expand
  int bm = 0;                    // rows per register tile (the kernel's BM template argument)
  int64_t grid[3] = {0, 0, 0};   // empty (0) when there is nothing to do
  int threads = 0;
  int64_t smem_bytes = 0;        // dynamic shared memory
  int vec_k = 0, vec_r = 0;      // 16-byte loads along K (x, A) / along R (B)
  int split_k = 1;
  int64_t k_per_split = 0;
  int64_t cols_per_chunk = 0;
};

// Throws std::invalid_argument (Python ValueError) naming the bad argument.
LaunchPlan plan_launch(Op op, DType dtype, int block_m, const SgmvParams& p, int sm_count);

// Plans and launches on `stream` (a cudaStream_t as an integer; 0 = legacy default stream).
// Throws std::invalid_argument for bad arguments, CudaError for CUDA failures. No host sync.
void run_sgmv(Op op, DType dtype, int block_m, const SgmvParams& p, std::uintptr_t stream);

// Multiprocessor count of the current device (cached per device). Throws CudaError.
int current_device_sm_count();

// nvcc's __CUDA_ARCH_LIST__ for launchers.cu (e.g. "800,890,900") and its version ("13.0").
std::string compiled_arch_list();
std::string nvcc_version();

}  // namespace openlora
