// The native CPU kernels for the target's baseline (SSE2 on x86-64, NEON on arm64), fp8 e4m3 weights with fp32, fp16 and bf16 activations (see sgmv_cpu.h and sgmv_cpu_isa.inc).
#define OLK_ISA_LEVEL 0
#define OLK_FP8 1
#include "sgmv_cpu_isa.inc"
