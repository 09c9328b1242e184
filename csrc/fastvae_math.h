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
//   * expm1 and expm1(x) - x, halved, by their Taylor series for |x| < 1 (the series of
//     fastvae.reference / kernels/_common.py; in float32 a polynomial fitted to it, shorter),
//     so the KL of a tiny log-variance stays accurate;
//   * the scalings that keep intermediates finite wherever the result is (e^x / 2 as
//     (e^(x/2) / 2) e^(x/2); r e^(-lv/2) as (r q) q with q = e^(-lv/4), clamped);
//   * the formulas of each op and of its derivatives (kl_*, bernoulli_*, gaussian_nll_*,
//     iwae_*: the log-weight terms, the guarded online log-sum-exp, the gradients), written
//     so that no intermediate overflows where the result does not and no result is formed by
//     cancelling nearly equal numbers where it is well conditioned (docs/numerics.md);
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

// x y + z, one rounding where the target has FMA (CUDA; x86-64-v3 and v4), two otherwise. Written
// out where two products meet in one sum: GCC's contraction fuses one of them, chosen by the
// order of its IR, which differs between a vector loop and its scalar remainder, so an element
// would round differently by where it sits.
template <class T>
FV_HD T fmadd_(T x, T y, T z) {
#if defined(__CUDA_ARCH__)
    return fma(x, y, z);
#elif defined(__FMA__)
    return std::fma(x, y, z);  // a vfmadd instruction (-fno-math-errno), never a library call
#else
    return x * y + z;
#endif
}

// ln 2 for Cody-Waite reductions: kLn2HiF has 8 significant bits, so n kLn2HiF is exact.
constexpr float kLog2eF = 1.44269504088896341f;
constexpr float kLn2HiF = 0.693359375f;
constexpr float kLn2LoF = -2.12194440e-4f;  // ln 2 - kLn2HiF

// c0 + c1 x + ... + ck x^k by Horner's rule (((ck x + ck-1) x + ...) x + c0).
template <class T>
FV_HD T horner(T, T c) { return c; }
template <class T, class... Cs>
FV_HD T horner(T x, T c, Cs... cs) { return horner(x, cs...) * x + c; }

// e^x = p 2^n with n = round(x / ln 2) and p = e^r, r = x - n ln 2 (|r| <= ln(2) / 2), for the
// callers' clamped x: returns p, sets n.
FV_HD float exp_reduced_f32(float x, int32_t& n) {
    const float t = x * kLog2eF + kRoundMagic;  // round(x / ln 2) in the low mantissa bits
    n = static_cast<int32_t>(f2u(t) - kRoundMagicBits);
    const float kn = t - kRoundMagic;
    const float r = (x - kn * kLn2HiF) - kn * kLn2LoF;
    // 1 + r + r^2 Q(r), Q of degree 4 fitted (relative least squares, reweighted to near
    // minimax) to (e^r - 1 - r) / r^2 on |r| <= ln(2) / 2: relative error 1.2e-7 in Q, < 0.01
    // ulp in e^r; exp_f32 stays within 0.94 ulp of exp (as with the degree-7 Taylor polynomial
    // it replaces, one multiply-add shorter).
    return horner(r, 1.0f, 1.0f, 0.5f, 0.16666577756404877f, 0.041666869074106216f,
                  0.008363142609596252f, 0.0013900002231821418f);
}

