// The native CPU kernels for x86-64-v3 (AVX2 + FMA), f16 (see sgmv_cpu.h and sgmv_cpu_isa.inc).
#define OLK_ISA_LEVEL 3
#define OLK_DTYPE f16
#define OLK_MIXED 1   // also fp32 activations with weights stored in f16
#define OLK_MIXED_BF16 1   // and bf16 activations with weights stored in f16
#include "sgmv_cpu_isa.inc"
