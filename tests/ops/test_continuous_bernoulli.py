"""The continuous Bernoulli against a 60-digit mpmath oracle, on every backend and dtype.

The oracle is the textbook formula, -log C(l) - x l + softplus(l) with C(l) = l / tanh(l/2),
and its derivative -(1/l - 1/sinh(l)) - x + sigmoid(l), evaluated by mpmath with 60 digits
(more near l = 0, where the textbook form itself cancels) on the very values the test dtype
holds. The grid runs from -1e4 to 1e4 through 0 on a log scale (down to 1e-30, and to the largest
float beyond), across the switch of forms at |l| = 8, against hard, soft and near-1/2 targets.
Every result is held to a few units of roundoff: BUDGET units of the compute dtype's, relative to
the size of what the result is formed from (``accuracy.continuous_bernoulli_slack``: an
inherent cancellation such as l (1/2 - x) against log(sinh(l/2)/(l/2)) is allowed its terms'
size, nothing more), plus 2 units of the output dtype's for the final rounding.

Also: torch.distributions.ContinuousBernoulli is wrong where this op is right (large |l| and
near 0 in float32; the identity where torch's is accurate is in test_identities.py), and the mean
used by the VAE's images is the distribution's mean.
"""

from __future__ import annotations

import functools
import math

import accuracy
import mpmath
import pytest
import torch
from helpers import DTYPES, dtype_id, loss_dtype

import fastvae as fv
from fastvae.models.vae import continuous_bernoulli_mean

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BUDGET = 8  # units of the compute dtype's roundoff
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11,
                 torch.bfloat16: 2.0**-8}
TARGETS = [0.0, 1e-3, 0.3, 0.5, 0.5 + 2.0**-10, 0.7, 1.0 - 1e-3, 1.0]


def _logit_grid(dtype: torch.dtype) -> list[float]:
    """0, +-10^e for e from -30 to 4 (six per decade), +-(8 - ulp, 8, 8 + ulp) in ``dtype``, and
    1e30 and the largest finite value where ``dtype`` holds them."""
    mags = [10.0 ** (e / 6.0) for e in range(-180, 25)]
    eight = torch.tensor(8.0, dtype=dtype)
    mags += [torch.nextafter(eight, eight - 1).item(), 8.0,
             torch.nextafter(eight, eight + 1).item(), 1e-6, 0.999e-6, 1.0, 1e30,
             torch.finfo(dtype).max]
    held = torch.tensor(mags, dtype=torch.float64).to(dtype).double()
    mags = sorted({m for m in held.tolist() if math.isfinite(m)})
    return [0.0] + [s * m for m in mags for s in (1.0, -1.0) if m > 0]


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


@functools.cache
def _grid(dtype: torch.dtype):
    """(logits, targets) as ``dtype`` holds them (float64 tensors) and the oracle's values and
    d/dlogits."""
    logits = torch.tensor([v for v in _logit_grid(dtype) for _ in TARGETS], dtype=torch.float64)
    targets = torch.tensor(TARGETS * (logits.numel() // len(TARGETS)), dtype=torch.float64)
    logits, targets = logits.to(dtype).double(), targets.to(dtype).double()
    truth = [_textbook(a, b) for a, b in zip(logits.tolist(), targets.tolist(), strict=True)]
    value = torch.tensor([v for v, _ in truth], dtype=torch.float64)
    grad = torch.tensor([g for _, g in truth], dtype=torch.float64)
    return logits, targets, value, grad


def _errors(got: torch.Tensor, want: torch.Tensor, slack: torch.Tensor, out_dtype: torch.dtype,
            compute: torch.dtype) -> torch.Tensor:
    """The error in units of the compute dtype's roundoff times (|true| + slack), after the
    output's rounding (2 units of it) and its smallest normal number are taken off."""
    got = got.detach().cpu().double()
    slack_out = 2 * UNIT_ROUNDOFF[out_dtype] * want.abs() + torch.finfo(out_dtype).tiny
    excess = ((got - want).abs() - slack_out).clamp_min(0)
    return excess / (UNIT_ROUNDOFF[compute] * (want.abs() + slack)).clamp_min(1e-300)


def measure(dtype: torch.dtype, device) -> tuple[float, float]:
    """Worst value and d/dlogits error (units as ``_errors``) of the active backend on the grid."""
    logits, targets, value, grad = _grid(dtype)
    lf = logits.to(dtype).to(device).reshape(-1, 1).requires_grad_()
    xf = targets.to(dtype).to(device).reshape(-1, 1).requires_grad_()
    out = fv.continuous_bernoulli_nll(lf, xf, reduction="none")
    g_l, g_x = torch.autograd.grad(out.sum(), (lf, xf))
    assert out.dtype == loss_dtype(dtype)
    assert g_l.dtype == dtype
    assert torch.equal(g_x.cpu().double().reshape(-1), -logits)  # d/dx = -l, exactly
    slack = accuracy.continuous_bernoulli_slack(logits, targets)
    compute = loss_dtype(dtype)
    e_value = _errors(out.reshape(-1), value, slack["value"], loss_dtype(dtype), compute)
    e_grad = _errors(g_l.reshape(-1), grad, slack["logits"], dtype, compute)
    return e_value.max().item(), e_grad.max().item()


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_against_mpmath(dtype, backend, device):
    worst_value, worst_grad = measure(dtype, device)
    assert worst_value <= BUDGET, f"value off by {worst_value:.3g} units"
    assert worst_grad <= BUDGET, f"d/dlogits off by {worst_grad:.3g} units"


def test_the_oracle_grid_covers_the_domain():
    logits = _grid(torch.float32)[0]
    assert logits.min() <= -1e4
    assert logits.max() >= 1e4
    assert (logits == 0).any()
    small = logits.abs()[logits != 0]
    assert small.min() < 1e-29
    assert ((small > 1e-7) & (small < 1e-5)).any()
    assert (logits == 8.0).any()
    assert ((logits > 7.999) & (logits < 8.0)).any()


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
