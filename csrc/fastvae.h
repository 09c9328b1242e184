/* fastvae.h -- the plain C ABI of libfastvae_native (no libtorch, no Python).
 *
 * Every op is one function taking a description of the call (fv_call): sizes, the operands
 * as raw pointers with element strides and a dtype code, the outputs (preallocated by the
 * caller), the Philox seed, and for CUDA the device, the stream and a scratch buffer. It
 * returns FV_OK or an error code; fv_last_error() then gives a message (per thread). No C++
 * exception crosses this boundary.
 *
 * Operand layout of one call: tensors are (B, N) views -- or (K, B, N) for the samples of
 * reparameterize and iwae -- read through element strides (stride[0] along K, [1] along B,
 * [2] along N; any value, 0 for broadcast operands). A loss gradient of shape (B,) or (N,) is
 * passed as a (B, N) view with stride 0 along the other dimension. Outputs: per-sample sums
 * (B,), or per-feature sums (N,), or gradients (B, N) / (K, B, N); an output with data == NULL
 * is not wanted and not computed. Inputs and outputs per op (in[] / out[]):
 *
 *   reparameterize_fwd   in: mu, logvar, eps|NULL             out: z (K,B,N)        K, seed
 *   reparameterize_bwd   in: grad_z (K,B,N), logvar, eps|NULL out: d_mu, d_logvar, d_eps
 *   gaussian_kl_fwd      in: mu, logvar, prior_mu|NULL, prior_logvar|NULL  out: kl  reduce_dim
 *   gaussian_kl_bwd      in: grad, mu, logvar, prior_mu|NULL, prior_logvar|NULL
 *                        out: d_mu, d_logvar, d_prior_mu, d_prior_logvar
 *   bernoulli_nll_fwd    in: logits, target                   out: nll (B,)
 *   bernoulli_nll_bwd    in: grad, logits, target             out: d_logits, d_target
 *   gaussian_nll_fwd     in: mean, target, logvar|NULL        out: nll (B,)   logvar_value
 *   gaussian_nll_bwd     in: grad, mean, target, logvar|NULL  out: d_mean, d_target, d_logvar
 *   sample_and_kl_fwd    in: mu, logvar                       out: z (B,N), kl   seed, reduce_dim
 *   sample_and_kl_bwd    in: grad_z, grad_kl, mu, logvar      out: d_mu, d_logvar   seed
 *   iwae_fwd             in: log_px (K,B), z (K,B,N), mu, logvar
 *                        out: ll (B,), log_w (K,B)                                  K
 *   iwae_bwd             in: grad (B,), ll (B,), log_w (K,B), z (K,B,N), mu, logvar
 *                        out: d_log_px (K,B), d_z (K,B,N), d_mu, d_logvar             K
 *
 * IWAE: a (K, B) tensor (log_px, log_w, d_log_px) is passed as a (K, B, N) view with stride 0
 * along N, and a (B,) input of iwae_bwd (grad, ll) as a (K, B, N) view with stride 0 along K
 * and N -- the convention of the (B,) loss gradients above, with K added; the output ll is a
 * sum output like the others ((B,), element stride stride[2]). log_px and d_log_px have any
 * float dtype (the same one); grad, ll and log_w (outputs and inputs) have the compute dtype;
 * z, mu, logvar and their gradients share one dtype. With s = (z - mu) e^(-lv/2):
 *   log_w[k,b] = log_px[k,b] + sum_j 0.5 (s^2 + lv - z^2),  ll[b] = logsumexp_k log_w - log K
 * (a NaN log-weight gives NaN, a +inf one +inf, all -inf gives -inf); with
 * a[k,b] = grad[b] exp(log_w[k,b] - ll[b] - log K): d_log_px = a, d_z = a (s e^(-lv/2) - z),
 * d_mu = -sum_k a s e^(-lv/2), d_logvar = sum_k a (1 - s^2) / 2, summed over k in order.
 *
 * The prior is both tensors or neither. Noise element (k, b, j) is tl.randn(seed, (k*B + b)*N
 * + j), seed read from memory on the call's device (so CUDA launches never sync the host).
 * Compute happens in `compute` (FV_FLOAT32, or FV_FLOAT64 for float64 inputs); sums come
 * out in that dtype. Sums are deterministic: bitwise the same for the same inputs, whatever the
 * thread count (CPU) or run (CUDA, same device).
 */
#ifndef FASTVAE_H_
#define FASTVAE_H_

#include <stdint.h>

#if defined(_WIN32)
#define FV_API __declspec(dllexport)
#else
#define FV_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define FV_ABI_VERSION 2  /* 2: FV_MAX_IN 6, the IWAE ops */

