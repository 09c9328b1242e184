"""The continuous Bernoulli beyond the shared tables: the special values, the mean the VAE
shows, and torch.distributions.ContinuousBernoulli, which is wrong where this op is right.

The whole-domain accuracy (every backend and dtype, value and gradients, logits from -1e4 to 1e4
through 0 against a 60-digit mpmath oracle of the textbook formula) is the "continuous_bernoulli"
row of test_domain.py; values and gradients in every layout, reduction and dtype, gradcheck,
opcheck, compile, extremes and non-finite inputs are rows of the other shared tables.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from helpers import dtype_id

import fastvae as fv
from fastvae.models.vae import continuous_bernoulli_mean

UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}


def _textbook(logit: float, x: float) -> tuple[float, float]:
    """-log CB(x | sigmoid(l)) and its l-derivative by mpmath, 60 digits plus what cancels."""
    if logit == 0:
        return 0.0, 0.5 - x
    lm, xm = mpmath.mpf(logit), mpmath.mpf(x)
    scale = int(mpmath.floor(mpmath.log10(abs(lm))))
    with mpmath.workdps(60 + 2 * abs(scale) + 10):  # the textbook form cancels both ways
        log_c = mpmath.log(lm / mpmath.tanh(lm / 2))
        softplus = lm + mpmath.log1p(mpmath.exp(-lm)) if lm > 0 else mpmath.log1p(mpmath.exp(lm))
        value = -log_c - xm * lm + softplus
        grad = -(1 / lm - 1 / mpmath.sinh(lm)) - xm + 1 / (1 + mpmath.exp(-lm))
        return float(value), float(grad)


def test_special_values():
    """C(0) = 2: at l = 0 the loss is exactly -log 2 + log 2 = 0 and d/dl = 1/2 - x; the
    infinite logits are the limits (+inf for x below the hard target, -inf at it)."""
    x = torch.tensor([[0.0, 0.3, 1.0]])
    out = fv.continuous_bernoulli_nll(torch.zeros(1, 3), x, reduction="none")
    assert out.item() == 0.0
    logits = torch.tensor([[math.inf], [math.inf], [-math.inf], [-math.inf]])
    target = torch.tensor([[1.0], [0.3], [0.0], [0.7]])
    got = fv.continuous_bernoulli_nll(logits, target, reduction="none").tolist()
    assert got == [-math.inf, math.inf, -math.inf, math.inf]


# ---------------------------------------------------------------------------------------------
# torch.distributions.ContinuousBernoulli
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "logit"), [
    (torch.float32, 16.0), (torch.float32, 20.0), (torch.float32, -40.0),
    (torch.float32, 0.01), (torch.float64, 40.0), (torch.float64, 80.0), (torch.float64, -80.0)])
def test_torch_distributions_is_wrong_where_this_is_right(dtype, logit, backend, device):
    """At x = 0.3: torch's log_prob is off by 1e-4 to 10% (float32 at |l| >= 16 and near 0,
    float64 at |l| >= 40) against the mpmath oracle; this op is within a few ulps."""
    lt, x = torch.tensor([[logit]], dtype=dtype), torch.tensor([[0.3]], dtype=dtype)
    true_value = _textbook(lt.item(), x.item())[0]
    theirs = -torch.distributions.ContinuousBernoulli(logits=lt).log_prob(x).item()
    ours = fv.continuous_bernoulli_nll(lt.to(device), x.to(device), reduction="none").item()
    assert abs(theirs - true_value) > 1e-4 * abs(true_value)
    assert abs(ours - true_value) <= 4 * UNIT_ROUNDOFF[dtype] * abs(true_value)


# ---------------------------------------------------------------------------------------------
# The mean (what the VAE shows as images)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_mean_is_the_distributions_mean(dtype):
    """E[x] = integral of x CB(x | sigmoid(l)) over [0, 1], by mpmath quadrature: 1/2 at l = 0,
    sigmoid(l) is not it."""
    logits = [-1e4, -30.0, -8.0, -1.0, -1e-5, 0.0, 1e-5, 0.5, 7.9, 8.1, 100.0]
    got = continuous_bernoulli_mean(torch.tensor(logits, dtype=dtype))
    assert got.dtype == dtype
    for logit, m in zip(logits, got.tolist(), strict=True):
        with mpmath.workdps(30):
            lm = mpmath.mpf(logit)

            def density(x, lm=lm):
                if lm == 0:
                    return mpmath.mpf(1)
                if lm < 0:  # C(l) exp(x l - softplus(l))
                    log_p = x * lm - mpmath.log1p(mpmath.exp(lm))
                else:
                    log_p = (x - 1) * lm - mpmath.log1p(mpmath.exp(-lm))
                return lm / mpmath.tanh(lm / 2) * mpmath.exp(log_p)

            points = [0, 1] if abs(logit) < 50 else [0, 1e-4, 1e-2, 0.99, 1 - 1e-4, 1]
            want = float(mpmath.quad(lambda x: x * density(x), points))
        assert abs(m - want) <= 8 * UNIT_ROUNDOFF[dtype] * max(abs(want), 1e-300), (logit, m, want)
