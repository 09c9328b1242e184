// The CPU kernels for any x86-64 (SSE2) or other CPU: the fallback of the run-time dispatch.
#define FV_ISA isa_baseline
#define FV_TABLE kernels_baseline
#define FV_RANDN randn_baseline
#include "cpu_kernels.inc"