// exp(x), float32, about 1 ulp. Overflows to inf above 88.72, underflows gradually (subnormal
// results) to 0 below -103.97; nan stays nan.
FV_HD float exp_f32(float x) {
    x = x > 89.0f ? 89.0f : x;                  // comparisons are false for nan: nan passes
    x = x < -104.0f ? -104.0f : x;
    int32_t n;
    const float p = exp_reduced_f32(x, n);
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
    return k * kLn2HiF + (f - (hfsq - (s * (hfsq + R) + k * kLn2LoF)));
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

// (expm1(x) - x) / x^2 = sum_{k>=2} x^(k-2) / k!, accurate for |x| <= 1. float64 runs the
// series to 1/18! (the coefficients and order of fastvae.reference and kernels/); float32 a
// degree-7 polynomial fitted to it on [-1, 1] (relative error 4.3e-9, under 0.1 ulp; two
// multiply-adds fewer than the series to 1/11!, which it matches to 1 ulp).
FV_HD float expm1_tail(float x) {
    return horner(x, 0.5f, 0.1666666716337204f, 0.04166673496365547f, 0.008333309553563595f,
                  0.0013885454973205924f, 0.00019844209600705653f, 2.5354651370435022e-05f,
                  2.7712108021660242e-06f);
}

FV_HD double expm1_tail(double x) {
    return horner(x, 0.5, 0.16666666666666666, 0.041666666666666664, 0.008333333333333333,
                  0.001388888888888889, 0.0001984126984126984, 2.48015873015873e-05,
                  2.7557319223985893e-06, 2.755731922398589e-07, 2.505210838544172e-08,
                  2.08767569878681e-09, 1.6059043836821613e-10, 1.1470745597729725e-11,
                  7.647163731819816e-13, 4.779477332387385e-14, 2.8114572543455206e-15,
                  1.5619206968586225e-16);
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
#else
FV_HD double exp_(double x) { return std::exp(x); }
FV_HD double log_(double x) { return std::log(x); }
FV_HD double log1p_unit(double x) { return std::log1p(x); }
#endif

// Where q = e^(-lv/4) stops growing (quarter_scale): beyond it any nonzero residual, even the
// smallest subnormal, overflows the result anyway, and e^clamp itself is finite.
FV_HD float exp_clamp(float) { return 80.0f; }
FV_HD double exp_clamp(double) { return 600.0; }

constexpr double kSqrtHalf = 0.7071067811865476;

template <class T>
FV_HD T abs_(T x) { return x < T(0) ? -x : x; }

// e^x / 2 as (e^(x/2) / 2) e^(x/2): finite wherever e^x / 2 is (e^x alone overflows first).
FV_HD double half_exp(double x) {
    const double h = exp_(0.5 * x);
    return (0.5 * h) * h;
}

// expm1(d) / 2, given d and hd = d / 2: the series for |d| < 1, e^d / 2 - 1/2 beyond. (float64;
// float32 takes the one-reduction forms below.)
template <class T>
FV_HD T half_expm1(T d, T hd) {
    const T series = hd + hd * d * expm1_tail(d);
    const T direct = half_exp(d) - T(0.5);
    return abs_(d) < T(1) ? series : direct;
}

// (expm1(d) - d) / 2, given d and hd = d / 2: hd d tail(d) for |d| < 1, e^d / 2 - (1/2 + hd)
// beyond (+inf at d = +inf, not inf - inf). hd is exact where d overflows: the KL takes
// d = lv - plv as lv / 2 - plv / 2. (float64; float32 below.)
template <class T>
FV_HD T half_expm1mx(T d, T hd) {
    const T series = hd * d * expm1_tail(d);
    T direct = half_exp(d) - (T(0.5) + hd);
    direct = d == T(__builtin_huge_val()) ? d : direct;
    return abs_(d) < T(1) ? series : direct;
}

template <class T>
FV_HD T half_expm1mx(T x) { return half_expm1mx(x, T(0.5) * x); }

// float32 expm1(x) and expm1(x) - x without a branch between the series near 0 and e^x beyond:
// one range reduction x = n ln 2 + r, |r| <= ln(2) / 2, with r split as rhi + rlo
// (rhi = x - n ln2hi exact, rlo = -n ln2lo), and W = e^r - 1 - r = r^2 Q(r). With s = 2^(n-2),
// a = s - 1/4 and c = a - n ln2hi / 4:
//   expm1(x) / 4      = a + s (rhi + (W + rlo)),
//   (expm1(x) - x) / 4 = c + a rhi + s (W + rlo).
// For n = 0 these are (r + W) / 4 and W / 4; for |n| small, c and a rhi are exact, so what cancels
// (n = -1: 0.097 - 0.087 + 0.016 at x = -0.35) cancels exactly. Against long double, over every
// float32 with 0.015 < |x| < 2.1 (where the worst cases lie) and every 5th beyond: within 2.07
// ulp (2.11 without FMA) for (expm1(x) - x) / 2, 1.48 for expm1(x) / 2.
// The quarter scale keeps s <= 2^127 up to n = 129 (e^x / 2 finite up to x = 89.41); the caller
// doubles. n is clamped to [-124, 129] on the bits of round(x / ln 2) (integer min/max: a float
// clamp to constants makes GCC vectorize every clamped case separately); beyond, |r| > 0.4 and
// W is 0 (the result is then a rhi or a + s rhi, to which W adds nothing or the overflow
// already there). NaN passes through rhi.
struct QuarterExp {
    float s, a, kn, rhi, w;  // 2^(n-2), s - 1/4, n, rhi, W + rlo
};

FV_HD QuarterExp quarter_exp_parts(float x, float xhi) {
    const int32_t kMagic = static_cast<int32_t>(kRoundMagicBits);
    int32_t tb = static_cast<int32_t>(f2u(x * kLog2eF + kRoundMagic));  // negative floats: < 0
    tb = tb < kMagic - 124 ? kMagic - 124 : tb;
    tb = tb > kMagic + 129 ? kMagic + 129 : tb;
    QuarterExp e;
    e.kn = u2f(static_cast<uint32_t>(tb)) - kRoundMagic;
    e.rhi = xhi - e.kn * kLn2HiF;
    const float rlo = e.kn * -kLn2LoF;
    float r = (x - e.kn * kLn2HiF) + rlo;
    // Where n is clamped, r is taken as 0 (W = 0). The selection comes before the arithmetic,
    // so the vector loop and its scalar remainder contract the same multiply-adds (bitwise the
    // same result at any position). !(<=) && !(>=): a NaN of either sign stays.
    r = !(r <= -0.4f) && !(r >= 0.4f) ? r : 0.0f;
    // Q of degree 5 fitted (relative least squares, reweighted to near minimax) to
    // (e^r - 1 - r) / r^2 on |r| <= 0.3468: relative error 2.7e-9, below float32's rounding.
    const float q = horner(r, 0.5f, 0.1666666716337204f, 0.04166646674275398f,
                           0.008333360776305199f, 0.0013933643931522965f,
                           0.00019857738516293466f);
    e.w = fmadd_(r * r, q, rlo);
    e.s = u2f(static_cast<uint32_t>(tb - kMagic + 125) << 23);
    e.a = e.s - 0.25f;
    return e;
}

// expm1(x) / 2, float32 (see QuarterExp). x is taken as -100 below it for rhi, where
// s rhi would otherwise grow back (s = 2^-126 at x = -3e38) and expm1 is -1 long before;
// an unsigned minimum on the bits does that and keeps +NaN; -NaN passes through W.
FV_HD float half_expm1(float d, float) {
    const float kMinus100 = -100.0f;
    uint32_t b = f2u(d);
    b = b < f2u(kMinus100) ? b : f2u(kMinus100);
    const QuarterExp e = quarter_exp_parts(d, u2f(b));
    const float q = e.a + e.s * (e.rhi + e.w);
    return q + q;
}

// (expm1(x) - x) / 2, float32 (see QuarterExp): for every x, -inf included (there +inf, as
// a rhi says).
FV_HD float half_expm1mx(float x) {
    const float kLn2HiQuarter = 0.25f * kLn2HiF;  // exact
    const QuarterExp e = quarter_exp_parts(x, x);
    const float c = e.a - e.kn * kLn2HiQuarter;
    const float q = (e.a * e.rhi + c) + e.s * e.w;
    return q + q;
}

// The same given d and hd = d / 2, where d may have overflowed to -inf (lv - plv < -3.4e38):
// then it is -(1/2 + hd), finite.
FV_HD float half_expm1mx(float d, float hd) {
    return d == -kInfF ? -(0.5f + hd) : half_expm1mx(d);
}

// expm1(-lv) for |lv| < 1 (the IWAE gradient in z near lv = 0); anything beyond.
template <class T>
FV_HD T expm1_neg_small(T lv) {
    const T x = -lv;
    return x + x * x * expm1_tail(x);
}

// q = e^(-lv/4), the exponent clamped at exp_clamp (NaN passes): a residual r scaled as
// (r q) q = r e^(-lv/2) or ((r q) q q) q = r e^(-lv) never overflows where the product does
// not, and r = 0 gives exactly 0 (never 0 * inf).
template <class T>
FV_HD T quarter_scale(T lv) {
    T x = T(-0.25) * lv;
    x = x > exp_clamp(x) ? exp_clamp(x) : x;
    return exp_(x);
}

// u = r e^(-lv/2) sqrt(1/2) from q = quarter_scale(lv): u^2 = r^2 e^(-lv) / 2, squared after
// the scaling and the halving.
template <class T>
FV_HD T scaled_half(T r, T q) { return (r * q) * (q * T(kSqrtHalf)); }

// r e^(-lv) from q = quarter_scale(lv).
template <class T>
FV_HD T scaled_full(T r, T q) { return (((r * q) * q) * q) * q; }

// t e^(lv/2) from h = e^(lv/4), as (t h) h: finite wherever the product is (for normal t),
// exactly 0 for t = 0.
template <class T>
FV_HD T std_times(T t, T h) {
    const T hz = t == T(0) ? T(0) : h;  // selected before the products (see fmadd_)
    return (t * hz) * hz;
}

// ---------------------------------------------------------------------------------------------
// The ops' formulas (T = float or double)
// ---------------------------------------------------------------------------------------------

constexpr double kLog2Pi = 1.8378770664093453;

// Gaussian KL, standard prior: (mu sqrt(1/2))^2 + (expm1(lv) - lv) / 2.
template <class T>
FV_HD T kl_standard(T mu, T lv) {
    const T u = mu * T(kSqrtHalf);
    // fmadd_: to GCC the float32 half_expm1mx's q + q is q * 2, a second product in this sum
    return fmadd_(u, u, half_expm1mx(lv));
}

// Gaussian KL against N(pm, e^plv): with u = (mu - pm) e^(-plv/2) sqrt(1/2) and d = lv - plv
// (taken as d / 2 = lv / 2 - plv / 2, which does not overflow), u^2 + (expm1(d) - d) / 2.
template <class T>
FV_HD T kl_prior(T mu, T lv, T pm, T plv) {
    const T u = scaled_half(mu - pm, quarter_scale(plv));
    const T hd = T(0.5) * lv - T(0.5) * plv;
    return fmadd_(u, u, half_expm1mx(hd + hd, hd));
}

// Derivatives of the KL times an incoming gradient g:
//   d/dmu = g (mu - pm) e^-plv = -d/dpm,  d/dlv = g expm1(d) / 2,
//   d/dplv = -g (expm1(d) / 2 + u^2).
// (One function per derivative: GCC vectorizes a loop with one output stream, not one loop
// writing four.) The standard prior is pm = plv = 0.
template <class T>
FV_HD T kl_grad_mu(T g, T mu, T pm, T plv) {
    return g * scaled_full(mu - pm, quarter_scale(plv));
}

template <class T>
FV_HD T kl_grad_logvar(T g, T lv, T plv) {
    const T hd = T(0.5) * lv - T(0.5) * plv;
    return g * half_expm1(hd + hd, hd);
}

template <class T>
FV_HD T kl_grad_prior_logvar(T g, T mu, T lv, T pm, T plv) {
    const T u = scaled_half(mu - pm, quarter_scale(plv));
    const T hd = T(0.5) * lv - T(0.5) * plv;
    return -g * (half_expm1(hd + hd, hd) + u * u);
}

// Bernoulli NLL from logits, with t = e^(-|l|) and a = 1 - x for l >= 0, x below:
// |l| a + log1p(t) (max(l, 0) - l x without its cancellation). An infinite logit gives the
// limit for a hard target (a = 0: 0, never inf * 0; a = 1: inf) and NaN for a target strictly
// inside (0, 1).
template <class T>
FV_HD bool bernoulli_nonhard_inf(T l, T x) {
    return (abs_(l) == T(__builtin_huge_val())) & (x > T(0)) & (x < T(1));
}

template <class T>
FV_HD T bernoulli_nll(T l, T x) {
    const T al = abs_(l);
    const T a = l >= T(0) ? T(1) - x : x;
    const T weighted = a == T(0) ? T(0) : al * a;
    const T v = weighted + log1p_unit(exp_(-al));
    return bernoulli_nonhard_inf(l, x) ? T(__builtin_nan("")) : v;
}

// d nll / dl = g (sigmoid(l) - x), taken without cancellation: with p = sigmoid(-|l|) =
// t / (1 + t), (1 - x) - p for l >= 0 and p - x below (sigmoid(17) - 1 = -4.1e-8, not 0).
// d nll / dx = -g l.
template <class T>
FV_HD T bernoulli_grad_logits(T g, T l, T x) {
    const T t = exp_(-abs_(l));
    const T p = t / (T(1) + t);
    T d = l >= T(0) ? (T(1) - x) - p : p - x;
    d = bernoulli_nonhard_inf(l, x) ? T(__builtin_nan("")) : d;
    return g * d;
}

// Lookup-free quantization (LFQ): one bit of a code, with logit l = 4 inv_temperature s x_j.
// P(bit = 1) = sigmoid(l), P(bit = 0) = sigmoid(-l), each as e / (1 + e) or 1 / (1 + e) with
// e = e^(-|l|) (no cancellation, nothing overflows); log P(bit = 1) = -(max(-l, 0) +
// log1p(e)). The binary entropy h(l) = log1p(e) + |l| e / (1 + e) (0 * inf guarded: h(+-inf)
// = 0), and dh/dl = -l sigmoid(l) sigmoid(-l) = -l e / (1 + e)^2.
template <class T>
FV_HD T lfq_sigmoid(T l) {
    const T e = exp_(-abs_(l));
    const T r = T(1) / (T(1) + e);
    return l >= T(0) ? r : e * r;
}

template <class T>
FV_HD T lfq_log_sigmoid(T l) {
    const T e = exp_(-abs_(l));
    return -((l < T(0) ? -l : T(0)) + log1p_unit(e));
}

template <class T>
FV_HD T lfq_bit_entropy(T l) {
    const T al = abs_(l);
    const T e = exp_(-al);
    const T tail = e == T(0) ? T(0) : al * (e / (T(1) + e));
    return log1p_unit(e) + tail;
}

template <class T>
FV_HD T lfq_bit_entropy_grad(T l) {
    const T e = exp_(-abs_(l));
    const T r = T(1) / (T(1) + e);
    return e == T(0) ? T(0) : -l * ((e * r) * r);
}

// Gaussian NLL, in terms of r = x - m and q = quarter_scale(lv) (one exp per log-variance, so
// a scalar log-variance costs one exp per call): with u = r e^(-lv/2) sqrt(1/2),
// lv / 2 + log(2 pi) / 2 + u^2 (a zero residual adds exactly 0, whatever lv).
template <class T>
FV_HD T gaussian_nll(T r, T q, T lv) {
    const T u = scaled_half(r, q);
    return (T(0.5) * lv + T(0.5 * kLog2Pi)) + u * u;
}

// d/dx = g r e^-lv = -d/dm,  d/dlv = g (1/2 - u^2).
template <class T>
FV_HD T gaussian_nll_grad_target(T g, T r, T q) { return g * scaled_full(r, q); }

template <class T>
FV_HD T gaussian_nll_grad_logvar(T g, T r, T q) {
    const T u = scaled_half(r, q);
    return g * (T(0.5) - u * u);
}

// sample_and_kl's d/dlv = g_z e^(lv/2) eps / 2 + g_kl expm1(lv) / 2, from h = e^(lv/4). Where
// the KL's part overflows (lv > 89.4 in float32) it dominates: a sample's part that overflows
// too (lv > 177) is e^(lv/2) times smaller, and the sum is the KL's part (never inf - inf).
template <class T>
FV_HD T sample_and_kl_grad_logvar(T gz, T gkl, T eps, T lv, T h) {
    const T kl_part = gkl * half_expm1(lv, T(0.5) * lv);
    const T sum = std_times(T(0.5) * gz * eps, h) + kl_part;
    return abs_(kl_part) == T(__builtin_huge_val()) ? kl_part : sum;
}

// Importance-weighted log-likelihood (IWAE), per element j of sample k of row b, with
// q = quarter_scale(lv) (computed once per element of a row) and u = (z - mu) e^(-lv/2)
// sqrt(1/2): the log-weight's term log N(z; 0, I) - log N(z; mu, e^lv)
// = u^2 - (z sqrt(1/2))^2 + lv / 2 (the 2 pi terms cancel; z = mu adds exactly lv / 2 - z^2 / 2,
// whatever lv); log_w[k, b] = log_px[k, b] + the sum of the terms over j.
template <class T>
FV_HD T iwae_term(T z, T mu, T lv, T q) {
    const T u = scaled_half(z - mu, q);
    const T zh = z * T(kSqrtHalf);
    return (u * u - zh * zh) + T(0.5) * lv;
}

// One step of the online log-sum-exp over the samples k, in order: `m` the running maximum
// (start: -inf), `r` the running sum of exp(w - m) (start: 0). The maximum propagates NaN; a
// term equal to the maximum is exactly 1 whatever the maximum, so that all log-weights -inf
// give -inf and a +inf one gives +inf, never exp(inf - inf) = NaN (kernels/iwae.py's guards).
// One exp per step: of exp(m - max) and exp(w - max), one is exactly 1.
template <class T>
FV_HD void iwae_lse_step(T& m, T& r, T w) {
    const bool up = w > m || w != w;  // w is the new maximum
    const T e = w == m ? T(1) : exp_(up ? m - w : w - m);
    r = up ? r * e + T(1) : r + e;
    m = up ? w : m;
}

// ll = logsumexp_k w - log K from the final state of iwae_lse_step.
template <class T>
FV_HD T iwae_ll(T m, T r, T log_k) { return m + log_(r) - log_k; }

// The normalized weight of a sample times the upstream gradient g of ll:
// a = g exp(w - lse), lse = ll + log K.
template <class T>
FV_HD T iwae_weight(T g, T w, T lse) { return g * exp_(w - lse); }

// Per-element gradients for one sample with weight a, from q = quarter_scale(lv) and
// em = expm1_neg_small(lv): d/dz = a ((z - mu) e^-lv - z), taken as a ((z - mu) expm1(-lv) - mu)
// for |lv| < 1 where the first form cancels; the terms summed over k for
// d/dmu = -sum_k a (z - mu) e^-lv and d/dlv = sum_k a (1/2 - u^2).
template <class T>
struct IwaeGrads { T z, mu, lv; };

template <class T>
FV_HD IwaeGrads<T> iwae_grads(T a, T z, T mu, T lv, T q, T em) {
    const T r = z - mu;
    const T re = scaled_full(r, q);
    const T u = scaled_half(r, q);
    const T dz = (lv < T(1) && lv > T(-1)) ? r * em - mu : re - z;
    // a weight of exactly 0 contributes 0, also where a partial overflows (never 0 * inf)
    return {a == T(0) ? T(0) : a * dz, a == T(0) ? T(0) : -(a * re), a * (T(0.5) - u * u)};
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
// Continuous Bernoulli (appended)
// ---------------------------------------------------------------------------------------------
//
// -log CB(x | sigmoid(l)) = -log C(l) - x l + softplus(l), C(l) = l / tanh(l/2), C(0) = 2, in
// the two forms that do not cancel (those of fastvae.ops.reference; t = |l|, u = l/2, v = u^2):
//   |l| < 8:  l (1/2 - x) + log1p(q),  q = sinh(u)/u - 1 = v Q(v),  Q(v) = sum v^(k-1)/(2k+1)!
//   |l| >= 8: t a + (-log t + log1p(-e^-t)),  a = 1 - x (l >= 0) or x (l < 0)
//   d/dl = (1/2 - x) + (u/2) P(v) / (1 + q),  P(v) = sum 2k v^(k-1)/(2k+1)!   (|l| < 8)
//        = sign(l) (a - (1/t - e^-t / (1 - e^-t)))                             (|l| >= 8)
// Q and P keep 16 terms in double, 11 in float (the first left out is below 2^-56 / 2^-28 of
// the sum at |l| = 8). Branch-free: both forms are evaluated, each at logits it serves.

namespace fv {
inline namespace FV_MATH_NAMESPACE {

constexpr double kCbSwitch = 8.0;

template <class T>
FV_HD T cb_series_q(T v) {
    T acc;
    if constexpr (sizeof(T) == 8) {
        acc = T(1.151633562077195e-37);
        acc = acc * v + T(1.216125041553518e-34);
        acc = acc * v + T(1.1309962886447716e-31);
        acc = acc * v + T(9.183689863795546e-29);
        acc = acc * v + T(6.446950284384474e-26);
        acc = acc * v + T(3.868170170630684e-23);
    } else {
        acc = T(3.868170170630684e-23);
    }
    acc = acc * v + T(1.9572941063391263e-20);
    acc = acc * v + T(8.22063524662433e-18);
    acc = acc * v + T(2.8114572543455206e-15);
    acc = acc * v + T(7.647163731819816e-13);
    acc = acc * v + T(1.6059043836821613e-10);
    acc = acc * v + T(2.505210838544172e-08);
    acc = acc * v + T(2.7557319223985893e-06);
    acc = acc * v + T(0.0001984126984126984);
    acc = acc * v + T(0.008333333333333333);
    acc = acc * v + T(0.16666666666666666);
    return acc;
}

template <class T>
FV_HD T cb_series_p(T v) {
    T acc;
    if constexpr (sizeof(T) == 8) {
        acc = T(3.685227398647024e-36);
        acc = acc * v + T(3.6483751246605535e-33);
        acc = acc * v + T(3.166789608205361e-30);
        acc = acc * v + T(2.387759364586842e-27);
        acc = acc * v + T(1.5472680682522736e-24);
        acc = acc * v + T(8.509974375387505e-22);
    } else {
        acc = T(8.509974375387505e-22);
    }
    acc = acc * v + T(3.9145882126782523e-19);
    acc = acc * v + T(1.4797143443923793e-16);
    acc = acc * v + T(4.498331606952833e-14);
    acc = acc * v + T(1.0706029224547743e-11);
    acc = acc * v + T(1.9270852604185937e-09);
    acc = acc * v + T(2.505210838544172e-07);
    acc = acc * v + T(2.2045855379188714e-05);
    acc = acc * v + T(0.0011904761904761906);
    acc = acc * v + T(0.03333333333333333);
    acc = acc * v + T(0.3333333333333333);
    return acc;
}

// One logarithm serves both forms: log(1 + q) below the switch, as log(w) of w = 1 + q rounded
// plus the rounding error of w over w (w - 1 is exact for w >= 1; about 1 ulp), and log t above.
template <class T>
FV_HD T continuous_bernoulli_nll(T l, T x) {
    const T t = abs_(l);
    const bool small = t < T(kCbSwitch);
    const T ls = small ? l : T(0);
    const T tb = small ? T(kCbSwitch) : t;
    const T u = T(0.5) * ls;
    const T v = u * u;
    const T q = v * cb_series_q(v);
    const T w = T(1) + q;
    const T lg = log_(small ? w : tb);
    const T value_small = ls * (T(0.5) - x) + (lg + (q - (w - T(1))) / w);
    const T e = exp_(-tb);
    const T a = l >= T(0) ? T(1) - x : x;
    const T log_term = -lg - e * (T(1) + e * (T(0.5) + e * (T(1.0 / 3.0) + T(0.25) * e)));
    // An infinite logit: the limit, +inf below the hard target, -inf at it (not inf * 0).
    const T inf = T(__builtin_huge_val());
    const T value_large = tb == inf ? (a > T(0) ? inf : -inf) : tb * a + log_term;
    return small ? value_small : value_large;
}

// d nll / dl times the upstream gradient g;  d nll / dx = -g l.
template <class T>
FV_HD T continuous_bernoulli_grad_logits(T g, T l, T x) {
    const T t = abs_(l);
    const bool small = t < T(kCbSwitch);
    const T ls = small ? l : T(0);
    const T tb = small ? T(kCbSwitch) : t;
    const T u = T(0.5) * ls;
    const T v = u * u;
    const T q = v * cb_series_q(v);
    const T d_small = (T(0.5) - x) + (T(0.5) * u) * cb_series_p(v) / (T(1) + q);
    const T e = exp_(-tb);
    const T a = l >= T(0) ? T(1) - x : x;
    const T d = a - (T(1) / tb - e / (T(1) - e));
    const T d_large = l >= T(0) ? d : -d;
    return g * (small ? d_small : d_large);
}

}  // inline namespace FV_MATH_NAMESPACE
}  // namespace fv

// ---------------------------------------------------------------------------------------------
// Discretized mixture of logistics (PixelCNN++): one channel's log bin probability and its
// derivatives (the formulas of reference._dmol_channel_terms). Appended after the other ops.
// ---------------------------------------------------------------------------------------------

namespace fv {
inline namespace FV_MATH_NAMESPACE {

// expm1(x) for |x| <= 1 by its series (see expm1_tail): no exp, no cancellation.
template <class T>
FV_HD T expm1_series(T x) {
    return x + x * x * expm1_tail(x);
}

// A coupling coefficient's tanh(u) and its derivative 1 - tanh(u)^2 from one exp,
// e = e^(-2|u|): tanh(u) = sign(u) (1 - e) / (1 + e), 1 - e by the series where it would cancel
// (|2u| < 1); 1 - tanh(u)^2 = 4 e / (1 + e)^2 (no cancellation as |tanh| nears 1).
template <class T>
struct DmolCoupling {
    T tanh, sech2;
};

template <class T>
FV_HD DmolCoupling<T> dmol_coupling(T u) {
    const T v = T(-2) * abs_(u);
    const T e = exp_(v);
    const T r = T(1) / (T(1) + e);
    const T t = -(v > T(-1) ? expm1_series(v) : e - T(1)) * r;
    return {u < T(0) ? -t : t, T(4) * e * r * r};
}

template <class T>
FV_HD T dmol_tanh(T u) {
    return dmol_coupling(u).tanh;
}

template <class T>
FV_HD T dmol_sech2(T u) {
    return dmol_coupling(u).sech2;
}

// The constants of one call: h = 1 / (n_bins - 1), 2h, log(2h), log((n_bins - 1) / 2).
template <class T>
struct DmolBins {
    T h, two_h, log_2h, log_half_bins;
};

template <class T>
FV_HD DmolBins<T> dmol_bins(double n_bins) {
    const double h = 1.0 / (n_bins - 1.0);
    return {T(h), T(2.0 * h), T(::log(2.0 * h)), T(::log((n_bins - 1.0) / 2.0))};
}

// The bound of the scaled arguments a, b, m of a finite c = x - mu': a quarter of the largest
// finite value (three channels' log-probabilities and a + b stay finite). Beyond it
// e^-s (x - mu') overflowed, and a component of zero responsibility gave 0 * inf = NaN in the
// gradient. An infinite c (an infinite input) keeps u infinite; NaN passes.
template <class T>
FV_HD T dmol_bound(T u, T c) {
    if (!(abs_(c) < T(kInfF))) return u;
    T big;
    if constexpr (sizeof(T) == 8) {
        big = T(4.4942328371557893e307);
    } else {
        big = T(8.5070591730234616e37);
    }
    return u > big ? big : u < -big ? -big : u;
}

template <class T>
struct DmolTerm {
    T value, dc, ds;  // log P(bin); its derivatives by c = x - mu' and by the log-scale s
};

// log P(bin of x) for one channel and mixture: centered c = x - mu', log-scale s (floored at
// -7, so that e^-s <= e^7). With a = e^-s (c + h), b = e^-s (c - h), m = e^-s c,
// d = a - b = 2 h e^-s (for a finite c, a, b, m bounded to +-(largest finite / 4): dmol_bound):
//   lowest bin (x < -1 + h)   log sigmoid(a)
//   highest bin (x > 1 - h)   log sigmoid(-b)
//   inner bins                log(sigmoid(a) - sigmoid(b))
//                             = log sigmoid(a) + log sigmoid(-b) + log(-expm1(-d)),
//   unless that is below log(1e-5): the mid-bin density
//                             log sigmoid(m) + log sigmoid(-m) - s - log((n_bins - 1) / 2).
// log(-expm1(-d)) is log(2h) - s + log(ratio), ratio = -expm1(-d) / d, so that a tiny d stays
// finite. Every exp is shared: with t_u = e^-|u|, log sigmoid(u) = min(u, 0) - log1p(t_u),
// sigmoid(-u) = t_u / (1 + t_u) for u >= 0 (1 / (1 + t_u) below), tanh(|m| / 2) =
// -expm1(-|m|) / (1 + t_m), d / expm1(d) = e^-d / ratio. The gradient's
// sigmoid(-a) - sigmoid(b) is -sigmoid(-a) sigmoid(-b) expm1(a + b) where it would cancel
// (|a + b| < 1). Nine exp/log per term for the value, none more for the derivatives.
template <class T, bool kGrads>
FV_HD DmolTerm<T> dmol_channel(T c, T s, T x, const DmolBins<T>& k) {
    const T inv_s = exp_(-s);
    const T a = dmol_bound(inv_s * (c + k.h), c), b = dmol_bound(inv_s * (c - k.h), c);
    const T m = dmol_bound(inv_s * c, c);
    const T d = k.two_h * inv_s;
    const T e_md = exp_(-d);
    const T ratio = d > T(0) ? -(d < T(1) ? expm1_series(-d) : e_md - T(1)) / d : T(1);
    const T t_a = exp_(-abs_(a)), t_b = exp_(-abs_(b)), t_m = exp_(-abs_(m));
    const T l1p_a = log1p_unit(t_a), l1p_b = log1p_unit(t_b);
    const T ls_a = (a < T(0) ? a : T(0)) - l1p_a;     // log sigmoid(a)
    const T ls_mb = (b > T(0) ? -b : T(0)) - l1p_b;   // log sigmoid(-b)
    const T log_delta = ls_a + ls_mb + (k.log_2h - s) + log_(ratio);
    const T log_mid = -abs_(m) - T(2) * log1p_unit(t_m) - s - k.log_half_bins;
    const bool low = x < T(-1) + k.h, high = x > T(1) - k.h;
    const bool use_delta = log_delta > T(-11.512925464970229);  // log(1e-5)
    DmolTerm<T> r;
    r.value = low ? ls_a : high ? ls_mb : use_delta ? log_delta : log_mid;
    if (kGrads) {
        const T r_a = T(1) / (T(1) + t_a), r_b = T(1) / (T(1) + t_b);
        const T sig_ma = a >= T(0) ? t_a * r_a : r_a;   // sigmoid(-a)
        const T sig_b = b >= T(0) ? r_b : t_b * r_b;    // sigmoid(b)
        const T sig_mb = b >= T(0) ? t_b * r_b : r_b;   // sigmoid(-b)
        const T am = abs_(m);
        const T tanh_half =
            -(am < T(1) ? expm1_series(-am) : t_m - T(1)) / (T(1) + t_m) * (m < T(0) ? T(-1) : T(1));
        const T apb = a + b;
        const bool near = abs_(apb) < T(1);
        const T dc_delta =
            inv_s * (near ? -sig_ma * sig_mb * expm1_series(near ? apb : T(0)) : sig_ma - sig_b);
        const T ds_delta = -(a * sig_ma - b * sig_b + e_md / ratio);
        r.dc = low ? inv_s * sig_ma : high ? -inv_s * sig_b
             : use_delta ? dc_delta : -inv_s * tanh_half;
        r.ds = low ? -a * sig_ma : high ? b * sig_b : use_delta ? ds_delta : m * tanh_half - T(1);
    } else {
        r.dc = r.ds = T(0);
    }
    return r;
}

// ---------------------------------------------------------------------------------------------
// Finite scalar quantization (Mentzer et al. 2023; as vector-quantize-pytorch 1.32.0's FSQ)
// ---------------------------------------------------------------------------------------------
//
// One element of dimension j with L levels, hw = L / 2, top = L - 1 - hw, and the constants a, b
// of fastvae.reference.fsq_bound_constants (float32 values): the tanh bound
//   u = z + b (b = shift), r = round_half_even(tanh(u) a - offset) in [-hw, top],
//   code = (r + 0) / hw, level = r + hw;
// symmetric (Zhao et al. 2024): level = floor(a (tanh(z) + 1) / 2 + 1/2), code = b level - 1
// (a = L - 1, b = 2 / (L - 1)); HARD: clamp(., -1, 1) instead of tanh. Every product that
// meets an addition is rounded first (mul_rn; the CPU kernels compile with fp-contract=off), as
// PyTorch rounds it: the decisions of round and floor are those of the reference's formula.
// tanh(u) = sign(u) (1 - e) / (1 + e), e = e^(-2|u|), 1 - e by the expm1 series for |2u| < 1
// (the mixture's dmol_coupling, a few ulps), sech^2(u) = 4 e / (1 + e)^2 (no cancellation).
namespace fsq {

#if defined(__CUDA_ARCH__)
FV_HD float mul_rn(float x, float y) { return __fmul_rn(x, y); }
FV_HD double mul_rn(double x, double y) { return __dmul_rn(x, y); }
#else
FV_HD float mul_rn(float x, float y) { return x * y; }
FV_HD double mul_rn(double x, double y) { return x * y; }
#endif

// Round half to even, branch-free: below 2^23 (2^52) by adding and subtracting that power of
// two to |x| (exact under round-to-nearest-even), above it x is an integer already; NaN passes.
template <class T>
FV_HD T round_half_even(T x) {
    const T big = sizeof(T) == 8 ? T(4503599627370496.0) : T(8388608.0f);
    const T ax = abs_(x);
    const T r = (ax + big) - big;
    const T s = x < T(0) ? -r : r;
    return ax < big ? s : x;
}

template <class T>
FV_HD T floor_(T x) {
#if defined(__CUDA_ARCH__)
    return ::floor(x);
#else
    return __builtin_floor(x);
#endif
}
FV_HD float floor_(float x) {
#if defined(__CUDA_ARCH__)
    return ::floorf(x);
#else
    return __builtin_floorf(x);
#endif
}

template <class T>
FV_HD T clamp_unit(T u) {  // clamp(u, -1, 1), NaN passes
    const T lo = u < T(-1) ? T(-1) : u;
    return lo > T(1) ? T(1) : lo;
}

// The per-dimension constants of one level count, in the compute dtype.
template <class T>
struct Dim {
    T a, b, hw, top, offset;
};

template <class T>
FV_HD Dim<T> dim(int64_t L, T a, T b) {
    const int64_t hw = L / 2;
    return {a, b, T(hw), T(L - 1 - hw), (L & 1) ? T(0) : T(0.5)};
}

template <class T>
struct Code {
    T code, level;  // level: integer valued in [0, L - 1]; NaN where z is NaN
};

template <class T, bool SYM, bool HARD>
FV_HD Code<T> code(T z, T a, T b, T hw, T top, T offset) {
    if (SYM) {
        const T t = HARD ? clamp_unit(z) : dmol_tanh(z);
        const T level = floor_(mul_rn(a, t + T(1)) / T(2) + T(0.5));
        return {mul_rn(b, level) - T(1), level};
    }
    const T u = z + b;
    const T t = HARD ? clamp_unit(u) : dmol_tanh(u);
    T r = round_half_even(mul_rn(t, a) - offset);
    r = r < -hw ? -hw : r;
    r = r > top ? top : r;
    return {(r + T(0)) / hw, r + hw};
}

// d code / d z times g: straight through the rounding, times the bound's derivative.
template <class T, bool SYM, bool HARD>
FV_HD T grad(T g, T z, T a, T b, T hw) {
    const T u = SYM ? z : z + b;
    const T slope = HARD ? (u != u ? u : (u >= T(-1) && u <= T(1)) ? T(1) : T(0))
                         : dmol_sech2(u);
    const T scaled = SYM ? ((g * b) / T(2)) * a : (g / hw) * a;
    return scaled * slope;
}

}  // namespace fsq

}  // namespace FV_MATH_NAMESPACE
}  // namespace fv
