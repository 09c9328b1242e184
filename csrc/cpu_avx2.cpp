// The CPU kernels compiled for x86-64-v3 (AVX2, FMA, F16C, BMI1/2, ...; CMakeLists.txt sets the
// flags on this file); cpu.cpp uses them only on CPUs of that level.
#define FV_ISA isa_avx2
#define FV_TABLE kernels_avx2
#define FV_RANDN randn_avx2
#include "cpu_kernels.inc"
