"""The Triton DMoL kernels in float64 agree with the float64 reference to float64 rounding.

Every constant reaches a float64 kernel unrounded. The GPU compiler passes a Python float
kernel argument as float32 while Triton's interpreter keeps it a Python float, so here each
launch's float arguments are rounded to float32 as on a GPU: a kernel that took h = 1/(n_bins - 1)
or log(2h) as an argument would be off by ~1e-8 relative, far outside the tolerance below.
The reference is the stable formula the kernels implement (``reference._dmol_channel_terms``),
not the CDF-difference oracle (which loses eps / P(bin)).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvae.ops import backends as _backend
from fastvae.ops import reference

pytestmark = pytest.mark.skipif(_backend.unusable_reason("triton", torch.device("cpu")) is not None
                                and not torch.cuda.is_available(),
                                reason="triton cannot run here")

dmol = pytest.importorskip("fastvae.kernels.dmol")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def gpu_scalars(monkeypatch):
    """Round every Python float kernel argument to float32, as the GPU compiler does."""
    launch = dmol.launch

    def rounded(op, kernel, grid, *args, **meta):
        args = tuple(float(np.float32(a)) if isinstance(a, float) else a for a in args)
        return launch(op, kernel, grid, *args, **meta)

    monkeypatch.setattr(dmol, "launch", rounded)


def _inputs(B, C, M, S, n_bins, seed, sharp):
    """(B, P, S) float64 parameters and (B, C, S) pixels on the grid, edges included. Log-scales
    in [-3, 0] (the oracle's own rounding stays near eps there), or, ``sharp``, in [-7.5, -5]
    (at and below the floor: the edge bins and the fallback, where h enters through e^-s h)."""
    g = torch.Generator().manual_seed(seed)
    J = 2 if C == 1 else 3
    logits = torch.randn(B, M, S, generator=g, dtype=torch.float64)
    means = torch.rand(B, C, M, S, generator=g, dtype=torch.float64) * 2.2 - 1.1
    lo, hi = (-7.5, -5.0) if sharp else (-3.0, 0.0)
    log_s = torch.rand(B, C, M, S, generator=g, dtype=torch.float64) * (hi - lo) + lo
    parts = [means, log_s]
    if J == 3:
        parts.append(torch.randn(B, C, M, S, generator=g, dtype=torch.float64))
    params = torch.cat((logits, torch.stack(parts, 2).reshape(B, C * J * M, S)), 1)
    k = torch.randint(0, n_bins, (B, C, S), generator=g)
    k[:, :, 0], k[:, :, 1] = 0, n_bins - 1
    x = k.double() * (2.0 / (n_bins - 1)) - 1.0
    if sharp:  # the means near the pixels: inner bins with the CDF difference, not only tails
        body = params[:, M:].view(B, C, J, M, S)
        body[:, :, 0] = x[:, :, None] + (body[:, :, 0] - body[:, :, 0].round()) * 0.01
    return params.to(DEVICE), x.to(DEVICE)


@pytest.mark.parametrize("sharp", [False, True], ids=["flat", "sharp"])
@pytest.mark.parametrize(("C", "M", "n_bins"), [(3, 3, 256), (1, 2, 256), (3, 2, 8)])
def test_float64_matches_reference_to_rounding(gpu_scalars, C, M, n_bins, sharp):
    params, x = _inputs(2, C, M, 24, n_bins, seed=C * 10 + M, sharp=sharp)
    grad = torch.tensor([0.7, -1.3], dtype=torch.float64, device=DEVICE)
    nll = dmol.discretized_mix_logistic_nll_fwd(params, x, M, n_bins)
    d_params = dmol.discretized_mix_logistic_nll_bwd(grad, params, x, M, n_bins)
    cpu_p, cpu_x = params.cpu(), x.cpu()
    want = reference.discretized_mix_logistic_nll_fwd(cpu_p, cpu_x, M, n_bins)
    want_d = reference.discretized_mix_logistic_nll_bwd(grad.cpu(), cpu_p, cpu_x, M, n_bins)
    # ~1e-15 relative per term; a gradient scale e^-s up to e^7.5 amplifies its rounding
    torch.testing.assert_close(nll.cpu(), want, rtol=1e-13, atol=0)
    scale = want_d.abs().max().item()
    torch.testing.assert_close(d_params.cpu(), want_d, rtol=1e-11, atol=1e-13 * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_mixtures_with_logit_minus_inf_drop_out(dtype):
    """A mixture of logit -inf has weight 0, also as the first term of the log-sum-exps over the
    mixtures (an empty running sum): values and gradients are the reference's, finite."""
    M = 3
    params, x = _inputs(2, 3, M, 6, 256, seed=7, sharp=False)
    params[0, 0, :3] = -float("inf")   # the first mixture
    params[1, M - 1, 2:] = -float("inf")   # the last
    params[1, 0, 0] = params[1, 1, 0] = -float("inf")  # all but one
    params, x = params.to(dtype), x.to(dtype)
    grad = torch.tensor([0.7, -1.3], dtype=torch.float64, device=DEVICE)
    nll = dmol.discretized_mix_logistic_nll_fwd(params, x, M, 256)
    d_params = dmol.discretized_mix_logistic_nll_bwd(grad, params, x, M, 256)
    cpu_p, cpu_x = params.cpu().double(), x.cpu().double()
    want = reference.discretized_mix_logistic_nll_fwd(cpu_p, cpu_x, M, 256)
    want_d = reference.discretized_mix_logistic_nll_bwd(grad.cpu(), cpu_p, cpu_x, M, 256)
    assert torch.isfinite(d_params).all()
    rtol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(nll.cpu().double(), want, rtol=rtol, atol=0)
    torch.testing.assert_close(d_params.cpu().double(), want_d, rtol=rtol * 100,
                               atol=rtol * want_d.abs().max().item())
