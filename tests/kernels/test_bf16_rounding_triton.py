"""Triton stores round float32 -> bfloat16 to nearest, ties to even, as a GPU does:
Triton's interpreter truncates (half of all values one ulp toward zero), so the kernels
cast through ``kernels/_common.cast_rn``. Held bit for bit against torch's conversion (round to
nearest even) over random magnitudes, ties, subnormals, the overflow threshold, infinities and
NaN; and through an op whose float32 value is exact on every backend."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from fastvae.kernels._common import store

import fastvae as fv

pytestmark = pytest.mark.skipif("triton" not in fv.backends(), reason="needs Triton")


@triton.jit
def _copy_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    rows = tl.arange(0, 1)
    cols = tl.arange(0, BLOCK)
    mask = (rows[:, None] < 1) & (cols[None, :] < N)
    store(y_ptr, rows, cols, N, tl.load(x_ptr + cols[None, :], mask=mask, other=0.0), mask)


def _values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scale = 10.0 ** torch.randint(-40, 39, (2000,), generator=g).double()
    randoms = (torch.randn(2000, generator=g, dtype=torch.float64) * scale).float()
    one = 1.0
    specials = [0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"),
                one + 2**-8,  # a tie: to 1 (even)
                one + 3 * 2**-8,  # a tie: to 1 + 2**-6 (even)
                one + 2**-8 + 2**-20,  # just above a tie: up
                -(one + 2**-8 + 2**-20),
                3.3895313892515355e38,  # bfloat16's largest finite value
                3.3961e38,  # rounds to inf
                -3.4e38, 1e-40, -1e-39, 9.2e-41, 2**-133]
    return torch.cat([randoms, torch.tensor(specials, dtype=torch.float32)])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_store_rounds_to_nearest_even(device):
    x = _values().to(device)
    y = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _copy_kernel[(1,)](x, y, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(y.isnan(), nan)
    bad = (y.view(torch.int16) != want.view(torch.int16)) & ~nan
    assert not bad.any(), [(x[i].item(), y[i].item(), want[i].item())
                           for i in bad.nonzero().flatten()[:5].tolist()]
    assert torch.equal(y[nan].view(torch.int16) < 0, x[nan].view(torch.int32) < 0)  # sign kept


def test_an_op_stores_as_the_gpu_does():
    """reparameterize with eps given and logvar 0: z = mu + eps, one float32 addition on every
    backend, then one rounding to bfloat16: the Triton result equals the torch backend's bit for
    bit (with truncation about half of them were one ulp off)."""
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(64, 32, generator=g).bfloat16()
    eps = torch.randn(1, 64, 32, generator=g).bfloat16()
    logvar = torch.zeros_like(mu)
    with fv.use_backend("triton"):
        z = fv.reparameterize(mu, logvar, eps=eps[0])
    want = (mu.float() + eps[0].float()).bfloat16()
    assert (z.view(torch.int16) != want.view(torch.int16)).sum() == 0
