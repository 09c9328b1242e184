// The CPU kernels compiled for x86-64-v4 (AVX-512 F/BW/DQ/VL/CD on top of x86-64-v3;
// CMakeLists.txt sets the flags on this file); cpu.cpp uses them only on CPUs of that level.
#define FV_ISA isa_avx512
#define FV_TABLE kernels_avx512
#define FV_RANDN randn_avx512
#include "cpu_kernels.inc"
