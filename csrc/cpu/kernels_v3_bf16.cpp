// The native CPU kernels for x86-64-v3 (AVX2 + FMA), bf16 (see sgmv_cpu.h and sgmv_cpu_isa.inc).
#define OLK_ISA_LEVEL 3
#define OLK_DTYPE bf16
#define OLK_MIXED 1   // also fp32 activations with weights stored in bf16
#include "sgmv_cpu_isa.inc"
