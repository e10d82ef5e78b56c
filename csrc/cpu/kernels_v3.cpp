// The native CPU kernels (sgmv_cpu_kernels.h) compiled for x86-64-v3 (AVX2 + FMA: 16 vector registers of 8 floats).
// The binding uses them when the CPU has that level (checked once, at load time). With another
// compiler or target this file defines an empty entry that is never chosen.
#include "sgmv_cpu.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OLK_BUILD_ISA 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#endif

namespace openlora {
namespace cpu {
namespace v3 {
#if defined(OLK_BUILD_ISA)
constexpr int kVecBytes = 32;   // the expand's accumulators: 32-byte vectors (ymm), 8 of the 16 registers
constexpr int kAccVecs = 8;
constexpr int kDotJB4 = 2;       // A rows per dot block of 4 x rows
#include "sgmv_cpu_kernels.h"
const IsaKernels kernels = {"x86-64-v3", {run_claimed<f16>, run_claimed<bf16>, run_claimed<float>}};
#else
const IsaKernels kernels = {"x86-64-v3", {nullptr, nullptr, nullptr}};
#endif
}  // namespace v3
}  // namespace cpu
}  // namespace openlora

#if defined(OLK_BUILD_ISA)
#pragma GCC pop_options
#endif
