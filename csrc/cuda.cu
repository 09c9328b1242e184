// cuda.cu -- the CUDA kernels of every op and the exported fv_cuda_* functions.
//
// Same structure as the CPU kernels (cpu_kernels.inc), same per-element math (fastvae_math.h):
//   * each thread handles E consecutive columns of a row, E = 16 bytes of the storage dtype
//     (4 float32, 2 float64, 8 float16/bfloat16), loaded and stored as one 16-byte vector when
//     the operand is contiguous along N and its rows are 16-byte aligned, else element by
//     element through its strides (stride 0 for broadcast operands);
//   * blocks of 256 threads are (tx, ty): tx threads along a row (a power of two covering N / E
//     up to 256), ty = 256 / tx rows; grid-stride loops over rows and columns;
//   * per-sample sums: each block owns a fixed set of column tiles of its rows (n_split blocks
//     per row), reduces across the row's threads with warp shuffles (and shared memory when a
//     row spans several warps), and writes one partial per (row, split); a second kernel adds
//     the partials in split order. Per-feature sums likewise with rows and columns swapped.
//     No atomics: results are bitwise reproducible run to run on one device;
//   * IWAE: the forward's event sums are per-sample sums over the K * B rows (k, b), their
//     partials always in the workspace; a second kernel, one thread per row b, adds them in
//     split order to log_px and runs the log-sum-exp over the samples in order. The backward is
//     elementwise over (b, j) with the samples in order inside (the sums over k);
//   * launches go to the caller's stream (torch's current stream) on call->device; the seed is
//     read from device memory by the kernels: no host sync, safe under CUDA-graph capture.
//   * the operands' dtypes are checked, and the storage dtype picked, by the marks of the op's
//     line of FV_OPS (fastvae.h, as kOps); an op of FV_OPS without a case in run_typed does not
//     compile.
#define FV_MATH_NAMESPACE cuda_math
#include "fastvae_math.h"
#include "internal.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <exception>

namespace fv::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

struct alignas(2) Half { uint16_t bits; };
struct alignas(2) BFloat16 { uint16_t bits; };

// ---------------------------------------------------------------------------------------------
// Storage <-> compute conversions
// ---------------------------------------------------------------------------------------------

template <class T> __device__ __forceinline__ T from_storage(float v) { return T(v); }
template <class T> __device__ __forceinline__ T from_storage(double v) { return T(v); }
template <class T> __device__ __forceinline__ T from_storage(Half v) {
    return T(__half2float(__ushort_as_half(v.bits)));
}
template <class T> __device__ __forceinline__ T from_storage(BFloat16 v) {
    return T(__bfloat162float(__ushort_as_bfloat16(v.bits)));
}

template <class S> struct ToStorage;
template <> struct ToStorage<float> {
    template <class T> __device__ static float cvt(T v) { return float(v); }
};
template <> struct ToStorage<double> {
    template <class T> __device__ static double cvt(T v) { return double(v); }
};
template <> struct ToStorage<Half> {
    template <class T> __device__ static Half cvt(T v) {
        return {__half_as_ushort(__float2half_rn(float(v)))};
    }
};
template <> struct ToStorage<BFloat16> {
    template <class T> __device__ static BFloat16 cvt(T v) {
        return {__bfloat16_as_ushort(__float2bfloat16_rn(float(v)))};
    }
};

// ---------------------------------------------------------------------------------------------
// Operands
// ---------------------------------------------------------------------------------------------

// A strided (K, B, N) operand; `vec`: 16-byte vector access is allowed (contiguous along N,
// base and row/sample strides 16-byte aligned).
template <class S>
struct In {
    const S* p = nullptr;
    int64_t sk = 0, sb = 0, sn = 0;
    bool vec = false;
};

template <class S>
struct Out {
    S* p = nullptr;
    int64_t sk = 0, sb = 0, sn = 0;
    bool vec = false;
};

inline bool vector_ok(const fv_tensor& t, size_t elem) {
    return t.data != nullptr && t.stride[2] == 1 && reinterpret_cast<uintptr_t>(t.data) % 16 == 0 &&
           (t.stride[1] * int64_t(elem)) % 16 == 0 && (t.stride[0] * int64_t(elem)) % 16 == 0;
}

template <class S>
In<S> make_in(const fv_tensor& t) {
    return {static_cast<const S*>(t.data), t.stride[0], t.stride[1], t.stride[2],
            vector_ok(t, sizeof(S))};
}

template <class S>
Out<S> make_out(const fv_tensor& t) {
    return {static_cast<S*>(t.data), t.stride[0], t.stride[1], t.stride[2],
            vector_ok(t, sizeof(S))};
}

