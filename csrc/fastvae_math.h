// fastvae_math.h -- the per-element math of every fastvae op, shared by the CPU and CUDA code.
//
// Everything here is an inline function usable on the host and on the device (FV_HD), free of
// branches that depend on data (selects only), so that a loop calling it auto-vectorizes on the
// CPU. The same source is the math the CUDA kernels run: what the CPU tests check is what the
// GPU computes.
//
// Contents:
//   * float32 primitives exp, log, log1p on [0, 1], expm1, cos, written as polynomials (about
//     1 ulp; IEEE special values: inf, nan, zero, subnormals); float64 uses the C library;
//   * expm1mx(x) = expm1(x) - x by its Taylor series for |x| < 0.5 (the series of
//     fastvae.reference / kernels/_common.py), so the KL of a tiny log-variance stays accurate;
//   * the formulas of each op and of its derivatives (kl_*, bernoulli_*, gaussian_nll_*,
//     iwae_*: the log-weight terms, the guarded online log-sum-exp, the gradients);
//   * Philox4x32-10 and Box-Muller exactly as Triton's tl.randn(seed, offset): the integers
//     bit for bit, the normal to float rounding;
//   * float16 / bfloat16 <-> float32 conversions (round to nearest even), bit manipulation only.
#pragma once

#include <stdint.h>

#include <cmath>
#include <cstring>

#if defined(__CUDACC__)
#define FV_HD __host__ __device__ __forceinline__
#else
#define FV_HD inline __attribute__((always_inline))
#endif

// Translation units compiled with different instruction sets (the CPU kernels are built twice,
// baseline x86-64 and AVX2) set FV_MATH_NAMESPACE, so that their copies of these inline
// functions have distinct symbols and the linker never mixes them up.
#ifndef FV_MATH_NAMESPACE
#define FV_MATH_NAMESPACE common
#endif

namespace fv {
inline namespace FV_MATH_NAMESPACE {

// ---------------------------------------------------------------------------------------------
// Bit casts
// ---------------------------------------------------------------------------------------------

FV_HD uint32_t f2u(float x) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    return u;
#endif
}

FV_HD float u2f(uint32_t u) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
#endif
}

// ---------------------------------------------------------------------------------------------
// float32 primitives
// ---------------------------------------------------------------------------------------------

constexpr float kInfF = __builtin_huge_valf();
constexpr uint32_t kNanBits = 0x7FC00000u;
constexpr float kRoundMagic = 12582912.0f;  // 1.5 * 2^23: x + magic rounds x to an integer
constexpr uint32_t kRoundMagicBits = 0x4B400000u;

// 2^n for n in [-126, 127], built from bits.
FV_HD float pow2i(int32_t n) { return u2f(static_cast<uint32_t>(n + 127) << 23); }

// exp(x), float32, about 1 ulp. Overflows to inf above 88.72, underflows gradually (subnormal
// results) to 0 below -103.97; nan stays nan.
FV_HD float exp_f32(float x) {
    const float kLog2e = 1.44269504088896341f;
    const float kLn2Hi = 0.693359375f;          // 8 significant bits: n * kLn2Hi is exact
    const float kLn2Lo = -2.12194440e-4f;       // ln 2 - kLn2Hi
    x = x > 89.0f ? 89.0f : x;                  // comparisons are false for nan: nan passes
    x = x < -104.0f ? -104.0f : x;
    const float t = x * kLog2e + kRoundMagic;   // round(x / ln 2) in the low mantissa bits
    const int32_t n = static_cast<int32_t>(f2u(t) - kRoundMagicBits);
    const float kn = t - kRoundMagic;
    const float r = (x - kn * kLn2Hi) - kn * kLn2Lo;  // |r| <= ln(2) / 2
    // Taylor polynomial of degree 7: truncation error < 0.1 ulp on |r| <= ln(2) / 2.
    float p = 1.98412698e-4f;
    p = p * r + 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    // Scale by 2^n in two steps, so that n in [-150, 128] neither overflows the exponent field
    // nor rounds twice: p * 2^n1 is exact, the second product rounds once.
    const int32_t n1 = n >> 1;
    return (p * pow2i(n1)) * pow2i(n - n1);
}

