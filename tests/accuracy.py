"""Error bounds of fastvae's results against the float64 oracle, for inputs of any magnitude.

Shared by ``test_extremes`` (one element per sample, values at the limits of docs/numerics.md) and
``test_properties`` (random shapes, strides, dtypes and values). A result is held to

    |actual - true| <= rtol * (|true| + slack) + tiny(dtype)

where ``slack`` is the size of the terms the computation cancels or sums (0 where nothing
cancels: the KL of a tiny log-variance must be accurate relative to itself) and ``tiny`` the
dtype's smallest normal number (below it no relative accuracy exists). Where the true value
overflows the dtype of the result, the result must be infinite with the true sign; within
``rtol`` of the overflow threshold either is accepted.

The ``*_slack`` functions give, per element and at unit upstream gradient, the slack of the
elementwise value and of each partial derivative, computed in float64 from the inputs as the
test dtype holds them. Subtractions of two inputs round once (relative error of the difference)
and need no slack.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from fastvae.ops import reference

# Unit roundoff of the dtype a kernel accumulates in.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def check(name: str, actual: Tensor, expected: Tensor, slack: Tensor | float,
          dtype: torch.dtype, rtol: float,
          describe: Callable[[list[int]], str] | None = None) -> None:
    """``actual`` (which must have ``dtype``) against the float64 truth ``expected``."""
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    slack = torch.as_tensor(slack, dtype=torch.float64).detach().cpu().reshape(
        e.shape if torch.is_tensor(slack) and slack.numel() == e.numel() else ()).expand(e.shape)
    assert not e.isnan().any(), f"{name}: the oracle is NaN on finite inputs"
    info = torch.finfo(dtype)
    overflow = e.abs() > info.max * (1 + rtol)
    border = ~overflow & (e.abs() > info.max * (1 - rtol))
    bound = rtol * (e.abs() + slack) + info.tiny
    close = torch.isfinite(a) & ((a - e).abs() <= bound)
    right_inf = torch.isinf(a) & (a.sign() == e.sign())
    ok = torch.where(overflow, right_inf, torch.where(border, close | right_inf, close))
    if not ok.all():
        lines = [f"  got {a[tuple(i)].item():.9g}, true {e[tuple(i)].item():.9g} (bound "
                 f"{bound[tuple(i)].item():.3g}) at index {i}"
                 + (f": {describe(i)}" if describe is not None else "")
                 for i in (~ok).nonzero()[:8].tolist()]
        raise AssertionError(f"{name}: {int((~ok).sum())} of {ok.numel()} wrong\n"
                             + "\n".join(lines))


def kl_slack(mu: Tensor, logvar: Tensor, prior_mu: Tensor | None = None,
             prior_logvar: Tensor | None = None) -> dict[str, Tensor]:
    """KL = 0.5 * (s^2 + expm1(d) - d) has no cancellation (both parts >= 0), nor have d/dmu,
    d/dlv = 0.5 expm1(d); d/dplv = -0.5 * (expm1(d) + s^2) cancels for d < 0."""
    plv = torch.zeros_like(logvar) if prior_logvar is None else prior_logvar
    diff = mu if prior_mu is None else mu - prior_mu
    s2 = diff * diff * torch.exp(-plv)
    zero = torch.zeros_like(s2 + logvar)
    return {"value": zero, "mu": zero, "logvar": zero, "prior_mu": zero,
            "prior_logvar": 0.5 * (torch.expm1(logvar - plv).abs() + s2)}


def bernoulli_slack(logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    """max(l, 0) - l x + log1p(e^-|l|) cancels up to |l|; sigmoid(l) - x up to sigmoid(l) + x."""
    return {"value": logits.abs(), "logits": torch.sigmoid(logits) + target.abs(),
            "target": torch.zeros_like(logits)}


def gaussian_nll_slack(mean: Tensor, target: Tensor, logvar: Tensor) -> dict[str, Tensor]:
    """0.5 * (lv + s^2 + log 2 pi) and d/dlv = 0.5 * (1 - s^2) cancel; d/dmean does not."""
    s2 = (target - mean) ** 2 * torch.exp(-logvar)
    zero = torch.zeros_like(s2)
    return {"value": 0.5 * (logvar.abs() + s2 + reference.LOG_2PI), "mean": zero,
            "target": zero, "logvar": 0.5 * (1 + s2)}


def sample_slack(mu: Tensor, logvar: Tensor, eps: Tensor, noisy: bool) -> dict[str, Tensor]:
    """z = mu + e^(lv/2) eps per sample k (``eps``: (K, *mu.shape)). Generated noise agrees
    across backends to float32 rounding, absolutely (Box-Muller): |eps| + 1 then. d/dmu = sum_k
    g_k sums K terms of size 1 (at unit upstream); d/dlv = 0.5 e^(lv/2) sum_k g_k eps_k."""
    noise = torch.exp(0.5 * logvar) * (eps.abs() + (1.0 if noisy else 0.0))
    return {"value": mu.abs() + noise, "mu": torch.ones_like(noise), "logvar": 0.5 * noise,
            "eps": torch.zeros_like(noise)}


def iwae_slack(log_px: Tensor, z: Tensor, mu: Tensor, logvar: Tensor, grad: Tensor,
               rtol: float) -> dict[str, Tensor]:
    """The log-weights w = log_px + sum_event 0.5 * (s^2 + lv - z^2) are known to
    delta = rtol * (the size of their terms), absolutely, hence ll = logsumexp_k w - log K too,
    and the normalized weights a = softmax_k(w) to a factor e^(+-2 delta): to rtol relatively
    while delta is small, not at all (anything in [0, K]) once delta passes 1 -- log-weights of
    1e12 in float32. ``grad``: the upstream gradient of ll, (B,); ``rtol``: the relative accuracy
    of the float32 (float64) sums, and the unit of the gradients' slack: check them with an rtol
    of at least this."""
    event = tuple(range(2, z.dim()))
    diff2 = (z - mu) ** 2 * torch.exp(-logvar)  # s^2, (K, B, *event)
    size = log_px.abs() + 0.5 * (diff2 + logvar.abs() + z ** 2).sum(event)
    w_err = size.amax(0)
    weights = torch.softmax(reference.iwae_log_weights(log_px, z, mu.unsqueeze(0),
                                                       logvar.unsqueeze(0)), 0)
    delta = rtol * w_err
    K = float(z.shape[0])
    weight_err = torch.where(delta > 10, K, torch.clamp(
        weights * torch.expm1(2 * delta.clamp(max=10)), max=K))
    a = grad.abs() * (weight_err / rtol + weights)  # slack of g * a, per (k, b)
    a = a.reshape(*a.shape, *([1] * len(event)))
    scaled = (z - mu).abs() * torch.exp(-logvar)  # |s| e^(-lv/2)
    return {"value": w_err, "log_px": a.reshape(log_px.shape), "z": a * (scaled + z.abs()),
            "mu": (a * scaled).sum(0), "logvar": (a * 0.5 * (1 + diff2)).sum(0)}


def continuous_bernoulli_slack(logits: Tensor, target: Tensor) -> dict[str, Tensor]:
    """The value is formed as l (1/2 - x) + log(sinh(u)/u) (u = l/2) or as |l| a + f(|l|),
    f(t) = log((1 - e^-t)/t) <= 0, a = 1 - x (l >= 0) or x: it may cancel the two terms of
    either, so its slack is the smaller sum of their sizes. Likewise d/dl, formed as
    (1/2 - x) + D(l), D = coth(l/2)/2 - 1/l, or as sign(l) (a - (1/t - e^-t/(1 - e^-t)))."""
    t = logits.abs()
    u = 0.5 * t
    big = u > 1
    ub, us = torch.where(big, u, 2.0), torch.where(big, 0.5, u)
    log_sinhc = torch.where(big, ub - torch.log(2 * ub) + torch.log1p(-torch.exp(-2 * ub)),
                            torch.where(us == 0, 0.0, torch.log(torch.sinh(us) / us)))
    a = torch.where(logits >= 0, 1 - target, target)
    value = torch.minimum((logits * (0.5 - target)).abs() + log_sinhc,
                          t * a + (log_sinhc - u).abs())
    lb = torch.where(t > 1e-3, logits, 1.0)
    d = torch.where(t > 1e-3, 0.5 / torch.tanh(0.5 * lb) - 1 / lb, logits / 12).abs()
    tb = torch.where(t > 1e-3, t, 1.0)
    rest = torch.where(t > 1e-3, (1 / tb - torch.exp(-tb) / -torch.expm1(-tb)).abs(), 0.5)
    grad = torch.minimum((0.5 - target).abs() + d, a + rest)
    return {"value": value, "logits": grad, "target": torch.zeros_like(logits)}


def dmol_slack(logits: Tensor, means: Tensor, raw_log_scales: Tensor, x: Tensor, n_bins: int,
               rtol: float) -> dict[str, Tensor]:
    """The discretized mixture of logistics, grey pixels: ``logits``, ``means``,
    ``raw_log_scales`` (n, M), ``x`` (n,). Component k's log-weight w_k = log_softmax_k +
    log P_k(x) is formed from terms of size |a| + |b| + |m| + |s| (a, b, m = e^-s (x - mu
    (+-h)), s floored at -7) plus the logits', and known to delta_k = rtol * that size,
    absolutely: the value (-logsumexp_k w_k) to the responsibility-weighted sizes, the
    responsibilities r_k = softmax_k(w_k) to a factor e^(+-2 delta_k) (as in ``iwae_slack``).
    d/dlogit_k = softmax_k - r_k, d/dmu_k = r_k dL/dc (|dL/dc| <= e^-s), d/draw s_k = -r_k
    dL/ds (|dL/ds| <= |a| + |b| + |m| + 2; 0 below the floor). A component far from x has
    r_k = 0 and gets no slack: its gradients must be 0 (not 0 * inf = NaN)."""
    h = 1.0 / (n_bins - 1)
    s = raw_log_scales.clamp_min(reference.DMOL_LOG_SCALE_MIN)
    inv_s = torch.exp(-s)
    c = x.unsqueeze(1) - means
    a, b, m = inv_s * (c + h), inv_s * (c - h), inv_s * c
    log_pi = torch.log_softmax(logits, 1)
    size = (a.abs() + b.abs() + m.abs() + s.abs() + log_pi.abs() + logits.abs().amax(1, True)
            + math.log(n_bins) + 1)
    value, _, _ = reference._dmol_channel_terms(c, s, x.unsqueeze(1).expand_as(c), n_bins, False)
    r = torch.softmax(log_pi + value, 1)
    delta = rtol * size
    weight_err = torch.where(delta > 10, 1.0, torch.clamp(
        r * torch.expm1(2 * delta.clamp(max=10)), max=1.0))
    w = weight_err / rtol + r
    return {"value": (r * size).sum(1), "logits": w + torch.exp(log_pi), "means": w * inv_s,
            "log_scales": torch.where(raw_log_scales >= reference.DMOL_LOG_SCALE_MIN,
                                      w * (a.abs() + b.abs() + m.abs() + 2), 0.0)}