// Columns j .. j+E-1 of row b (sample k), zeros past N.
template <class T, int E, class S>
__device__ __forceinline__ void load(const In<S>& t, int64_t k, int64_t b, int64_t j, int64_t N,
                                     T (&v)[E]) {
    const S* row = t.p + k * t.sk + b * t.sb;
    if constexpr (E * sizeof(S) == 16) {
        if (t.vec && j + E <= N) {
            alignas(16) S s[E];
            *reinterpret_cast<uint4*>(s) = *reinterpret_cast<const uint4*>(row + j);
#pragma unroll
            for (int e = 0; e < E; ++e) v[e] = from_storage<T>(s[e]);
            return;
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = j + e < N ? from_storage<T>(row[(j + e) * t.sn]) : T(0);
}

template <class T, int E, class S>
__device__ __forceinline__ void store(const Out<S>& t, int64_t k, int64_t b, int64_t j, int64_t N,
                                      const T (&v)[E]) {
    S* row = t.p + k * t.sk + b * t.sb;
    if constexpr (E * sizeof(S) == 16) {
        if (t.vec && j + E <= N) {
            alignas(16) S s[E];
#pragma unroll
            for (int e = 0; e < E; ++e) s[e] = ToStorage<S>::cvt(v[e]);
            *reinterpret_cast<uint4*>(row + j) = *reinterpret_cast<const uint4*>(s);
            return;
        }
    }
#pragma unroll
    for (int e = 0; e < E; ++e)
        if (j + e < N) row[(j + e) * t.sn] = ToStorage<S>::cvt(v[e]);
}

// A (K, B) operand of any float dtype (IWAE's log_px and its gradient), one element at a time.
struct AnyKB {
    void* p = nullptr;
    int64_t sk = 0, sb = 0;
    int32_t dtype = FV_FLOAT32;
};

inline AnyKB make_any_kb(const fv_tensor& t) {
    return {t.data, t.stride[0], t.stride[1], t.dtype};
}

template <class T>
__device__ __forceinline__ T load_kb(const AnyKB& t, int64_t k, int64_t b) {
    const int64_t off = k * t.sk + b * t.sb;
    switch (t.dtype) {
        case FV_FLOAT32: return from_storage<T>(static_cast<const float*>(t.p)[off]);
        case FV_FLOAT64: return from_storage<T>(static_cast<const double*>(t.p)[off]);
        case FV_FLOAT16: return from_storage<T>(static_cast<const Half*>(t.p)[off]);
        default: return from_storage<T>(static_cast<const BFloat16*>(t.p)[off]);
    }
}

template <class T>
__device__ __forceinline__ void store_kb(const AnyKB& t, int64_t k, int64_t b, T v) {
    const int64_t off = k * t.sk + b * t.sb;
    switch (t.dtype) {
        case FV_FLOAT32: static_cast<float*>(t.p)[off] = ToStorage<float>::cvt(v); break;
        case FV_FLOAT64: static_cast<double*>(t.p)[off] = ToStorage<double>::cvt(v); break;
        case FV_FLOAT16: static_cast<Half*>(t.p)[off] = ToStorage<Half>::cvt(v); break;
        default: static_cast<BFloat16*>(t.p)[off] = ToStorage<BFloat16>::cvt(v); break;
    }
}

// E standard normals tl.randn(seed, offset + e), in the compute dtype.
template <class T, int E>
__device__ __forceinline__ void noise(const int64_t* seed, int64_t offset, T (&v)[E]) {
    const uint64_t s = uint64_t(*seed);
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = T(randn(s, uint64_t(offset + e)));
}

// Columns j .. j+E-1 of row b of an optional operand, or `fill` in each where it is absent (the
// Gaussian's log-variance given as one number).
template <class T, int E, class S>
__device__ __forceinline__ void load_or(const In<S>& t, T fill, int64_t b, int64_t j, int64_t N,
                                        T (&v)[E]) {
    if (t.p) {
        load(t, 0, b, j, N, v);
        return;
    }
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = fill;
}

// f(e) for the columns j + e of row b (sample k), stored to t: one gradient of a backward.
template <class T, int E, class S, class F>
__device__ __forceinline__ void store_each(const Out<S>& t, int64_t k, int64_t b, int64_t j,
                                           int64_t N, F f) {
    T v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = f(e);
    store(t, k, b, j, N, v);
}

// d to `plus` and -d to `minus`, each where wanted: the gradients of the two sides of a
// difference (mu - prior_mu, target - mean). Leaves -d in d.
template <class T, int E, class S>
__device__ __forceinline__ void store_opposite(const Out<S>& plus, const Out<S>& minus, int64_t b,
                                               int64_t j, int64_t N, T (&d)[E]) {
    if (plus.p) store(plus, 0, b, j, N, d);
#pragma unroll
    for (int e = 0; e < E; ++e) d[e] = -d[e];
    if (minus.p) store(minus, 0, b, j, N, d);
}

// ---------------------------------------------------------------------------------------------
// Kernel skeletons
// ---------------------------------------------------------------------------------------------

// op(b, j): columns j .. j+E-1 of row b.
template <int E, class Op>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Op op, int64_t B, int64_t N) {
    const int64_t row_step = int64_t(gridDim.y) * blockDim.y;
    const int64_t col_step = int64_t(gridDim.x) * blockDim.x * E;
    for (int64_t b = int64_t(blockIdx.y) * blockDim.y + threadIdx.y; b < B; b += row_step)
        for (int64_t j = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * E; j < N; j += col_step)
            op(b, j);
}

// Sum of v over the tx threads of this thread's row (tx a power of two; a row's threads are
// consecutive). Every thread of the block must call it. The result is valid in thread x == 0.
template <class T>
__device__ __forceinline__ T row_sum(T v, int tx) {
    const int width = tx < 32 ? tx : 32;
    for (int off = width / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (tx <= 32) return v;
    __shared__ double smem_raw[kThreads / 32];
    T* smem = reinterpret_cast<T*>(smem_raw);
    const int warps_per_row = tx / 32;
    __syncthreads();  // the previous call's reads are done
    if (threadIdx.x % 32 == 0) smem[threadIdx.y * warps_per_row + threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        v = T(0);
        for (int w = 0; w < warps_per_row; ++w) v += smem[threadIdx.y * warps_per_row + w];
    }
    return v;
}

// Per-sample sums. Block (s, r): rows r*ty.. (grid-stride), column tiles s, s + n_split, ...
// dst[(b * n_split + s) * dst_stride] = that block's sum for row b.
template <int E, class T, class Op>
__global__ void __launch_bounds__(kThreads) sum_rows_kernel(Op op, int64_t B, int64_t N,
                                                             T* dst, int64_t dst_stride) {
    const int tx = blockDim.x, ty = blockDim.y;
    const int64_t n_split = gridDim.x;
    for (int64_t b0 = int64_t(blockIdx.y) * ty; b0 < B; b0 += int64_t(gridDim.y) * ty) {
        const int64_t b = b0 + threadIdx.y;
        T acc = T(0);
        if (b < B) {
            for (int64_t j = (int64_t(blockIdx.x) * tx + threadIdx.x) * E; j < N;
                 j += n_split * tx * E) {
                T v[E];
                op(b, j, v);
#pragma unroll
                for (int e = 0; e < E; ++e) acc += v[e];
            }
        }
        acc = row_sum(acc, tx);
        if (threadIdx.x == 0 && b < B) dst[(b * n_split + blockIdx.x) * dst_stride] = acc;
    }
}

// Per-feature sums. Block (c, s): column tiles c.. (grid-stride), rows of row tiles s,
// s + n_split, ...; dst[(s * N + j) * dst_stride] = that block's sum for column j.
template <int E, class T, class Op>
__global__ void __launch_bounds__(kThreads) sum_cols_kernel(Op op, int64_t B, int64_t N,
                                                             T* dst, int64_t dst_stride) {
    __shared__ double smem_raw[kThreads * 4];  // kThreads * E values of T: at most 8 KiB
    T* smem = reinterpret_cast<T*>(smem_raw);
    const int tx = blockDim.x, ty = blockDim.y;
    for (int64_t j0 = int64_t(blockIdx.x) * tx * E; j0 < N; j0 += int64_t(gridDim.x) * tx * E) {
        const int64_t j = j0 + int64_t(threadIdx.x) * E;
        T acc[E];
#pragma unroll
        for (int e = 0; e < E; ++e) acc[e] = T(0);
        if (j < N) {
            for (int64_t b = int64_t(blockIdx.y) * ty + threadIdx.y; b < B;
                 b += int64_t(gridDim.y) * ty) {
                T v[E];
                op(b, j, v);
#pragma unroll
                for (int e = 0; e < E; ++e) acc[e] += v[e];
            }
        }
        __syncthreads();  // the previous iteration's reads are done
#pragma unroll
        for (int e = 0; e < E; ++e) smem[(threadIdx.y * tx + threadIdx.x) * E + e] = acc[e];
        __syncthreads();
        if (threadIdx.y == 0 && j < N) {
            for (int e = 0; e < E && j + e < N; ++e) {
                T s = T(0);
                for (int y = 0; y < ty; ++y) s += smem[(y * tx + threadIdx.x) * E + e];
                dst[(int64_t(blockIdx.y) * N + j + e) * dst_stride] = s;
            }
        }
    }
}

// out[i] = sum over s of the partials, in split order.
template <class T>
__global__ void combine_kernel(const T* partial, T* out, int64_t out_stride, int64_t n_out,
                               int64_t n_split, int reduce_dim) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n_out;
         i += int64_t(gridDim.x) * blockDim.x) {
        T s = T(0);
        for (int64_t k = 0; k < n_split; ++k)
            s += reduce_dim == 1 ? partial[i * n_split + k] : partial[k * n_out + i];
        out[i * out_stride] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// The ops (operand slots as in fastvae.h). Sum ops: op(b, j, v) gives the E per-element values
// (0 past N); elementwise ops: op(b, j).
// ---------------------------------------------------------------------------------------------

template <class T, class S, int E>
struct ReparameterizeFwd {
    In<S> mu, lv, eps;
    Out<S> z, kept;  // kept: the noise drawn, for the backward (when wanted and eps is absent)
    const int64_t* seed;
    int64_t B, N, K;
    __device__ void operator()(int64_t b, int64_t j) const {
        T m[E], l[E], sd[E];
        load(mu, 0, b, j, N, m);
        load(lv, 0, b, j, N, l);
#pragma unroll
        for (int e = 0; e < E; ++e) sd[e] = exp_(T(0.25) * l[e]);  // see std_times
        for (int64_t k = 0; k < K; ++k) {
            T ep[E], zv[E];
            if (eps.p) load(eps, k, b, j, N, ep);
            else noise(seed, (k * B + b) * N + j, ep);
#pragma unroll
            for (int e = 0; e < E; ++e) zv[e] = m[e] + std_times(ep[e], sd[e]);
            store(z, k, b, j, N, zv);
            if (kept.p && !eps.p) store(kept, k, b, j, N, ep);
        }
    }
};

template <class T, class S, int E>
struct ReparameterizeBwd {
    In<S> g, lv, eps;
    Out<S> dmu, dlv, deps;
    const int64_t* seed;
    int64_t B, N, K;
    __device__ void operator()(int64_t b, int64_t j) const {
        T l[E], sd[E], gs[E], ges[E];
        load(lv, 0, b, j, N, l);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            sd[e] = exp_(T(0.25) * l[e]);  // see std_times
            gs[e] = T(0);
            ges[e] = T(0);
        }
        for (int64_t k = 0; k < K; ++k) {
            T gv[E];
            load(g, k, b, j, N, gv);
#pragma unroll
            for (int e = 0; e < E; ++e) gs[e] += gv[e];
            if (dlv.p) {
                T ep[E];
                if (eps.p) load(eps, k, b, j, N, ep);
                else noise(seed, (k * B + b) * N + j, ep);
#pragma unroll
                for (int e = 0; e < E; ++e) ges[e] += gv[e] * ep[e];
            }
            if (deps.p)
                store_each<T, E>(deps, k, b, j, N, [&](int e) { return std_times(gv[e], sd[e]); });
        }
        if (dmu.p) store(dmu, 0, b, j, N, gs);
        if (dlv.p)
            store_each<T, E>(dlv, 0, b, j, N,
                             [&](int e) { return std_times(T(0.5) * ges[e], sd[e]); });
    }
};

template <class T, class S, int E>
struct GaussianKlFwd {
    In<S> mu, lv, pm, plv;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j, T (&v)[E]) const {
        T m[E], l[E];
        load(mu, 0, b, j, N, m);
        load(lv, 0, b, j, N, l);
        if (pm.p) {
            T a[E], c[E];
            load(pm, 0, b, j, N, a);
            load(plv, 0, b, j, N, c);
#pragma unroll
            for (int e = 0; e < E; ++e) v[e] = j + e < N ? kl_prior(m[e], l[e], a[e], c[e]) : T(0);
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) v[e] = j + e < N ? kl_standard(m[e], l[e]) : T(0);
        }
    }
};

template <class T, class S, int E>
struct GaussianKlBwd {
    In<T> g;
    In<S> mu, lv, pm, plv;
    Out<S> dmu, dlv, dpm, dplv;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j) const {
        T gv[E], m[E], l[E], a[E], c[E];
        load(g, 0, b, j, N, gv);
        load(mu, 0, b, j, N, m);
        load(lv, 0, b, j, N, l);
        if (pm.p) {  // the prior: both or neither
            load(pm, 0, b, j, N, a);
            load(plv, 0, b, j, N, c);
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) a[e] = c[e] = T(0);
        }
        if (dmu.p || dpm.p) {
            T d[E];
#pragma unroll
            for (int e = 0; e < E; ++e) d[e] = kl_grad_mu(gv[e], m[e], a[e], c[e]);
            store_opposite(dmu, dpm, b, j, N, d);
        }
        if (dlv.p)
            store_each<T, E>(dlv, 0, b, j, N,
                             [&](int e) { return kl_grad_logvar(gv[e], l[e], c[e]); });
        if (dplv.p)
            store_each<T, E>(dplv, 0, b, j, N, [&](int e) {
                return kl_grad_prior_logvar(gv[e], m[e], l[e], a[e], c[e]);
            });
    }
};

// Likelihoods of logits l and a target x, one formula per element: the value (summed over the
// event), the gradient F::grad_logits(g, l, x) = g d/dl, and d/dx = -g l (a likelihood of the
// form -log p(x | l) = A(l) - x l, whose log-normalizer A depends on the logit alone). F, a tag
// type per op (BernoulliLogits, ContinuousBernoulliLogits), names the per-element math of
// fastvae_math.h; a new op of this shape is its tag and its cases in run_typed and
// workspace_bytes.
struct BernoulliLogits {
    template <class T> __device__ static T nll(T l, T x) { return bernoulli_nll(l, x); }
    template <class T> __device__ static T grad_logits(T g, T l, T x) {
        return bernoulli_grad_logits(g, l, x);
    }
};

struct ContinuousBernoulliLogits {
    template <class T> __device__ static T nll(T l, T x) { return continuous_bernoulli_nll(l, x); }
    template <class T> __device__ static T grad_logits(T g, T l, T x) {
        return continuous_bernoulli_grad_logits(g, l, x);
    }
};

template <class F, class T, class S, int E>
struct LogitsNllFwd {
    In<S> l, x;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j, T (&v)[E]) const {
        T lv[E], xv[E];
        load(l, 0, b, j, N, lv);
        load(x, 0, b, j, N, xv);
#pragma unroll
        for (int e = 0; e < E; ++e) v[e] = j + e < N ? F::nll(lv[e], xv[e]) : T(0);
    }
};

template <class F, class T, class S, int E>
struct LogitsNllBwd {
    In<T> g;
    In<S> l, x;
    Out<S> dl, dx;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j) const {
        T gv[E], lv[E], xv[E];
        load(g, 0, b, j, N, gv);
        load(l, 0, b, j, N, lv);
        if (dl.p) {  // the only part that reads the target
            load(x, 0, b, j, N, xv);
            store_each<T, E>(dl, 0, b, j, N,
                             [&](int e) { return F::grad_logits(gv[e], lv[e], xv[e]); });
        }
        if (dx.p) store_each<T, E>(dx, 0, b, j, N, [&](int e) { return -gv[e] * lv[e]; });
    }
};

template <class T, class S, int E>
struct GaussianNllFwd {
    In<S> m, x, lv;
    T lv_value;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j, T (&v)[E]) const {
        T mv[E], xv[E], l[E];
        load(m, 0, b, j, N, mv);
        load(x, 0, b, j, N, xv);
        load_or(lv, lv_value, b, j, N, l);
#pragma unroll
        for (int e = 0; e < E; ++e)
            v[e] = j + e < N ? gaussian_nll(xv[e] - mv[e], quarter_scale(l[e]), l[e]) : T(0);
    }
};

