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
 * is not wanted and not computed. The operands of each op, in slot order, are in the list FV_OPS
 * below.
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
 * Discretized mixture of logistics: N is the pixels, K the mixtures M, scalar the bin count;
 * params (and d_params, written in full) is a (P, B, N) view whose stride[0] steps along its
 * P = M (1 + 3C) (C = 3) or 3M (C = 1) parameter rows, laid out as fastvae/ops/reference.py
 * says; x_r, x_g, x_b are the channels of x, (B, N) views in the compute dtype (x_g and x_b
 * absent for C = 1); grad (backward) is the (B,) loss gradient as a (B, N) view.
 *
 * Nearest code (vector quantization): x is the (B, N) rows, N = D the vector size; codebook the
 * K codes as a (K, B, N) view with stride 0 along B (stride[0] along its rows, stride[2] along
 * D); scalar the metric (0: squared L2, 1: cosine, 1 - x^.e^); index (int64) and dist (compute
 * dtype) are (B,) outputs with element stride stride[2]. index[b] is the lowest k of the least
 * distance (NaN distances never win; 0 where no distance is below +inf) and dist[b] the distance
 * to it, computed in the one order of docs/numerics.md: t = x_j - e_j, acc = acc + t*t for
 * j = 0 .. D-1 (each operation rounded, no fused multiply-add), from acc = 0.
 *
 * Finite scalar quantization: z is the (B, N) rows, N = D <= 64 dimensions; levels and basis
 * (int64) and a, b (compute dtype) are (D,) operands as (B, N) views with stride 0 along B;
 * scalar the mode (0 the tanh bound, +1 preserve_symmetry, +2 hard clamp); codes (B, N) in the
 * storage dtype and index (int64, (B,), element stride stride[2]) the mixed-radix index
 * sum_j level_j basis_j (-1 for a row with a NaN). The backward's d_z = grad d code / d z
 * (straight through the rounding). The formulas: fv::fsq in fastvae_math.h. Levels must be in
 * [2, 2^24] and their product at most 2^63 - 1 (the caller checks; other values give
 * meaningless results, never a memory fault).
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

#define FV_ABI_VERSION 4  /* 2: FV_MAX_IN 6, the IWAE ops; 3: the op table, fv_layout();
                            4: reparameterize_fwd keeps its noise (out[1]), fv_torch_register
                            takes the saved outputs */

/* FV_INT64: indices only (an operand marked % in FV_OPS); every other operand is a float. */
enum fv_dtype { FV_FLOAT32 = 0, FV_FLOAT64 = 1, FV_FLOAT16 = 2, FV_BFLOAT16 = 3, FV_INT64 = 4 };

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

/* The ops: FV_OPS is the one list of them and of everything the library knows about their
 * operands. The enum fv_op, the checks of every call (both backends), the CPU kernel table, the
 * CUDA dtype rules and the table that fv_op_name() & co. export (which the Python loader checks
 * against its own) are all made from it. A new op is one more line at the end (codes are
 * positions: never reorder), plus what runs it: its CPU kernels (cpu_kernels.inc), its case in
 * run_typed (cuda.cu) and its NativeBackend method (Python); a missing one fails to build or,
 * for the method, to load.
 *
 *   X(CODE, name, "inputs", "outputs", uses)
 *
 * CODE gives FV_OP_CODE; `name` is the op's name, also that of its CPU kernels. The inputs and
 * the outputs are operand names in slot order (in[0], in[1], ... / out[0], ...), separated by
 * spaces, each followed by its marks:
 *   ?   may be absent (data == NULL): an optional input; an output not wanted, so not computed
 *   *   the main input: its dtype is the call's storage dtype (exactly one input has it)
 *   #   has the compute dtype (sums, gradients of sums, IWAE's ll and log-weights); an operand
 *       without # or ~ has the storage dtype (CUDA requires it; the CPU converts any float dtype)
 *   ~   any float dtype (IWAE's log_px and its gradient)
 *   %   int64 (FV_INT64): indices (nearest_code's, FSQ's, residual VQ's) and integer
 *       inputs (FSQ's level counts and basis, residual VQ's levels per row); no other operand
 *       may be int64
 *   !   an input: the noise, drawn from the seed where absent; an output: made from the noise.
 *       A call needs the seed when it wants a ! output and does not give the ! input.
 *   (a b)?  a and b are given together or not at all
 * residual_vq (residual_vq.inc): K codes per level, scalar = L - 1, reduce_dim = 1 for the
 * rotation trick (backward); codebooks at offset_of(k, level, j); levels (B,) along stride[1];
 * index/commit/dist/grad_commit/grad_dist (B, L) at offset_of(0, b, level).
 * `uses`: which of K, reduce_dim and scalar the op reads, as FV_USES_* bits (0: none); an op
 * without FV_USES_K is called with K = 1.
 * Shapes (their layout in a call: above): (B, N) but for (K, B, N): eps, z, grad_z, d_eps of
 * reparameterize, z and d_z of iwae; (K, B): log_px, log_w, d_log_px; the sums and their
 * gradients (grad, grad_kl): (B,), or (N,) with reduce_dim 0. */
