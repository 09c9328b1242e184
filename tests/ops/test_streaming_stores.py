"""Large elementwise calls of the ``cpu`` backend write their outputs with non-temporal stores
(``kStreamMinElems`` = 2**21 elements, csrc/cpu_kernels.inc): the values must be those of the
plain stores that smaller calls use, bit for bit, whatever the alignment of each chunk (an odd
row length puts most chunks off a vector boundary) and the dtype."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv

STREAM_MIN = 1 << 21
ROWS, COLS = 2048, 1031  # 2.1M elements; an odd row length: chunks start anywhere

OPS = {
    "gaussian_kl": lambda a, b, eps: fv.gaussian_kl(a, b, reduction="none"),
    "bernoulli_nll": lambda a, b, eps: fv.bernoulli_nll(a, (b.detach() > 0).to(a.dtype),
                                                        reduction="none"),
    "gaussian_nll": lambda a, b, eps: fv.gaussian_nll(a, b.detach(), reduction="none"),
    "reparameterize": lambda a, b, eps: fv.reparameterize(a, b, eps=eps),
}


def _forward_backward(op, a, b, eps, up):
    """The op's output and its gradients in both inputs, for the upstream gradient ``up`` (its
    first column for the losses, whose output is one value a sample)."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    out = op(a, b, eps)
    grads = torch.autograd.grad(out, (a, b), up if out.dim() == 2 else up[:, 0],
                                allow_unused=True)
    return [out.detach()] + [g for g in grads if g is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", OPS)
def test_streamed_outputs_equal_plain_stores(name, dtype):
    """A call over ROWS x COLS (streamed) against the same rows in two calls of half the size
    (plain stores), with the same inputs and upstream gradient."""
    assert ROWS * COLS >= STREAM_MIN > ROWS * COLS // 2
    g = torch.Generator().manual_seed(0)
    a, b, eps, up = (torch.randn(ROWS, COLS, generator=g, dtype=dtype) for _ in range(4))
    half = ROWS // 2
    with fv.use_backend("cpu"):
        whole = _forward_backward(OPS[name], a, b, eps, up)
        top = _forward_backward(OPS[name], a[:half], b[:half], eps[:half], up[:half])
        bottom = _forward_backward(OPS[name], a[half:], b[half:], eps[half:], up[half:])
    assert len(whole) == (2 if name in ("bernoulli_nll", "gaussian_nll") else 3)
    for w, t, u in zip(whole, top, bottom, strict=True):
        assert torch.equal(w, torch.cat([t, u]))
