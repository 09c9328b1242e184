"""The discretized mixture of logistics refuses ``x`` off its bin grid with validation on (issue
22, item 4): values farther than rounding from ``-1 + 2 k / (n_bins - 1)``. Data on the grid in
every dtype passes (bfloat16 cannot hold 256 levels: its rounding is allowed), whatever the
grid's size; unquantized data, data of another grid and values a fraction of a bin off do not.
The training-side check (``fastvae train --likelihood dmol``, ``fastvae.train``) is tested in
tests/cli/test_dmol_data.py."""

from __future__ import annotations

import pytest
import torch
from helpers import dtype_id

import fastvae as fv
from fastvae.ops import validation

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _params(x: torch.Tensor, M: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(x.shape[0], 3 * M, *x.shape[2:], generator=g)


def _grid(n_bins: int, dtype: torch.dtype, how: str) -> torch.Tensor:
    k = torch.arange(n_bins).repeat(2)[: 2 * n_bins].reshape(2, 1, n_bins)
    # "levels": -1 + 2k/(n-1) in float64, rounded to dtype; "pixels": the usual float32
    # pipeline, integer pixels / max * 2 - 1
    levels = -1 + 2 * k.double() / (n_bins - 1)
    pixels = (k.float() / (n_bins - 1)) * 2 - 1
    return (levels if how == "levels" else pixels).to(dtype)


@pytest.mark.parametrize("how", ["levels", "pixels"])
@pytest.mark.parametrize("n_bins", [2, 5, 17, 256, 1024])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_on_the_grid_passes(dtype, n_bins, how):
    x = _grid(n_bins, dtype, how)
    fv.set_validation(True)
    out = fv.discretized_mix_logistic_nll(_params(x).to(dtype), x, n_mixtures=2, n_bins=n_bins)
    assert torch.isfinite(out)


@pytest.mark.parametrize(("n_bins", "x_of"), [
    (256, lambda: torch.rand(2, 1, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1),
    (256, lambda: _grid(17, torch.float32, "levels")),  # another grid (digits at 256 bins)
    (17, lambda: _grid(256, torch.float32, "levels")),
    (256, lambda: _grid(256, torch.float32, "levels") + 0.1 * 2 / 255),  # a tenth of a bin
    (17, lambda: _grid(17, torch.bfloat16, "levels") + 0.4 * 2 / 16),  # bfloat16: 0.4 bin
    (2, lambda: torch.tensor([-1.0, 1.0, 0.5]).reshape(1, 1, 3)),
])
def test_off_the_grid_is_refused(n_bins, x_of):
    x = x_of().clamp(-1, 1)
    fv.set_validation(True)
    with pytest.raises(ValueError, match=r"x must lie on the grid of n_bins=\d+") as info:
        fv.discretized_mix_logistic_nll(_params(x).to(x.dtype), x, n_mixtures=2, n_bins=n_bins)
    assert "Quantize x" in str(info.value)
    fv.set_validation(False)  # off: not checked (the check reads the data)
    fv.discretized_mix_logistic_nll(_params(x).to(x.dtype), x, n_mixtures=2, n_bins=n_bins)


def test_grid_offsets():
    x = torch.tensor([0.0, 1.0, 0.5, 0.25 + 1e-3, 1.5, -0.2])
    off = validation.grid_offsets(x, 5, 0.0, 1.0)  # levels 0, 1/4, ..., 1
    assert off[:3].tolist() == [0.0, 0.0, 0.0]
    assert off[3] == pytest.approx(4e-3, rel=1e-3)
    assert off[4].item() == pytest.approx(2.0 - 4 * 4 * 2**-23, rel=1e-6)  # 2 bins above 1
    assert off[5].item() > 0.7
