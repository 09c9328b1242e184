"""Plain-PyTorch fastvae: the per-element formulas, the Philox noise, the reference ops.

Three uses, one set of formulas:

* the test oracle (run in float64): ``gaussian_kl``, ``bernoulli_nll``, ... below are ordinary
  differentiable torch code with the public signatures of ``fastvae.ops.functional``;
* the ``"torch"`` backend of the custom ops: the ``*_fwd`` / ``*_bwd`` functions at the end take
  the canonical ``(B, N)`` views that every backend takes (see ``fastvae/ops/custom_ops.py``);
* the baseline of the benchmarks.

``philox_randn`` reproduces Triton's ``tl.randn(seed, offset)``: the integer Philox4x32-10 part
bit for bit, the Box-Muller part to float rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)

# ---------------------------------------------------------------------------------------------
# Philox4x32-10 + Box-Muller, as triton.language.random computes it
# ---------------------------------------------------------------------------------------------

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57


def _mulhilo32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and uint32 values ``b``
    held in int64, computed in 16-bit limbs so that no product overflows int64."""
    p_hi = b * (a >> 16)  # < 2**48
    p_lo = b * (a & 0xFFFF)  # < 2**48
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    hi = ((p_hi + (p_lo >> 16)) >> 16) & _MASK32
    return hi, lo


def philox4x32(seed: Tensor, offset: Tensor, n_rounds: int = 10) -> tuple[Tensor, ...]:
    """Philox4x32 with key ``(seed_lo, seed_hi)`` and counter ``(offset_lo, offset_hi, 0, 0)``.

    ``seed``: int64 tensor (one element, any device); ``offset``: int64 tensor. Returns the four
    uint32 outputs as int64 tensors of ``offset``'s shape.
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _MASK32
    k1 = (seed >> 32) & _MASK32
    c0 = offset & _MASK32
    c1 = (offset >> 32) & _MASK32
    c2 = torch.zeros_like(offset)
    c3 = torch.zeros_like(offset)
    for _ in range(n_rounds):
        hi_b, lo_b = _mulhilo32(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mulhilo32(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _MASK32
        k1 = (k1 + _PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(x: Tensor) -> Tensor:
    """uint32 (in int64) -> float32 uniform in [0, 1), as ``tl.rand``: the bits read as int32,
    negatives folded by bitwise not, times 4.6566127342e-10."""
    x = torch.where(x >= 2**31, x - 2**32, x)
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def philox_randn(seed: Tensor | int, offset: Tensor) -> Tensor:
    """Standard normals, float32: element ``i`` is ``tl.randn(seed, offset[i])``."""
    if not isinstance(seed, Tensor):
        seed = torch.tensor(seed, dtype=torch.int64, device=offset.device)
    i1, i2, _, _ = philox4x32(seed.to(offset.device), offset.to(torch.int64))
    u1 = torch.clamp_min(uint32_to_uniform(i1), 1.0e-7)
    theta = torch.tensor(6.283185307179586, dtype=torch.float32) * uint32_to_uniform(i2)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)


def noise(seed: Tensor | int, shape: tuple[int, ...], device: torch.device | str) -> Tensor:
    """The noise of one call: element at flat (row-major) index ``i`` of ``shape`` is
    ``tl.randn(seed, i)``. float32."""
    numel = math.prod(shape)
    return philox_randn(seed, torch.arange(numel, dtype=torch.int64, device=device)).view(shape)


# ---------------------------------------------------------------------------------------------
# Per-element formulas
# ---------------------------------------------------------------------------------------------

# The per-element formulas follow two rules (see docs/numerics.md):
#
# * No intermediate overflows where the result does not. Halvings happen inside an exponent
#   (e^x / 2 = (e^(x/2) / 2) * e^(x/2), finite up to x = 2 ln(2 max)); a residual r is scaled by
#   e^(-lv/2) as (r q) q with q = e^(-lv/4) (and by e^(-lv) as ((r q) q q) q) before it is squared,
#   and squared as (s sqrt(1/2))^2 when the formula halves the square; q's exponent is clamped
#   (at 80 in float32, 600 in float64) where any nonzero residual overflows anyway, so that a
#   zero residual gives exactly 0, never 0 * inf.
# * No result is formed by cancelling nearly equal numbers where the result itself is well
#   conditioned: the Bernoulli gradient takes (1 - x) - sigmoid(-|l|) or sigmoid(-|l|) - x by the
#   sign of l; expm1 and expm1(x) - x run on a Taylor series for |x| < 1; the IWAE gradient in z
#   is (z - mu) expm1(-lv) - mu for |lv| < 1.

# 1/k! for k = 2..11 (float32: the first term left out, x^10 / 12!, is below 0.1 ulp for
# |x| <= 1) and k = 2..18 (float64: x^17 / 19! < 0.1 ulp).
_EXPM1_SERIES = {
    torch.float32: [1.0 / math.factorial(k) for k in range(2, 12)],
    torch.float64: [1.0 / math.factorial(k) for k in range(2, 19)],
}
# Where q = e^(-lv/4) stops growing: beyond it any nonzero residual (>= the smallest subnormal)
# overflows the result anyway; e^EXP_CLAMP itself stays finite.
EXP_CLAMP = {torch.float32: 80.0, torch.float64: 600.0}
SQRT_HALF = math.sqrt(0.5)


def _series(dtype: torch.dtype) -> list[float]:
    return _EXPM1_SERIES[torch.float64 if dtype == torch.float64 else torch.float32]


def _expm1_tail(x: Tensor) -> Tensor:
    """(expm1(x) - x) / x**2 by its Taylor series; accurate for |x| <= 1."""
    coeffs = _series(x.dtype)
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x + c
    return acc


def half_exp(x: Tensor) -> Tensor:
    """e^x / 2 as (e^(x/2) / 2) * e^(x/2): finite wherever e^x / 2 is."""
    h = torch.exp(0.5 * x)
    return (0.5 * h) * h


def half_expm1(d: Tensor, hd: Tensor) -> Tensor:
    """expm1(d) / 2 given d and hd = d / 2: the series for |d| < 1, e^d / 2 - 1/2 above."""
    small = d.abs() < 1.0
    ds, hs = torch.where(small, d, 0.0), torch.where(small, hd, 0.0)
    return torch.where(small, hs + hs * ds * _expm1_tail(ds), half_exp(d) - 0.5)


def half_expm1mx(d: Tensor, hd: Tensor) -> Tensor:
    """(expm1(d) - d) / 2 given d and hd = d / 2: hd d tail(d) for |d| < 1, else
    e^d / 2 - (1/2 + hd) (+inf at d = +inf, not inf - inf)."""
    small = d.abs() < 1.0
    ds, hs = torch.where(small, d, 0.0), torch.where(small, hd, 0.0)
    direct = torch.where(d == math.inf, d, half_exp(d) - (0.5 + hd))
    return torch.where(small, hs * ds * _expm1_tail(ds), direct)


def expm1mx(x: Tensor) -> Tensor:
    """``expm1(x) - x`` without the cancellation of the direct form near 0
    (and +inf at x = +inf, not inf - inf)."""
    return 2.0 * half_expm1mx(x, 0.5 * x)


def quarter_scale(lv: Tensor | float, like: Tensor) -> Tensor:
    """q = e^(-lv/4), its exponent clamped at EXP_CLAMP (NaN kept): r e^(-lv/2) = (r q) q and
    r e^(-lv) = ((r q) q q) q never overflow where the product does not, and a zero r gives 0."""
    lv = torch.as_tensor(lv, dtype=like.dtype, device=like.device)
    x = -0.25 * lv
    return torch.exp(torch.where(x > EXP_CLAMP[compute_dtype(like.dtype)],
                                 EXP_CLAMP[compute_dtype(like.dtype)], x))


def scaled_half(r: Tensor, q: Tensor) -> Tensor:
    """u = r e^(-lv/2) sqrt(1/2), so that u^2 = (r^2 e^(-lv)) / 2, from q = quarter_scale(lv)."""
    return (r * q) * (q * SQRT_HALF)


def scaled_full(r: Tensor, q: Tensor) -> Tensor:
    """r e^(-lv) from q = quarter_scale(lv)."""
    return (((r * q) * q) * q) * q


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs compute in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def std_times(t: Tensor, logvar: Tensor) -> Tensor:
    """t e^(lv/2) as (t h) h with h = e^(lv/4), finite wherever the product is (for normal t);
    exactly 0 for t = 0."""
    h = torch.exp(0.25 * logvar)
    return torch.where(t == 0, torch.zeros_like(t), (t * h) * h)


def kl_elementwise(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
                   prior_logvar: Tensor | None = None) -> Tensor:
    """KL(N(mu, e^lv) || N(pm, e^plv)) per element
    = u^2 + (expm1(d) - d) / 2 with u = (mu - pm) e^(-plv/2) sqrt(1/2) and d = lv - plv
    (taken as d / 2 = lv / 2 - plv / 2, which does not overflow)."""
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        u, hd = diff * SQRT_HALF, 0.5 * logvar
    else:
        u = scaled_half(diff, quarter_scale(prior_logvar, diff))
        hd = 0.5 * logvar - 0.5 * prior_logvar
    return u * u + half_expm1mx(hd + hd, hd)


def kl_grads(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
             prior_logvar: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """d kl / d (mu, logvar, prior_mu, prior_logvar)
    = ((mu - pm) e^-plv, expm1(d) / 2, -(mu - pm) e^-plv, -(expm1(d) / 2 + u^2))."""
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        d_mu, u, hd = diff, diff * SQRT_HALF, 0.5 * logvar
    else:
        q = quarter_scale(prior_logvar, diff)
        d_mu, u = scaled_full(diff, q), scaled_half(diff, q)
        hd = 0.5 * logvar - 0.5 * prior_logvar
    d_lv = half_expm1(hd + hd, hd)
    return d_mu, d_lv, -d_mu, -(d_lv + u * u)


def _bernoulli_parts(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(t, a, nonhard_inf): t = e^(-|l|); a = 1 - x for l >= 0, x below (the weight of |l| in
    the loss); whether l is infinite and x strictly between 0 and 1."""
    t = torch.exp(-logits.abs())
    a = torch.where(logits >= 0, 1.0 - target, target)
    nonhard_inf = logits.isinf() & (target > 0) & (target < 1)
    return t, a, nonhard_inf