// log(1 + f) for f in [-0.293, 0.5], without the constant term: with s = f / (2 + f),
// log(1 + f) = f - hfsq + s * (hfsq + R(s^2)), hfsq = f^2 / 2, R = 2 s^2 / 3 + 2 s^4 / 5 + ...
// (the series of 2 atanh(s); truncation error below 0.1 ulp for |s| <= 0.2).
FV_HD float log1p_core_f32(float f, float k) {
    const float s = f / (2.0f + f);
    const float z = s * s;
    float R = 0.222222222f;                            // 2/9
    R = R * z + 0.285714286f;                          // 2/7
    R = R * z + 0.4f;                                  // 2/5
    R = R * z + 0.666666667f;                          // 2/3
    R = R * z;
    const float hfsq = 0.5f * f * f;
    return k * 0.693359375f + (f - (hfsq - (s * (hfsq + R) + k * -2.12194440e-4f)));
}

// log(x), float32, about 1 ulp; log(0) = -inf, log(x < 0) = nan, log(inf) = inf.
FV_HD float log_f32(float x) {
    const bool subnormal = f2u(x) < 0x00800000u;     // +0 and positive subnormals
    const float xs = subnormal ? x * 8388608.0f : x;  // times 2^23
    // x = 2^k * m with m in [sqrt(1/2), sqrt(2)): f = m - 1 in [-0.293, 0.414].
    const uint32_t ix = f2u(xs);
    const uint32_t tmp = ix - 0x3F3504F3u;            // bits of sqrt(1/2)
    const int32_t k = (static_cast<int32_t>(tmp) >> 23) - (subnormal ? 23 : 0);
    const float m = u2f(ix - (tmp & 0xFF800000u));
    float r = log1p_core_f32(m - 1.0f, static_cast<float>(k));
    r = x == 0.0f ? -kInfF : r;
    r = x < 0.0f ? u2f(kNanBits) : r;
    r = x == kInfF ? kInfF : r;
    return x != x ? x : r;
}

// log(1 + x) for x in [0, 1] (the softplus tail log1p(exp(-|l|))), about 1 ulp, one division:
// below 1/2 the series runs on x itself; above, 1 + x = 2 (1 + f) with f = (x - 1) / 2, exact.
FV_HD float log1p_unit_f32(float x) {
    const bool upper = x > 0.5f;
    const float f = upper ? (x - 1.0f) * 0.5f : x;
    return log1p_core_f32(f, upper ? 1.0f : 0.0f);
}

// (expm1(x) - x) / x^2 = sum_{k>=2} x^(k-2) / k!, truncated after 1/13!; accurate for |x| < 0.5.
// The coefficients and the evaluation order are those of fastvae.reference and kernels/.
template <class T>
FV_HD T expm1_tail(T x) {
    T acc = T(1.6059043836821613e-10);
    acc = acc * x + T(2.08767569878681e-09);
    acc = acc * x + T(2.505210838544172e-08);
    acc = acc * x + T(2.755731922398589e-07);
    acc = acc * x + T(2.7557319223985893e-06);
    acc = acc * x + T(2.48015873015873e-05);
    acc = acc * x + T(0.0001984126984126984);
    acc = acc * x + T(0.001388888888888889);
    acc = acc * x + T(0.008333333333333333);
    acc = acc * x + T(0.041666666666666664);
    acc = acc * x + T(0.16666666666666666);
    acc = acc * x + T(0.5);
    return acc;
}

// cos(x) for |x| < 2^12 (Box-Muller calls it on [0, 2 pi)), about 1 ulp: x = q * pi/2 + r
// (three-part Cody-Waite reduction), then the sine or cosine polynomial of r by quadrant.
FV_HD float cos_f32(float x) {
    const float t = x * 0.636619772f + kRoundMagic;
    const uint32_t q = f2u(t) - kRoundMagicBits;
    const float qf = t - kRoundMagic;
    const float r = ((x - qf * 1.5703125f) - qf * 4.83826792e-4f) - qf * 2.56328292e-12f;
    const float r2 = r * r;
    float c = -2.75573192e-7f;                         // -1/10!
    c = c * r2 + 2.48015873e-5f;
    c = c * r2 - 1.38888889e-3f;
    c = c * r2 + 4.16666667e-2f;
    c = c * r2 - 0.5f;
    c = c * r2 + 1.0f;
    float s = 2.75573192e-6f;                          // 1/9!
    s = s * r2 - 1.98412698e-4f;
    s = s * r2 + 8.33333333e-3f;
    s = s * r2 - 1.66666667e-1f;
    s = r + r * r2 * s;
    const float v = (q & 1u) ? s : c;                  // quadrant 0: c, 1: -s, 2: -c, 3: s
    return ((q + 1u) & 2u) ? -v : v;
}

