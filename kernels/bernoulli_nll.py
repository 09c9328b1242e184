"""Bernoulli negative log-likelihood from logits: the per-element formulas, and the launchers
made from them (the kernels: ``kernels/_likelihood.py``).

Per element, exact for any finite logit l and target x in [0, 1] (kernels/_common.py):
    nll = |l| * a + log1p(exp(-|l|)),  a = 1 - x for l >= 0, x below  (= max(l, 0) - l * x)
    d/dl = sigmoid(l) - x = (1 - x) - p for l >= 0, p - x below,  p = sigmoid(-|l|)
    d/dx = -l
An infinite logit gives the limit for a hard target (x = 0 or 1), NaN for x inside (0, 1).
Forward sums over the event: per-sample values, shape (B,).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import bernoulli_grad_logits, bernoulli_nll
from ._likelihood import logits_likelihood


@triton.jit
def _bernoulli_value(l, x, c, DTYPE: tl.constexpr):
    """The per-element value (no second parameter: ``c`` is unused)."""
    return bernoulli_nll(l, x)


@triton.jit
def _bernoulli_grads(g, l, x, c, DTYPE: tl.constexpr):
    """g times the partials in (l, x) (and a placeholder for the absent ``c``)."""
    return g * bernoulli_grad_logits(l, x), -g * l, g


bernoulli_nll_fwd, bernoulli_nll_bwd = logits_likelihood("bernoulli_nll", _bernoulli_value,
                                                         _bernoulli_grads)
