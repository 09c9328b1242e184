// internal.h -- pieces shared by the CPU and CUDA parts of the library (not exported).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "fastvae.h"

namespace fv {

// Records this thread's error message (printf-style) and returns `code`.
int set_error(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Checks one call against the contract of fastvae.h: op known, sizes positive, dtype codes,
// required operands present, sum outputs in the compute dtype, seed present when noise is
// drawn. Returns FV_OK, or an error code with the message set.
int validate_call(int32_t op, const fv_call* call);

// Whether the op draws Philox noise in this call (no eps given, and the output needs it).
bool needs_noise(int32_t op, const fv_call& call);

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline size_t dtype_size(int32_t dtype) {
    return dtype == FV_FLOAT64 ? 8 : dtype == FV_FLOAT32 ? 4 : 2;
}

}  // namespace fv

namespace fv::cpu {

// Runs fn(ctx, begin, end) over [0, n_units) on up to n_threads threads of a persistent pool
// (the caller among them), in contiguous ranges handed out a few per thread. Which thread runs
// which unit never changes a result: the kernels give every output a fixed summation order.
using RangeFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t n_units, int n_threads, RangeFn fn, void* ctx);

// One kernel per (op, compute dtype: 0 float, 1 double).
using KernelFn = int (*)(const fv_call& call);
using KernelTable = KernelFn[FV_OP_COUNT][2];

// The noise of the kernels: out[i] = tl.randn(seed, offset + i), i < n (for tests).
using RandnFn = void (*)(uint64_t seed, uint64_t offset, int64_t n, float* out);

extern const KernelTable kernels_baseline;
void randn_baseline(uint64_t seed, uint64_t offset, int64_t n, float* out);
#if defined(FV_HAVE_AVX2)
extern const KernelTable kernels_avx2;
void randn_avx2(uint64_t seed, uint64_t offset, int64_t n, float* out);
#endif
#if defined(FV_HAVE_AVX512)
extern const KernelTable kernels_avx512;
void randn_avx512(uint64_t seed, uint64_t offset, int64_t n, float* out);
#endif

}  // namespace fv::cpu
