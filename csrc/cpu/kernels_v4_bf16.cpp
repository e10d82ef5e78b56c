// The native CPU kernels for x86-64-v4 (AVX-512), bf16 (see sgmv_cpu.h and sgmv_cpu_isa.inc).
#define OLK_ISA_LEVEL 4
#define OLK_DTYPE bf16
#include "sgmv_cpu_isa.inc"
