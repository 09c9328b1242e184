"""The discretized mixture of logistics: the property that proves the formula (the
probabilities of all bins of a pixel sum to 1), channels-last inputs, an x of another dtype,
sampling and the VAE. Values and gradients against the float64 oracle on every
geometry, layout, reduction, dtype and backend, gradcheck, opcheck, torch.compile, determinism
and the gradient subsets are rows of the shared tables (tests/cases.py: "dmol", "dmol_gray",
"dmol_two_bins"); the argument checks are rows of test_errors.py, the data checks of
test_validation.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_close, dtype_id

import fastvae as fv
from fastvae.ops import reference


def make_params(B: int, C: int, M: int, spatial, *, gen: torch.Generator,
                dtype=torch.float64) -> torch.Tensor:
    """Parameters that reach every branch: logits N(0, 2), means U(-1.4, 1.4), log-scales
    U(-8, 1) (some below the floor of -7), coefficients N(0, 1.5)."""
    J = 2 if C == 1 else 3
    logits = torch.randn(B, M, *spatial, generator=gen) * 2
    means = torch.rand(B, C, M, *spatial, generator=gen) * 2.8 - 1.4
    log_s = torch.rand(B, C, M, *spatial, generator=gen) * 9 - 8
    parts = [means, log_s]
    if J == 3:
        parts.append(torch.randn(B, C, M, *spatial, generator=gen) * 1.5)
    body = torch.stack(parts, 2).reshape(B, C * J * M, *spatial)
    return torch.cat((logits, body), 1).to(dtype)


def make_x(B: int, C: int, n_bins: int, spatial, *, gen: torch.Generator,
           dtype=torch.float64) -> torch.Tensor:
    """Values on the bin grid, the edges included."""
    k = torch.randint(0, n_bins, (B, C, *spatial), generator=gen)
    k.view(-1)[:2] = torch.tensor([0, n_bins - 1])
    return (k.double() * (2.0 / (n_bins - 1)) - 1.0).to(dtype)


def oracle(params, x, M, n_bins, reduction="none"):
    return reference.discretized_mix_logistic_nll(params.double(), x.double(), n_mixtures=M,
                                                  n_bins=n_bins, reduction=reduction)


def test_channels_last(backend, device):
    """Channels-last params and x (the layout of a convolutional decoder's output), which the
    op reads as a (B, P, H W) view of stride 1 along P; the other layouts (strided, transposed,
    broadcast) and every reduction are rows of the shared tables (cases.py)."""
    C, M, n_bins, reduction = 3, 3, 256, "none"
    gen = torch.Generator().manual_seed(2)
    B, H, W = 4, 3, 5
    params = make_params(B, C, M, (H, W), gen=gen, dtype=torch.float32)
    x = make_x(B, C, n_bins, (H, W), gen=gen, dtype=torch.float32)
    params = params.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    leaf = params.detach().to(device).requires_grad_()
    assert leaf.is_contiguous(memory_format=torch.channels_last)
    nll = fv.discretized_mix_logistic_nll(leaf, x.to(device), n_mixtures=M, reduction=reduction)
    p64 = params.double().requires_grad_()
    expected = oracle(p64, x, M, n_bins, reduction)
    assert_close(nll, expected, dtype=torch.float32)
    (got,) = torch.autograd.grad(nll.sum(), leaf)
    (want,) = torch.autograd.grad(expected.sum(), p64)
    assert_close(got, want)


def _grid_pixels(C: int, n_bins: int, dtype) -> torch.Tensor:
    """Every value of one pixel, (n_bins ** C, C, 1)."""
    levels = torch.arange(n_bins, dtype=torch.float64) * (2.0 / (n_bins - 1)) - 1.0
    grid = torch.tensor(list(itertools.product(range(n_bins), repeat=C)))
    return levels[grid].unsqueeze(-1).to(dtype)


@pytest.mark.parametrize(("C", "n_bins"), [(1, 256), (3, 32), (1, 2), (3, 5)])
def test_bin_probabilities_sum_to_one(C, n_bins, backend, device):
    """exp(-nll) over every value of a pixel sums to 1, for parameters from sharp (log-scale
    at the floor) to flat ones, means inside and outside [-1, 1], and coupled channels.

    Exactly 1 (to rounding) where no bin takes the mid-bin fallback: the CDF differences
    telescope (flat components). Where some do (sharp components, in their tails), the formula
    itself is off by the fallback's midpoint error, less than the mass of those bins (each
    below 1e-5): 1e-5 then."""
    M = 3
    gen = torch.Generator().manual_seed(3)
    x = _grid_pixels(C, n_bins, torch.float64).to(device)
    n_values = x.shape[0]
    sets = make_params(6, C, M, (1,), gen=gen)
    J = 2 if C == 1 else 3
    body = sets[:, M:].view(6, C, J, M, 1)
    body[0, :, 1] = -7.5  # every scale at the floor
    body[1, :, 1] = 1.0   # flat: no bin falls back
    body[1, :, 0] = body[1, :, 0].clamp(-1, 1)
    body[2, :, 0] = 3.0   # means far outside the range
    for s in range(sets.shape[0]):
        for dtype in (torch.float64, torch.float32):
            params = sets[s:s + 1].to(device, dtype).expand(n_values, -1, -1)
            nll = fv.discretized_mix_logistic_nll(params, x.to(dtype), n_mixtures=M,
                                                  n_bins=n_bins, reduction="none")
            total = torch.exp(-nll.double()).sum().item()
            exact = s == 1
            tol = (1e-12 if exact else 1e-5) if dtype == torch.float64 else 5e-5
            assert abs(total - 1.0) < tol, f"set {s}, {dtype_id(dtype)}: sum = {total!r}"


@pytest.mark.parametrize(("p_dtype", "x_dtype"), [(torch.bfloat16, torch.float32),
                                                  (torch.float32, torch.float64),
                                                  (torch.float64, torch.float16)])
def test_mixed_x_dtype(p_dtype, x_dtype, backend, device):
    """x may have its own float dtype: the two compute in the common dtype (float32 params and
    a float64 grid give a float64 NLL at float64 accuracy), params' gradient in its dtype."""
    gen = torch.Generator().manual_seed(8)
    params = make_params(2, 3, 2, (4,), gen=gen, dtype=p_dtype).to(device).requires_grad_()
    x = make_x(2, 3, 256, (4,), gen=gen, dtype=x_dtype).to(device)
    nll = fv.discretized_mix_logistic_nll(params, x, n_mixtures=2, reduction="none")
    common = torch.promote_types(p_dtype, x_dtype)
    assert nll.dtype == (torch.float64 if common == torch.float64 else torch.float32)
    assert_close(nll, oracle(params.detach(), x, 2, 256), dtype=common)
    nll.sum().backward()
    assert params.grad.dtype == p_dtype