template <class T, class S, int E>
struct GaussianNllBwd {
    In<T> g;
    In<S> m, x, lv;
    Out<S> dm, dx, dlv;
    T lv_value;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j) const {
        T gv[E], mv[E], xv[E], l[E];
        load(g, 0, b, j, N, gv);
        load(m, 0, b, j, N, mv);
        load(x, 0, b, j, N, xv);
        load_or(lv, lv_value, b, j, N, l);
        if (dm.p || dx.p) {
            T d[E];
#pragma unroll
            for (int e = 0; e < E; ++e)
                d[e] = gaussian_nll_grad_target(gv[e], xv[e] - mv[e], quarter_scale(l[e]));
            store_opposite(dx, dm, b, j, N, d);
        }
        if (dlv.p)
            store_each<T, E>(dlv, 0, b, j, N, [&](int e) {
                return gaussian_nll_grad_logvar(gv[e], xv[e] - mv[e], quarter_scale(l[e]));
            });
    }
};

template <class T, class S, int E>
struct SampleAndKlFwd {
    In<S> mu, lv;
    Out<S> z;
    const int64_t* seed;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j, T (&v)[E]) const {
        T m[E], l[E], ep[E], zv[E];
        load(mu, 0, b, j, N, m);
        load(lv, 0, b, j, N, l);
        noise(seed, b * N + j, ep);
#pragma unroll
        for (int e = 0; e < E; ++e) {
            zv[e] = m[e] + std_times(ep[e], exp_(T(0.25) * l[e]));
            v[e] = j + e < N ? kl_standard(m[e], l[e]) : T(0);
        }
        store(z, 0, b, j, N, zv);
    }
};

template <class T, class S, int E>
struct SampleAndKlBwd {
    In<S> gz;
    In<T> gkl;
    In<S> mu, lv;
    Out<S> dmu, dlv;
    const int64_t* seed;
    int64_t N;
    __device__ void operator()(int64_t b, int64_t j) const {
        T g[E], gk[E];
        load(gz, 0, b, j, N, g);
        load(gkl, 0, b, j, N, gk);
        if (dmu.p) {
            T m[E];
            load(mu, 0, b, j, N, m);
            store_each<T, E>(dmu, 0, b, j, N, [&](int e) { return g[e] + gk[e] * m[e]; });
        }
        if (dlv.p) {
            T l[E], ep[E];
            load(lv, 0, b, j, N, l);
            noise(seed, b * N + j, ep);
            store_each<T, E>(dlv, 0, b, j, N, [&](int e) {
                return sample_and_kl_grad_logvar(g[e], gk[e], ep[e], l[e], exp_(T(0.25) * l[e]));
            });
        }
    }
};

// IWAE forward, pass 1: the event sums of the log-weights as per-sample sums over the K * B
// rows r = k * B + b (sum_rows_kernel, partials always in the workspace).
template <class T, class S, int E>
struct IwaeTerms {
    In<S> z, mu, lv;
    int64_t B, N;
    __device__ void operator()(int64_t r, int64_t j, T (&v)[E]) const {
        const int64_t k = r / B, b = r - k * B;
        T zv[E], m[E], l[E];
        load(z, k, b, j, N, zv);
        load(mu, 0, b, j, N, m);
        load(lv, 0, b, j, N, l);
#pragma unroll
        for (int e = 0; e < E; ++e)
            v[e] = j + e < N ? iwae_term(zv[e], m[e], l[e], quarter_scale(l[e])) : T(0);
    }
};

// IWAE forward, pass 2: one thread per row b, samples in order: log_w[k, b] = log_px[k, b] +
// the partials of row k * B + b in split order, then the online log-sum-exp; ll[b].
template <class T>
__global__ void iwae_lse_kernel(const T* partial, int64_t n_split, AnyKB lpx, T* lw,
                                int64_t lw_sk, int64_t lw_sb, T* ll, int64_t ll_stride,
                                int64_t B, int64_t K, T log_k) {
    for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B;
         b += int64_t(gridDim.x) * blockDim.x) {
        T m = -T(__builtin_huge_val()), r = T(0);
        for (int64_t k = 0; k < K; ++k) {
            const T* p = partial + (k * B + b) * n_split;
            T sum = T(0);
            for (int64_t s = 0; s < n_split; ++s) sum += p[s];
            const T w = load_kb<T>(lpx, k, b) + sum;
            lw[k * lw_sk + b * lw_sb] = w;
            iwae_lse_step(m, r, w);
        }
        ll[b * ll_stride] = iwae_ll(m, r, log_k);
    }
}

// IWAE backward: elementwise over (b, j), the samples in order inside; the thread of column 0
// of a row writes d log_px for all its samples.
template <class T, class S, int E>
struct IwaeBwd {
    In<T> g, ll, lw;  // g, ll: (B,) read at stride sb; lw: (K, B)
    In<S> z, mu, lv;
    AnyKB dlpx;
    Out<S> dz, dmu, dlv;
    int64_t N, K;
    T log_k;
    __device__ void operator()(int64_t b, int64_t j) const {
        const bool write_lpx = dlpx.p != nullptr && j == 0;
        const bool need_z = dz.p != nullptr || dmu.p != nullptr || dlv.p != nullptr;
        if (!write_lpx && !need_z) return;
        const T gv = g.p[b * g.sb];
        const T lse = ll.p[b * ll.sb] + log_k;
        T m[E], l[E], q[E], em[E], sm[E], sl[E];
        if (need_z) {
            load(mu, 0, b, j, N, m);
            load(lv, 0, b, j, N, l);
        } else {
#pragma unroll
            for (int e = 0; e < E; ++e) m[e] = l[e] = T(0);
        }
#pragma unroll
        for (int e = 0; e < E; ++e) {
            q[e] = quarter_scale(l[e]);
            em[e] = expm1_neg_small(l[e]);
            sm[e] = T(0);
            sl[e] = T(0);
        }
        for (int64_t k = 0; k < K; ++k) {
            const T a = iwae_weight(gv, lw.p[k * lw.sk + b * lw.sb], lse);
            if (write_lpx) store_kb(dlpx, k, b, a);
            if (!need_z) continue;
            T zv[E], d[E];
            load(z, k, b, j, N, zv);
#pragma unroll
            for (int e = 0; e < E; ++e) {
                const IwaeGrads<T> r = iwae_grads(a, zv[e], m[e], l[e], q[e], em[e]);
                d[e] = r.z;
                sm[e] += r.mu;
                sl[e] += r.lv;
            }
            if (dz.p) store(dz, k, b, j, N, d);
        }
        if (dmu.p) store(dmu, 0, b, j, N, sm);
        if (dlv.p) store(dlv, 0, b, j, N, sl);
    }
};

// ---------------------------------------------------------------------------------------------
// Host side: geometry, launches, dispatch
// ---------------------------------------------------------------------------------------------

int cuda_error(cudaError_t err, const char* what) {
    return set_error(FV_ERR_CUDA, "CUDA error in %s: %s (%s)", what, cudaGetErrorString(err),
                     cudaGetErrorName(err));
}

std::atomic<int> g_sm_count[64];

int sm_count(int device) {
    if (device >= 0 && device < 64) {
        const int cached = g_sm_count[device].load();
        if (cached > 0) return cached;
    }
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        n <= 0) {
        (void)cudaGetLastError();
        n = 108;
    }
    if (device >= 0 && device < 64) g_sm_count[device].store(n);
    return n;
}

struct Geometry {
    int tx, ty;
};

// tx: threads along N (a power of two, up to 256, covering N / E); ty = 256 / tx rows.
Geometry geometry(int64_t N, int E) {
    const int64_t cols = cdiv(N, E);
    int tx = 1;
    while (tx < cols && tx < kThreads) tx *= 2;
    return {tx, kThreads / tx};
}

// How a sum is spread over blocks: n_split blocks per output row (reduce_dim 1) or per output
// column tile (reduce_dim 0), enough blocks to fill the GPU.
struct SumPlan {
    Geometry g;
    dim3 grid;
    int64_t n_split, n_out;
    int64_t workspace_bytes;
};

SumPlan plan_sum(const fv_call& c, int E, size_t compute_size, int reduce_dim) {
    SumPlan p;
    p.g = geometry(c.N, E);
    const int64_t target_blocks = 8 * int64_t(sm_count(c.device));
    const int64_t col_tiles = cdiv(c.N, int64_t(p.g.tx) * E);
    const int64_t row_tiles = cdiv(c.B, p.g.ty);
    // The output's tiles (rows for per-sample sums, on grid y; columns, on grid x) and the
    // tiles each output block sums over, spread over n_split blocks (the other grid axis).
    const bool per_sample = reduce_dim == 1;
    const int64_t out_tiles = per_sample ? row_tiles : col_tiles;
    const int64_t sum_tiles = per_sample ? col_tiles : row_tiles;
    const int64_t out_max = per_sample ? int64_t(kMaxGridY) : kMaxGridX;
    const int64_t outer = out_tiles < out_max ? out_tiles : out_max;
    int64_t split = cdiv(target_blocks, outer);
    split = split < sum_tiles ? split : sum_tiles;
    split = split < kMaxGridY ? split : kMaxGridY;
    p.n_split = split;
    p.n_out = per_sample ? c.B : c.N;
    p.grid = per_sample ? dim3(unsigned(split), unsigned(outer))
                        : dim3(unsigned(outer), unsigned(split));
    p.workspace_bytes = p.n_split > 1 ? p.n_split * p.n_out * int64_t(compute_size) : 0;
    return p;
}

int check_launch(const char* what) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? FV_OK : cuda_error(err, what);
}

// FV_OK if the caller's workspace holds the `need` bytes fv_cuda_workspace_bytes() asked for.
int check_workspace(const fv_call& c, int64_t need) {
    if (c.workspace == nullptr || c.workspace_bytes < need)
        return set_error(FV_ERR_INVALID, "the workspace is smaller than the %lld bytes that "
                         "fv_cuda_workspace_bytes() asked for", static_cast<long long>(need));
    return FV_OK;
}

template <int E, class Op>
int launch_elementwise(const Op& op, const fv_call& c, cudaStream_t stream) {
    const Geometry g = geometry(c.N, E);
    const int64_t cols = cdiv(c.N, int64_t(g.tx) * E);
    const int64_t rows = cdiv(c.B, g.ty);
    const dim3 grid(unsigned(cols < kMaxGridX ? cols : kMaxGridX),
                    unsigned(rows < kMaxGridY ? rows : kMaxGridY));
    elementwise_kernel<E><<<grid, dim3(g.tx, g.ty), 0, stream>>>(op, c.B, c.N);
    return check_launch("an elementwise kernel");
}

