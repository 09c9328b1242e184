"""Huge tensors: every kernel indexes with 64-bit offsets.

Two kinds of inputs past 2**31 elements that cost little memory:

* Far offsets: views into a storage of more than 2**31 float16 elements that torch reserves but
  never touches (``torch.empty``: the pages are only mapped when written), whose rows -- or
  columns, transposed -- lie 2**31 elements apart (on a GPU, 4 GiB of its memory). Every op,
  forward and backward, on every backend (the interpreter too: the grids are tiny), against the
  same op on contiguous copies. 32-bit offsets would wrap to another address and read other
  values, or crash.
* Many elements: one element expanded (stride 0) to more than 2**31, reduced to a few sums
  (their gradients would be as large as the inputs: forward only). On the cpu backend here
  (Triton's interpreter would take hours), on GPU for triton and cuda.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import BACKENDS

import fastvae as fv

FAR = 2**31 + 5  # elements between the rows of a far view: past int32
SLOT, SLOTS = 32, 5


@pytest.fixture(scope="module")
def far_storages():
    """device type -> a float16 storage of more than 2**31 elements: on the CPU untouched
    (4 GiB of address space, no memory), on a GPU 4 GiB of its memory."""
    storages = {}

    def get(device: torch.device) -> torch.Tensor:
        if device.type not in storages:
            try:
                storages[device.type] = torch.empty(FAR + SLOT * SLOTS, dtype=torch.float16,
                                                    device=device)
            except (RuntimeError, MemoryError) as e:  # an address-space or memory limit
                pytest.skip(f"cannot reserve 4 GiB on {device}: {e}")
        return storages[device.type]

    yield get
    storages.clear()


class Far:
    """Hands out views of ``storage`` holding given values: (B, N) with rows FAR elements apart
    (``transposed``: (N, 2) with columns FAR apart), each in its own slot of 32 elements."""

    def __init__(self, storage: torch.Tensor):
        self.storage, self.next = storage, 0

    def __call__(self, values: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        rows, cols = values.shape
        assert (cols if transposed else rows) <= 2
        assert (rows if transposed else cols) <= SLOT
        assert self.next + SLOT <= SLOTS * SLOT, "out of slots"
        stride = (1, FAR) if transposed else (FAR, 1)
        view = self.storage.as_strided(values.shape, stride, self.next)
        self.next += SLOT
        view.copy_(values)
        # A leaf of its own: its gradient has the view's shape, not the storage's.
        return view.detach().requires_grad_()


def _check_far(name, fn, far_inputs):
    copies = [t.detach().clone().contiguous().requires_grad_() for t in far_inputs]
    out_far, out = fn(*far_inputs), fn(*copies)
    torch.testing.assert_close(out_far, out, rtol=0, atol=0, msg=f"{name}: values")
    grads_far = torch.autograd.grad(out_far.sum(), far_inputs)
    grads = torch.autograd.grad(out.sum(), copies)
    for a, b in zip(grads_far, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"{name}: gradients")


def test_far_offsets(backend, device, far_storages):
    """Every op reads inputs 2**31 elements apart as it reads contiguous copies, bit for bit."""
    far_storage = far_storages(device)
    g = torch.Generator().manual_seed(0)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(torch.float16).to(device)

    seed = 1234  # the backend fixture has the backend in effect

    def unit(*shape):
        return torch.rand(*shape, generator=g).half().to(device)

    # name -> (op, its inputs from a Far of their own: the views of one case never overlap)
    cases = {
        "bernoulli_nll": (
            lambda logits, x: fv.bernoulli_nll(logits, x, reduction="none"),
            lambda far: [far(r(2, 13, scale=3)), far(unit(2, 13))]),
        "bernoulli_nll_transposed": (
            lambda logits, x: fv.bernoulli_nll(logits, x, reduction="none"),
            lambda far: [far(r(11, 2, scale=3), transposed=True),
                         unit(11, 2).requires_grad_()]),
        "gaussian_kl_prior": (
            lambda m, lv, pm, plv: fv.gaussian_kl(m, lv, pm, plv, reduction="none"),
            lambda far: [far(r(2, 7)), far(r(2, 7, scale=0.5)), far(r(2, 7)),
                         far(r(2, 7, scale=0.5))]),
        "gaussian_kl_free_bits": (
            lambda m, lv: fv.gaussian_kl(m, lv, free_bits=0.2),
            lambda far: [far(r(2, 9)), far(r(2, 9, scale=0.5))]),
        "gaussian_nll": (
            lambda m, x, lv: fv.gaussian_nll(m, x, lv, reduction="none"),
            lambda far: [far(r(2, 5)), far(r(2, 5)), far(r(2, 5, scale=0.5))]),
        "reparameterize_eps": (
            lambda m, lv, e: fv.reparameterize(m, lv, eps=e),
            lambda far: [far(r(2, 6)), far(r(2, 6, scale=0.5)), far(r(2, 6))]),
        "reparameterize_seed": (
            lambda m, lv: fv.reparameterize(m, lv, n_samples=2, seed=seed),
            lambda far: [far(r(2, 6)), far(r(2, 6, scale=0.5))]),
        "sample_and_kl": (
            lambda m, lv: torch.cat([t.flatten().float() for t in
                                     fv.sample_and_kl(m, lv, seed=seed, reduction="none")]),
            lambda far: [far(r(2, 8)), far(r(2, 8, scale=0.5))]),
        "vae_loss": (
            lambda rec, x, m, lv: fv.vae_loss(rec, x, m, lv, reduction="none"),
            lambda far: [far(r(2, 10, scale=2)), far(unit(2, 10)), far(r(2, 3)),
                         far(r(2, 3, scale=0.5))]),
    }
    for name, (fn, make) in cases.items():
        _check_far(name, fn, make(Far(far_storage)))
    # The mixture of logistics (M = 2, C = 3): params (2, 20, 1) of two images whose rows lie
    # FAR apart, and (1, 20, 2) of one image whose two pixels lie FAR apart; x on the grid.
    def dmol(p, x):
        return fv.discretized_mix_logistic_nll(p, x.detach(), n_mixtures=2, reduction="none")

    x = (torch.randint(0, 256, (2, 3), generator=g) / 127.5 - 1).half().to(device)
    far = Far(far_storage)
    _check_far("dmol_batch", lambda p: dmol(p.unsqueeze(-1), x.unsqueeze(-1)),
               [far(r(2, 20, scale=2))])
    _check_far("dmol_pixels", lambda p: dmol(p.unsqueeze(0), x.t().unsqueeze(0)),
               [far(r(20, 2, scale=2), transposed=True)])
    # IWAE: z (K, B, N) with its samples 2**30 + 2 elements apart (the last past 2**31).
    far = Far(far_storage)
    mu, lv = far(r(2, 4)), far(r(2, 4, scale=0.5))
    z = far_storage.as_strided((3, 2, 4), (FAR // 2, 4, 1), far.next)
    z.copy_(r(3, 2, 4))
    z = z.detach().requires_grad_()
    log_px = r(3, 2, scale=5).requires_grad_()
    _check_far("iwae", fv.iwae_log_likelihood, [log_px, z, mu, lv])


# ---------------------------------------------------------------------------------------------
# More than 2**31 elements: stride 0
# ---------------------------------------------------------------------------------------------

LOG2 = math.log(2.0)


def _huge_backends():
    """cpu here; triton and cuda on GPU (marked gpu: skipped without one)."""
    params = [pytest.param(name, marks=pytest.mark.gpu) for name in ("triton", "cuda")]
    skip = pytest.mark.skipif("cpu" not in BACKENDS, reason="the native cpu backend is not built")
    return [pytest.param("cpu", marks=skip), *params]


# Sums of a billion equal float32 terms carry a systematic rounding error of ~1e-5 (lanes of
# ~1000 sequential additions); a 32-bit count would be off by orders of magnitude.
RTOL = 1e-4


def _const(value: float, shape, device) -> torch.Tensor:
    return torch.full((), value, device=device).expand(shape)


@pytest.mark.parametrize("name", _huge_backends())
def test_more_than_2_31_elements(name):
    if name not in BACKENDS:
        pytest.skip(f"the {name} backend is not usable here")
    device = torch.device("cuda" if name != "cpu" else "cpu")
    n = 2**31 + 3
    with fv.use_backend(name):
        # One row of n elements: -log sigmoid(0) = log 2 each.
        zero = _const(0.0, (1, n), device)
        out = fv.bernoulli_nll(zero, zero, reduction="none")
        torch.testing.assert_close(out.double().cpu(), torch.tensor([n * LOG2],
                                                                    dtype=torch.float64),
                                   rtol=RTOL, atol=0)
        # Two rows of n / 2 elements (B * N past 2**31): KL of N(1, 1) is 1/2 each.
        half = (n + 1) // 2
        out = fv.gaussian_kl(_const(1.0, (2, half), device), _const(0.0, (2, half), device),
                             reduction="none")
        torch.testing.assert_close(out.double().cpu(), torch.full((2,), 0.5 * half,
                                                                  dtype=torch.float64),
                                   rtol=RTOL, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_more_than_2_31_rows_gpu(name):
    """Per-feature sums (free bits) over more than 2**31 rows, a Gaussian NLL over more than
    2**31 elements, and IWAE with K * B * N past 2**31."""
    if name not in BACKENDS:
        pytest.skip(f"{name} backend not usable")
    device = torch.device("cuda")
    n = 2**31 + 3
    with fv.use_backend(name):
        kl = fv.gaussian_kl(_const(1.0, (n, 2), device), _const(0.0, (n, 2), device),
                            reduction="mean", free_bits=0.1)
        torch.testing.assert_close(kl.double().cpu(), torch.tensor(1.0, dtype=torch.float64),
                                   rtol=RTOL, atol=0)
        nll = fv.gaussian_nll(_const(0.0, (2, n // 2), device), _const(1.0, (2, n // 2), device),
                              reduction="sum")
        want = 2 * (n // 2) * 0.5 * (1.0 + math.log(2 * math.pi))
        torch.testing.assert_close(nll.double().cpu(), torch.tensor(want, dtype=torch.float64),
                                   rtol=RTOL, atol=0)
        K, B, N = 3, 2, 2**30
        z = _const(0.0, (K, B, N), device)
        ll = fv.iwae_log_likelihood(torch.zeros(K, B, device=device), z,
                                    _const(0.0, (B, N), device), _const(0.0, (B, N), device))
        torch.testing.assert_close(ll.double().cpu(), torch.zeros(B, dtype=torch.float64),
                                   rtol=0, atol=1e-3)
