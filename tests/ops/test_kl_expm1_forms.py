"""The float32 KL's expm1 forms of the C++ kernels (``QuarterExp`` in csrc/fastvae_math.h): one
range reduction ``x = n ln2 + r`` in place of a series near 0 and ``e^x`` beyond, whose terms
cancel wherever ``|n|`` is small. Held per element, with every CPU kernel set this machine runs
(with and without FMA), to a few ulps of the float64 reference: ``(expm1(lv) - lv) / 2`` within
2.5 ulps (2.07 with FMA, 2.11 without, the worst over every float32 with 0.015 < |lv| < 2.1 and
every 5th beyond), ``expm1(lv) / 2`` within 2 (1.48). The op-wide grids of test_domain.py allow
8 to 16 units; these bounds are what the forms give. Also: a NaN of either sign stays NaN. (That an
element's result does not depend on where it sits: test_position_independence.py.)
"""

from __future__ import annotations

import math

import pytest
import torch

import fastvae as fv
from fastvae.ops import native as _native
from fastvae.ops import reference

pytestmark = pytest.mark.skipif(_native.unusable_reason("cpu") is not None,
                                reason=f"native library: {_native.unusable_reason('cpu')}")


@pytest.fixture(params=_native.cpu_isas() if _native.unusable_reason("cpu") is None else [])
def cpu(request):
    """The cpu backend with each CPU kernel set this machine runs, restored to "auto" after."""
    _native.set_cpu_isa(request.param)
    yield _native.implementation("cpu")
    _native.set_cpu_isa("auto")


def logvar_grid() -> torch.Tensor:
    """Dense on [-3, 3] (n = -4..4), a few floats either side of every n boundary (r = +-ln2/2)
    up to |n| = 130, log-spaced magnitudes from 1e-30 to 1e4 of both signs, the overflow edge
    (e^lv / 2 is finite up to 89.41) and the ends of the float32 range."""
    parts = [torch.linspace(-3.0, 3.0, 120_001, dtype=torch.float64)]
    boundaries = torch.tensor([(k + 0.5) * math.log(2.0) for k in range(-130, 130)],
                              dtype=torch.float32)
    for _ in range(3):
        parts.append(boundaries.double())
        boundaries = torch.nextafter(boundaries, torch.full_like(boundaries, math.inf))
    magnitudes = torch.logspace(-30, 4, 3401, dtype=torch.float64)
    parts += [magnitudes, -magnitudes, torch.linspace(85.0, 89.41, 4001, dtype=torch.float64),
              torch.tensor([0.0, -3.4e38, 3.4e38, -1e30, -88.0, -104.0], dtype=torch.float64)]
    return torch.cat(parts).float().unique()


def ulps(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| in units of float32's spacing at the expected value (the smallest
    subnormal's for subnormal values); 0 where both are the same infinity."""
    e32 = expected.float().abs()
    spacing = (torch.nextafter(e32, torch.full_like(e32, math.inf)) - e32).double()
    err = (actual.double() - expected).abs() / spacing
    both_inf = torch.isinf(actual) & torch.isinf(expected.float()) & (actual == expected.float())
    return torch.where(both_inf, torch.zeros_like(err), err)


def test_kl_value_within_a_few_ulps(cpu):
    lv = logvar_grid()[:, None]
    mu = torch.zeros_like(lv)
    got = cpu.gaussian_kl_fwd(mu, lv, None, None, 1)
    want = reference.gaussian_kl_fwd(mu.double(), lv.double(), None, None, 1)
    err = ulps(got, want)
    worst = int(err.argmax())
    assert err.max() <= 2.5, (lv[worst].item(), got[worst].item(), want[worst].item())


def test_kl_logvar_gradient_within_a_few_ulps(cpu):
    lv = logvar_grid()[:, None]
    mu = torch.zeros_like(lv)
    grad = torch.ones(lv.shape[0])
    (got,) = cpu.gaussian_kl_bwd(grad, mu, lv, None, None, 1, [False, True, False, False])
    (want,) = reference.gaussian_kl_bwd(grad.double(), mu.double(), lv.double(), None, None, 1,
                                        [False, True, False, False])
    err = ulps(got, want)
    worst = int(err.argmax())
    assert err.max() <= 2.0, (lv[worst].item(), got[worst].item(), want[worst].item())


def test_kl_with_prior_whose_difference_overflows(cpu):
    """d = lv - plv below -3.4e38 rounds to -inf in float32; the KL's part is -(1/2 + d/2),
    finite, and its gradient expm1(d) / 2 = -1/2."""
    lv = torch.tensor([[-2e38], [-3e38], [1.0]])
    plv = torch.tensor([[2e38], [3e38], [1.0]])
    mu = torch.zeros_like(lv)
    got = cpu.gaussian_kl_fwd(mu, lv, mu, plv, 1)
    want = reference.gaussian_kl_fwd(mu.double(), lv.double(), mu.double(), plv.double(), 1)
    assert torch.isfinite(got).all()
    assert (ulps(got, want) <= 2.5).all(), (got, want)
    (dlv,) = cpu.gaussian_kl_bwd(torch.ones(3), mu, lv, mu, plv, 1, [False, True, False, False])
    assert dlv.flatten().tolist() == [-0.5, -0.5, 0.0]


def test_nan_of_either_sign_stays_nan(cpu):
    """+NaN and -NaN (0xFFC00000, what inf - inf and 0 * inf give on the CPU) in the log-variance:
    NaN value and NaN d/dlogvar, standard prior and with a prior, next to finite elements that
    stay finite."""
    nans = torch.tensor([0x7FC00000, -0x00400000], dtype=torch.int32).view(torch.float32)
    assert torch.isnan(nans).all()
    assert nans.view(torch.int32)[1] < 0  # the sign bit is set
    lv = torch.cat([nans, torch.tensor([0.5, -3.0])])[:, None]
    mu = torch.zeros_like(lv)
    for prior in ((None, None), (mu, torch.zeros_like(lv))):
        kl = cpu.gaussian_kl_fwd(mu, lv, *prior, 1)
        (dlv,) = cpu.gaussian_kl_bwd(torch.ones(4), mu, lv, *prior, 1, [False, True, False, False])
        assert torch.isnan(kl[:2]).all(), kl
        assert torch.isfinite(kl[2:]).all(), kl
        assert torch.isnan(dlv[:2]).all(), dlv
        assert torch.isfinite(dlv[2:]).all(), dlv
    # sample_and_kl's d/dlogvar takes the same expm1(lv) / 2
    before = fv.get_backend()
    fv.set_backend("cpu")
    try:
        lv = lv.flatten()[None, :].clone().requires_grad_()
        mu = torch.zeros_like(lv, requires_grad=True)
        z, kl = fv.sample_and_kl(mu, lv, reduction="sum", seed=1)
        (dlv,) = torch.autograd.grad(z.sum() + kl, (lv,))
    finally:
        fv.set_backend(before)
    assert torch.isnan(dlv[0, :2]).all(), dlv
    assert torch.isfinite(dlv[0, 2:]).all(), dlv