template <class T, int E, class Op>
int launch_sum(const Op& op, const fv_call& c, const fv_tensor& out, int reduce_dim,
               cudaStream_t stream) {
    const SumPlan p = plan_sum(c, E, sizeof(T), reduce_dim);
    T* result = static_cast<T*>(out.data);
    T* dst = result;
    int64_t dst_stride = out.stride[2];
    if (p.n_split > 1) {
        if (const int status = check_workspace(c, p.workspace_bytes); status != FV_OK)
            return status;
        dst = static_cast<T*>(c.workspace);
        dst_stride = 1;
    }
    const dim3 block(p.g.tx, p.g.ty);
    if (reduce_dim == 1)
        sum_rows_kernel<E, T><<<p.grid, block, 0, stream>>>(op, c.B, c.N, dst, dst_stride);
    else
        sum_cols_kernel<E, T><<<p.grid, block, 0, stream>>>(op, c.B, c.N, dst, dst_stride);
    int status = check_launch("a sum kernel");
    if (status != FV_OK || p.n_split == 1) return status;
    const int64_t blocks = cdiv(p.n_out, kThreads);
    combine_kernel<T><<<unsigned(blocks < kMaxGridX ? blocks : kMaxGridX), kThreads, 0, stream>>>(
        dst, result, out.stride[2], p.n_out, p.n_split, reduce_dim);
    return check_launch("the partial-sum kernel");
}

// The dtypes of the operands, as the marks of the op's line of FV_OPS say: `#` the compute
// dtype (validate_call checked those), `~` any float dtype, the others the storage dtype (that
// of the main input `*`), which the compute dtype must go with.
int check_dtypes(int32_t op, const fv_call& c) {
    const OpSpec& s = kOps[op];
    const int32_t storage = c.in[s.in.main].dtype;
    if (c.compute != compute_dtype(storage))
        return set_error(FV_ERR_INVALID, "compute dtype %d does not go with storage dtype %d",
                         c.compute, storage);
    for (int i = 0; i < FV_MAX_IN; ++i) {
        if (c.in[i].data == nullptr || bit(s.in.compute | s.in.any | s.in.index, i)) continue;
        if (c.in[i].dtype != storage)
            return set_error(FV_ERR_INVALID, "input %d has dtype code %d, the CUDA kernels "
                             "expect %d", i, c.in[i].dtype, storage);
    }
    for (int i = 0; i < FV_MAX_OUT; ++i) {
        if (c.out[i].data == nullptr || bit(s.out.compute | s.out.any | s.out.index, i)) continue;
        if (c.out[i].dtype != storage)
            return set_error(FV_ERR_INVALID, "output %d has dtype code %d, the CUDA kernels "
                             "expect %d", i, c.out[i].dtype, storage);
    }
    return FV_OK;
}

// The K * B rows of IWAE's event sums as a per-sample sum plan; workspace: all partials.
SumPlan plan_iwae(const fv_call& c, int E, size_t compute_size) {
    fv_call rows = c;
    rows.B = c.K * c.B;
    SumPlan p = plan_sum(rows, E, compute_size, 1);
    p.workspace_bytes = p.n_split * rows.B * int64_t(compute_size);
    return p;
}

template <class T, class S, int E>
int launch_iwae_fwd(const fv_call& c, cudaStream_t stream) {
    const SumPlan p = plan_iwae(c, E, sizeof(T));
    if (const int status = check_workspace(c, p.workspace_bytes); status != FV_OK)
        return status;
    T* partial = static_cast<T*>(c.workspace);
    const IwaeTerms<T, S, E> op{make_in<S>(c.in[1]), make_in<S>(c.in[2]), make_in<S>(c.in[3]),
                                c.B, c.N};
    sum_rows_kernel<E, T><<<p.grid, dim3(p.g.tx, p.g.ty), 0, stream>>>(op, c.K * c.B, c.N,
                                                                        partial, 1);
    const int status = check_launch("the IWAE event-sum kernel");
    if (status != FV_OK) return status;
    const fv_tensor &LL = c.out[0], &LW = c.out[1];
    const int64_t blocks = cdiv(c.B, kThreads);
    iwae_lse_kernel<T><<<unsigned(blocks < kMaxGridX ? blocks : kMaxGridX), kThreads, 0,
                         stream>>>(partial, p.n_split, make_any_kb(c.in[0]),
                                   static_cast<T*>(LW.data), LW.stride[0], LW.stride[1],
                                   static_cast<T*>(LL.data), LL.stride[2], c.B, c.K,
                                   log_(T(c.K)));
    return check_launch("the IWAE log-sum-exp kernel");
}

// Discretized mixture of logistics: one thread per pixel (b, j), the mixtures and channels in
// a loop (the formulas of fastvae_math.h's dmol_channel); params is a (P, B, N) view.
template <class T, class S>
struct Dmol {
    In<S> p;
    In<T> x[3];
    int64_t M;
    int C;
    DmolBins<T> bins;

    __device__ T param(int64_t row, int64_t b, int64_t j) const {
        return from_storage<T>(p.p[row * p.sk + b * p.sb + j * p.sn]);
    }
    __device__ T xv(int ch, int64_t b, int64_t j) const {
        return x[ch].p[b * x[ch].sb + j * x[ch].sn];
    }
    // mu' of channel ch, mixture k; raw log-scale in raw.
    __device__ T coupled(int ch, int64_t k, int64_t b, int64_t j, T x0, T x1, T& raw) const {
        const int64_t J = C == 1 ? 2 : 3, base = M + ch * J * M;
        T mu = param(base + k, b, j);
        if (C == 3 && ch == 1) mu += dmol_tanh(param(3 * M + k, b, j)) * x0;
        if (C == 3 && ch == 2)
            mu += dmol_tanh(param(6 * M + k, b, j)) * x0 + dmol_tanh(param(9 * M + k, b, j)) * x1;
        raw = param(base + M + k, b, j);
        return mu;
    }
    // The logits' log-normalizer and the joint's log-sum-exp at pixel (b, j).
    __device__ void prepare(int64_t b, int64_t j, T& log_norm, T& lse) const {
        const T x0 = xv(0, b, j), x1 = C == 3 ? xv(1, b, j) : T(0);
        T m1 = -T(__builtin_huge_val()), r1 = T(0), m2 = m1, r2 = T(0);
        for (int64_t k = 0; k < M; ++k) {
            const T l = param(k, b, j);
            iwae_lse_step(m1, r1, l);
            T t = l;
            for (int ch = 0; ch < C; ++ch) {
                T raw;
                const T mu = coupled(ch, k, b, j, x0, x1, raw);
                const T xc = ch == 0 ? x0 : ch == 1 ? x1 : xv(2, b, j);
                t += dmol_channel<T, false>(xc - mu, raw < T(-7) ? T(-7) : raw, xc, bins).value;
            }
            iwae_lse_step(m2, r2, t);
        }
        log_norm = m1 + log_(r1);
        lse = m2 + log_(r2);
    }
};

template <class T, class S>
struct DmolFwd {
    Dmol<T, S> d;
    __device__ void operator()(int64_t b, int64_t j, T (&v)[1]) const {
        T log_norm, lse;
        d.prepare(b, j, log_norm, lse);
        v[0] = log_norm - lse;
    }
};

template <class T, class S>
struct DmolBwd {
    Dmol<T, S> d;
    In<T> g;
    Out<S> dp;
    __device__ void put(int64_t row, int64_t b, int64_t j, T v) const {
        dp.p[row * dp.sk + b * dp.sb + j * dp.sn] = ToStorage<S>::cvt(v);
    }
    __device__ void operator()(int64_t b, int64_t j) const {
        T log_norm, lse;
        d.prepare(b, j, log_norm, lse);
        const T gv = g.p[b * g.sb + j * g.sn];
        const int C = d.C;
        const int64_t M = d.M, J = C == 1 ? 2 : 3;
        const T x0 = d.xv(0, b, j), x1 = C == 3 ? d.xv(1, b, j) : T(0);
        const T x2 = C == 3 ? d.xv(2, b, j) : T(0);
        for (int64_t k = 0; k < M; ++k) {
            const T l = d.param(k, b, j);
            T t = l, dc[3], ds[3];  // lse is that of the unnormalized joint
            for (int ch = 0; ch < C; ++ch) {
                T raw;
                const T mu = d.coupled(ch, k, b, j, x0, x1, raw);
                const T xc = ch == 0 ? x0 : ch == 1 ? x1 : x2;
                const DmolTerm<T> term =
                    dmol_channel<T, true>(xc - mu, raw < T(-7) ? T(-7) : raw, xc, d.bins);
                t += term.value;
                dc[ch] = term.dc;
                ds[ch] = raw >= T(-7) ? term.ds : T(0);
            }
            const T gr = gv * exp_(t - lse);
            put(k, b, j, gv * exp_(l - log_norm) - gr);
            for (int ch = 0; ch < C; ++ch) {
                const int64_t base = M + ch * J * M;
                put(base + k, b, j, gr * dc[ch]);
                put(base + M + k, b, j, -gr * ds[ch]);
            }
            if (C == 3) {
                put(3 * M + k, b, j, gr * dc[1] * x0 * dmol_sech2(d.param(3 * M + k, b, j)));
                put(6 * M + k, b, j, gr * dc[2] * x0 * dmol_sech2(d.param(6 * M + k, b, j)));
                put(9 * M + k, b, j, gr * dc[2] * x1 * dmol_sech2(d.param(9 * M + k, b, j)));
            }
        }
    }
};

template <class T, class S>
Dmol<T, S> make_dmol(const fv_call& c, int first) {
    Dmol<T, S> d;
    d.p = make_in<S>(c.in[first]);
    for (int ch = 0; ch < 3; ++ch) d.x[ch] = make_in<T>(c.in[first + 1 + ch]);
    d.M = c.K;
    d.C = c.in[first + 2].data ? 3 : 1;
    d.bins = dmol_bins<T>(c.scalar);
    return d;
}

