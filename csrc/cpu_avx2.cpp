// The CPU kernels compiled for AVX2 + FMA + F16C (CMakeLists.txt sets the flags on this file);
// cpu.cpp uses them only when the CPU reports those features.
#define FV_ISA isa_avx2
#define FV_TABLE kernels_avx2
#define FV_RANDN randn_avx2
#include "cpu_kernels.inc"