enum fv_dtype { FV_FLOAT32 = 0, FV_FLOAT64 = 1, FV_FLOAT16 = 2, FV_BFLOAT16 = 3 };

enum fv_status {
    FV_OK = 0,
    FV_ERR_INVALID = 1,   /* bad arguments (sizes, dtypes, missing operands) */
    FV_ERR_CUDA = 2,      /* a CUDA runtime error (message says which) */
    FV_ERR_INTERNAL = 3,  /* anything else, e.g. out of host memory */
    FV_ERR_NOT_BUILT = 4  /* the library was built without this part */
};

typedef struct fv_tensor {
    void* data;         /* NULL: absent operand / output not wanted */
    int64_t stride[3];  /* element strides along (K, B, N) */
    int32_t dtype;      /* enum fv_dtype */
    int32_t reserved;
} fv_tensor;

#define FV_MAX_IN 6
#define FV_MAX_OUT 4

typedef struct fv_call {
    int64_t B, N, K;          /* B >= 1, N >= 1, K >= 1 (K: samples of reparameterize, iwae) */
    fv_tensor in[FV_MAX_IN];
    fv_tensor out[FV_MAX_OUT];
    const int64_t* seed;      /* one int64 on the call's device, or NULL when not needed */
    double scalar;            /* gaussian_nll: the log-variance when in[3]/in[2] is absent */
    int32_t reduce_dim;       /* 1: per-sample sums (B,); 0: per-feature sums (N,) */
    int32_t compute;          /* FV_FLOAT32 or FV_FLOAT64 */
    int32_t n_threads;        /* CPU: threads to use (>= 1) */
    int32_t device;           /* CUDA: device ordinal */
    void* stream;             /* CUDA: cudaStream_t to launch on */
    void* workspace;          /* CUDA: device scratch, fv_cuda_workspace_bytes() of it */
    int64_t workspace_bytes;
} fv_call;

typedef enum fv_op {
    FV_OP_REPARAMETERIZE_FWD = 0,
    FV_OP_REPARAMETERIZE_BWD,
    FV_OP_GAUSSIAN_KL_FWD,
    FV_OP_GAUSSIAN_KL_BWD,
    FV_OP_BERNOULLI_NLL_FWD,
    FV_OP_BERNOULLI_NLL_BWD,
    FV_OP_GAUSSIAN_NLL_FWD,
    FV_OP_GAUSSIAN_NLL_BWD,
    FV_OP_SAMPLE_AND_KL_FWD,
    FV_OP_SAMPLE_AND_KL_BWD,
    FV_OP_IWAE_FWD,
    FV_OP_IWAE_BWD,
    FV_OP_COUNT
} fv_op;

/* Library facts. */
FV_API int32_t fv_abi_version(void);
FV_API int32_t fv_has_cuda(void);            /* 1 when the CUDA part was compiled in */
FV_API const char* fv_build_info(void);      /* compiler, CUDA architectures, CPU kernels */
FV_API const char* fv_last_error(void);      /* message of this thread's last failed call */

/* CPU. fv_cpu_isa(): the kernel set in use ("avx512", "avx2" or "baseline"); fv_cpu_set_isa()
 * picks one ("auto" = the best this CPU runs) and returns 0, or -1 for a name this build or this
 * CPU cannot run. */
FV_API const char* fv_cpu_isa(void);
/* The kernel sets this build has and this CPU runs, best first, comma-separated. */
FV_API const char* fv_cpu_isas(void);
FV_API int32_t fv_cpu_set_isa(const char* name);
FV_API int32_t fv_cpu_run(int32_t op, const fv_call* call);

/* CUDA (FV_ERR_NOT_BUILT without the CUDA part). Reductions need a scratch buffer on the
 * device of fv_cuda_workspace_bytes(op, call) bytes (0: none), passed in call->workspace. */
FV_API int64_t fv_cuda_workspace_bytes(int32_t op, const fv_call* call);
FV_API int32_t fv_cuda_run(int32_t op, const fv_call* call);

/* Tests: n standard normals tl.randn(seed, offset + i), float32, by the CPU kernels' noise code
 * (of the kernel set in use). */
FV_API void fv_randn_host(uint64_t seed, uint64_t offset, int64_t n, float* out);
/* Tests: the first two Philox4x32-10 outputs for (seed, offset + i), interleaved (2n values). */
FV_API void fv_philox_host(uint64_t seed, uint64_t offset, int64_t n, uint32_t* out);

#ifdef __cplusplus
}
#endif

#endif /* FASTVAE_H_ */