// ---------------------------------------------------------------------------------------------
// Nearest code (vector quantization). The distance in the one order of every backend
// (nearest_code.inc, docs/numerics.md): acc = 0; for j: t = x_j - e_j, acc = acc + t * t (l2),
// or acc = acc + x^_j * e^_j and 1 - acc (cosine), each operation rounded (the _rn intrinsics:
// nvcc would otherwise fuse them into FMAs); the normalization x / max(sqrt(n), 1e-12), n the
// sum of squares in j order, with a correctly rounded sqrt and division. Two small kernels
// convert x and the codebook to contiguous compute-dtype copies in the workspace (normalized for
// cosine); the search kernel gives each thread one row and walks the codebook in tiles held in
// shared memory, keeping the row's running best (strictly closer replaces: the lowest index of
// the least distance; a NaN distance never wins; no distance below +inf gives code 0).
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float nc_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double nc_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float nc_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double nc_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float nc_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double nc_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float nc_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double nc_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float nc_sqrt(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double nc_sqrt(double a) { return __dsqrt_rn(a); }
template <class T> __device__ __forceinline__ T nc_inf();
template <> __device__ __forceinline__ float nc_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double nc_inf<double>() {
    return __longlong_as_double(0x7ff0000000000000LL);
}

// rows [0, M) of a strided (M, D) operand -> a contiguous (M, D) copy in T, normalized for
// cosine; one thread per row.
template <class T, class S>
__global__ void nc_pack_kernel(const S* src, int64_t s_row, int64_t s_col, int64_t M, int64_t D,
                               bool cosine, T* dst) {
    for (int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; m < M;
         m += int64_t(gridDim.x) * blockDim.x) {
        const S* row = src + m * s_row;
        T* out = dst + m * D;
        T n = T(0);
        for (int64_t j = 0; j < D; ++j) {
            const T v = from_storage<T>(row[j * s_col]);
            out[j] = v;
            n = nc_add(n, nc_mul(v, v));
        }
        if (cosine) {
            T norm = nc_sqrt(n);
            norm = norm < T(1e-12) ? T(1e-12) : norm;  // NaN passes
            for (int64_t j = 0; j < D; ++j) out[j] = nc_div(out[j], norm);
        }
    }
}

constexpr int kNcThreads = 128;
constexpr int kNcSharedBytes = 16384;

// Blocks of kNcThreads for a grid-stride loop over m items (at most 65535).
unsigned nc_blocks(int64_t m) {
    const int64_t n = cdiv(m, kNcThreads);
    return unsigned(n < 65535 ? n : 65535);
}

// Codes of D elements of T per shared-memory tile (at least 1: D > 4096 in float32 reads one
// code at a time from global memory).
template <class T>
int64_t nc_tile(int64_t D) {
    const int64_t tile = kNcSharedBytes / (D * int64_t(sizeof(T)));
    return tile < 1 ? 1 : tile;
}

template <class T>
__device__ __forceinline__ T nc_distance(const T* x, const T* e, int64_t D, bool cosine) {
    T acc = T(0);
    if (cosine) {
        for (int64_t j = 0; j < D; ++j) acc = nc_add(acc, nc_mul(x[j], e[j]));
        return nc_sub(T(1), acc);
    }
    for (int64_t j = 0; j < D; ++j) {
        const T t = nc_sub(x[j], e[j]);
        acc = nc_add(acc, nc_mul(t, t));
    }
    return acc;
}

template <class T>
__global__ void __launch_bounds__(kNcThreads)
nc_search_kernel(const T* x, const T* codebook, int64_t B, int64_t K, int64_t D, bool cosine,
                 int64_t tile, int64_t* index, int64_t s_index, T* dist, int64_t s_dist) {
    __shared__ __align__(16) unsigned char smem[kNcSharedBytes];
    T* codes = reinterpret_cast<T*>(smem);
    const int64_t b = blockIdx.x * int64_t(kNcThreads) + threadIdx.x;
    const bool live = b < B;
    const T* xr = x + (live ? b : 0) * D;
    const T inf = nc_inf<T>();
    T best = inf;
    int64_t best_k = 0;
    for (int64_t k0 = 0; k0 < K; k0 += tile) {
        const int64_t n = K - k0 < tile ? K - k0 : tile;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < n * D; i += kNcThreads) codes[i] = codebook[k0 * D + i];
        __syncthreads();
        if (!live) continue;
        for (int64_t k = 0; k < n; ++k) {
            const T d = nc_distance(xr, codes + k * D, D, cosine);
            if (d < best) {
                best = d;
                best_k = k0 + k;
            }
        }
    }
    if (!live) return;
    if (!(best < inf)) {  // no distance below +inf: code 0 and its distance (NaN or +inf)
        best_k = 0;
        best = nc_distance(xr, codebook, D, cosine);
    }
    index[b * s_index] = best_k;
    dist[b * s_dist] = best;
}

// D too large for one code in shared memory: the codes straight from global memory.
template <class T>
__global__ void __launch_bounds__(kNcThreads)
nc_search_global_kernel(const T* x, const T* codebook, int64_t B, int64_t K, int64_t D,
                        bool cosine, int64_t* index, int64_t s_index, T* dist, int64_t s_dist) {
    const int64_t b = blockIdx.x * int64_t(kNcThreads) + threadIdx.x;
    if (b >= B) return;
    const T* xr = x + b * D;
    const T inf = nc_inf<T>();
    T best = inf;
    int64_t best_k = 0;
    for (int64_t k = 0; k < K; ++k) {
        const T d = nc_distance(xr, codebook + k * D, D, cosine);
        if (d < best) {
            best = d;
            best_k = k;
        }
    }
    if (!(best < inf)) {
        best_k = 0;
        best = nc_distance(xr, codebook, D, cosine);
    }
    index[b * s_index] = best_k;
    dist[b * s_dist] = best;
}

int64_t nc_workspace_bytes(const fv_call& c) {
    return (c.K + c.B) * c.N * int64_t(dtype_size(c.compute)) + 256;
}

template <class T, class S>
int launch_nearest_code(const fv_call& c, cudaStream_t stream) {
    const int64_t B = c.B, K = c.K, D = c.N;
    if (c.scalar != 0.0 && c.scalar != 1.0)
        return set_error(FV_ERR_INVALID, "nearest_code_fwd: the metric (scalar) is 0 (l2) or 1 "
                         "(cosine), got %g", c.scalar);
    const bool cosine = c.scalar == 1.0;
    if (const int status = check_workspace(c, nc_workspace_bytes(c)); status != FV_OK)
        return status;
    T* cb = static_cast<T*>(c.workspace);
    T* xs = cb + K * D;
    const fv_tensor &X = c.in[0], &E = c.in[1];
    nc_pack_kernel<T, S><<<nc_blocks(K), kNcThreads, 0, stream>>>(
        static_cast<const S*>(E.data), E.stride[0], E.stride[2], K, D, cosine, cb);
    int status = check_launch("the nearest-code codebook kernel");
    if (status != FV_OK) return status;
    nc_pack_kernel<T, S><<<nc_blocks(B), kNcThreads, 0, stream>>>(
        static_cast<const S*>(X.data), X.stride[1], X.stride[2], B, D, cosine, xs);
    status = check_launch("the nearest-code rows kernel");
    if (status != FV_OK) return status;
    const int64_t tile = nc_tile<T>(D);  // 1: one code at a time, read from global below
    const int64_t grid = cdiv(B, kNcThreads);
    if (grid > kMaxGridX) return set_error(FV_ERR_INVALID, "nearest_code_fwd: too many rows");
    if (D * int64_t(sizeof(T)) > kNcSharedBytes)
        nc_search_global_kernel<T><<<unsigned(grid), kNcThreads, 0, stream>>>(
            xs, cb, B, K, D, cosine, static_cast<int64_t*>(c.out[0].data), c.out[0].stride[2],
            static_cast<T*>(c.out[1].data), c.out[1].stride[2]);
    else
        nc_search_kernel<T><<<unsigned(grid), kNcThreads, 0, stream>>>(
            xs, cb, B, K, D, cosine, tile, static_cast<int64_t*>(c.out[0].data),
            c.out[0].stride[2], static_cast<T*>(c.out[1].data), c.out[1].stride[2]);
    return check_launch("the nearest-code search kernel");
}

// ---------------------------------------------------------------------------------------------
// Residual VQ (residual_vq.inc's order, docs/numerics.md "the residual"): x packed once into the
// residual r (workspace), then per level the nearest-code search above on r against that level's
// packed codebook, and rvq_update_kernel (one thread per row): c = codebook[i], r = r - c,
// q = q + c with the _rn intrinsics where the row is active. Workspace: the packed level
// codebook (K x D), r and q (B x D each), the level's indices and distances (B each).
// The backward (one thread per row, levels in order) advances r in the workspace and
// accumulates d x; the codebooks' gradient (a learned codebook) is not implemented here (the
// Triton backend has it).
// ---------------------------------------------------------------------------------------------

int64_t rvq_workspace_bytes(const fv_call& c) {
    const int64_t T = int64_t(dtype_size(c.compute));
    if (c.in[1].data == nullptr) return 0;
    return (c.K * c.N + 2 * c.B * c.N + c.B) * T + c.B * int64_t(sizeof(int64_t)) + 512;
}

int64_t rvq_bwd_workspace_bytes(const fv_call& c) {
    return c.B * c.N * int64_t(dtype_size(c.compute)) + 256;
}

template <class T>
__global__ void rvq_update_kernel(T* r, T* q, const T* codebook, const int64_t* index,
                                  const T* dist, const int64_t* levels, int64_t s_levels,
                                  int64_t level, int64_t B, int64_t D, int64_t* out_index,
                                  int64_t s_i_b, int64_t s_i_l, T* commit, int64_t s_c_b,
                                  int64_t s_c_l, T* out_dist, int64_t s_d_b, int64_t s_d_l) {
    for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
         b += int64_t(gridDim.x) * blockDim.x) {
        const bool active = levels == nullptr || level < levels[b * s_levels];
        int64_t k = -1;
        T d = T(0);
        if (active) {
            k = index[b];
            d = dist[b];
            const T* e = codebook + k * D;
            T* rb = r + b * D;
            T* qb = q + b * D;
            for (int64_t j = 0; j < D; ++j) {
                rb[j] = nc_sub(rb[j], e[j]);
                qb[j] = nc_add(qb[j], e[j]);
            }
        }
        out_index[b * s_i_b + level * s_i_l] = k;
        commit[b * s_c_b + level * s_c_l] = d;
        out_dist[b * s_d_b + level * s_d_l] = d;
    }
}

template <class T>
__global__ void rvq_store_kernel(const T* q, int64_t B, int64_t D, T* out, int64_t s_b,
                                 int64_t s_d) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < B * D;
         i += int64_t(gridDim.x) * blockDim.x)
        out[(i / D) * s_b + (i % D) * s_d] = q[i];
}

