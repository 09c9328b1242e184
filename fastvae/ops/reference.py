"""Plain-PyTorch fastvae: the per-element formulas, the Philox noise, the reference ops.

Three uses, one set of formulas:

* the test oracle (run in float64): ``gaussian_kl``, ``bernoulli_nll``, ... below are ordinary
  differentiable torch code with the public signatures of SPEC §3;
* the ``"torch"`` backend of the custom ops: the ``*_fwd`` / ``*_bwd`` functions at the end take
  the canonical ``(B, N)`` views that every backend takes (see ``fastvae/ops/custom_ops.py``);
* the baseline of the benchmarks.

``philox_randn`` reproduces Triton's ``tl.randn(seed, offset)``: the integer Philox4x32-10 part
bit for bit, the Box-Muller part to float rounding.
"""

from __future__ import annotations

import math

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

# 1/k! for k = 2..13: expm1(x) - x = x**2 * (1/2! + x/3! + x**2/4! + ...)
_EXPM1_SERIES = [1.0 / math.factorial(k) for k in range(2, 14)]


def _expm1_tail(x: Tensor) -> Tensor:
    """(expm1(x) - x) / x**2 by its Taylor series; accurate for |x| < 0.5."""
    acc = torch.full_like(x, _EXPM1_SERIES[-1])
    for c in reversed(_EXPM1_SERIES[:-1]):
        acc = acc * x + c
    return acc


def expm1mx(x: Tensor) -> Tensor:
    """``expm1(x) - x`` without the cancellation of the direct form near 0
    (and +inf at x = +inf, not inf - inf)."""
    direct = torch.where(x == math.inf, x, torch.expm1(x) - x)
    return torch.where(x.abs() < 0.5, x * x * _expm1_tail(x), direct)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs compute in float64, everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kl_elementwise(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
                   prior_logvar: Tensor | None = None) -> Tensor:
    """KL(N(mu, e^lv) || N(pm, e^plv)) per element
    = 0.5 * (((mu - pm) * e^(-plv/2))^2 + expm1(lv - plv) - (lv - plv))."""
    if prior_mu is None and prior_logvar is None:
        return 0.5 * (mu * mu + expm1mx(logvar))
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return 0.5 * (diff * diff + expm1mx(logvar))
    scaled = diff * torch.exp(-0.5 * prior_logvar)
    return 0.5 * (scaled * scaled + expm1mx(logvar - prior_logvar))