@pytest.mark.parametrize("C", [1, 3])
def test_sample_is_on_the_grid_and_follows_the_mixture(C):
    """Samples lie on the grid in [-1, 1]; the most likely value is deterministic; sample
    frequencies match exp(-nll)."""
    M, n_bins = 2, 5
    gen = torch.Generator().manual_seed(9)
    params = make_params(3, C, M, (4,), gen=gen, dtype=torch.float32)
    y = fv.discretized_mix_logistic_sample(params, n_mixtures=M, n_bins=n_bins, generator=gen)
    assert y.shape == (3, C, 4)
    k = (y + 1) * (n_bins - 1) / 2
    assert torch.equal(k, k.round())
    assert y.abs().max() <= 1
    a = fv.discretized_mix_logistic_sample(params, n_mixtures=M, most_likely=True)
    assert torch.equal(a, fv.discretized_mix_logistic_sample(params, n_mixtures=M,
                                                             most_likely=True))
    # frequencies of one pixel's values against the probabilities
    one = params[:1, :, :1].double()
    draws = fv.discretized_mix_logistic_sample(one.expand(20000, -1, -1), n_mixtures=M,
                                               n_bins=n_bins, generator=gen)
    grid = _grid_pixels(C, n_bins, torch.float64)
    probs = torch.exp(-fv.discretized_mix_logistic_nll(
        one.expand(grid.shape[0], -1, -1), grid, n_mixtures=M, n_bins=n_bins, reduction="none"))
    freq = (draws.unsqueeze(1) == grid.unsqueeze(0)).all(-1).all(-1).double().mean(0)
    assert (freq - probs).abs().max() < 0.02


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("C", [1, 3])
def test_most_likely_is_the_mode(C, seed):
    """most_likely: for one channel the grid value of highest mixture probability (brute force
    over the grid with the fused NLL); for three, each channel's value maximizes the joint
    probability summed over the channels after it, given the ones before (R, then G given R,
    then B given R and G)."""
    M, n_bins = 3, 7
    gen = torch.Generator().manual_seed(20 + seed)
    params = make_params(1, C, M, (6,), gen=gen)
    mode = fv.discretized_mix_logistic_sample(params, n_mixtures=M, n_bins=n_bins,
                                              most_likely=True)
    grid = _grid_pixels(C, n_bins, torch.float64)  # (n_bins ** C, C, 1)
    for j in range(params.shape[2]):
        one = params[:, :, j:j + 1]
        probs = torch.exp(-fv.discretized_mix_logistic_nll(
            one.expand(grid.shape[0], -1, -1), grid, n_mixtures=M, n_bins=n_bins,
            reduction="none"))
        chosen = torch.ones(grid.shape[0], dtype=torch.bool)
        for c in range(C):
            # the marginal of channel c over the values that agree with the chosen ones
            marginal = torch.zeros(n_bins, dtype=torch.float64)
            k = ((grid[:, c, 0] + 1) * (n_bins - 1) / 2).round().long()
            marginal.index_add_(0, k[chosen], probs[chosen])
            want = marginal.argmax().item() * 2 / (n_bins - 1) - 1
            assert mode[0, c, j].item() == pytest.approx(want, abs=1e-12), (j, c)
            chosen &= (grid[:, c, 0] - mode[0, c, j]).abs() < 1e-9


def test_most_likely_is_not_the_heaviest_component():
    """A flat component of weight 0.51 and a sharp one of 0.49: the mode is the sharp one's
    mean, not the heavier component's (P = 0.44 against 7e-6)."""
    params = torch.zeros(1, 6, 1)
    params[0, 0] = 0.04
    params[0, 2], params[0, 3] = -0.5, 0.5
    params[0, 4], params[0, 5] = 5.0, -7.0
    mode = fv.discretized_mix_logistic_sample(params, n_mixtures=2, most_likely=True)
    assert mode.item() == pytest.approx(191 * 2 / 255 - 1, abs=1e-6)  # the bin of 0.5


def test_vae_with_dmol_likelihood_trains():
    torch.manual_seed(0)
    model = fv.build_vae((1, 8, 8), 4, arch="conv", likelihood="dmol", n_mixtures=3, n_bins=17)
    x = torch.randint(0, 17, (16, 1, 8, 8)).float() / 16
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        out = model(x, seed=0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert out.recon.shape == (16, 9, 8, 8)
    r = model.reconstruct(x)
    assert r.shape == x.shape
    assert torch.equal(r * 16, (r * 16).round())
    with pytest.raises(ValueError, match="C = 1 or 3"):
        fv.build_vae((2, 8, 8), 4, likelihood="dmol")