// ---------------------------------------------------------------------------------------------
// Primitives by compute type: float32 polynomials above, float64 from the C library
// ---------------------------------------------------------------------------------------------

FV_HD float exp_(float x) { return exp_f32(x); }
FV_HD float log_(float x) { return log_f32(x); }
FV_HD float log1p_unit(float x) { return log1p_unit_f32(x); }
FV_HD float sqrt_(float x) {
#if defined(__CUDA_ARCH__)
    return sqrtf(x);
#else
    return __builtin_sqrtf(x);
#endif
}

#if defined(__CUDA_ARCH__)
FV_HD double exp_(double x) { return ::exp(x); }
FV_HD double log_(double x) { return ::log(x); }
FV_HD double log1p_unit(double x) { return ::log1p(x); }
FV_HD double expm1_lib(double x) { return ::expm1(x); }
#else
FV_HD double exp_(double x) { return std::exp(x); }
FV_HD double log_(double x) { return std::log(x); }
FV_HD double log1p_unit(double x) { return std::log1p(x); }
FV_HD double expm1_lib(double x) { return std::expm1(x); }
#endif

// expm1(x): the series below |x| < 0.5, exp(x) - 1 above (no cancellation there).
FV_HD float expm1_(float x) {
    const float series = x + x * x * expm1_tail(x);
    const float direct = exp_f32(x) - 1.0f;
    return (x < 0.5f && x > -0.5f) ? series : direct;
}
FV_HD double expm1_(double x) { return expm1_lib(x); }

// expm1(x) - x without the cancellation of the direct form near 0, and +inf at x = +inf.
template <class T>
FV_HD T expm1mx(T x) {
    const T series = x * x * expm1_tail(x);
    T direct = expm1_(x) - x;
    direct = x == T(__builtin_huge_val()) ? x : direct;
    return (x < T(0.5) && x > T(-0.5)) ? series : direct;
}

template <class T>
FV_HD T max0(T x) { return x > T(0) ? x : T(0); }

template <class T>
FV_HD T abs_(T x) { return x < T(0) ? -x : x; }

// ---------------------------------------------------------------------------------------------
// The ops' formulas (T = float or double)
// ---------------------------------------------------------------------------------------------

constexpr double kLog2Pi = 1.8378770664093453;

// Gaussian KL, standard prior: 0.5 * (mu^2 + expm1(lv) - lv).
template <class T>
FV_HD T kl_standard(T mu, T lv) { return T(0.5) * (mu * mu + expm1mx(lv)); }

// Gaussian KL against N(pm, e^plv): with s = (mu - pm) e^(-plv/2) and d = lv - plv,
// 0.5 * (s^2 + expm1(d) - d).
template <class T>
FV_HD T kl_prior(T mu, T lv, T pm, T plv) {
    const T s = (mu - pm) * exp_(T(-0.5) * plv);
    return T(0.5) * (s * s + expm1mx(lv - plv));
}

// Derivatives of the KL times an incoming gradient g:
//   d/dmu = g (mu - pm) e^-plv = -d/dpm,  d/dlv = g expm1(d) / 2,
//   d/dplv = -g (expm1(d) + s^2) / 2.
// (One function per derivative: GCC vectorizes a loop with one output stream, not one loop
// writing four.) The standard prior is pm = plv = 0.
template <class T>
FV_HD T kl_grad_mu(T g, T mu, T pm, T plv) {
    const T inv_pstd = exp_(T(-0.5) * plv);
    return g * ((mu - pm) * inv_pstd) * inv_pstd;
}

template <class T>
FV_HD T kl_grad_logvar(T g, T lv, T plv) { return g * T(0.5) * expm1_(lv - plv); }

template <class T>
FV_HD T kl_grad_prior_logvar(T g, T mu, T lv, T pm, T plv) {
    const T s = (mu - pm) * exp_(T(-0.5) * plv);
    return -g * T(0.5) * (expm1_(lv - plv) + s * s);
}