def bernoulli_nll_elementwise(logits: Tensor, target: Tensor) -> Tensor:
    """-log Bernoulli(x | sigmoid(l)) = |l| a + log1p(e^-|l|), a = 1 - x (l >= 0) or x (l < 0):
    max(l, 0) - l x without its cancellation. An infinite logit gives the limit for a hard
    target (0 where it agrees, +inf where not), NaN for a target strictly inside (0, 1)."""
    t, a, nonhard_inf = _bernoulli_parts(logits, target)
    weighted = torch.where(a == 0, 0.0, logits.abs() * a)
    return torch.where(nonhard_inf, math.nan, weighted + torch.log1p(t))


def bernoulli_nll_grads(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """d nll / d (logits, target) = (sigmoid(l) - x, -l), the first as (1 - x) - p for
    l >= 0 and p - x below, p = sigmoid(-|l|) = t / (1 + t): no cancellation at x = 1, l >> 0."""
    t, _, nonhard_inf = _bernoulli_parts(logits, target)
    p = t / (1.0 + t)
    d_l = torch.where(logits >= 0, (1.0 - target) - p, p - target)
    return torch.where(nonhard_inf, math.nan, d_l), -logits


def gaussian_nll_elementwise(mean: Tensor, target: Tensor, logvar: Tensor | float) -> Tensor:
    """-log N(x | m, e^lv) = lv / 2 + u^2 + log(2 pi) / 2, u = (x - m) e^(-lv/2) sqrt(1/2)."""
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    u = scaled_half(target - mean, quarter_scale(logvar, mean))
    return (0.5 * logvar + 0.5 * LOG_2PI) + u * u


def gaussian_nll_grads(mean: Tensor, target: Tensor,
                       logvar: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """d nll / d (mean, target, logvar)
    = (-(x - m) e^-lv, (x - m) e^-lv, 1/2 - u^2)."""
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    q = quarter_scale(logvar, mean)
    r = target - mean
    d_target, u = scaled_full(r, q), scaled_half(r, q)
    return -d_target, d_target, 0.5 - u * u


def sample_and_kl_grad_logvar(gz: Tensor, gkl: Tensor, eps: Tensor, logvar: Tensor,
                              d_kl_lv: Tensor) -> Tensor:
    """g_z e^(lv/2) eps / 2 + g_kl expm1(lv) / 2. Where the KL's part overflows (lv > 89.4 in
    float32), it dominates: a sample's part that overflows too (lv > 177) is e^(lv/2) times
    smaller, and their sum is the KL's part (never inf - inf)."""
    kl_part = gkl * d_kl_lv
    return torch.where(kl_part.isinf(), kl_part, std_times(0.5 * gz * eps, logvar) + kl_part)


def iwae_terms(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; 0, I) - log N(z; mu, e^lv) per element = u^2 + lv / 2 - (z sqrt(1/2))^2,
    u = (z - mu) e^(-lv/2) sqrt(1/2) (the 2 pi terms cancel)."""
    u = scaled_half(z - mu, quarter_scale(logvar, z))
    zh = z * SQRT_HALF
    return (u * u - zh * zh) + 0.5 * logvar


def iwae_log_weights(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x), summed over the event: shape (K, B)."""
    per_element = iwae_terms(z, mu, logvar)
    return log_px + per_element.reshape(*z.shape[:2], math.prod(z.shape[2:])).sum(-1)


def iwae_grad_parts(z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per element, the partials of one log-weight in (z, mu, logvar):
    ((z - mu) e^-lv - z, -(z - mu) e^-lv, 1/2 - u^2). The first is taken as
    (z - mu) expm1(-lv) - mu for |lv| < 1, where (z - mu) e^-lv - z would cancel."""
    q = quarter_scale(logvar, z)
    r = z - mu
    r_e = scaled_full(r, q)
    u = scaled_half(r, q)
    small = logvar.abs() < 1.0
    x = torch.where(small, -logvar, 0.0)
    em = x + x * x * _expm1_tail(x)
    d_z = torch.where(small, r * em - mu, r_e - z)
    return d_z, -r_e, 0.5 - u * u


# ---------------------------------------------------------------------------------------------
# Reference ops (the oracle): plain differentiable torch, the signatures of ops.functional
# ---------------------------------------------------------------------------------------------


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    return per_sample.mean()


def _rows(t: Tensor) -> Tensor:
    """``(B, *event)`` -> ``(B, N)``; explicit sizes, so that an empty batch works too."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _per_sample(elementwise: Tensor) -> Tensor:
    return _rows(elementwise).sum(1)


def _up(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.to(compute_dtype(t.dtype))


def reparameterize(mu: Tensor, logvar: Tensor, *, eps: Tensor | None = None,
                   n_samples: int | None = None, seed: int | Tensor | None = None) -> Tensor:
    """z = mu + exp(0.5 * logvar) * eps; eps from ``noise(seed, ...)`` when not given."""
    shape = tuple(mu.shape) if n_samples is None else (n_samples, *mu.shape)
    if eps is None:
        eps = noise(seed, shape, mu.device)
    return (_up(mu) + std_times(_up(eps), _up(logvar))).to(mu.dtype)


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: Tensor | float | None = None,
                prior_logvar: Tensor | float | None = None, *, reduction: str = "mean",
                free_bits: float = 0.0) -> Tensor:
    if isinstance(prior_mu, (int, float)):
        prior_mu = torch.tensor(float(prior_mu), dtype=mu.dtype, device=mu.device)
    if isinstance(prior_logvar, (int, float)):
        prior_logvar = torch.tensor(float(prior_logvar), dtype=mu.dtype, device=mu.device)
    kl = kl_elementwise(_up(mu), _up(logvar), _up(prior_mu), _up(prior_logvar))
    kl = kl.expand(mu.shape)
    if free_bits > 0:
        # "mean": sum_j max(mean_b kl[b, j], λ); "sum": B times that, written as
        # sum_j max(sum_b kl[b, j], B λ) so that an empty batch sums to 0, not nan * 0.
        if reduction == "mean":
            return torch.clamp_min(_rows(kl).mean(0), free_bits).sum()
        return torch.clamp_min(_rows(kl).sum(0), free_bits * mu.shape[0]).sum()
    return _reduce(_per_sample(kl), reduction)


def bernoulli_nll(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    return _reduce(_per_sample(bernoulli_nll_elementwise(_up(logits), _up(target))), reduction)


def gaussian_nll(mean: Tensor, target: Tensor, logvar: Tensor | float = 0.0, *,
                 reduction: str = "mean") -> Tensor:
    lv = _up(logvar) if isinstance(logvar, Tensor) else logvar
    nll = gaussian_nll_elementwise(_up(mean), _up(target), lv).expand(mean.shape)
    return _reduce(_per_sample(nll), reduction)


def sample_and_kl(mu: Tensor, logvar: Tensor, *, reduction: str = "mean", free_bits: float = 0.0,
                  seed: int | Tensor | None = None) -> tuple[Tensor, Tensor]:
    z = reparameterize(mu, logvar, seed=seed)
    return z, gaussian_kl(mu, logvar, reduction=reduction, free_bits=free_bits)


def vae_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, *,
             likelihood: str = "bernoulli", obs_logvar: Tensor | float = 0.0, beta: float = 1.0,
             free_bits: float = 0.0, reduction: str = "mean") -> Tensor:
    if likelihood == "bernoulli":
        nll = bernoulli_nll(recon, x, reduction=reduction)
    elif likelihood == "continuous_bernoulli":
        nll = continuous_bernoulli_nll(recon, x, reduction=reduction)
    else:
        nll = gaussian_nll(recon, x, obs_logvar, reduction=reduction)
    return nll + beta * gaussian_kl(mu, logvar, reduction=reduction, free_bits=free_bits)


def iwae_log_likelihood(log_px_given_z: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """logsumexp_k [log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x)] - log K, shape (B,)."""
    log_w = iwae_log_weights(_up(log_px_given_z), _up(z), _up(mu).unsqueeze(0),
                             _up(logvar).unsqueeze(0))
    return torch.logsumexp(log_w, 0) - math.log(z.shape[0])


# ---------------------------------------------------------------------------------------------
# The "torch" backend: the interface every backend implements (see fastvae/ops/custom_ops.py)
# ---------------------------------------------------------------------------------------------


def _grad_rows(grad: Tensor, reduce_dim: int) -> Tensor:
    """A (B,) or (N,) gradient of a reduction, broadcastable against (B, N)."""
    return grad.unsqueeze(1) if reduce_dim == 1 else grad.unsqueeze(0)


def _cast_needed(grads: tuple[Tensor, ...], needs: list[bool], like: Tensor) -> list[Tensor]:
    return [g.expand(like.shape).to(like.dtype).contiguous()
            for g, need in zip(grads, needs, strict=True) if need]


def _noise_for(seed: Tensor, n_samples: int, rows: int, cols: int, device) -> Tensor:
    return noise(seed, (n_samples, rows, cols), device)


def kept_noise(noise: Tensor, mu: Tensor, keep: bool) -> Tensor:
    """The noise a reparameterize forward keeps for its backward: ``noise`` in mu's dtype when
    ``keep``, else an empty tensor (docs/random-numbers.md, "Kept or regenerated")."""
    return noise.to(mu.dtype) if keep else mu.new_empty((0,))


def reparameterize_fwd(mu: Tensor, logvar: Tensor, eps: Tensor | None, seed: Tensor | None,
                       n_samples: int, keep_noise: bool = False) -> tuple[Tensor, Tensor]:
    B, N = mu.shape
    keep = keep_noise and eps is None
    if eps is None:
        eps = _noise_for(seed, n_samples, B, N, mu.device)
    z = (_up(mu) + std_times(_up(eps), _up(logvar))).to(mu.dtype)
    return z, kept_noise(eps, mu, keep)


def reparameterize_bwd(grad_z: Tensor, noise: Tensor, mu: Tensor, logvar: Tensor,
                       eps: Tensor | None, seed: Tensor | None, needs: list[bool]) -> list[Tensor]:
    K = grad_z.shape[0]
    B, N = mu.shape
    if eps is None:
        eps = noise if noise.numel() else _noise_for(seed, K, B, N, mu.device)
    g = _up(grad_z)
    lv = _up(logvar)
    out = []
    if needs[0]:
        out.append(g.sum(0).to(mu.dtype))
    if needs[1]:
        out.append(std_times(0.5 * (g * _up(eps)).sum(0), lv).to(logvar.dtype))
    if needs[2]:
        out.append(std_times(g, lv).to(eps.dtype))
    return out


def gaussian_kl_fwd(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None,
                    prior_logvar: Tensor | None, reduce_dim: int) -> Tensor:
    return kl_elementwise(_up(mu), _up(logvar), _up(prior_mu), _up(prior_logvar)).sum(reduce_dim)


def gaussian_kl_bwd(grad: Tensor, mu: Tensor, logvar: Tensor, prior_mu: Tensor | None,
                    prior_logvar: Tensor | None, reduce_dim: int,
                    needs: list[bool]) -> list[Tensor]:
    g = _grad_rows(grad, reduce_dim)
    grads = kl_grads(_up(mu), _up(logvar), _up(prior_mu), _up(prior_logvar))
    return _cast_needed(tuple(g * d for d in grads), needs, mu)


def bernoulli_nll_fwd(logits: Tensor, target: Tensor) -> Tensor:
    return bernoulli_nll_elementwise(_up(logits), _up(target)).sum(1)


def bernoulli_nll_bwd(grad: Tensor, logits: Tensor, target: Tensor,
                      needs: list[bool]) -> list[Tensor]:
    g = grad.unsqueeze(1)
    grads = bernoulli_nll_grads(_up(logits), _up(target))
    return _cast_needed(tuple(g * d for d in grads), needs, logits)


def gaussian_nll_fwd(mean: Tensor, target: Tensor, logvar: Tensor | None,
                     logvar_value: float) -> Tensor:
    lv = logvar_value if logvar is None else _up(logvar)
    return gaussian_nll_elementwise(_up(mean), _up(target), lv).sum(1)


def gaussian_nll_bwd(grad: Tensor, mean: Tensor, target: Tensor, logvar: Tensor | None,
                     logvar_value: float, needs: list[bool]) -> list[Tensor]:
    g = grad.unsqueeze(1)
    lv = logvar_value if logvar is None else _up(logvar)
    grads = gaussian_nll_grads(_up(mean), _up(target), lv)
    return _cast_needed(tuple(g * d for d in grads), needs, mean)


def sample_and_kl_fwd(mu: Tensor, logvar: Tensor, seed: Tensor,
                      reduce_dim: int) -> tuple[Tensor, Tensor]:
    z = reparameterize_fwd(mu, logvar, None, seed, 1)[0][0]
    return z, gaussian_kl_fwd(mu, logvar, None, None, reduce_dim)


def sample_and_kl_bwd(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor,
                      reduce_dim: int, needs: list[bool]) -> list[Tensor]:
    B, N = mu.shape
    eps = _noise_for(seed, 1, B, N, mu.device)[0]
    gz, gkl = _up(grad_z), _grad_rows(grad_kl, reduce_dim)
    mu_c, lv_c = _up(mu), _up(logvar)
    d_kl_mu, d_kl_lv, _, _ = kl_grads(mu_c, lv_c)
    grads = (gz + gkl * d_kl_mu, sample_and_kl_grad_logvar(gz, gkl, eps, lv_c, d_kl_lv))
    return _cast_needed(grads, needs, mu)


def iwae_fwd(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    K = z.shape[0]
    log_w = iwae_log_weights(log_px.to(compute_dtype(z.dtype)), _up(z), _up(mu), _up(logvar))
    return torch.logsumexp(log_w, 0) - math.log(K), log_w


def iwae_bwd(grad: Tensor, out: Tensor, log_w: Tensor, log_px: Tensor, z: Tensor, mu: Tensor,
             logvar: Tensor, needs: list[bool]) -> list[Tensor]:
    K = z.shape[0]
    a = grad * torch.exp(log_w - (out + math.log(K)))  # (K, B): g times the normalized weights
    d_z, d_mu, d_lv = iwae_grad_parts(_up(z), _up(mu), _up(logvar))
    # a weight of exactly 0 contributes 0, also where a partial overflows (never 0 * inf)
    a3 = a.unsqueeze(-1)
    d_z, d_mu = (torch.where(a3 == 0, 0.0, a3 * d) for d in (d_z, d_mu))
    grads = [a, d_z, d_mu.sum(0), (a3 * d_lv).sum(0)]
    like = (log_px, z, mu, logvar)
    return [g.to(t.dtype) for g, t, need in zip(grads, like, needs, strict=True) if need]


# ---------------------------------------------------------------------------------------------
# Continuous Bernoulli (appended: the per-element formulas, the reference op, the backend)
# ---------------------------------------------------------------------------------------------

# -log CB(x | sigmoid(l)) = -[log C(l) + x l - softplus(l)], C(l) = l / tanh(l/2), C(0) = 2
# (Loaiza-Ganem & Cunningham 2019), in the two forms that do not cancel (t = |l|, u = l/2):
#
#   |l| < 8:  l (1/2 - x) + log(sinh(u) / u)            (symmetric: odd part + even part)
#             log(sinh(u) / u) = log1p(q),  q = sinh(u)/u - 1 = v Q(v),  v = u^2,
#             Q(v) = sum_{k>=1} v^(k-1) / (2k+1)!        (entire; positive terms)
#   |l| >= 8: t a + log((1 - e^-t) / t),  a = 1 - x for l >= 0, x below
#             log((1 - e^-t) / t) = -log t + log1p(-e^-t) (e^-t <= 3.4e-4: four terms)
#
# Both are exact rewritings (softplus(l) - x l = t a + log1p(e^-t), and the log1p(e^-t) of
# log C cancels it). The switch at 8 balances what each form cancels against the result:
# the symmetric form cancels l (1/2 - x) against log(sinh u / u) for x near 0 or 1, the other
# t a against the log for x near 1/2; at 8 either loses at most a factor of 2.
# Derivatives: d/dl = (1/2 - x) + D(l), D(l) = coth(l/2)/2 - 1/l = (u/2) P(v) / (1 + q) with
# P(v) = sum_{k>=1} 2k v^(k-1) / (2k+1)! (q'(u) = u P(v)), and for |l| >= 8
# d/dl = sign(l) (a - (1/t - e^-t / (1 - e^-t)));  d/dx = -l.
CB_SWITCH = 8.0
# Terms of Q and P kept per compute dtype: the first one left out is below 2^-56 (float64),
# 2^-28 (float32) of the sum at v = 16 (|l| = 8).
CB_TERMS = {torch.float64: 16, torch.float32: 11}
CB_Q = [1.0 / math.factorial(2 * k + 1) for k in range(1, 17)]
CB_P = [2.0 * k / math.factorial(2 * k + 1) for k in range(1, 17)]


def _horner(v: Tensor, coefficients: list[float]) -> Tensor:
    acc = torch.full_like(v, coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = acc * v + c
    return acc


def _cb_parts(logits: Tensor):
    """The pieces both forms share; each branch sees only the logits it serves (so that
    autograd through the unselected branch meets no inf or nan)."""
    t = logits.abs()
    small = t < CB_SWITCH
    n = CB_TERMS[compute_dtype(logits.dtype)]
    l_small = torch.where(small, logits, torch.zeros_like(logits))
    t_large = torch.where(small, torch.full_like(t, CB_SWITCH), t)
    u = 0.5 * l_small
    v = u * u
    q = v * _horner(v, CB_Q[:n])
    e = torch.exp(-t_large)
    return small, l_small, t_large, u, v, q, e, n


def continuous_bernoulli_nll_elementwise(logits: Tensor, target: Tensor) -> Tensor:
    """-log CB(x | sigmoid(l)) = -log C(l) - x l + softplus(l), C(l) = l / tanh(l/2), per
    element, by the two cancellation-free forms above."""
    small, l_small, t_large, _, _, q, e, _ = _cb_parts(logits)
    value_small = l_small * (0.5 - target) + torch.log1p(q)
    a = torch.where(logits >= 0, 1.0 - target, target)
    # An infinite logit gives the limit, +inf below the hard target and -inf at it (never
    # inf * 0 = nan: the finite branch sees t = 8 there).
    infinite = torch.isinf(t_large)
    t_finite = torch.where(infinite, CB_SWITCH, t_large)
    log_term = -torch.log(t_finite) - e * (1.0 + e * (0.5 + e * (1.0 / 3.0 + 0.25 * e)))
    value_large = torch.where(infinite,
                              torch.where(a > 0, math.inf, -math.inf).to(logits.dtype),
                              t_finite * a + log_term)
    return torch.where(small, value_small, value_large)


def continuous_bernoulli_nll_grads(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """d nll / d (logits, target) = ((1/2 - x) + coth(l/2)/2 - 1/l, -l), in the two forms
    above."""
    small, _, t_large, u, v, q, e, n = _cb_parts(logits)
    d_small = (0.5 - target) + (0.5 * u) * _horner(v, CB_P[:n]) / (1.0 + q)
    a = torch.where(logits >= 0, 1.0 - target, target)
    d_large = torch.where(logits >= 0, 1.0, -1.0).to(logits.dtype) * (
        a - (1.0 / t_large - e / (1.0 - e)))
    return torch.where(small, d_small, d_large), -logits


def continuous_bernoulli_nll(logits: Tensor, target: Tensor, *,
                             reduction: str = "mean") -> Tensor:
    return _reduce(_per_sample(continuous_bernoulli_nll_elementwise(_up(logits), _up(target))),
                   reduction)


def continuous_bernoulli_nll_fwd(logits: Tensor, target: Tensor) -> Tensor:
    return continuous_bernoulli_nll_elementwise(_up(logits), _up(target)).sum(1)


def continuous_bernoulli_nll_bwd(grad: Tensor, logits: Tensor, target: Tensor,
                                 needs: list[bool]) -> list[Tensor]:
    g = grad.unsqueeze(1)
    grads = continuous_bernoulli_nll_grads(_up(logits), _up(target))
    return _cast_needed(tuple(g * d for d in grads), needs, logits)


# ---------------------------------------------------------------------------------------------
# Discretized mixture of logistics (PixelCNN++, Salimans et al. 2017; VDVAE's layout)
# ---------------------------------------------------------------------------------------------
#
# Canonical views of the backend interface: ``params`` (B, P, S) and ``x`` (B, C, S), with S the
# number of pixels (the spatial dimensions flattened), C in {1, 3} and P = M (1 + 3 C) for C = 3,
# 3 M for C = 1. Layout of dim 1 of ``params`` (channel-major blocks of M):
#   [0, M)                          mixture logits pi_k
#   M + c J M + j M + k             channel c, j = 0 mean, 1 log-scale, 2 coefficient (C = 3)
# with J = 3 for C = 3 and J = 2 for C = 1. The coefficient of channel block 0 couples G to R,
# that of block 1 B to R, that of block 2 B to G:
#   mu'_R = mu_R,  mu'_G = mu_G + tanh(a_0) x_R,  mu'_B = mu_B + tanh(a_1) x_R + tanh(a_2) x_G.

DMOL_LOG_SCALE_MIN = -7.0
DMOL_MIN_BIN_PROB = 1e-5
# The scaled arguments a, b, m = e^-s (x - mu' (+-h)) of a finite x - mu' are bounded to
# +-(largest finite / 4) of the compute dtype (8.5e37 in float32): beyond it they overflowed
# (|mu'| > ~3e35 at s = -7), and a component of zero responsibility then gave 0 * inf = NaN in
# the gradient. Three channels' log-probabilities and a + b stay finite at the bound. An infinite
# x - mu' (an infinite input) keeps its infinite arguments: infinities propagate.
DMOL_ARG_BOUND_FRACTION = 0.25


def _dmol_bound(u: Tensor, centered: Tensor) -> Tensor:
    """``u`` clamped to +-(largest finite / 4) of its dtype where ``centered`` is finite;
    NaN passes."""
    big = torch.finfo(u.dtype).max * DMOL_ARG_BOUND_FRACTION
    return torch.where(torch.isinf(centered), u, torch.clamp(u, -big, big))


def dmol_params_per_mixture(n_channels: int) -> int:
    """Parameters per mixture component: 1 logit + (mean, log-scale[, coefficient]) per channel."""
    return 3 if n_channels == 1 else 1 + 3 * n_channels


def _dmol_split(params: Tensor, C: int, M: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(B, P, S) -> logits (B, M, S), means, raw log-scales, raw coefficients (B, C, M, S)."""
    B, _, S = params.shape
    J = 2 if C == 1 else 3
    body = params[:, M:].reshape(B, C, J, M, S)
    return params[:, :M], body[:, :, 0], body[:, :, 1], (body[:, :, 2] if J == 3 else None)


def _dmol_coupled_means(means: Tensor, coeffs: Tensor | None, x: Tensor) -> Tensor:
    """mu' of every channel: (B, C, M, S) from means, tanh'd coefficients and x (B, C, S)."""
    if coeffs is None:
        return means
    xr, xg = x[:, 0:1], x[:, 1:2]
    return torch.stack((means[:, 0], means[:, 1] + coeffs[:, 0] * xr,
                        means[:, 2] + coeffs[:, 1] * xr + coeffs[:, 2] * xg), 1)


def discretized_mix_logistic_nll(params: Tensor, x: Tensor, *, n_mixtures: int,
                                 n_bins: int = 256, reduction: str = "mean") -> Tensor:
    """The oracle: PixelCNN++'s formula transcribed as written (CDF differences by subtraction,
    ``log(max(delta, 1e-12))``), run in the compute dtype. ``params`` (B, P, *spatial), ``x``
    (B, C, *spatial) on the bin grid of [-1, 1]; returns per-sample NLL in nats, reduced."""
    B, C = x.shape[:2]
    S = math.prod(x.shape[2:])
    M = n_mixtures
    p = _up(params).reshape(B, params.shape[1], S)
    xv = _up(x).reshape(B, C, S)
    logits, means, raw_ls, raw_coeffs = _dmol_split(p, C, M)
    log_s = torch.clamp_min(raw_ls, DMOL_LOG_SCALE_MIN)
    coeffs = None if raw_coeffs is None else torch.tanh(raw_coeffs)
    xe = xv.unsqueeze(2)  # (B, C, 1, S)
    centered = xe - _dmol_coupled_means(means, coeffs, xv)
    inv_s = torch.exp(-log_s)
    h = 1.0 / (n_bins - 1)
    plus_in = inv_s * (centered + h)
    min_in = inv_s * (centered - h)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - torch.nn.functional.softplus(plus_in)
    log_one_minus_cdf_min = -torch.nn.functional.softplus(min_in)
    mid_in = inv_s * centered
    log_pdf_mid = mid_in - log_s - 2.0 * torch.nn.functional.softplus(mid_in)
    inner = torch.where(cdf_delta > DMOL_MIN_BIN_PROB,
                        torch.log(torch.clamp_min(cdf_delta, 1e-12)),
                        log_pdf_mid - math.log((n_bins - 1) / 2.0))
    log_probs = torch.where(xe < -1.0 + h, log_cdf_plus,
                            torch.where(xe > 1.0 - h, log_one_minus_cdf_min, inner))
    joint = log_probs.sum(1) + torch.log_softmax(logits, 1)  # (B, M, S)
    return _reduce(-torch.logsumexp(joint, 1).sum(1), reduction)


def _log_sigmoid(u: Tensor) -> Tensor:
    """log sigmoid(u) = -softplus(-u) = min(u, 0) - log1p(exp(-|u|))."""
    return torch.clamp_max(u, 0) - torch.log1p(torch.exp(-u.abs()))


def _dmol_channel_terms(centered: Tensor, log_s: Tensor, xe: Tensor, n_bins: int,
                        grads: bool):
    """Per channel and mixture: log P(bin) (the stable form) and, with ``grads``, its
    derivatives by ``centered`` = x - mu' and by the (floored) log-scale s.

    With a = e^-s (c + h), b = e^-s (c - h), m = e^-s c, d = a - b = 2 h e^-s:
      lowest bin   log sigmoid(a)                d/dc = e^-s sigmoid(-a),  d/ds = -a sigmoid(-a)
      highest bin  log sigmoid(-b)               d/dc = -e^-s sigmoid(b),  d/ds = b sigmoid(b)
      inner bins   log(sigmoid(a) - sigmoid(b))
                   = log sigmoid(a) + log sigmoid(-b) + log(-expm1(-d))  (no cancellation),
                   d/dc = e^-s (sigmoid(-a) - sigmoid(b)), for |a + b| < 1 as
                   -e^-s sigmoid(-a) sigmoid(-b) expm1(a + b) (no cancellation),
                   d/ds = -(a sigmoid(-a) - b sigmoid(b) + d / expm1(d))
      fallback     (bin probability below 1e-5): log sigmoid(m) + log sigmoid(-m) - s
                   - log((n_bins - 1) / 2),   d/dc = -e^-s tanh(m / 2),  d/ds = m tanh(m / 2) - 1
    log(-expm1(-d)) is written log(d) + log(-expm1(-d) / d) with log d = log(2 h) - s, so that
    a tiny scale (d underflowing) stays finite. a, b and m of a finite ``centered`` are bounded
    to +-(largest finite / 4) (``_dmol_bound``): a far component's log-probability saturates
    there instead of overflowing, so that its zero responsibility times its derivatives is 0,
    not 0 * inf = NaN.
    """
    h = 1.0 / (n_bins - 1)
    inv_s = torch.exp(-log_s)
    a = _dmol_bound(inv_s * (centered + h), centered)
    b = _dmol_bound(inv_s * (centered - h), centered)
    m = _dmol_bound(inv_s * centered, centered)
    log_d = math.log(2.0 * h) - log_s
    d = torch.exp(log_d)
    ratio = torch.where(d > 0, -torch.expm1(-d) / d, torch.ones_like(d))
    ls_a, ls_mb = _log_sigmoid(a), _log_sigmoid(-b)
    log_delta = ls_a + ls_mb + log_d + torch.log(ratio)
    log_mid = _log_sigmoid(m) + _log_sigmoid(-m) - log_s - math.log((n_bins - 1) / 2.0)
    low, high = xe < -1.0 + h, xe > 1.0 - h
    use_delta = log_delta > math.log(DMOL_MIN_BIN_PROB)
    value = torch.where(low, ls_a, torch.where(high, ls_mb,
                                               torch.where(use_delta, log_delta, log_mid)))
    if not grads:
        return value, None, None
    sig_ma, sig_b = torch.sigmoid(-a), torch.sigmoid(b)
    t_half = torch.tanh(0.5 * m)
    d_over = torch.where(d > 0, d / torch.expm1(d), torch.ones_like(d))
    # sigmoid(-a) - sigmoid(b) cancels only near a + b = 0: there as the product (a + b small,
    # no overflow), elsewhere directly (the two terms differ by a factor >= 1.6)
    apb = a + b
    near = apb.abs() < 1.0
    dc_delta = inv_s * torch.where(
        near, -sig_ma * torch.sigmoid(-b) * torch.expm1(torch.where(near, apb, 0.0)),
        sig_ma - sig_b)
    ds_delta = -(a * sig_ma - b * sig_b + d_over)
    dc = torch.where(low, inv_s * sig_ma, torch.where(
        high, -inv_s * sig_b, torch.where(use_delta, dc_delta, -inv_s * t_half)))
    ds = torch.where(low, -a * sig_ma, torch.where(
        high, b * sig_b, torch.where(use_delta, ds_delta, m * t_half - 1.0)))
    return value, dc, ds


def _dmol_forward_parts(params: Tensor, x: Tensor, M: int, n_bins: int, grads: bool):
    C = x.shape[1]
    p, xv = _up(params), _up(x).to(compute_dtype(params.dtype))
    logits, means, raw_ls, raw_coeffs = _dmol_split(p, C, M)
    log_s = torch.clamp_min(raw_ls, DMOL_LOG_SCALE_MIN)
    coeffs = None if raw_coeffs is None else torch.tanh(raw_coeffs)
    xe = xv.unsqueeze(2)
    centered = xe - _dmol_coupled_means(means, coeffs, xv)
    value, dc, ds = _dmol_channel_terms(centered, log_s, xe, n_bins, grads)
    log_w = torch.log_softmax(logits, 1)
    joint = value.sum(1) + log_w  # (B, M, S)
    lse = torch.logsumexp(joint, 1)  # (B, S)
    return lse, joint, log_w, dc, ds, raw_ls, raw_coeffs, xv


def discretized_mix_logistic_nll_fwd(params: Tensor, x: Tensor, n_mixtures: int,
                                     n_bins: int) -> Tensor:
    """Per-sample NLL (B,) from ``params`` (B, P, S) and ``x`` (B, C, S)."""
    lse = _dmol_forward_parts(params, x, n_mixtures, n_bins, False)[0]
    return -lse.sum(1)


def discretized_mix_logistic_nll_bwd(grad: Tensor, params: Tensor, x: Tensor, n_mixtures: int,
                                     n_bins: int) -> Tensor:
    """d (sum_b grad_b nll_b) / d params, (B, P, S) contiguous in ``params``' dtype.

    With r_k = softmax_k(log pi_k + sum_c L_ck) (the responsibilities) and g = grad_b:
    d/d logit_k = g (softmax(pi)_k - r_k); d/d mu_ck = g r_k dL_ck/dc; d/d raw log-scale =
    -g r_k dL_ck/ds where the raw value is >= -7 (0 below, the floor); d/d a (coefficient
    block 0, 1, 2) = d/d mu_(G, B, B) times x_(R, R, G) times sech^2(a)."""
    M = n_mixtures
    lse, joint, log_w, dc, ds, raw_ls, raw_coeffs, xv = _dmol_forward_parts(
        params, x, M, n_bins, True)
    B, P, S = params.shape
    g = grad.to(lse.dtype)[:, None, None]
    r = torch.exp(joint - lse.unsqueeze(1))  # (B, M, S)
    d_logits = g * (torch.exp(log_w) - r)
    rc = (g * r).unsqueeze(1)  # (B, 1, M, S)
    d_means = rc * dc
    d_ls = torch.where(raw_ls >= DMOL_LOG_SCALE_MIN, -rc * ds, torch.zeros_like(ds))
    parts = [d_means, d_ls]
    if raw_coeffs is not None:
        # sech^2(a) = 4 e^(-2|a|) / (1 + e^(-2|a|))^2 (no 1 - tanh^2 cancellation)
        e = torch.exp(-2.0 * raw_coeffs.abs())
        sech2 = 4.0 * e / ((1.0 + e) * (1.0 + e))
        xr, xg = xv[:, 0:1], xv[:, 1:2]
        d_coeffs = torch.stack((d_means[:, 1] * xr, d_means[:, 2] * xr, d_means[:, 2] * xg), 1)
        parts.append(d_coeffs * sech2)
    body = torch.stack(parts, 2).reshape(B, P - M, S)  # (B, C, J, M, S) -> channel-major
    out = torch.cat((d_logits, body), 1)
    return out.to(params.dtype).contiguous()


# ---------------------------------------------------------------------------------------------
# Vector quantization: the nearest code, without the N x K matrix
# ---------------------------------------------------------------------------------------------

NEAREST_CODE_METRICS = ("l2", "cosine")
NEAREST_CODE_EPS = 1e-12  # cosine: x / max(|x|, eps), in the compute dtype


def _sqrt_rn(n: Tensor) -> Tensor:
    """The correctly rounded square root (IEEE's, that of the C++, CUDA and Triton ``sqrt_rn``).
    ``torch.sqrt`` on the CPU is not (Sleef's 0.5-ulp routine: about 0.7% of random values
    1 ulp off, float32 and float64): float32 goes through float64 (whose 1-ulp error cannot
    move a float32 result: a float32's root is never that close to a float32 midpoint),
    float64 on the CPU through NumPy (the hardware instruction)."""
    if n.dtype == torch.float32:
        return torch.sqrt(n.double()).float()
    if n.device.type == "cpu":
        return torch.from_numpy(np.sqrt(n.numpy()))
    return torch.sqrt(n)


def nearest_code_normalize(v: Tensor) -> Tensor:
    """Rows of ``v`` (M, D) over ``max(|v|, eps)``, ``|v| = sqrt(n)`` with ``n = 0``,
    ``n = n + v_j * v_j`` for j = 0 .. D-1 (each operation rounded; a NaN norm passes): the
    order of every backend."""
    n = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for j in range(v.shape[1]):
        n = n + v[:, j] * v[:, j]
    norm = _sqrt_rn(n)
    eps = torch.tensor(NEAREST_CODE_EPS, dtype=v.dtype, device=v.device)
    norm = torch.where(norm < eps, eps, norm)
    return v / norm[:, None]


def nearest_code_distances(x: Tensor, codebook: Tensor, metric: str) -> Tensor:
    """The (n, k) distances of rows ``x`` (n, D) to codes ``codebook`` (k, D) (normalized
    already for ``"cosine"``), in the one order of every backend: ``acc = 0``, then for
    j = 0 .. D-1 ``t = x_j - e_j; acc = acc + t * t`` (l2) or ``acc = acc + x_j * e_j`` and
    ``1 - acc`` at the end (cosine); each operation rounded to the dtype, no fused
    multiply-add. (n x k: for tiles only.)"""
    acc = torch.zeros((x.shape[0], codebook.shape[0]), dtype=x.dtype, device=x.device)
    for j in range(x.shape[1]):
        if metric == "cosine":
            acc += x[:, j, None] * codebook[None, :, j]
        else:
            t = x[:, j, None] - codebook[None, :, j]
            acc += t.mul_(t)
    return 1 - acc if metric == "cosine" else acc


def nearest_code_fwd(x: Tensor, codebook: Tensor, metric: str,
                     tile: int = 1 << 20) -> tuple[Tensor, Tensor]:
    """The ``"torch"`` backend of ``nearest_code`` on canonical views: ``x (N, D)``,
    ``codebook (K, D)``, both in one dtype, N, K, D >= 1. Returns
    ``(indices int64 (N,), distances (N,))``.

    In the compute dtype (float32, float64 for float64 inputs), in the order of
    ``nearest_code_distances`` (bitwise that of the native and Triton backends), over tiles of
    about ``tile`` (row, code) pairs: memory O(tile + N + K D), never N x K. The index is the
    lowest k of the least distance: a NaN distance never wins, a later tile replaces the best
    only when strictly closer; a row with no distance below +inf (NaN in x, or an overflow) gets
    code 0 and its distance (NaN or +inf).
    """
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(compute)
    codebook = codebook.to(compute)
    if metric == "cosine":
        x = nearest_code_normalize(x)
        codebook = nearest_code_normalize(codebook)
    N, K = x.shape[0], codebook.shape[0]
    tile_k = min(K, max(1, tile // 256))
    tile_n = max(1, tile // tile_k)
    best = torch.full((N,), math.inf, dtype=compute, device=x.device)
    index = torch.zeros((N,), dtype=torch.int64, device=x.device)
    for n0 in range(0, N, tile_n):
        xs = x[n0:n0 + tile_n]
        for k0 in range(0, K, tile_k):
            d = nearest_code_distances(xs, codebook[k0:k0 + tile_k], metric)
            d = torch.where(torch.isnan(d), math.inf, d)
            dmin, imin = d.min(dim=1)  # the first of equal minima
            better = dmin < best[n0:n0 + tile_n]
            best[n0:n0 + tile_n] = torch.where(better, dmin, best[n0:n0 + tile_n])
            index[n0:n0 + tile_n] = torch.where(better, imin + k0, index[n0:n0 + tile_n])
    # rows with no distance below +inf: code 0's distance (O(N D); no host sync)
    first = nearest_code_distances(x, codebook[:1], metric)[:, 0]
    return index, torch.where(best < math.inf, best, first)


# ---------------------------------------------------------------------------------------------
# Finite scalar quantization (Mentzer et al. 2023)
# ---------------------------------------------------------------------------------------------
#
# Per dimension j with L levels (hw = L // 2), the "torch" backend on canonical views: z (N, D),
# levels and basis int64 (D,), a and b (D,) in the compute dtype, `mode` the bits FSQ_SYMMETRIC
# and FSQ_HARD_CLAMP. The constants a, b are those of vector-quantize-pytorch 1.32.0, computed
# once in float32 by fsq_bound_constants (widened exactly for float64 inputs):
#   tanh bound (mode 0):  a = half_l = (L - 1)(1 + 1e-3)/2, b = shift = atanh(offset / half_l),
#                         offset = 1/2 for even L, else 0;
#       u = z + b, t = tanh(u), r = round_half_even(t a - offset) clamped to [-hw, L - 1 - hw],
#       code = (r + 0) / hw (+0, never -0, as vqp's round_ste gives), level = r + hw;
#   hard clamp (bit 2):   t = clamp(u, -1, 1) and b = offset / half_l (no atanh);
#   symmetric (bit 1):    a = L - 1, b = 2 / (L - 1) (Zhao et al. 2024, section 3.2):
#       t = tanh(z) (or clamp), level = floor(a (t + 1) / 2 + 1/2), code = b level - 1;
#   index = sum_j level_j basis_j in int64 (basis = cumprod([1] + levels[:-1])), -1 for a row
#   with a NaN; a NaN z gives NaN codes.
# Backward (straight through the rounding, times the bound's derivative, closed form):
#   tanh bound: dz = ((g / hw) a) sech^2(u), sech^2(u) = 4e / (1 + e)^2 with e = e^(-2|u|)
#   (no 1 - tanh^2 cancellation); symmetric: dz = (((g b) / 2) a) sech^2(z); a hard clamp
#   replaces sech^2 by 1 on [-1, 1], 0 outside (NaN stays NaN).

FSQ_SYMMETRIC = 1
FSQ_HARD_CLAMP = 2


def fsq_bound_constants(levels: list[int], mode: int) -> tuple[Tensor, Tensor]:
    """The per-dimension constants ``(a, b)`` of the bound, float32 on the CPU, computed as
    vector-quantize-pytorch 1.32.0's ``FSQ`` computes them (float32 tensors whatever the input
    dtype): ``half_l = (L - 1) * (1 + 1e-3) / 2`` and ``shift = atanh(offset / half_l)``
    (``offset / half_l`` with a hard clamp), or ``L - 1`` and ``2 / (L - 1)`` with
    ``preserve_symmetry``."""
    L = torch.tensor(levels, dtype=torch.int64)
    lm1 = (L - 1).to(torch.float32)
    if mode & FSQ_SYMMETRIC:
        return lm1, torch.tensor(2.0, dtype=torch.float32) / lm1
    half_l = lm1 * torch.tensor(1 + 1e-3, dtype=torch.float32) / 2
    offset = torch.where(L % 2 == 0, 0.5, 0.0).to(torch.float32)
    ratio = offset / half_l
    return half_l, ratio if mode & FSQ_HARD_CLAMP else torch.atanh(ratio)


def _fsq_compute(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _sech2(u: Tensor) -> Tensor:
    """sech^2(u) = 4e / (1 + e)^2, e = e^(-2|u|): no cancellation where tanh(u)^2 nears 1."""
    e = torch.exp(-2 * u.abs())
    return 4 * e / ((1 + e) * (1 + e))


def fsq_levels_and_codes(z: Tensor, levels: Tensor, a: Tensor, b: Tensor,
                         mode: int) -> tuple[Tensor, Tensor]:
    """``(level, code)`` of every element of ``z (N, D)``, both in the compute dtype (``level``
    integer valued in [0, L - 1], NaN where ``z`` is NaN)."""
    zc = z.to(_fsq_compute(z))
    a, b = a.to(zc.dtype), b.to(zc.dtype)
    if mode & FSQ_SYMMETRIC:
        t = zc.clamp(-1.0, 1.0) if mode & FSQ_HARD_CLAMP else torch.tanh(zc)
        level = torch.floor(a * (t + 1) / 2 + 0.5)
        return level, b * level - 1
    hw = (levels // 2).to(zc.dtype)
    top = (levels - 1 - levels // 2).to(zc.dtype)
    offset = torch.where(levels % 2 == 0, 0.5, 0.0).to(zc.dtype)
    u = zc + b
    t = u.clamp(-1.0, 1.0) if mode & FSQ_HARD_CLAMP else torch.tanh(u)
    r = torch.round(t * a - offset)
    r = torch.where(r < -hw, -hw, torch.where(r > top, top, r))  # NaN passes
    return r + hw, (r + 0.0) / hw


def fsq_index(level: Tensor, basis: Tensor) -> Tensor:
    """The mixed-radix index ``sum_j level_j basis_j`` of integer-valued levels ``(N, D)``, in
    int64 (exact), -1 for a row with a NaN level."""
    nan = torch.isnan(level)
    digits = torch.where(nan, 0, level).to(torch.int64)
    return torch.where(nan.any(-1), -1, (digits * basis).sum(-1))


def finite_scalar_quantize_fwd(z: Tensor, levels: Tensor, basis: Tensor, a: Tensor, b: Tensor,
                               mode: int) -> tuple[Tensor, Tensor]:
    """The ``"torch"`` backend of ``finite_scalar_quantize``: ``z (N, D)`` -> ``(codes (N, D) in
    z's dtype, indices int64 (N,))``, computed in float32 (float64 for float64 inputs)."""
    level, code = fsq_levels_and_codes(z, levels, a, b, mode)
    return code.to(z.dtype), fsq_index(level, basis)


def finite_scalar_quantize_bwd(grad: Tensor, z: Tensor, levels: Tensor, basis: Tensor,
                               a: Tensor, b: Tensor, mode: int) -> Tensor:
    """d codes / d z times ``grad`` (straight through the rounding), in z's dtype."""
    compute = _fsq_compute(z)
    g, zc = grad.to(compute), z.to(compute)
    a, b = a.to(compute), b.to(compute)
    u = zc if mode & FSQ_SYMMETRIC else zc + b
    if mode & FSQ_HARD_CLAMP:
        slope = torch.where(torch.isnan(u), u, ((u >= -1) & (u <= 1)).to(compute))
    else:
        slope = _sech2(u)
    scaled = (((g * b) / 2) * a if mode & FSQ_SYMMETRIC
              else (g / (levels // 2).to(compute)) * a)
    return (scaled * slope).to(z.dtype)


# ---------------------------------------------------------------------------------------------
# Lookup-free quantization (MAGVIT-v2, Yu et al. 2023): the entropy statistics
# ---------------------------------------------------------------------------------------------

LFQ_TILE = 1 << 22  # (row, code) pairs per tile of the torch backend


def lfq_bit_entropy(logits: Tensor) -> Tensor:
    """The binary entropy of ``P(bit = 1) = sigmoid(l)``: ``log1p(e) + |l| e / (1 + e)`` with
    ``e = exp(-|l|)`` (0 at ``l = +-inf``; NaN stays NaN)."""
    a = logits.abs()
    e = torch.exp(-a)
    return torch.log1p(e) + torch.where(e == 0, 0.0, a * (e / (1 + e)))


def lfq_bit_entropy_grad(logits: Tensor) -> Tensor:
    """``d/dl`` of ``lfq_bit_entropy``: ``-l sigmoid(l) sigmoid(-l)`` (0 at ``l = +-inf``)."""
    e = torch.exp(-logits.abs())
    r = 1 / (1 + e)
    return torch.where(e == 0, 0.0, -logits * ((e * r) * r))


def lfq_half_tables(logits: Tensor, with_log: bool) -> tuple[Tensor, Tensor | None]:
    """The probabilities ``P[..., k] = prod_j P(bit_j = b_j(k))`` of the ``2**h`` codes of the
    ``h`` bits ``logits (..., h)`` (bit 0 the most significant of k), and their logs."""
    shape = logits.shape[:-1]
    P = logits.new_ones((*shape, 1))
    L = logits.new_zeros((*shape, 1)) if with_log else None
    for j in range(logits.shape[-1]):
        lj = logits[..., j:j + 1]
        P = torch.stack((P * torch.sigmoid(-lj), P * torch.sigmoid(lj)), -1).flatten(-2)
        if with_log:
            logsig = torch.nn.functional.logsigmoid
            L = torch.stack((L + logsig(-lj), L + logsig(lj)), -1).flatten(-2)
    return P, L


def _lfq_split(d: int) -> tuple[int, int]:
    return d // 2, d - d // 2


def lfq_entropy_fwd(logits: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """The ``"torch"`` backend of ``lfq_entropy``: ``logits (R, C, d)`` (the bit logits
    ``4 inv_temperature s x``) -> ``(sums (C, 2**d), entropy (R, C))`` in the compute dtype.

    ``sums[c, k] = sum_n p_nc(k)`` with ``p_nc(k) = prod_j P(bit_j = b_j(k))``, accumulated as
    ``PA^T PB`` over tiles of rows (the bits split into two halves: never R x 2**d);
    ``entropy[n, c] = -sum_k p log max(p, eps)``: for ``eps = 0`` the sum of the d binary
    entropies, else over tiles of (row, code) pairs with ``log p = LA + LB``.
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(compute)
    R, C, d = logits.shape
    dA, dB = _lfq_split(d)
    K = 1 << d
    clamped = eps > 0
    leps = math.log(eps) if clamped else 0.0
    sums = logits.new_zeros((C, 1 << dA, 1 << dB))
    tile = max(1, LFQ_TILE // (C * K))
    parts = []
    for n0 in range(0, R, tile):
        lt = logits[n0:n0 + tile]
        PA, LA = lfq_half_tables(lt[..., :dA], clamped)
        PB, LB = lfq_half_tables(lt[..., dA:], clamped)
        sums += torch.einsum("nca,ncb->cab", PA, PB)
        if clamped:
            t = LA[..., :, None] + LB[..., None, :]
            p = PA[..., :, None] * PB[..., None, :]
            parts.append(-(p * t.clamp_min(leps)).sum((-1, -2)))
    entropy = torch.cat(parts) if clamped else lfq_bit_entropy(logits).sum(-1)
    return sums.reshape(C, K), entropy


def lfq_entropy_bwd(grad_sums: Tensor, grad_entropy: Tensor, logits: Tensor, eps: float,
                    needs) -> list[Tensor]:
    """The gradient of the logits: ``d l_nj = sum_k W_nk (b_kj - sigma_nj)`` with
    ``W_nk = p_n(k) (G_k + gh_n E_nk)``, ``E = -(max(log p, log eps) + [log p > log eps])``
    (with ``eps = 0`` the entropy's part is the closed form ``gh dh/dl``), formed as
    ``sigma(-l) S1 - sigma(l) S0`` from the sums of ``W`` over the codes with bit j set and
    clear; over tiles of rows."""
    if not needs[0]:
        return []
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lg = logits.to(compute)
    R, C, d = lg.shape
    dA, dB = _lfq_split(d)
    K = 1 << d
    clamped = eps > 0
    leps = math.log(eps) if clamped else 0.0
    G = grad_sums.to(compute).reshape(C, 1 << dA, 1 << dB)
    gh = grad_entropy.to(compute)
    bitsA = _lfq_bits(dA, lg)
    bitsB = _lfq_bits(dB, lg)
    out = torch.empty_like(lg)
    tile = max(1, LFQ_TILE // (C * K))
    for n0 in range(0, R, tile):
        lt = lg[n0:n0 + tile]
        PA, LA = lfq_half_tables(lt[..., :dA], clamped)
        PB, LB = lfq_half_tables(lt[..., dA:], clamped)
        coef = G.expand(lt.shape[0], *G.shape)
        if clamped:
            t = LA[..., :, None] + LB[..., None, :]
            above = t > leps
            E = torch.where(above, t, leps) + above.to(compute)
            coef = coef - gh[n0:n0 + tile, :, None, None] * E
        W = (PA[..., :, None] * PB[..., None, :]) * coef
        RA, RB = W.sum(-1), W.sum(-2)
        s1 = torch.cat((RA @ bitsA, RB @ bitsB), -1)
        s0 = torch.cat((RA @ (1 - bitsA), RB @ (1 - bitsB)), -1)
        out[n0:n0 + tile] = torch.sigmoid(-lt) * s1 - torch.sigmoid(lt) * s0
    if not clamped:
        out = out + gh[..., None] * lfq_bit_entropy_grad(lg)
    return [out.to(logits.dtype)]


def _lfq_bits(h: int, like: Tensor) -> Tensor:
    """``(2**h, h)``: bit j (most significant first) of each code of ``h`` bits."""
    k = torch.arange(1 << h, device=like.device)
    shifts = torch.arange(h - 1, -1, -1, device=like.device)
    return ((k[:, None] >> shifts) & 1).to(like.dtype)


# ---------------------------------------------------------------------------------------------
# Residual vector quantization: L nearest-code searches on the running residual
# ---------------------------------------------------------------------------------------------


def residual_vq_fwd(x: Tensor, codebooks: Tensor, n_levels: Tensor | None,
                    rotation: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The ``"torch"`` backend of ``residual_vq`` (SoundStream, Zeghidour et al. 2021, alg. 1;
    Encodec): ``x (N, D)`` and ``codebooks (L, K, D)`` in one compute dtype (float32 or
    float64), ``n_levels`` int64 ``(N,)`` (the active levels of each row: level l is active when
    ``l < n_levels[n]``) or None (all L). ``rotation`` is the backward's (unused here).

    In the one order of every backend (docs/numerics.md, "the residual"): ``r = x``, ``q = 0``;
    for l = 0 .. L-1 and an active row: ``i_l = nearest_code(r, codebooks[l])`` (its order),
    ``c = codebooks[l, i_l]``, ``d_l = that distance`` (= ``sum_j (r_j - c_j)^2`` in j order),
    then ``r = r - c`` and ``q = q + c`` elementwise (each rounded). An inactive level leaves
    ``r`` and ``q`` as they are, with index -1 and distance 0.

    Returns ``(quantized (N, D), indices int64 (N, L), commit (N, L), dist (N, L))``: ``commit``
    and ``dist`` hold the same distances (two outputs: the commitment term's gradient goes to
    ``x``, the codebook term's to the codebooks)."""
    N, _D = x.shape
    L = codebooks.shape[0]
    r = x
    q = torch.zeros_like(x)
    indices = torch.empty((N, L), dtype=torch.int64, device=x.device)
    dist = torch.empty((N, L), dtype=x.dtype, device=x.device)
    for level in range(L):
        index, d = nearest_code_fwd(r, codebooks[level], "l2")
        c = codebooks[level].index_select(0, index)
        if n_levels is None:
            r, q = r - c, q + c
            indices[:, level], dist[:, level] = index, d
        else:
            active = n_levels > level
            r = torch.where(active[:, None], r - c, r)
            q = torch.where(active[:, None], q + c, q)
            indices[:, level] = torch.where(active, index, -1)
            dist[:, level] = torch.where(active, d, 0)
    return q, indices, dist, dist.clone()


def rotation_trick_grad(r: Tensor, c: Tensor, g: Tensor) -> Tensor:
    """The gradient the rotation trick (Fifty et al. 2024, eq. 4.2) passes from the quantized
    ``c`` back to its input ``r`` (rows): ``lambda (g - 2 w (w.g) + 2 u (c^.g))`` with
    ``u = r/|r|``, ``c^ = c/|c|``, ``w = (u + c^)/|u + c^|``, ``lambda = |c|/|r|``; rows where
    the rotation is not defined (``r = 0``, or ``u = -c^``) pass ``g`` through (as
    ``vector_quantize``'s ``_RotationTrick``)."""
    tiny = torch.finfo(r.dtype).tiny
    rn = r.norm(dim=-1, keepdim=True)
    cn = c.norm(dim=-1, keepdim=True)
    u = r / rn.clamp_min(tiny)
    ch = c / cn.clamp_min(tiny)
    w = u + ch
    wn = w.norm(dim=-1, keepdim=True)
    w = w / wn.clamp_min(tiny)
    lam = cn / rn.clamp_min(tiny)
    rotated = lam * (g - 2 * w * (w * g).sum(-1, keepdim=True)
                     + 2 * u * (ch * g).sum(-1, keepdim=True))
    ok = (rn > 0) & ((wn > 1e-6) | (cn == 0))
    return torch.where(ok, rotated, g)


def residual_vq_bwd(grad_q: Tensor, grad_commit: Tensor, grad_dist: Tensor, indices: Tensor,
                    x: Tensor, codebooks: Tensor, n_levels: Tensor | None, rotation: int,
                    needs: list[bool]) -> list[Tensor]:
    """The gradients of ``residual_vq_fwd``'s outputs, with the residuals recomputed from the
    indices in the forward's order (nothing L x N x D saved). Per active level l of a row, with
    ``r_l`` the residual and ``c_l`` its code (``r_l - c_l = r_{l+1}``):

    - ``quantized = sum_l c_l`` passes the gradient straight through each level to ``r_l``
      (``rotation=0``: ``g``; ``rotation=1``: the rotation trick's ``lambda_l R_l^T g``), and
      ``r_l`` reaches ``x`` by the identity (the codes are subtracted stopped, as in
      vector-quantize-pytorch's ResidualVQ): ``d x += sum_l ST_l(g)``;
    - ``commit_l = |r_l - sg(c_l)|^2``: ``d x += 2 g_commit_l (r_l - c_l)``;
    - ``dist_l = |sg(r_l) - c_l|^2``: ``d codebooks[l, i_l] += 2 g_dist_l (c_l - r_l)``
      (index-add, rows in order).
    """
    _N, _D = x.shape
    L = codebooks.shape[0]
    r = x
    dx = torch.zeros_like(x)
    dcb = torch.zeros_like(codebooks) if needs[1] else None
    for level in range(L):
        index = indices[:, level]
        active = index >= 0
        c = codebooks[level].index_select(0, index.clamp_min(0))
        e = r - c
        if needs[0]:
            st = rotation_trick_grad(r, c, grad_q) if rotation else grad_q
            step = st + 2 * grad_commit[:, level, None] * e
            dx = torch.where(active[:, None], dx + step, dx)
        if dcb is not None:
            dcb[level].index_add_(0, index.clamp_min(0),
                                  torch.where(active[:, None],
                                              -2 * grad_dist[:, level, None] * e, 0))
        r = torch.where(active[:, None], e, r)
    out = []
    if needs[0]:
        out.append(dx)
    if needs[1]:
        out.append(dcb)
    return out