template <class T, class S>
int launch_residual_vq_fwd(const fv_call& c, cudaStream_t stream) {
    const int64_t B = c.B, K = c.K, D = c.N, L = int64_t(c.scalar) + 1;
    if (L < 1) return set_error(FV_ERR_INVALID, "residual_vq_fwd: L = %lld levels",
                                static_cast<long long>(L));
    if (const int status = check_workspace(c, rvq_workspace_bytes(c)); status != FV_OK)
        return status;
    T* cb = static_cast<T*>(c.workspace);
    T* r = cb + K * D;
    T* q = r + B * D;
    T* dist = q + B * D;
    int64_t* index = reinterpret_cast<int64_t*>(
        (reinterpret_cast<uintptr_t>(dist + B) + 255) & ~uintptr_t(255));
    const fv_tensor &X = c.in[0], &E = c.in[1], &Lev = c.in[2];
    nc_pack_kernel<T, S><<<nc_blocks(B), kNcThreads, 0, stream>>>(
        static_cast<const S*>(X.data), X.stride[1], X.stride[2], B, D, false, r);
    int status = check_launch("the residual-VQ rows kernel");
    if (status != FV_OK) return status;
    cudaError_t err = cudaMemsetAsync(q, 0, size_t(B * D) * sizeof(T), stream);
    if (err != cudaSuccess) return cuda_error(err, "clearing the residual-VQ sum");
    const int64_t tile = nc_tile<T>(D);
    const int64_t grid = cdiv(B, kNcThreads);
    if (grid > kMaxGridX) return set_error(FV_ERR_INVALID, "residual_vq_fwd: too many rows");
    for (int64_t l = 0; l < L; ++l) {
        const S* level = static_cast<const S*>(E.data) + l * E.stride[1];
        nc_pack_kernel<T, S><<<nc_blocks(K), kNcThreads, 0, stream>>>(
            level, E.stride[0], E.stride[2], K, D, false, cb);
        status = check_launch("the residual-VQ codebook kernel");
        if (status != FV_OK) return status;
        if (D * int64_t(sizeof(T)) > kNcSharedBytes)
            nc_search_global_kernel<T><<<unsigned(grid), kNcThreads, 0, stream>>>(
                r, cb, B, K, D, false, index, 1, dist, 1);
        else
            nc_search_kernel<T><<<unsigned(grid), kNcThreads, 0, stream>>>(
                r, cb, B, K, D, false, tile, index, 1, dist, 1);
        status = check_launch("the residual-VQ search kernel");
        if (status != FV_OK) return status;
        rvq_update_kernel<T><<<nc_blocks(B), kNcThreads, 0, stream>>>(
            r, q, cb, index, dist, static_cast<const int64_t*>(Lev.data), Lev.stride[1], l, B, D,
            static_cast<int64_t*>(c.out[0].data), c.out[0].stride[1], c.out[0].stride[2],
            static_cast<T*>(c.out[2].data), c.out[2].stride[1], c.out[2].stride[2],
            static_cast<T*>(c.out[3].data), c.out[3].stride[1], c.out[3].stride[2]);
        status = check_launch("the residual-VQ update kernel");
        if (status != FV_OK) return status;
    }
    rvq_store_kernel<T><<<nc_blocks(B * D), kNcThreads, 0, stream>>>(
        q, B, D, static_cast<T*>(c.out[1].data), c.out[1].stride[1], c.out[1].stride[2]);
    return check_launch("the residual-VQ store kernel");
}

// One thread per row: d x = sum over the active levels of ST_l(g) + (2 g_commit_l) (r_l - c_l)
// (residual_vq.inc's rvq_rotation for ST with the rotation trick), r advanced in place.
template <class T, class S>
__global__ void rvq_bwd_kernel(const T* gq, int64_t s_g_b, int64_t s_g_d, const T* gc,
                               int64_t s_gc_b, int64_t s_gc_l, const int64_t* index,
                               int64_t s_i_b, int64_t s_i_l, const S* e, int64_t s_e_k,
                               int64_t s_e_l, int64_t s_e_d, int64_t B, int64_t D, int64_t L,
                               int64_t K, bool rotation, T* r, T* dx, int64_t s_dx_b,
                               int64_t s_dx_d) {
    for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < B;
         b += int64_t(gridDim.x) * blockDim.x) {
        T* rb = r + b * D;
        const T* g = gq + b * s_g_b;
        for (int64_t j = 0; j < D; ++j) dx[b * s_dx_b + j * s_dx_d] = T(0);
        for (int64_t l = 0; l < L; ++l) {
            const int64_t k = index[b * s_i_b + l * s_i_l];
            if (k < 0 || k >= K) continue;
            const S* code = e + k * s_e_k + l * s_e_l;
            const T gcl = gc[b * s_gc_b + l * s_gc_l];
            T lam = T(0), rd = T(1), cd = T(1), wd = T(1), wg = T(0), cg = T(0);
            bool ok = false;
            if (rotation) {
                const T tiny = sizeof(T) == 4 ? T(1.17549435e-38f) : T(2.2250738585072014e-308);
                T rr = T(0), cc = T(0), rc = T(0), rg = T(0), cgs = T(0);
                for (int64_t j = 0; j < D; ++j) {
                    const T rv = rb[j], cv = from_storage<T>(code[j * s_e_d]);
                    const T gv = g[j * s_g_d];
                    rr += rv * rv;
                    cc += cv * cv;
                    rc += rv * cv;
                    rg += rv * gv;
                    cgs += cv * gv;
                }
                const T rn = nc_sqrt(rr), cn = nc_sqrt(cc);
                rd = rn > tiny ? rn : tiny;
                cd = cn > tiny ? cn : tiny;
                const T wn = nc_sqrt(rr / (rd * rd) + T(2) * rc / (rd * cd) + cc / (cd * cd));
                wd = wn > tiny ? wn : tiny;
                wg = (rg / rd + cgs / cd) / wd;
                cg = cgs / cd;
                lam = cn / rd;
                ok = rn > T(0) && (wn > T(1e-6) || cn == T(0));
            }
            for (int64_t j = 0; j < D; ++j) {
                const T rv = rb[j], cv = from_storage<T>(code[j * s_e_d]), gv = g[j * s_g_d];
                T st = gv;
                if (ok) {
                    const T u = rv / rd;
                    const T w = (u + cv / cd) / wd;
                    st = lam * (gv - T(2) * w * wg + T(2) * u * cg);
                }
                const T ev = nc_sub(rv, cv);
                T* out = dx + b * s_dx_b + j * s_dx_d;
                *out = *out + (st + T(2) * gcl * ev);
                rb[j] = ev;
            }
        }
    }
}

template <class T, class S>
int launch_residual_vq_bwd(const fv_call& c, cudaStream_t stream) {
    const int64_t B = c.B, K = c.K, D = c.N, L = int64_t(c.scalar) + 1;
    if (c.out[1].data != nullptr)
        return set_error(FV_ERR_NOT_BUILT, "residual_vq_bwd: the codebooks' gradient has no "
                         "CUDA kernel (a learned codebook: use the triton backend)");
    if (c.out[0].data == nullptr) return FV_OK;
    if (const int status = check_workspace(c, rvq_bwd_workspace_bytes(c)); status != FV_OK)
        return status;
    T* r = static_cast<T*>(c.workspace);
    const fv_tensor &X = c.in[4], &E = c.in[5];
    const int64_t n = cdiv(B, kNcThreads);
    const unsigned grid = unsigned(n < 65535 ? n : 65535);
    nc_pack_kernel<T, S><<<grid, kNcThreads, 0, stream>>>(
        static_cast<const S*>(X.data), X.stride[1], X.stride[2], B, D, false, r);
    const int status = check_launch("the residual-VQ rows kernel");
    if (status != FV_OK) return status;
    rvq_bwd_kernel<T, S><<<grid, kNcThreads, 0, stream>>>(
        static_cast<const T*>(c.in[0].data), c.in[0].stride[1], c.in[0].stride[2],
        static_cast<const T*>(c.in[1].data), c.in[1].stride[1], c.in[1].stride[2],
        static_cast<const int64_t*>(c.in[3].data), c.in[3].stride[1], c.in[3].stride[2],
        static_cast<const S*>(E.data), E.stride[0], E.stride[1], E.stride[2], B, D, L, K,
        c.reduce_dim == 1, r, static_cast<T*>(c.out[0].data), c.out[0].stride[1],
        c.out[0].stride[2]);
    return check_launch("the residual-VQ backward kernel");
}

// ---------------------------------------------------------------------------------------------
// Lookup-free quantization: the entropy statistics (lfq.inc has the math and the CPU version).
// Direct loops: one thread per (codebook, code) for the sums over rows, one per (row, codebook)
// for the per-row entropy and the backward, each pair (n, k) formed from the row's 2d bit
// factors (O(N K d) work, O(d) registers per thread; no N x K memory). Sums over rows per tile
// of kLfqTileRows, then added (blocked summation, as on the CPU); no atomics.
// ---------------------------------------------------------------------------------------------

constexpr int kLfqThreads = 256;
constexpr int kLfqTileRows = 32;
constexpr int kLfqMaxBits = 30;

template <class T, class S>
__global__ void lfq_sums_kernel(const S* __restrict l, int64_t s_c, int64_t s_r, int64_t s_j,
                                int64_t R, int d, T* __restrict sums, int64_t o_c, int64_t o_k) {
    __shared__ T sig[kLfqTileRows][kLfqMaxBits][2];
    const int64_t K = int64_t(1) << d;
    const int64_t cb = blockIdx.y;
    const int64_t k = int64_t(blockIdx.x) * kLfqThreads + threadIdx.x;
    T acc = T(0);
    for (int64_t n0 = 0; n0 < R; n0 += kLfqTileRows) {
        const int nt = int(R - n0 < kLfqTileRows ? R - n0 : kLfqTileRows);
        __syncthreads();
        for (int i = threadIdx.x; i < nt * d; i += kLfqThreads) {
            const int r = i / d, j = i % d;
            const T v = from_storage<T>(l[cb * s_c + (n0 + r) * s_r + j * s_j]);
            sig[r][j][0] = cuda_math::lfq_sigmoid(-v);
            sig[r][j][1] = cuda_math::lfq_sigmoid(v);
        }
        __syncthreads();
        if (k < K) {
            T tile = T(0);
            for (int r = 0; r < nt; ++r) {
                T p = T(1);
                for (int j = 0; j < d; ++j) p *= sig[r][j][(k >> (d - 1 - j)) & 1];
                tile += p;
            }
            acc += tile;
        }
    }
    if (k < K) sums[cb * o_c + k * o_k] = acc;
}

// Code k's log-probability t = sum_j log P(bit_j = b_j(k)) and probability p = prod_j
// P(bit_j = b_j(k)) (bits most significant first) from the per-bit tables lg and sg.
template <class T>
__device__ __forceinline__ void lfq_code_log_prob(const T (&lg)[kLfqMaxBits][2],
                                                  const T (&sg)[kLfqMaxBits][2], int d,
                                                  int64_t k, T& t, T& p) {
    t = T(0);
    p = T(1);
    for (int j = 0; j < d; ++j) {
        const int b = int((k >> (d - 1 - j)) & 1);
        t += lg[j][b];
        p *= sg[j][b];
    }
}