// Bernoulli NLL from logits: max(l, 0) - l x + log1p(exp(-|l|)).
template <class T>
FV_HD T bernoulli_nll(T l, T x) { return max0(l) - l * x + log1p_unit(exp_(-abs_(l))); }

// sigmoid(l) from t = exp(-|l|): 1 / (1 + t) for l >= 0, t / (1 + t) below (no overflow).
template <class T>
FV_HD T sigmoid_(T l) {
    const T t = exp_(-abs_(l));
    const T r = T(1) / (T(1) + t);
    return l >= T(0) ? r : t * r;
}

// d nll / dl = g (sigmoid(l) - x);  d nll / dx = -g l.
template <class T>
FV_HD T bernoulli_grad_logits(T g, T l, T x) { return g * (sigmoid_(l) - x); }

// Gaussian NLL, in terms of r = x - m and inv_std = e^(-lv/2) (one exp per log-variance, so a
// scalar log-variance costs one exp per call): with s = r inv_std, 0.5 (lv + s^2 + log 2 pi).
template <class T>
FV_HD T inv_std_of(T lv) { return exp_(T(-0.5) * lv); }

template <class T>
FV_HD T gaussian_nll(T r, T inv_std, T lv) {
    const T s = r * inv_std;
    return T(0.5) * (lv + s * s + T(kLog2Pi));
}

// d/dx = g s inv_std = -d/dm,  d/dlv = g (1 - s^2) / 2.
template <class T>
FV_HD T gaussian_nll_grad_target(T g, T r, T inv_std) { return g * (r * inv_std) * inv_std; }

template <class T>
FV_HD T gaussian_nll_grad_logvar(T g, T r, T inv_std) {
    const T s = r * inv_std;
    return g * T(0.5) * (T(1) - s * s);
}

// Importance-weighted log-likelihood (IWAE), per element j of sample k of row b, with
// inv_std = e^(-lv/2) (computed once per element of a row) and s = (z - mu) inv_std:
// the log-weight's term log N(z; 0, I) - log N(z; mu, e^lv) = 0.5 (s^2 + lv - z^2) (the 2 pi
// terms cancel); log_w[k, b] = log_px[k, b] + the sum of the terms over j.
template <class T>
FV_HD T iwae_term(T z, T mu, T lv, T inv_std) {
    const T s = (z - mu) * inv_std;
    return T(0.5) * (s * s + lv - z * z);
}

// One step of the online log-sum-exp over the samples k, in order: `m` the running maximum
// (start: -inf), `r` the running sum of exp(w - m) (start: 0). The maximum propagates NaN; a
// term equal to the maximum is exactly 1 whatever the maximum, so that all log-weights -inf
// give -inf and a +inf one gives +inf, never exp(inf - inf) = NaN (kernels/iwae.py's guards).
template <class T>
FV_HD void iwae_lse_step(T& m, T& r, T w) {
    const T new_max = (w > m || w != w) ? w : m;
    const T rescale = m == new_max ? T(1) : exp_(m - new_max);
    const T term = w == new_max ? T(1) : exp_(w - new_max);
    r = r * rescale + term;
    m = new_max;
}

// ll = logsumexp_k w - log K from the final state of iwae_lse_step.
template <class T>
FV_HD T iwae_ll(T m, T r, T log_k) { return m + log_(r) - log_k; }

// The normalized weight of a sample times the upstream gradient g of ll:
// a = g exp(w - lse), lse = ll + log K.
template <class T>
FV_HD T iwae_weight(T g, T w, T lse) { return g * exp_(w - lse); }

// Per-element gradients for one sample with weight a: d/dz = a (s inv_std - z) and the terms
// summed over k for d/dmu = -sum_k a s inv_std and d/dlv = sum_k a (1 - s^2) / 2.
template <class T>
struct IwaeGrads { T z, mu, lv; };

template <class T>
FV_HD IwaeGrads<T> iwae_grads(T a, T z, T mu, T inv_std) {
    const T s = (z - mu) * inv_std;
    return {a * (s * inv_std - z), -(a * s * inv_std), a * T(0.5) * (T(1) - s * s)};
}

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 and Box-Muller, as Triton's tl.randn(seed, offset)
// ---------------------------------------------------------------------------------------------

FV_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
    return __umulhi(a, b);
#else
    return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Key (k0, k1) = (seed_lo, seed_hi), counter (c0, c1, 0, 0) = (offset_lo, offset_hi, 0, 0);