#define FV_USES_K 1           /* call->K samples */
#define FV_USES_REDUCE_DIM 2  /* call->reduce_dim */
#define FV_USES_SCALAR 4      /* call->scalar: gaussian_nll's log-variance when logvar is absent */
#define FV_DRAWS_NOISE 8      /* not in FV_OPS: fv_op_flags() adds it for an op with ! marks */

#define FV_OPS(X)                                                                                  \
    X(REPARAMETERIZE_FWD, reparameterize_fwd, "mu* logvar eps?!", "z! noise?!", FV_USES_K)         \
    X(REPARAMETERIZE_BWD, reparameterize_bwd, "grad_z logvar* eps?!", "d_mu? d_logvar?! d_eps?",   \
      FV_USES_K)                                                                                   \
    X(GAUSSIAN_KL_FWD, gaussian_kl_fwd, "mu* logvar (prior_mu prior_logvar)?", "kl#",              \
      FV_USES_REDUCE_DIM)                                                                          \
    X(GAUSSIAN_KL_BWD, gaussian_kl_bwd, "grad# mu* logvar (prior_mu prior_logvar)?",               \
      "d_mu? d_logvar? d_prior_mu? d_prior_logvar?", FV_USES_REDUCE_DIM)                           \
    X(BERNOULLI_NLL_FWD, bernoulli_nll_fwd, "logits* target", "nll#", 0)                           \
    X(BERNOULLI_NLL_BWD, bernoulli_nll_bwd, "grad# logits* target", "d_logits? d_target?", 0)      \
    X(GAUSSIAN_NLL_FWD, gaussian_nll_fwd, "mean* target logvar?", "nll#", FV_USES_SCALAR)          \
    X(GAUSSIAN_NLL_BWD, gaussian_nll_bwd, "grad# mean* target logvar?",                            \
      "d_mean? d_target? d_logvar?", FV_USES_SCALAR)                                               \
    X(SAMPLE_AND_KL_FWD, sample_and_kl_fwd, "mu* logvar", "z! kl#", FV_USES_REDUCE_DIM)            \
    X(SAMPLE_AND_KL_BWD, sample_and_kl_bwd, "grad_z grad_kl# mu* logvar", "d_mu? d_logvar?!",      \
      FV_USES_REDUCE_DIM)                                                                          \
    X(IWAE_FWD, iwae_fwd, "log_px~ z* mu logvar", "ll# log_w#", FV_USES_K)                         \
    X(IWAE_BWD, iwae_bwd, "grad# ll# log_w# z* mu logvar", "d_log_px?~ d_z? d_mu? d_logvar?",      \
      FV_USES_K)                                                                                   \
    X(CONTINUOUS_BERNOULLI_NLL_FWD, continuous_bernoulli_nll_fwd, "logits* target", "nll#", 0)     \
    X(CONTINUOUS_BERNOULLI_NLL_BWD, continuous_bernoulli_nll_bwd, "grad# logits* target",          \
      "d_logits? d_target?", 0)                                                                    \
    X(DMOL_NLL_FWD, discretized_mix_logistic_nll_fwd, "params* x_r# (x_g x_b)?#", "nll#",          \
      FV_USES_K | FV_USES_SCALAR)                                                                  \
    X(DMOL_NLL_BWD, discretized_mix_logistic_nll_bwd, "grad# params* x_r# (x_g x_b)?#",            \
      "d_params?", FV_USES_K | FV_USES_SCALAR)                                                  \
    X(NEAREST_CODE_FWD, nearest_code_fwd, "x* codebook", "index% dist#",                           \
      FV_USES_K | FV_USES_SCALAR)                                                                  \
    X(LFQ_ENTROPY_FWD, lfq_entropy_fwd, "logits*", "sums# entropy#", FV_USES_K | FV_USES_SCALAR)   \
    X(LFQ_ENTROPY_BWD, lfq_entropy_bwd, "grad_sums# grad_entropy# logits*", "d_logits?",           \
      FV_USES_K | FV_USES_SCALAR)                                                                  \
    X(RESIDUAL_VQ_FWD, residual_vq_fwd, "x* codebooks levels?%",                                   \
      "index% quantized# commit# dist#", FV_USES_K | FV_USES_SCALAR)                               \
    X(RESIDUAL_VQ_BWD, residual_vq_bwd, "grad_q# grad_commit# grad_dist# index% x* codebooks",     \
      "d_x? d_codebooks?", FV_USES_K | FV_USES_SCALAR | FV_USES_REDUCE_DIM)                        \
    X(FSQ_FWD, finite_scalar_quantize_fwd, "z* levels% basis% a# b#", "codes index%",              \
      FV_USES_SCALAR)                                                                              \
    X(FSQ_BWD, finite_scalar_quantize_bwd, "grad z* levels% a# b#", "d_z?", FV_USES_SCALAR)

