"""fv.vector_quantize against a float64 dense reference (cdist + argmin, the rotation as an
explicit D x D matrix per row): values, indices, the three losses and the gradients to x and
to the codebook, for the straight-through estimator and the rotation trick."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv


def dense_reference(x, codebook, metric, beta, mode, reduction="mean"):
    """Float64, N x K distances and N x D x D rotations: the oracle, small sizes only."""
    xs = x / x.norm(dim=-1, keepdim=True) if metric == "cosine" else x
    cb = codebook / codebook.norm(dim=-1, keepdim=True) if metric == "cosine" else codebook
    flat = xs.reshape(-1, xs.shape[-1])
    d = 1 - flat @ cb.T if metric == "cosine" else torch.cdist(flat, cb).square()
    idx = d.argmin(dim=1)
    q = cb[idx]
    if mode == "ste":
        out = flat + (q - flat).detach()
    else:
        u = flat / flat.norm(dim=-1, keepdim=True)
        qh = q / q.norm(dim=-1, keepdim=True)
        r = (u + qh) / (u + qh).norm(dim=-1, keepdim=True)
        eye = torch.eye(flat.shape[1], dtype=flat.dtype)
        R = eye - 2 * r[:, :, None] * r[:, None, :] + 2 * qh[:, :, None] * u[:, None, :]
        lam = q.norm(dim=-1) / flat.norm(dim=-1)
        out = ((lam[:, None, None] * R).detach() @ flat[:, :, None])[:, :, 0]
    cl = (flat.detach() - q).square()
    ml = beta * (flat - q.detach()).square()
    if reduction == "mean":
        cl, ml = cl.mean(), ml.mean()
    elif reduction == "sum":
        cl, ml = cl.sum(), ml.sum()
    else:
        cl, ml = cl.sum(-1).view(x.shape[:-1]), ml.sum(-1).view(x.shape[:-1])
    return out.view(x.shape), idx.view(x.shape[:-1]), cl + ml, ml, cl


def _inputs(shape, K, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    cb = torch.randn(K, shape[-1], generator=g, dtype=torch.float64)
    return x.to(dtype), cb.to(dtype)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("mode", ["ste", "rotation"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients_match_dense_float64(metric, mode, dtype, reduction):
    x, cb = _inputs((3, 5, 6), 11, dtype)
    x.requires_grad_()
    cb.requires_grad_()
    out = fv.vector_quantize(x, cb, metric=metric, beta=0.3, straight_through=mode,
                             reduction=reduction)
    x64 = x.detach().double().requires_grad_()
    cb64 = cb.detach().double().requires_grad_()
    ref = dense_reference(x64, cb64, metric, 0.3, mode, reduction)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    assert out.indices.dtype == torch.int64
    assert out.indices.shape == (3, 5)
    assert torch.equal(out.indices, ref[1])
    assert out.quantized.dtype == dtype
    torch.testing.assert_close(out.quantized.double(), ref[0].detach(), **tol)
    for a, b in zip(out[2:], ref[2:], strict=False):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b.detach(), **tol)
    # one backward through everything, with an arbitrary upstream gradient on quantized
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.randn(out.loss.shape, generator=torch.Generator().manual_seed(2),
                    dtype=torch.float64)
    ((out.quantized.double() * g).sum() + (out.loss.double() * w).sum()
     + 0.7 * (out.commitment_loss.double() * w).sum()).backward()
    ((ref[0] * g).sum() + (ref[2] * w).sum() + 0.7 * (ref[3] * w).sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, **tol)
    torch.testing.assert_close(cb.grad.double(), cb64.grad, **tol)


def test_quantized_is_the_code_exactly_and_gradient_of_ste_is_identity():
    x, cb = _inputs((7, 4), 5, torch.float32)
    x.requires_grad_()
    for mode in ("ste", "rotation"):
        out = fv.vector_quantize(x, cb, straight_through=mode)
        assert torch.equal(out.quantized, cb[out.indices])
    out = fv.vector_quantize(x, cb)
    (g,) = torch.autograd.grad(out.quantized, x, torch.full_like(x, 3.0))
    assert torch.equal(g, torch.full_like(x, 3.0))


def test_rotation_gradient_is_a_scaled_rotation():
    # lambda R^T is a scaled orthogonal map: |grad| = lambda |g|, and it takes q_hat to u
    x, cb = _inputs((9, 8), 4, torch.float64, seed=3)
    x.requires_grad_()
    out = fv.vector_quantize(x, cb, straight_through="rotation")
    q = cb[out.indices]
    u = x.detach() / x.detach().norm(dim=-1, keepdim=True)
    qh = q / q.norm(dim=-1, keepdim=True)
    (g,) = torch.autograd.grad(out.quantized, x, qh)
    lam = q.norm(dim=-1, keepdim=True) / x.detach().norm(dim=-1, keepdim=True)
    torch.testing.assert_close(g, lam * u)


def test_degenerate_rows_fall_back_to_identity():
    cb = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # row 0 is zero; row 1 (-1, 0) is nearest to code 0 (distance 4 against 5), antiparallel
    x = torch.tensor([[0.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    out = fv.vector_quantize(x, cb, straight_through="rotation")
    assert out.indices.tolist() == [0, 0]
    (g,) = torch.autograd.grad(out.quantized, x, torch.ones_like(x))
    assert torch.equal(g, torch.ones_like(x))


def test_half_inputs_compute_in_float32_and_mixed_dtypes():
    x, cb = _inputs((6, 4), 5, torch.float32)
    out16 = fv.vector_quantize(x.bfloat16(), cb)
    assert out16.quantized.dtype == torch.bfloat16
    assert out16.loss.dtype == torch.float32
    ref = fv.vector_quantize(x.bfloat16().float(), cb)
    assert torch.equal(out16.indices, ref.indices)
    assert torch.equal(out16.loss, ref.loss)


def test_empty_and_beta_zero():
    x = torch.zeros(0, 3)
    cb = torch.randn(4, 3)
    out = fv.vector_quantize(x, cb)
    assert out.quantized.shape == (0, 3)
    assert out.indices.shape == (0,)
    assert out.loss.isnan()
    assert fv.vector_quantize(x, cb, reduction="sum").loss == 0
    x, cb = _inputs((6, 4), 5, torch.float32)
    out = fv.vector_quantize(x, cb, beta=0.0)
    assert out.commitment_loss == 0
    assert out.loss == out.codebook_loss


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    (dict(metric="l1"), ValueError, "metric"),
    (dict(straight_through="gumbel"), ValueError, "straight_through"),
    (dict(beta=-1.0), ValueError, "beta"),
    (dict(beta="a"), TypeError, "beta"),
    (dict(reduction="batchmean"), ValueError, "reduction"),
])
def test_argument_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        fv.vector_quantize(torch.randn(3, 2), torch.randn(4, 2), **kwargs)


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match="codebook"):
        fv.vector_quantize(torch.randn(3, 2), torch.randn(4, 3))
    with pytest.raises(TypeError, match="x"):
        fv.vector_quantize(torch.ones(3, 2, dtype=torch.int64), torch.randn(4, 2))


def test_backward_saves_nothing_n_by_k():
    # every tensor autograd keeps is at most N x D (plus the K x D codebook itself)
    N, K, D = 64, 512, 4
    x, cb = _inputs((N, D), K, torch.float32)
    x.requires_grad_()
    cb.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for mode in ("ste", "rotation"):
            fv.vector_quantize(x, cb, straight_through=mode)
    assert sizes
    assert max(sizes) <= max(N * D, K * D)
    assert max(sizes) < N * K