// returns the first two of the four outputs (those tl.randn uses).
FV_HD void philox_2(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1, uint32_t& out0,
                    uint32_t& out1) {
    uint32_t c2 = 0, c3 = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int round = 0; round < 10; ++round) {
        const uint32_t n0 = mulhi32(0xCD9E8D57u, c2) ^ c1 ^ k0;
        const uint32_t n2 = mulhi32(0xD2511F53u, c0) ^ c3 ^ k1;
        const uint32_t n1 = 0xCD9E8D57u * c2;
        const uint32_t n3 = 0xD2511F53u * c0;
        c0 = n0; c1 = n1; c2 = n2; c3 = n3;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out0 = c0;
    out1 = c1;
}

// uint32 -> uniform float in [0, 1): read as int32, negatives folded by bitwise not, scaled.
FV_HD float uint_to_uniform(uint32_t u) {
    int32_t x = static_cast<int32_t>(u);
    x = x < 0 ? ~x : x;
    return static_cast<float>(x) * 4.6566127342e-10f;
}

// Box-Muller from two uniforms: sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2), float32.
FV_HD float box_muller(float u1, float u2) {
    u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
    const float theta = 6.283185307179586f * u2;
    return sqrt_(-2.0f * log_f32(u1)) * cos_f32(theta);
}

// tl.randn(seed, offset) with seed = (k0, k1) and offset = (c0, c1) split into 32-bit halves.
FV_HD float randn(uint32_t k0, uint32_t k1, uint32_t c0, uint32_t c1) {
    uint32_t i1, i2;
    philox_2(k0, k1, c0, c1, i1, i2);
    return box_muller(uint_to_uniform(i1), uint_to_uniform(i2));
}

// Element `offset` of the standard normal stream keyed by `seed`: tl.randn(seed, offset).
FV_HD float randn(uint64_t seed, uint64_t offset) {
    return randn(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                 static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32));
}

// ---------------------------------------------------------------------------------------------
// float16 / bfloat16 <-> float32, round to nearest even, nan kept nan
// ---------------------------------------------------------------------------------------------

FV_HD float half_bits_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7FFFu;                  // exponent and mantissa
    // Normal numbers: rebias the exponent (15 -> 127); inf/nan: exponent field all ones.
    uint32_t bits = (em << 13) + 0x38000000u;
    bits = em >= 0x7C00u ? bits + 0x38000000u : bits;
    // Zero and subnormals: m * 2^-24 = (2^-14 * (1 + m / 1024)) - 2^-14, exactly.
    const float sub = u2f((em << 13) + 0x38800000u) - 6.103515625e-05f;
    bits = em < 0x0400u ? f2u(sub) : bits;
    return u2f(bits | sign);
}

FV_HD uint16_t float_to_half_bits(float f) {
    const uint32_t x = f2u(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t a = x & 0x7FFFFFFFu;
    // Normal range: rebias, then round to nearest even on the 13 dropped bits.
    const uint32_t normal = (a - 0x38000000u + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
    // Below 2^-14: adding 0.5 puts the value on the 2^-24 grid of half subnormals, rounded.
    const uint32_t sub = f2u(u2f(a) + 0.5f) - 0x3F000000u;
    uint32_t h = a < 0x38800000u ? sub : normal;
    h = a >= 0x477FF000u ? 0x7C00u : h;                                // rounds to inf
    h = a > 0x7F800000u ? (0x7E00u | ((a >> 13) & 0x3FFu)) : h;        // nan stays nan
    return static_cast<uint16_t>(h | sign);
}

FV_HD float bf16_bits_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

FV_HD uint16_t float_to_bf16_bits(float f) {
    const uint32_t x = f2u(f);
    const uint32_t rounded = (x + 0x7FFFu + ((x >> 16) & 1u)) >> 16;
    const bool nan = (x & 0x7FFFFFFFu) > 0x7F800000u;
    return static_cast<uint16_t>(nan ? ((x >> 16) | 0x0040u) : rounded);
}

}  // inline namespace FV_MATH_NAMESPACE
}  // namespace fv

// ---------------------------------------------------------------------------------------------
// Discretized mixture of logistics (PixelCNN++): one channel's log bin probability and its
// derivatives (the formulas of reference._dmol_channel_terms). Appended after the other ops.
// ---------------------------------------------------------------------------------------------

