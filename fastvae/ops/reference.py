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
    a tiny scale (d underflowing) stays finite.
    """
    h = 1.0 / (n_bins - 1)
    inv_s = torch.exp(-log_s)
    a = inv_s * (centered + h)
    b = inv_s * (centered - h)
    m = inv_s * centered
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