def kl_grads(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
             prior_logvar: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """d kl / d (mu, logvar, prior_mu, prior_logvar)."""
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        d_mu = diff
        d_lv = 0.5 * torch.expm1(logvar)
        d_plv = -d_lv - 0.5 * diff * diff
    else:
        # (mu - pm) e^(-plv) as ((mu - pm) e^(-plv/2)) e^(-plv/2): e^(-plv) alone overflows
        # float32 for plv < -88.7 (inf, or nan where mu = pm) when the product does not.
        inv_std = torch.exp(-0.5 * prior_logvar)
        scaled = diff * inv_std
        d_mu = scaled * inv_std
        d_lv = 0.5 * torch.expm1(logvar - prior_logvar)
        d_plv = -d_lv - 0.5 * scaled * scaled
    return d_mu, d_lv, -d_mu, d_plv


def bernoulli_nll_elementwise(logits: Tensor, target: Tensor) -> Tensor:
    """-log Bernoulli(x | sigmoid(l)) = max(l, 0) - l * x + log1p(exp(-|l|))."""
    return torch.clamp_min(logits, 0) - logits * target + torch.log1p(torch.exp(-logits.abs()))


def bernoulli_nll_grads(logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """d nll / d (logits, target) = (sigmoid(l) - x, -l)."""
    return torch.sigmoid(logits) - target, -logits


def gaussian_nll_elementwise(mean: Tensor, target: Tensor, logvar: Tensor | float) -> Tensor:
    """-log N(x | m, e^lv) = 0.5 * (lv + ((x - m) * e^(-lv/2))^2 + log(2 pi))."""
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    scaled = (target - mean) * torch.exp(-0.5 * logvar)
    return 0.5 * (logvar + scaled * scaled + LOG_2PI)


def gaussian_nll_grads(mean: Tensor, target: Tensor,
                       logvar: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """d nll / d (mean, target, logvar)
    = (-(x - m) e^-lv, (x - m) e^-lv, 0.5 (1 - (x - m)^2 e^-lv))."""
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    inv_std = torch.exp(-0.5 * logvar)
    scaled = (target - mean) * inv_std
    d_target = scaled * inv_std
    return -d_target, d_target, 0.5 * (1.0 - scaled * scaled)


def iwae_log_weights(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x), summed over the event: shape (K, B).
    Per element 0.5 * (s^2 + lv - z^2) with s = (z - mu) * e^(-lv/2) (the 2 pi terms cancel)."""
    s = (z - mu) * torch.exp(-0.5 * logvar)
    per_element = 0.5 * (s * s + logvar - z * z)
    return log_px + per_element.reshape(*z.shape[:2], math.prod(z.shape[2:])).sum(-1)


# ---------------------------------------------------------------------------------------------
# Reference ops (the oracle): plain differentiable torch, public signatures of SPEC §3
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
    std = torch.exp(0.5 * _up(logvar))
    return (_up(mu) + std * _up(eps)).to(mu.dtype)


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


def reparameterize_fwd(mu: Tensor, logvar: Tensor, eps: Tensor | None, seed: Tensor | None,
                       n_samples: int) -> Tensor:
    B, N = mu.shape
    if eps is None:
        eps = _noise_for(seed, n_samples, B, N, mu.device)
    std = torch.exp(0.5 * _up(logvar))
    return (_up(mu) + std * _up(eps)).to(mu.dtype)


def reparameterize_bwd(grad_z: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor | None,
                       seed: Tensor | None, needs: list[bool]) -> list[Tensor]:
    K = grad_z.shape[0]
    B, N = mu.shape
    if eps is None:
        eps = _noise_for(seed, K, B, N, mu.device)
    g = _up(grad_z)
    std = torch.exp(0.5 * _up(logvar))
    out = []
    if needs[0]:
        out.append(g.sum(0).to(mu.dtype))
    if needs[1]:
        out.append((0.5 * std * (g * _up(eps)).sum(0)).to(logvar.dtype))
    if needs[2]:
        out.append((g * std).to(eps.dtype))
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
    z = reparameterize_fwd(mu, logvar, None, seed, 1)[0]
    return z, gaussian_kl_fwd(mu, logvar, None, None, reduce_dim)


def sample_and_kl_bwd(grad_z: Tensor, grad_kl: Tensor, mu: Tensor, logvar: Tensor, seed: Tensor,
                      reduce_dim: int, needs: list[bool]) -> list[Tensor]:
    B, N = mu.shape
    eps = _noise_for(seed, 1, B, N, mu.device)[0]
    gz, gkl = _up(grad_z), _grad_rows(grad_kl, reduce_dim)
    mu_c, lv_c = _up(mu), _up(logvar)
    std = torch.exp(0.5 * lv_c)
    d_kl_mu, d_kl_lv, _, _ = kl_grads(mu_c, lv_c)
    grads = (gz + gkl * d_kl_mu, 0.5 * std * eps * gz + gkl * d_kl_lv)
    return _cast_needed(grads, needs, mu)


def iwae_fwd(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor) -> tuple[Tensor, Tensor]:
    K = z.shape[0]
    log_w = iwae_log_weights(log_px.to(compute_dtype(z.dtype)), _up(z), _up(mu), _up(logvar))
    return torch.logsumexp(log_w, 0) - math.log(K), log_w


def iwae_bwd(grad: Tensor, out: Tensor, log_w: Tensor, log_px: Tensor, z: Tensor, mu: Tensor,
             logvar: Tensor, needs: list[bool]) -> list[Tensor]:
    K = z.shape[0]
    a = grad * torch.exp(log_w - (out + math.log(K)))  # (K, B): g times the normalized weights
    inv_std = torch.exp(-0.5 * _up(logvar))
    z_c = _up(z)
    s = (z_c - _up(mu)) * inv_std
    a3 = a.unsqueeze(-1)
    grads = [a, a3 * (s * inv_std - z_c), -(a3 * s * inv_std).sum(0),
             (a3 * 0.5 * (1.0 - s * s)).sum(0)]
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
