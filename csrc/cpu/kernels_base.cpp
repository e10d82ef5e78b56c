// The native CPU kernels (sgmv_cpu_kernels.h) compiled for the target's baseline (SSE2 on
// x86-64, NEON on arm64): what runs when no better level is available (or is built).
#include "sgmv_cpu.h"

namespace openlora {
namespace cpu {
namespace base {
constexpr int kVecBytes = 16;      // SSE2 / NEON registers
#if defined(__aarch64__)
constexpr int kAccVecs = 16;       // half of NEON's 32 registers
#else
constexpr int kAccVecs = 8;        // half of SSE's 16 registers
#endif
constexpr int kDotJB4 = 2;
#include "sgmv_cpu_kernels.h"
const IsaKernels kernels = {"baseline", {run_claimed<f16>, run_claimed<bf16>, run_claimed<float>}};
}  // namespace base
}  // namespace cpu
}  // namespace openlora
