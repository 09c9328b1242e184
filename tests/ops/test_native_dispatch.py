"""The dispatcher path (libfastvae_torch, fastvae/ops/native_dispatch.py): where the library is
built, eager calls of the native backends run as C++ kernels of torch's dispatcher (no Python
per call, forward or backward), and every result is bitwise that of the Python path. The value
tables (test_ops, test_errors, test_autograd, test_profiler, ...) run through it as they are."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv
from fastvae.ops import custom_ops, native_dispatch

pytestmark = pytest.mark.skipif(native_dispatch.unusable_reason() is not None,
                                reason=f"no libfastvae_torch: {native_dispatch.unusable_reason()}")

SERVED = ("reparameterize", "gaussian_kl", "bernoulli_nll", "gaussian_nll", "sample_and_kl",
          "continuous_bernoulli_nll")


def _leaf(shape, dtype, g, scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype) \
        .requires_grad_()


def _cases(dtype, shape, g):
    """name -> (leaves, a call of the public function returning a tuple of tensors)."""
    mu, lv, lg = _leaf(shape, dtype, g), _leaf(shape, dtype, g, 0.5), _leaf(shape, dtype, g, 2)
    x = torch.rand(*shape, generator=g, dtype=torch.float64).to(dtype)
    pm, plv = _leaf(shape[1:], dtype, g), _leaf(shape[1:], dtype, g, 0.3)  # a per-feature prior
    eps = torch.randn(2, *shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return {
        "bernoulli_nll": ((lg,), lambda: (fv.bernoulli_nll(lg, x),)),
        "bernoulli_nll_none": ((lg,), lambda: (fv.bernoulli_nll(lg, x, reduction="none"),)),
        "continuous_bernoulli_nll": ((lg,), lambda: (
            fv.continuous_bernoulli_nll(lg, x, reduction="sum"),)),
        "gaussian_nll": ((mu,), lambda: (fv.gaussian_nll(mu, x, -0.5),)),
        "gaussian_nll_logvar": ((mu, lv), lambda: (
            fv.gaussian_nll(mu, x, lv, reduction="none"),)),
        "gaussian_kl": ((mu, lv), lambda: (fv.gaussian_kl(mu, lv),)),
        "gaussian_kl_prior": ((mu, lv, pm, plv), lambda: (
            fv.gaussian_kl(mu, lv, pm, plv, reduction="sum"),)),
        "gaussian_kl_per_dim": ((mu, lv), lambda: (fv.gaussian_kl_per_dim(mu, lv),)),
        "sample_and_kl": ((mu, lv), lambda: fv.sample_and_kl(mu, lv, seed=7)),
        "reparameterize": ((mu, lv), lambda: (fv.reparameterize(mu, lv, seed=3, n_samples=2),)),
        "reparameterize_eps": ((mu, lv, eps), lambda: (
            fv.reparameterize(mu, lv, eps=eps, n_samples=2),)),
        "vae_loss": ((lg, mu, lv), lambda: (fv.vae_loss(lg, x, mu, lv, beta=0.5),)),
    }


def _run(leaves, fn):
    for leaf in leaves:
        leaf.grad = None
    outs = fn()
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    torch.autograd.backward(outs, grads)
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves]


def test_the_rows_the_library_serves():
    served = {custom_ops.SPEC[op].name for op in custom_ops.native_overloads()}
    assert served == set(SERVED)
    for op, overload in custom_ops.native_overloads().items():
        assert overload._schema.overload_name == "native"
        ours, python = str(overload._schema), str(op._opoverload._schema)
        assert ours.split("(", 1)[1] == python.split("(", 1)[1]


@pytest.mark.parametrize("name", sorted(_cases(torch.float32, (2, 3), torch.Generator())))
def test_the_native_path_is_taken(name, monkeypatch):
    """No Python op implementation runs, forward or backward: the C++ kernels serve the call."""
    leaves, fn = _cases(torch.float32, (3, 4), torch.Generator().manual_seed(0))[name]

    def refused(*args):
        raise AssertionError("the Python path ran")

    with fv.use_backend("cpu"):
        fn()  # the first call loads the library (and plans the signature)
        monkeypatch.setattr(custom_ops, "_forward", refused)
        monkeypatch.setattr(custom_ops, "_backward", refused)
        _, grads = _run(leaves, fn)
    assert all(g is not None for g in grads)
    names = _graph_names(fn())
    assert any(n.startswith("fastvae::") for n in names), names  # the C++ nodes
    assert not any("Eager" in n for n in names), names  # no Python autograd.Function


def _graph_names(outs) -> set[str]:
    names, todo = set(), [o.grad_fn for o in outs]
    while todo:
        node = todo.pop()
        if node is not None and node.name() not in names:
            names.add(node.name())
            todo.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (1, 1), (4, 1), (2, 300), (0, 3), (3, 0)], ids=str)
def test_bitwise_the_python_path(dtype, shape, monkeypatch):
    """Every served op, every reduction, dtype and shape (empty ones too): outputs and gradients
    bitwise those of the Python path."""
    with fv.use_backend("cpu"):
        for name, (leaves, fn) in _cases(dtype, shape, torch.Generator().manual_seed(0)).items():
            native = _run(leaves, fn)
            with monkeypatch.context() as m:
                m.setattr(custom_ops, "NATIVE", {})
                python = _run(leaves, fn)
            for a, b in zip([*native[0], *native[1]], [*python[0], *python[1]], strict=True):
                assert a.dtype == b.dtype, name
                assert a.shape == b.shape, name
                torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def test_strided_and_broadcast_operands_bitwise(monkeypatch):
    g = torch.Generator().manual_seed(0)
    lg_t = torch.randn(3, 8, generator=g).requires_grad_()  # used transposed: strides (1, 8)
    x = torch.rand(1, 3, generator=g).expand(8, 3)  # stride 0 along the batch
    lv = torch.randn(3, generator=g).requires_grad_()  # a per-feature log-variance

    def fn():
        lg = lg_t.t()
        return (fv.bernoulli_nll(lg, x), fv.gaussian_nll(lg, x, lv),
                fv.gaussian_kl(lg[:, :2], lg[:, 1:]))

    with fv.use_backend("cpu"):
        native = _run([lg_t, lv], fn)
        monkeypatch.setattr(custom_ops, "NATIVE", {})
        python = _run([lg_t, lv], fn)
    for a, b in zip([*native[0], *native[1]], [*python[0], *python[1]], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_native_overloads():
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(3, 4, generator=g).requires_grad_()
    lv = torch.randn(3, 4, generator=g).requires_grad_()
    x = torch.rand(3, 4, generator=g)
    seed = torch.tensor([5])
    ops = torch.ops.fastvae
    for op, args in ((ops.bernoulli_nll.native, (lg, x, 2, "cpu")),
                     (ops.gaussian_nll.native, (lg, x, lv, 0.0, 0, "cpu")),
                     (ops.gaussian_kl.native, (lg, lv, None, None, 1, 1, "cpu")),
                     (ops.sample_and_kl.native, (lg, lv, seed, 1, 2, "cpu")),
                     (ops.reparameterize.native, (lg, lv, None, seed, 2, True, "cpu")),
                     (ops.reparameterize.native, (lg, lv, None, seed, 2, False, "cpu"))):
        torch.library.opcheck(op, args)


def test_second_derivative_refused():
    lg = torch.randn(3, 4).requires_grad_()
    x = torch.rand(3, 4)
    with fv.use_backend("cpu"):
        (grad,) = torch.autograd.grad(fv.bernoulli_nll(lg, x), lg, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.sum().backward()


def test_wrong_backend_for_the_device_refused():
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot serve"):
        torch.ops.fastvae.bernoulli_nll.native(torch.zeros(2, 2), torch.zeros(2, 2), 2, "cuda")


def test_without_the_library_the_python_path_serves(monkeypatch):
    monkeypatch.setenv("FASTVAE_TORCH_LIB", "/nonexistent/libfastvae_torch.so")
    native_dispatch.load.cache_clear()
    try:
        assert "not built" in native_dispatch.unusable_reason()
    finally:
        monkeypatch.delenv("FASTVAE_TORCH_LIB")
        native_dispatch.load.cache_clear()
    assert native_dispatch.unusable_reason() is None