template <class T, class S>
__global__ void lfq_entropy_kernel(const S* __restrict l, int64_t s_c, int64_t s_r, int64_t s_j,
                                   int64_t R, int64_t C, int d, T eps, T* __restrict h,
                                   int64_t h_c, int64_t h_r) {
    const int64_t i = int64_t(blockIdx.x) * kLfqThreads + threadIdx.x;
    if (i >= R * C) return;
    const int64_t n = i / C, cb = i % C;
    T lg[kLfqMaxBits][2], sg[kLfqMaxBits][2];
    T sum = T(0);
    for (int j = 0; j < d; ++j) {
        const T v = from_storage<T>(l[cb * s_c + n * s_r + j * s_j]);
        lg[j][0] = cuda_math::lfq_log_sigmoid(-v);
        lg[j][1] = cuda_math::lfq_log_sigmoid(v);
        sg[j][0] = cuda_math::lfq_sigmoid(-v);
        sg[j][1] = cuda_math::lfq_sigmoid(v);
        sum += cuda_math::lfq_bit_entropy(v);
    }
    if (eps > T(0)) {
        const T leps = cuda_math::log_(eps);
        const int64_t K = int64_t(1) << d;
        sum = T(0);
        for (int64_t k = 0; k < K; ++k) {
            T t, p;
            lfq_code_log_prob(lg, sg, d, k, t, p);
            sum -= p * (t > leps ? t : leps);
        }
    }
    h[cb * h_c + n * h_r] = sum;
}

template <class T, class S>
__global__ void lfq_backward_kernel(const T* __restrict g, int64_t g_c, int64_t g_k,
                                    const T* __restrict gh, int64_t gh_c, int64_t gh_r,
                                    const S* __restrict l, int64_t s_c, int64_t s_r, int64_t s_j,
                                    int64_t R, int64_t C, int d, T eps, S* __restrict dl,
                                    int64_t d_c, int64_t d_r, int64_t d_j) {
    const int64_t i = int64_t(blockIdx.x) * kLfqThreads + threadIdx.x;
    if (i >= R * C) return;
    const int64_t n = i / C, cb = i % C;
    T lg[kLfqMaxBits][2], sg[kLfqMaxBits][2], s1[kLfqMaxBits], s0[kLfqMaxBits], v[kLfqMaxBits];
    for (int j = 0; j < d; ++j) {
        v[j] = from_storage<T>(l[cb * s_c + n * s_r + j * s_j]);
        lg[j][0] = cuda_math::lfq_log_sigmoid(-v[j]);
        lg[j][1] = cuda_math::lfq_log_sigmoid(v[j]);
        sg[j][0] = cuda_math::lfq_sigmoid(-v[j]);
        sg[j][1] = cuda_math::lfq_sigmoid(v[j]);
        s1[j] = s0[j] = T(0);
    }
    const T ghn = gh[cb * gh_c + n * gh_r];
    const bool clamped = eps > T(0);
    const T leps = clamped ? cuda_math::log_(eps) : T(0);
    const int64_t K = int64_t(1) << d;
    for (int64_t k = 0; k < K; ++k) {
        T t, p;
        lfq_code_log_prob(lg, sg, d, k, t, p);
        T coef = g[cb * g_c + k * g_k];
        if (clamped) {
            const bool above = t > leps;
            coef = coef - ghn * ((above ? t : leps) + (above ? T(1) : T(0)));
        }
        const T w = p * coef;
        for (int j = 0; j < d; ++j) {
            if ((k >> (d - 1 - j)) & 1) s1[j] += w;
            else s0[j] += w;
        }
    }
    for (int j = 0; j < d; ++j) {
        T out = sg[j][0] * s1[j] - sg[j][1] * s0[j];
        if (!clamped) out += ghn * cuda_math::lfq_bit_entropy_grad(v[j]);
        dl[cb * d_c + n * d_r + j * d_j] = ToStorage<S>::cvt(out);
    }
}

template <class T, class S>
int launch_lfq(int32_t op, const fv_call& c, cudaStream_t stream) {
    const int64_t R = c.B, C = c.K;
    if (c.N > kLfqMaxBits)
        return set_error(FV_ERR_INVALID, "lfq_entropy: at most %d bits, got %lld", kLfqMaxBits,
                         static_cast<long long>(c.N));
    if (C > kMaxGridY) return set_error(FV_ERR_INVALID, "lfq_entropy: too many codebooks");
    const int d = int(c.N);
    const int64_t K = int64_t(1) << d;
    const T eps = T(c.scalar);
    const int64_t rows_grid = cdiv(R * C, kLfqThreads);
    if (rows_grid > kMaxGridX) return set_error(FV_ERR_INVALID, "lfq_entropy: too many rows");
    if (op == FV_OP_LFQ_ENTROPY_FWD) {
        const fv_tensor &L = c.in[0], &Sm = c.out[0], &H = c.out[1];
        const dim3 grid(unsigned(cdiv(K, kLfqThreads)), unsigned(C));
        lfq_sums_kernel<T, S><<<grid, kLfqThreads, 0, stream>>>(
            static_cast<const S*>(L.data), L.stride[0], L.stride[1], L.stride[2], R, d,
            static_cast<T*>(Sm.data), Sm.stride[0], Sm.stride[2]);
        const int status = check_launch("the LFQ code-sums kernel");
        if (status != FV_OK) return status;
        lfq_entropy_kernel<T, S><<<unsigned(rows_grid), kLfqThreads, 0, stream>>>(
            static_cast<const S*>(L.data), L.stride[0], L.stride[1], L.stride[2], R, C, d, eps,
            static_cast<T*>(H.data), H.stride[0], H.stride[1]);
        return check_launch("the LFQ entropy kernel");
    }
    const fv_tensor &G = c.in[0], &GH = c.in[1], &L = c.in[2], &D = c.out[0];
    if (D.data == nullptr) return FV_OK;  // no gradient wanted
    lfq_backward_kernel<T, S><<<unsigned(rows_grid), kLfqThreads, 0, stream>>>(
        static_cast<const T*>(G.data), G.stride[0], G.stride[2], static_cast<const T*>(GH.data),
        GH.stride[0], GH.stride[1], static_cast<const S*>(L.data), L.stride[0], L.stride[1],
        L.stride[2], R, C, d, eps, static_cast<S*>(D.data), D.stride[0], D.stride[1],
        D.stride[2]);
    return check_launch("the LFQ backward kernel");
}

// ---------------------------------------------------------------------------------------------
// Finite scalar quantization: the forward one thread per row (its D <= 64 dimensions in order,
// then the row's int64 index), the backward one thread per element; grid-stride loops. The math
// is fv::fsq (fastvae_math.h), with the products that meet an addition rounded by __fmul_rn.
// ---------------------------------------------------------------------------------------------

template <class T>
struct FsqDims {
    const int64_t* levels;
    int64_t s_levels;
    const int64_t* basis;
    int64_t s_basis;
    const T* a;
    int64_t s_a;
    const T* b;
    int64_t s_b;
};

template <class T, class S, bool SYM, bool HARD>
__global__ void fsq_fwd_kernel(In<S> z, FsqDims<T> k, Out<S> codes, int64_t* index,
                               int64_t s_index, int64_t B, int64_t D) {
    const int64_t step = int64_t(gridDim.x) * blockDim.x;
    for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < B; row += step) {
        int64_t acc = 0;
        bool nan = false;
        for (int64_t j = 0; j < D; ++j) {
            const fsq::Dim<T> d =
                fsq::dim<T>(k.levels[j * k.s_levels], k.a[j * k.s_a], k.b[j * k.s_b]);
            const T zv = from_storage<T>(z.p[row * z.sb + j * z.sn]);
            const fsq::Code<T> q = fsq::code<T, SYM, HARD>(zv, d.a, d.b, d.hw, d.top, d.offset);
            codes.p[row * codes.sb + j * codes.sn] = ToStorage<S>::cvt(q.code);
            nan |= q.level != q.level;
            acc += (q.level == q.level ? int64_t(q.level) : int64_t(0)) * k.basis[j * k.s_basis];
        }
        index[row * s_index] = nan ? -1 : acc;
    }
}

template <class T, class S, bool SYM, bool HARD>
__global__ void fsq_bwd_kernel(In<S> g, In<S> z, FsqDims<T> k, Out<S> dz, int64_t B,
                               int64_t D) {
    const int64_t step = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < B * D; i += step) {
        const int64_t row = i / D, j = i - row * D;
        const fsq::Dim<T> d =
            fsq::dim<T>(k.levels[j * k.s_levels], k.a[j * k.s_a], k.b[j * k.s_b]);
        const T gv = from_storage<T>(g.p[row * g.sb + j * g.sn]);
        const T zv = from_storage<T>(z.p[row * z.sb + j * z.sn]);
        dz.p[row * dz.sb + j * dz.sn] =
            ToStorage<S>::cvt(fsq::grad<T, SYM, HARD>(gv, zv, d.a, d.b, d.hw));
    }
}

// levels at in[l], then basis (the forward only), a and b.
template <class T>
FsqDims<T> fsq_dims(const fv_call& c, int l, bool basis) {
    const fv_tensor &L = c.in[l], &A = c.in[basis ? l + 2 : l + 1],
                    &Bc = c.in[basis ? l + 3 : l + 2];
    return {static_cast<const int64_t*>(L.data), L.stride[2],
            basis ? static_cast<const int64_t*>(c.in[l + 1].data) : nullptr,
            basis ? c.in[l + 1].stride[2] : 0,
            static_cast<const T*>(A.data), A.stride[2],
            static_cast<const T*>(Bc.data), Bc.stride[2]};
}

inline unsigned fsq_blocks(int64_t n) {
    const int64_t blocks = cdiv(n, kThreads);
    return unsigned(blocks < 65535 ? blocks : 65535);
}

template <class T, class S, bool SYM, bool HARD>
void fsq_launch(const fv_call& c, bool forward, const FsqDims<T>& k, cudaStream_t stream) {
    if (forward) {
        fsq_fwd_kernel<T, S, SYM, HARD><<<fsq_blocks(c.B), kThreads, 0, stream>>>(
            make_in<S>(c.in[0]), k, make_out<S>(c.out[0]), static_cast<int64_t*>(c.out[1].data),
            c.out[1].stride[2], c.B, c.N);
    } else {
        fsq_bwd_kernel<T, S, SYM, HARD><<<fsq_blocks(c.B * c.N), kThreads, 0, stream>>>(
            make_in<S>(c.in[0]), make_in<S>(c.in[1]), k, make_out<S>(c.out[0]), c.B, c.N);
    }
}