namespace fv {
inline namespace FV_MATH_NAMESPACE {

template <class T>
FV_HD T dmol_log_sigmoid(T u) {
    return (u < T(0) ? u : T(0)) - log1p_unit(exp_(-abs_(u)));
}

// tanh(u) = sign(u) (1 - e^(-2|u|)) / (1 + e^(-2|u|)), the numerator by expm1 (no cancellation)
template <class T>
FV_HD T dmol_tanh(T u) {
    const T e = exp_(T(-2) * abs_(u));
    const T t = -expm1_(T(-2) * abs_(u)) / (T(1) + e);
    return u < T(0) ? -t : t;
}

// 1 - tanh(u)^2 = 4 e^(-2|u|) / (1 + e^(-2|u|))^2
template <class T>
FV_HD T dmol_sech2(T u) {
    const T e = exp_(T(-2) * abs_(u));
    return T(4) * e / ((T(1) + e) * (T(1) + e));
}

// The constants of one call: h = 1 / (n_bins - 1), log(2h), log((n_bins - 1) / 2).
template <class T>
struct DmolBins {
    T h, log_2h, log_half_bins;
};

template <class T>
FV_HD DmolBins<T> dmol_bins(double n_bins) {
    const double h = 1.0 / (n_bins - 1.0);
    return {T(h), T(::log(2.0 * h)), T(::log((n_bins - 1.0) / 2.0))};
}

template <class T>
struct DmolTerm {
    T value, dc, ds;  // log P(bin); its derivatives by c = x - mu' and by the log-scale s
};

// log P(bin of x) for one channel and mixture: centered c = x - mu', log-scale s (floored).
// Lowest bin (x < -1 + h): log sigmoid(a); highest (x > 1 - h): log sigmoid(-b); else
// log(sigmoid(a) - sigmoid(b)) = log sigmoid(a) + log sigmoid(-b) + log(-expm1(-d)) unless
// below log(1e-5), then the mid-bin density log sigmoid(m) + log sigmoid(-m) - s
// - log((n_bins - 1) / 2); a = e^-s (c + h), b = e^-s (c - h), m = e^-s c, d = 2 h e^-s.
template <class T, bool kGrads>
FV_HD DmolTerm<T> dmol_channel(T c, T s, T x, const DmolBins<T>& k) {
    const T inv_s = exp_(-s);
    const T a = inv_s * (c + k.h), b = inv_s * (c - k.h), m = inv_s * c;
    const T log_d = k.log_2h - s;
    const T d = exp_(log_d);
    const T ratio = d > T(0) ? -expm1_(-d) / d : T(1);
    const T ls_a = dmol_log_sigmoid(a), ls_mb = dmol_log_sigmoid(-b);
    const T log_delta = ls_a + ls_mb + log_d + log_(ratio);
    const T log_mid = dmol_log_sigmoid(m) + dmol_log_sigmoid(-m) - s - k.log_half_bins;
    const bool low = x < T(-1) + k.h, high = x > T(1) - k.h;
    const bool use_delta = log_delta > T(-11.512925464970229);  // log(1e-5)
    DmolTerm<T> r;
    r.value = low ? ls_a : high ? ls_mb : use_delta ? log_delta : log_mid;
    if (kGrads) {
        const T sig_ma = sigmoid_(-a), sig_b = sigmoid_(b);
        const T t_half = dmol_tanh(T(0.5) * m);
        const T d_over = d > T(0) ? d / expm1_(d) : T(1);
        // sigmoid(-a) - sigmoid(b): as a product where it cancels (|a + b| < 1), else directly
        const T apb = a + b;
        const bool near = apb < T(1) && apb > T(-1);
        const T dc_delta =
            inv_s * (near ? -sig_ma * sigmoid_(-b) * expm1_(near ? apb : T(0)) : sig_ma - sig_b);
        const T ds_delta = -(a * sig_ma - b * sig_b + d_over);
        r.dc = low ? inv_s * sig_ma : high ? -inv_s * sig_b : use_delta ? dc_delta : -inv_s * t_half;
        r.ds = low ? -a * sig_ma : high ? b * sig_b : use_delta ? ds_delta : m * t_half - T(1);
    } else {
        r.dc = r.ds = T(0);
    }
    return r;
}

}  // namespace FV_MATH_NAMESPACE
}  // namespace fv