#define FV_OP_ENUM_(CODE, name, inputs, outputs, uses) FV_OP_##CODE,
typedef enum fv_op { FV_OPS(FV_OP_ENUM_) } fv_op;
#undef FV_OP_ENUM_
#define FV_OP_ONE_(CODE, name, inputs, outputs, uses) +1
enum { FV_OP_COUNT = 0 FV_OPS(FV_OP_ONE_) };
#undef FV_OP_ONE_

/* Library facts. */
FV_API int32_t fv_abi_version(void);
FV_API int32_t fv_has_cuda(void);            /* 1 when the CUDA part was compiled in */
FV_API const char* fv_build_info(void);      /* compiler, CUDA architectures, CPU kernels */
FV_API const char* fv_last_error(void);      /* message of this thread's last failed call */

/* The op table (FV_OPS): fv_op_count() ops, codes 0 .. count - 1. Out of range: NULL, -1. */
FV_API int32_t fv_op_count(void);
FV_API const char* fv_op_name(int32_t op);     /* e.g. "reparameterize_fwd" */
FV_API const char* fv_op_inputs(int32_t op);   /* the operands as in FV_OPS: "mu* logvar eps?!" */
FV_API const char* fv_op_outputs(int32_t op);
FV_API int32_t fv_op_flags(int32_t op);        /* FV_USES_* bits, and FV_DRAWS_NOISE */

/* The layout of this build's structs, for a loader to check its copy against: the sizeof of
 * "fv_call" and "fv_tensor", the offsetof of a field named "fv_call.<field>" or
 * "fv_tensor.<field>", the values of "FV_MAX_IN" and "FV_MAX_OUT"; -1 for any other name. */
FV_API int64_t fv_layout(const char* name);

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