template <class T, class S>
int launch_fsq(const fv_call& c, bool forward, cudaStream_t stream) {
    if (c.N > 64)
        return set_error(FV_ERR_INVALID, "finite_scalar_quantize: at most 64 dimensions, got "
                         "%lld", static_cast<long long>(c.N));
    const int mode = int(c.scalar);
    if (double(mode) != c.scalar || mode < 0 || mode > 3)
        return set_error(FV_ERR_INVALID, "finite_scalar_quantize: the mode (scalar) is 0 .. 3, "
                         "got %g", c.scalar);
    const FsqDims<T> k = fsq_dims<T>(c, forward ? 1 : 2, forward);
    switch (mode) {
        case 0: fsq_launch<T, S, false, false>(c, forward, k, stream); break;
        case 1: fsq_launch<T, S, true, false>(c, forward, k, stream); break;
        case 2: fsq_launch<T, S, false, true>(c, forward, k, stream); break;
        default: fsq_launch<T, S, true, true>(c, forward, k, stream); break;
    }
    return check_launch(forward ? "the finite-scalar-quantization kernel"
                                : "the finite-scalar-quantization backward kernel");
}

// A logits likelihood's forward (the per-sample sums) or backward, operands in the slots of its
// lines of FV_OPS ("logits* target" -> "nll#"; "grad# logits* target" -> "d_logits? d_target?").
template <class F, class T, class S, int E>
int launch_logits_nll(bool forward, const fv_call& c, cudaStream_t st) {
    const fv_tensor* in = c.in;
    const fv_tensor* out = c.out;
    if (forward)
        return launch_sum<T, E>(
            LogitsNllFwd<F, T, S, E>{make_in<S>(in[0]), make_in<S>(in[1]), c.N}, c, out[0], 1, st);
    return launch_elementwise<E>(
        LogitsNllBwd<F, T, S, E>{make_in<T>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                 make_out<S>(out[0]), make_out<S>(out[1]), c.N},
        c, st);
}

// Every op of FV_OPS has a case here: a missing one is a compile error (-Werror=switch).
#pragma GCC diagnostic push
#pragma GCC diagnostic error "-Wswitch"
template <class T, class S>
int run_typed(int32_t op, const fv_call& c, cudaStream_t st) {
    constexpr int E = int(16 / sizeof(S));
    const fv_tensor* in = c.in;
    const fv_tensor* out = c.out;
    switch (static_cast<fv_op>(op)) {
        case FV_OP_REPARAMETERIZE_FWD:
            return launch_elementwise<E>(
                ReparameterizeFwd<T, S, E>{make_in<S>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                           make_out<S>(out[0]), make_out<S>(out[1]), c.seed,
                                           c.B, c.N, c.K},
                c, st);
        case FV_OP_REPARAMETERIZE_BWD:
            return launch_elementwise<E>(
                ReparameterizeBwd<T, S, E>{make_in<S>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                           make_out<S>(out[0]), make_out<S>(out[1]),
                                           make_out<S>(out[2]), c.seed, c.B, c.N, c.K},
                c, st);
        case FV_OP_GAUSSIAN_KL_FWD:
            return launch_sum<T, E>(
                GaussianKlFwd<T, S, E>{make_in<S>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                       make_in<S>(in[3]), c.N},
                c, out[0], c.reduce_dim, st);
        case FV_OP_GAUSSIAN_KL_BWD:
            return launch_elementwise<E>(
                GaussianKlBwd<T, S, E>{make_in<T>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                       make_in<S>(in[3]), make_in<S>(in[4]), make_out<S>(out[0]),
                                       make_out<S>(out[1]), make_out<S>(out[2]),
                                       make_out<S>(out[3]), c.N},
                c, st);
        case FV_OP_BERNOULLI_NLL_FWD:
        case FV_OP_BERNOULLI_NLL_BWD:
            return launch_logits_nll<BernoulliLogits, T, S, E>(op == FV_OP_BERNOULLI_NLL_FWD, c,
                                                               st);
        case FV_OP_GAUSSIAN_NLL_FWD:
            return launch_sum<T, E>(
                GaussianNllFwd<T, S, E>{make_in<S>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                        T(c.scalar), c.N},
                c, out[0], 1, st);
        case FV_OP_GAUSSIAN_NLL_BWD:
            return launch_elementwise<E>(
                GaussianNllBwd<T, S, E>{make_in<T>(in[0]), make_in<S>(in[1]), make_in<S>(in[2]),
                                        make_in<S>(in[3]), make_out<S>(out[0]),
                                        make_out<S>(out[1]), make_out<S>(out[2]), T(c.scalar),
                                        c.N},
                c, st);
        case FV_OP_SAMPLE_AND_KL_FWD:
            return launch_sum<T, E>(
                SampleAndKlFwd<T, S, E>{make_in<S>(in[0]), make_in<S>(in[1]), make_out<S>(out[0]),
                                        c.seed, c.N},
                c, out[1], c.reduce_dim, st);
        case FV_OP_SAMPLE_AND_KL_BWD:
            return launch_elementwise<E>(
                SampleAndKlBwd<T, S, E>{make_in<S>(in[0]), make_in<T>(in[1]), make_in<S>(in[2]),
                                        make_in<S>(in[3]), make_out<S>(out[0]),
                                        make_out<S>(out[1]), c.seed, c.N},
                c, st);
        case FV_OP_IWAE_FWD:
            return launch_iwae_fwd<T, S, E>(c, st);
        case FV_OP_IWAE_BWD:
            return launch_elementwise<E>(
                IwaeBwd<T, S, E>{make_in<T>(in[0]), make_in<T>(in[1]), make_in<T>(in[2]),
                                 make_in<S>(in[3]), make_in<S>(in[4]), make_in<S>(in[5]),
                                 make_any_kb(out[0]), make_out<S>(out[1]), make_out<S>(out[2]),
                                 make_out<S>(out[3]), c.N, c.K, log_(T(c.K))},
                c, st);
        case FV_OP_CONTINUOUS_BERNOULLI_NLL_FWD:
        case FV_OP_CONTINUOUS_BERNOULLI_NLL_BWD:
            return launch_logits_nll<ContinuousBernoulliLogits, T, S, E>(
                op == FV_OP_CONTINUOUS_BERNOULLI_NLL_FWD, c, st);
        case FV_OP_DMOL_NLL_FWD:
            return launch_sum<T, 1>(DmolFwd<T, S>{make_dmol<T, S>(c, 0)}, c, out[0], 1, st);
        case FV_OP_DMOL_NLL_BWD:
            if (out[0].data == nullptr) return FV_OK;  // no gradient wanted
            return launch_elementwise<1>(
                DmolBwd<T, S>{make_dmol<T, S>(c, 1), make_in<T>(in[0]), make_out<S>(out[0])}, c,
                st);
        case FV_OP_NEAREST_CODE_FWD:
            return launch_nearest_code<T, S>(c, st);
        case FV_OP_FSQ_FWD:
            return launch_fsq<T, S>(c, true, st);
        case FV_OP_FSQ_BWD:
            if (out[0].data == nullptr) return FV_OK;  // no gradient wanted
            return launch_fsq<T, S>(c, false, st);
        case FV_OP_LFQ_ENTROPY_FWD:
        case FV_OP_LFQ_ENTROPY_BWD:
            return launch_lfq<T, S>(op, c, st);
        case FV_OP_RESIDUAL_VQ_FWD:
            return launch_residual_vq_fwd<T, S>(c, st);
        case FV_OP_RESIDUAL_VQ_BWD:
            return launch_residual_vq_bwd<T, S>(c, st);
    }
    return set_error(FV_ERR_INVALID, "unknown op code %d", op);
}
#pragma GCC diagnostic pop

// Makes `device` current for the call and restores the caller's device afterwards.
class DeviceGuard {
  public:
    explicit DeviceGuard(int device) : device_(device) {
        status_ = cudaGetDevice(&previous_);
        if (status_ == cudaSuccess && previous_ != device_) status_ = cudaSetDevice(device_);
    }
    ~DeviceGuard() {
        if (status_ == cudaSuccess && previous_ != device_) cudaSetDevice(previous_);
    }
    cudaError_t status() const { return status_; }

  private:
    int device_;
    int previous_ = -1;
    cudaError_t status_;
};

int run(int32_t op, const fv_call* call) {
    int status = validate_call(op, call);
    if (status != FV_OK) return status;
    const fv_call& c = *call;
    status = check_dtypes(op, c);
    if (status != FV_OK) return status;
    DeviceGuard guard(c.device);
    if (guard.status() != cudaSuccess) return cuda_error(guard.status(), "selecting the device");
    cudaStream_t stream = static_cast<cudaStream_t>(c.stream);
    switch (c.in[kOps[op].in.main].dtype) {
        case FV_FLOAT32: return run_typed<float, float>(op, c, stream);
        case FV_FLOAT64: return run_typed<double, double>(op, c, stream);
        case FV_FLOAT16: return run_typed<float, Half>(op, c, stream);
        default: return run_typed<float, BFloat16>(op, c, stream);
    }
}

int64_t workspace_bytes(int32_t op, const fv_call* call) {
    if (call == nullptr || validate_call(op, call) != FV_OK) return 0;
    const fv_call& c = *call;
    const int E = int(16 / dtype_size(c.in[kOps[op].in.main].dtype));
    const size_t compute_size = dtype_size(c.compute);
    switch (op) {
        case FV_OP_GAUSSIAN_KL_FWD:
        case FV_OP_SAMPLE_AND_KL_FWD: {
            DeviceGuard guard(c.device);
            return plan_sum(c, E, compute_size, c.reduce_dim).workspace_bytes;
        }
        case FV_OP_BERNOULLI_NLL_FWD:
        case FV_OP_GAUSSIAN_NLL_FWD:
        case FV_OP_CONTINUOUS_BERNOULLI_NLL_FWD: {
            DeviceGuard guard(c.device);
            return plan_sum(c, E, compute_size, 1).workspace_bytes;
        }
        case FV_OP_IWAE_FWD: {
            DeviceGuard guard(c.device);
            return plan_iwae(c, E, compute_size).workspace_bytes;
        }
        case FV_OP_DMOL_NLL_FWD: {
            DeviceGuard guard(c.device);
            return plan_sum(c, 1, compute_size, 1).workspace_bytes;
        }
        case FV_OP_NEAREST_CODE_FWD: return nc_workspace_bytes(c);
        case FV_OP_RESIDUAL_VQ_FWD: return rvq_workspace_bytes(c);
        case FV_OP_RESIDUAL_VQ_BWD: return rvq_bwd_workspace_bytes(c);
        default: return 0;
    }
}

}  // namespace
}  // namespace fv::gpu

extern "C" {

FV_API int64_t fv_cuda_workspace_bytes(int32_t op, const fv_call* call) {
    try {
        return fv::gpu::workspace_bytes(op, call);
    } catch (...) {
        return 0;
    }
}

FV_API int32_t fv_cuda_run(int32_t op, const fv_call* call) {
    try {
        return fv::gpu::run(op, call);
    } catch (const std::exception& e) {
        return fv::set_error(FV_ERR_INTERNAL, "internal error: %s", e.what());
    } catch (...) {
        return fv::set_error(FV_ERR_INTERNAL, "internal error");
    }
}

}  // extern "C"
