"""The host path's structure: a public function's argument checks run once per call signature
(its plan), and nothing the planned path skips changes a result or lets a bad call through.
The value tables (test_ops, test_errors, test_validation, ...) run through the same path."""

from __future__ import annotations

import ctypes

import pytest
import torch
from helpers import device_for

import fastvae as fv
from fastvae.ops import custom_ops, functional, native, validation


@pytest.fixture
def checks(monkeypatch):
    """Counts the argument checks (``validation.tensor``, the first of every public function)."""
    calls = []
    tensor = validation.tensor
    monkeypatch.setattr(validation, "tensor", lambda name, t: calls.append(name) or tensor(name, t))
    functional._PLANS.clear()
    return calls


def _inputs(B=3, N=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(B, N, generator=g, dtype=dtype).requires_grad_()
    logvar = (0.5 * torch.randn(B, N, generator=g, dtype=dtype)).requires_grad_()
    logits = (2 * torch.randn(B, N, generator=g, dtype=dtype)).requires_grad_()
    target = torch.rand(B, N, generator=g, dtype=dtype)
    return mu, logvar, logits, target


CALLS = {
    "bernoulli_nll": lambda mu, lv, lg, x: fv.bernoulli_nll(lg, x),
    "continuous_bernoulli_nll": lambda mu, lv, lg, x: fv.continuous_bernoulli_nll(
        lg, x, reduction="sum"),
    "gaussian_nll": lambda mu, lv, lg, x: fv.gaussian_nll(lg, x, -1.0, reduction="none"),
    "gaussian_kl": lambda mu, lv, lg, x: fv.gaussian_kl(mu, lv),
    "sample_and_kl": lambda mu, lv, lg, x: fv.sample_and_kl(mu, lv, seed=5)[1],
    "sample_and_kl_free_bits": lambda mu, lv, lg, x: fv.sample_and_kl(mu, lv, seed=5,
                                                                      free_bits=0.1)[1],
    "vae_loss": lambda mu, lv, lg, x: fv.vae_loss(lg, x, mu, lv, beta=0.5),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_repeated_signature_skips_the_checks(name, checks):
    args = _inputs()
    CALLS[name](*args)
    first = len(checks)
    assert first > 0
    CALLS[name](*args)
    CALLS[name](*_inputs())  # other tensors, same shapes, strides, dtypes, device
    assert len(checks) == first, "a repeated signature ran the checks again"
    mu, lv, lg, x = _inputs(B=4)  # another shape: a new plan
    CALLS[name](mu, lv, lg, x)
    assert len(checks) > first


@pytest.mark.parametrize("name", sorted(CALLS))
def test_planned_results_equal_the_unplanned(name):
    """Values and gradients bit for bit with the plans cleared before each call and warm."""
    results = []
    for clear in (True, False, False):
        if clear:
            functional._PLANS.clear()
        mu, lv, lg, x = _inputs()
        out = CALLS[name](mu, lv, lg, x)
        out.sum().backward()
        results.append((out.detach(), *(t.grad for t in (mu, lv, lg))))
    for warm in results[1:]:
        for a, b in zip(results[0], warm, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_a_cached_signature_still_refuses_bad_calls():
    mu, lv, lg, x = _inputs()
    fv.bernoulli_nll(lg, x)
    with pytest.raises(ValueError, match="target has shape"):
        fv.bernoulli_nll(lg, x[:, :4])  # another shape: its own (failing) checks
    with pytest.raises(ValueError, match="reduction must be one of"):
        fv.bernoulli_nll(lg, x, reduction="avg")
    with pytest.raises(ValueError, match="reduction must be one of"):
        fv.bernoulli_nll(lg, x, reduction=["mean"])  # unhashable: checked, not cached
    with pytest.raises(TypeError, match=r"target must be a torch\.Tensor"):
        fv.bernoulli_nll(lg, x.tolist())
    fv.gaussian_kl(mu, lv)
    with pytest.raises(ValueError, match="free_bits must be >= 0"):
        fv.gaussian_kl(mu, lv, free_bits=-1.0)
    with pytest.raises(TypeError, match="logvar has dtype"):
        fv.gaussian_kl(mu, lv.double())


def test_data_checks_run_on_every_call():
    """Validation reads the data: a planned signature does not skip it."""
    mu, lv, lg, x = _inputs()
    fv.set_validation(True)
    try:
        fv.bernoulli_nll(lg, x)
        fv.gaussian_kl(mu, lv)
        with pytest.raises(ValueError, match="target must lie in"):
            fv.bernoulli_nll(lg, x + 2)
        with pytest.raises(ValueError, match="non-finite"):
            fv.gaussian_kl(mu, lv.detach() * float("nan"))
    finally:
        fv.set_validation(False)


def test_the_backend_choice_is_part_of_the_signature(spy):
    _, _, lg, x = _inputs()
    names = [n for n in fv.backends() if device_for(n).type == "cpu"]
    for name in [*names, *reversed(names)]:
        with fv.use_backend(name):
            spy.clear()
            fv.bernoulli_nll(lg, x)
            assert spy == [name]


def test_plans_are_bounded():
    functional._PLANS.clear()
    for n in range(1, functional.MAX_PLANS + 10):
        fv.bernoulli_nll(torch.zeros(1, n), torch.zeros(1, n))
    assert len(functional._PLANS) <= functional.MAX_PLANS


def test_loss_ops_reduce_inside_one_autograd_node():
    """A reduced loss is the op's own output: one node, no mean/sum node after it."""
    mu, lv, lg, x = _inputs()
    for out in (fv.bernoulli_nll(lg, x), fv.gaussian_kl(mu, lv, reduction="sum"),
                fv.sample_and_kl(mu, lv)[1], fv.gaussian_nll(lg, x)):
        assert out.shape == ()
        assert "Mean" not in type(out.grad_fn).__name__
        assert "Sum" not in type(out.grad_fn).__name__


def test_every_op_comes_from_the_table():
    """Every registered op, forward and backward, is a row of custom_ops.OPS."""
    rows = {spec.name for spec in custom_ops.OPS}
    names = {name.removeprefix("fastvae::").removesuffix("_backward")
             for name in custom_ops._NAME.values()}
    assert names == rows
    with_gradients = [spec for spec in custom_ops.OPS if spec.grads]
    assert len(custom_ops._NAME) == len(rows) + len(with_gradients)


def test_packed_call_matches_the_ctypes_layout():
    """The backend packs fv_call with ``struct``: read back through the ctypes layout that the
    loader checks against the library, every field lands where it belongs."""
    n = len(native._PACKED.unpack(bytes(native._PACKED.size)))
    fields = [i + 1 for i in range(n)]
    codes = native._PACKED.format.lstrip("<")
    fields = [float(v) if code == "d" else v for v, code in zip(fields, codes, strict=True)]
    call = native._Call.from_buffer_copy(native._PACKED.pack(*fields))
    assert (call.B, call.N, call.K) == (1, 2, 3)
    first_in = call.inputs[0]
    assert (first_in.data, tuple(first_in.stride), first_in.dtype) == (4, (5, 6, 7), 8)
    tail = fields[-9:]
    assert call.seed == tail[0]
    assert call.scalar == tail[1]
    assert (call.reduce_dim, call.compute, call.n_threads, call.device) == tuple(tail[2:6])
    assert (call.stream, call.workspace, call.workspace_bytes) == tuple(tail[6:])
    assert ctypes.sizeof(native._Call) == native._PACKED.size


def test_equal_values_of_other_types_are_other_signatures():
    """2, 2.0 and True are equal dictionary keys: a cached ``n_samples=2`` (or ``free_bits=0``)
    must not let ``n_samples=2.0`` (or ``free_bits=False``) skip the checks that refuse it."""
    mu, lv, lg, x = _inputs()
    fv.reparameterize(mu, lv, n_samples=2, seed=0)
    with pytest.raises(TypeError, match="n_samples"):
        fv.reparameterize(mu, lv, n_samples=2.0, seed=0)
    with pytest.raises(TypeError, match="n_samples"):
        fv.reparameterize(mu, lv, n_samples=True, seed=0)
    fv.gaussian_kl(mu, lv, free_bits=0)
    with pytest.raises(TypeError, match="free_bits"):
        fv.gaussian_kl(mu, lv, free_bits=False)
    fv.vae_loss(lg, x, mu, lv, beta=1)
    with pytest.raises(TypeError, match="beta"):
        fv.vae_loss(lg, x, mu, lv, beta=True)
