"""Continuous Bernoulli negative log-likelihood from logits: the per-element formulas, and the
launchers made from them (the kernels: ``kernels/_likelihood.py``).

Per element, for any finite logit l and target x in [0, 1] (Loaiza-Ganem & Cunningham 2019):
    nll = -log C(l) - x l + softplus(l),  C(l) = l / tanh(l/2),  C(0) = 2
computed without cancellation or overflow (the formulas of
``fastvae.ops.reference.continuous_bernoulli_nll_elementwise``; t = |l|, u = l/2, v = u^2):
    |l| < 8:  l (1/2 - x) + log1p(q),  q = sinh(u)/u - 1 = v Q(v)      (series, positive terms)
    |l| >= 8: t a + (-log t + log1p(-e^-t)),  a = 1 - x (l >= 0) or x (l < 0)
    d/dl = (1/2 - x) + (u/2) P(v) / (1 + q)  for |l| < 8,
           sign(l) (a - (1/t - e^-t / (1 - e^-t)))  for |l| >= 8;   d/dx = -l.
Q and P keep 11 terms in float32, 16 in float64. Forward sums over the event: (B,).
No libdevice: log1p from ``tl.log`` with the rounding error of 1 + q added back (one ``tl.log``
serves both forms).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._likelihood import logits_likelihood

SWITCH = tl.constexpr(8.0)


@triton.jit
def _series_q(v, F64: tl.constexpr):
    """Q(v) = sum_k v^(k-1) / (2k+1)!, k = 1..16 (float64) or 1..11 (float32)."""
    if F64:
        acc = v * 0.0 + 1.151633562077195e-37
        acc = acc * v + 1.216125041553518e-34
        acc = acc * v + 1.1309962886447716e-31
        acc = acc * v + 9.183689863795546e-29
        acc = acc * v + 6.446950284384474e-26
        acc = acc * v + 3.868170170630684e-23
    else:
        acc = v * 0.0 + 3.868170170630684e-23
    acc = acc * v + 1.9572941063391263e-20
    acc = acc * v + 8.22063524662433e-18
    acc = acc * v + 2.8114572543455206e-15
    acc = acc * v + 7.647163731819816e-13
    acc = acc * v + 1.6059043836821613e-10
    acc = acc * v + 2.505210838544172e-08
    acc = acc * v + 2.7557319223985893e-06
    acc = acc * v + 0.0001984126984126984
    acc = acc * v + 0.008333333333333333
    acc = acc * v + 0.16666666666666666
    return acc


@triton.jit
def _series_p(v, F64: tl.constexpr):
    """P(v) = sum_k 2k v^(k-1) / (2k+1)!, k = 1..16 (float64) or 1..11 (float32)."""
    if F64:
        acc = v * 0.0 + 3.685227398647024e-36
        acc = acc * v + 3.6483751246605535e-33
        acc = acc * v + 3.166789608205361e-30
        acc = acc * v + 2.387759364586842e-27
        acc = acc * v + 1.5472680682522736e-24
        acc = acc * v + 8.509974375387505e-22
    else:
        acc = v * 0.0 + 8.509974375387505e-22
    acc = acc * v + 3.9145882126782523e-19
    acc = acc * v + 1.4797143443923793e-16
    acc = acc * v + 4.498331606952833e-14
    acc = acc * v + 1.0706029224547743e-11
    acc = acc * v + 1.9270852604185937e-09
    acc = acc * v + 2.505210838544172e-07
    acc = acc * v + 2.2045855379188714e-05
    acc = acc * v + 0.0011904761904761906
    acc = acc * v + 0.03333333333333333
    acc = acc * v + 0.3333333333333333
    return acc


@triton.jit
def _cb_forms(l, F64: tl.constexpr):
    """What the value and the gradient start from: the small-logit mask, the logit seen by the
    series (0 above the switch), |l| seen by the large form (SWITCH below it), u = l/2, v = u^2
    and q = v Q(v). Each form sees only its own logits (the other is evaluated at a harmless
    point)."""
    t = tl.abs(l)
    small = t < SWITCH
    ls = tl.where(small, l, 0.0)
    tb = tl.where(small, SWITCH, t)
    u = 0.5 * ls
    v = u * u
    return small, ls, tb, u, v, v * _series_q(v, F64)


@triton.jit
def _cb_value(l, x, c, DTYPE: tl.constexpr):
    """The per-element value (no second parameter: ``c`` is unused)."""
    small, ls, tb, _, _, q = _cb_forms(l, DTYPE == tl.float64)  # noqa: SIM300 (see _common)
    # One logarithm for both forms: log1p(q) = log(w) + (rounding error of w = 1 + q) / w
    # below the switch, log t above.
    w = 1.0 + q
    lg = tl.log(tl.where(small, w, tb))
    value_small = ls * (0.5 - x) + (lg + (q - (w - 1.0)) / w)
    e = tl.exp(-tb)
    a = tl.where(l >= 0, 1.0 - x, x)
    log_term = -lg - e * (1.0 + e * (0.5 + e * (0.3333333333333333 + 0.25 * e)))
    inf = float("inf")
    # An infinite logit: the limit, +inf below the hard target, -inf at it (not inf * 0).
    value_large = tl.where(tb == inf, tl.where(a > 0.0, inf, -inf), tb * a + log_term)
    return tl.where(small, value_small, value_large)


@triton.jit
def _cb_grad_logits(l, x, F64: tl.constexpr):
    small, _, tb, u, v, q = _cb_forms(l, F64)
    d_small = (0.5 - x) + (0.5 * u) * _series_p(v, F64) / (1.0 + q)
    e = tl.exp(-tb)
    a = tl.where(l >= 0, 1.0 - x, x)
    d = a - (1.0 / tb - e / (1.0 - e))
    d_large = tl.where(l >= 0, d, -d)
    return tl.where(small, d_small, d_large)


@triton.jit
def _cb_grads(g, l, x, c, DTYPE: tl.constexpr):
    """g times the partials in (l, x) (and a placeholder for the absent ``c``)."""
    return g * _cb_grad_logits(l, x, DTYPE == tl.float64), -g * l, g  # noqa: SIM300


continuous_bernoulli_nll_fwd, continuous_bernoulli_nll_bwd = logits_likelihood(
    "continuous_bernoulli_nll", _cb_value, _cb_grads)
