"""Autograd and compiler integration (docs/conventions.md): gradcheck in float64,
torch.library.opcheck on the fastvae::* custom ops, torch.compile(fullgraph=True) forward and
backward, and re-tracing when the backend changes."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, SEED, make_inputs
from helpers import BACKENDS, device_for
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import fastvae as fv
from fastvae.ops import custom_ops as _ops

# torch.compile and opcheck go through torch.jit internals that warn about their own deprecation.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

# ---------------------------------------------------------------------------------------------
# gradcheck
# ---------------------------------------------------------------------------------------------

GRADCHECK_GEOMETRIES = {"small": ((2, 3), "contiguous"), "expanded_3d": ((2, 2, 2), "expanded")}


@pytest.mark.parametrize("geometry", GRADCHECK_GEOMETRIES)
@pytest.mark.parametrize("case", CASES)
def test_gradcheck(case, geometry, backend, device):
    """Analytic gradients equal finite differences in float64, for every op variant (the seeded
    ones regenerate the same noise at every evaluation)."""
    spec = CASES[case]
    shape, layout = GRADCHECK_GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(7)
    leaves, views, _ = make_inputs(spec, shape, layout, torch.float64, device, g)
    names = list(leaves)
    reduction = spec.reductions[0]

    def fn(*tensors):
        x = {n: views[n](t) for n, t in zip(names, tensors, strict=True)}
        return spec.call(fv, x, reduction, torch.float64)

    # The full Jacobian on the small shape; a random projection of it (fast mode) on the other,
    # and for inputs of more than 48 elements (the mixture of logistics' parameters: its full
    # gradient is compared with the float64 oracle's in test_ops).
    numel = sum(t.numel() for t in leaves.values() if t.requires_grad)
    assert torch.autograd.gradcheck(fn, tuple(leaves.values()), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=geometry != "small" or numel > 48)


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------


def _opcheck_samples(backend: str, device: torch.device):
    """(name, op, args) for every fastvae custom op of the foundation, forward and backward."""
    g = torch.Generator().manual_seed(3)

    def t(*shape, grad=True, scale=1.0):
        x = (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device)
        return x.requires_grad_(grad)

    B, N, K = 3, 5, 2
    seed = torch.tensor([SEED], device=device)
    mu, lv, pm, plv = t(B, N), t(B, N, scale=0.5), t(B, N), t(B, N, scale=0.5)
    eps, eps_k = t(1, B, N), t(K, B, N)
    logits, target = t(B, N, scale=3.0), torch.rand(B, N, generator=g, dtype=torch.float64)
    target = target.to(device).requires_grad_()
    d = {k: v.detach() for k, v in dict(mu=mu, lv=lv, pm=pm, plv=plv, eps=eps, eps_k=eps_k,
                                          logits=logits, target=target).items()}
    # An expanded (stride-0) prior, as gaussian_kl passes a per-feature one.
    pm_row = t(1, N).expand(B, N)
    pixels = (torch.randint(0, 256, (B, 3, N), generator=g) / 127.5 - 1).double().to(device)
    return [
        ("reparameterize_eps", _ops.reparameterize, (mu, lv, eps, None, 1, False, backend)),
        ("reparameterize_seed", _ops.reparameterize, (mu, lv, None, seed, 1, False, backend)),
        ("reparameterize_seed_kept", _ops.reparameterize, (mu, lv, None, seed, 1, True, backend)),
        ("reparameterize_samples", _ops.reparameterize, (mu, lv, None, seed, K, False, backend)),
        ("reparameterize_samples_kept", _ops.reparameterize,
         (mu, lv, None, seed, K, True, backend)),
        ("reparameterize_samples_eps", _ops.reparameterize,
         (mu, lv, eps_k, None, K, True, backend)),
        ("reparameterize_backward", _ops.reparameterize_backward,
         (t(K, B, N, grad=False), d["mu"].new_empty((0,)), d["mu"], d["lv"], None, seed, backend,
          [True, True, False])),
        ("reparameterize_backward_kept", _ops.reparameterize_backward,
         (t(K, B, N, grad=False), d["eps_k"], d["mu"], d["lv"], None, seed, backend,
          [True, True, False])),
        ("reparameterize_backward_eps", _ops.reparameterize_backward,
         (t(K, B, N, grad=False), d["mu"].new_empty((0,)), d["mu"], d["lv"], d["eps_k"], None,
          backend, [False, True, True])),
        ("gaussian_kl", _ops.gaussian_kl, (mu, lv, None, None, 1, 0, backend)),
        ("gaussian_kl_mean", _ops.gaussian_kl, (mu, lv, None, None, 1, 2, backend)),
        ("gaussian_kl_prior", _ops.gaussian_kl, (mu, lv, pm_row, plv, 1, 1, backend)),
        ("gaussian_kl_per_feature", _ops.gaussian_kl, (mu, lv, None, None, 0, 0, backend)),
        ("gaussian_kl_backward", _ops.gaussian_kl_backward,
         (t(B, grad=False), d["mu"], d["lv"], d["pm"], d["plv"], 1, 0, backend,
          [True, True, True, True])),
        ("gaussian_kl_backward_per_feature", _ops.gaussian_kl_backward,
         (t(N, grad=False), d["mu"], d["lv"], None, None, 0, 0, backend,
          [False, True, False, False])),
        ("bernoulli_nll", _ops.bernoulli_nll, (logits, target, 0, backend)),
        ("bernoulli_nll_mean", _ops.bernoulli_nll, (logits, target, 2, backend)),
        ("bernoulli_nll_backward", _ops.bernoulli_nll_backward,
         (t(B, grad=False), d["logits"], d["target"], 0, backend, [True, True])),
        ("bernoulli_nll_backward_mean", _ops.bernoulli_nll_backward,
         (t(grad=False), d["logits"], d["target"], 2, backend, [True, False])),
        ("gaussian_nll_float", _ops.gaussian_nll, (mu, target, None, 0.25, 1, backend)),
        ("gaussian_nll_tensor", _ops.gaussian_nll, (mu, target, plv, 0.0, 0, backend)),
        ("gaussian_nll_backward", _ops.gaussian_nll_backward,
         (t(B, grad=False), d["mu"], d["target"], d["plv"], 0.0, 0, backend, [True, True, True])),
        ("sample_and_kl", _ops.sample_and_kl, (mu, lv, seed, 1, 0, backend)),
        ("sample_and_kl_mean", _ops.sample_and_kl, (mu, lv, seed, 1, 2, backend)),
        ("sample_and_kl_per_feature", _ops.sample_and_kl, (mu, lv, seed, 0, 0, backend)),
        ("sample_and_kl_backward", _ops.sample_and_kl_backward,
         (t(B, N, grad=False), t(B, grad=False), d["mu"], d["lv"], seed, 1, 0, backend,
          [True, True])),
        ("continuous_bernoulli_nll", _ops.continuous_bernoulli_nll, (logits, target, 0, backend)),
        ("continuous_bernoulli_nll_backward", _ops.continuous_bernoulli_nll_backward,
         (t(B, grad=False), d["logits"], d["target"], 0, backend, [True, True])),
        # (B, M (1 + 3 C), S) parameters of M = 2 components, x (B, C = 3, S) on the grid
        ("discretized_mix_logistic_nll", _ops.discretized_mix_logistic_nll,
         (t(B, 20, N), pixels, 2, 256, 2, backend)),
        ("discretized_mix_logistic_nll_backward", _ops.discretized_mix_logistic_nll_backward,
         (t(B, grad=False), t(B, 20, N, grad=False), pixels, 2, 256, 0, backend, [True])),
    ]


OPCHECK_NAMES = [name for name, _, _ in _opcheck_samples("torch", torch.device("cpu"))]


@pytest.mark.parametrize("sample", OPCHECK_NAMES)
def test_opcheck(sample, backend, device):
    """Schema, fake (meta) kernel, autograd registration and AOT dispatch of each custom op."""
    _, op, args = next(s for s in _opcheck_samples(backend, device) if s[0] == sample)
    torch.library.opcheck(op, args)


def test_every_foundation_op_is_opchecked():
    ops = {op._qualname for _, op, _ in _opcheck_samples("torch", torch.device("cpu"))}
    foundation = {"reparameterize", "gaussian_kl", "bernoulli_nll", "gaussian_nll",
                  "sample_and_kl", "continuous_bernoulli_nll", "discretized_mix_logistic_nll"}
    assert ops == {f"fastvae::{n}{s}" for n in foundation for s in ("", "_backward")}


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------


def _loss_head(recon, x, mu, logvar, prior_mu, obs_logvar, eps):
    """Every op of the foundation in one function."""
    z, kl = fv.sample_and_kl(mu, logvar, seed=SEED)
    zs = fv.reparameterize(mu, logvar, n_samples=2, seed=SEED + 1)
    z_eps = fv.reparameterize(mu, logvar, eps=eps)
    loss = fv.bernoulli_nll(recon, x) + kl + fv.gaussian_kl(mu, logvar, prior_mu, 0.5,
                                                             free_bits=0.1)
    loss = loss + fv.gaussian_nll(recon, x, obs_logvar, reduction="sum")
    loss = loss + fv.vae_loss(recon, x, mu, logvar, likelihood="gaussian", beta=0.5)
    loss = loss + fv.continuous_bernoulli_nll(recon, x)
    # recon as the (B, 3 M, S) parameters of a grey mixture of logistics (M = 2, S = 1), x as
    # its pixels on the grid of 17 levels
    pixels = ((x[:, :1] * 16).round() / 8 - 1).detach().unsqueeze(-1)
    loss = loss + fv.discretized_mix_logistic_nll(recon.unsqueeze(-1), pixels, n_mixtures=2,
                                                  n_bins=17)
    return loss + (z * z).mean() + zs.square().sum() * 0.01 + z_eps.sum() * 0.1


def _head_inputs(device, batch=4, features=6, latent=3):
    g = torch.Generator().manual_seed(5)

    def t(*shape, scale=1.0, unit=False):
        x = torch.rand(shape, generator=g) if unit else scale * torch.randn(shape, generator=g)
        return x.to(device).requires_grad_()

    return (t(batch, features, scale=2.0), t(batch, features, unit=True), t(batch, latent),
            t(batch, latent, scale=0.5), t(latent), t(features, scale=0.3), t(batch, latent))


def _run(fn, inputs):
    loss = fn(*inputs)
    return loss, torch.autograd.grad(loss, inputs)


def test_compile_fullgraph(backend, device):
    """Every op inside one torch.compile(fullgraph=True) function: forward and backward equal
    eager's."""
    torch._dynamo.reset()
    inputs = _head_inputs(device)
    eager_loss, eager_grads = _run(_loss_head, inputs)
    compiled_loss, compiled_grads = _run(torch.compile(_loss_head, fullgraph=True), inputs)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-5)
    for c, e in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def _small_head(recon, x, mu, logvar, prior_mu, obs_logvar, eps):
    z, kl = fv.sample_and_kl(mu, logvar, seed=SEED)
    return (fv.bernoulli_nll(recon, x) + kl + fv.gaussian_nll(recon, x, obs_logvar)
            + fv.gaussian_kl(mu, logvar, prior_mu) + fv.reparameterize(z, logvar, eps=eps).sum())


def test_compile_dynamic_batch():
    """The fake kernels work with symbolic shapes: one dynamic graph serves two batch sizes."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(_small_head, fullgraph=True, dynamic=True)
    for batch in (5, 7):  # sizes unlike the others (3, 6), lest duck sizing tie them
        inputs = _head_inputs(torch.device("cpu"), batch=batch)
        eager_loss, eager_grads = _run(_small_head, inputs)
        loss, grads = _run(compiled, inputs)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
        for c, e in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_compile_drawn_seed_backward_uses_forward_noise():
    """Inside a compiled graph the seed comes from torch's generator; the backward still
    regenerates the forward's noise, and torch.manual_seed still governs it."""
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def sample(mu, logvar):
        return fv.sample_and_kl(mu, logvar)[0]

    mu, logvar = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    torch.manual_seed(11)
    z = sample(mu, logvar)
    torch.manual_seed(11)
    assert torch.equal(sample(mu, logvar), z)
    assert not torch.equal(sample(mu, logvar), z)
    upstream = torch.randn(4, 6)
    (d_lv,) = torch.autograd.grad(z, logvar, upstream)
    torch.testing.assert_close(d_lv, 0.5 * upstream * (z - mu).detach(), rtol=1e-5, atol=1e-6)


def test_compile_retraces_on_backend_change(monkeypatch):
    """The backend is part of the traced graph: changing it with use_backend / set_backend makes
    the compiled function re-trace and run on the new backend, forward and backward."""
    used = []
    implementation = _ops.implementation
    monkeypatch.setattr(_ops, "implementation", lambda name: used.append(name) or
                        implementation(name))
    torch._dynamo.reset()

    @torch.compile(fullgraph=True)
    def f(mu, logvar, logits, target):
        return fv.gaussian_kl(mu, logvar) + fv.bernoulli_nll(logits, target)

    mu, logvar, logits = (torch.randn(3, 4, requires_grad=True) for _ in range(3))
    target = torch.rand(3, 4, requires_grad=True)
    results = {}
    for name in [*BACKENDS, *reversed(BACKENDS)]:
        if device_for(name).type != "cpu":
            continue
        with fv.use_backend(name):
            used.clear()
            results[name] = _run(f, (mu, logvar, logits, target))
            assert used == [name] * 4, f"under use_backend({name!r}) ran on {used}"
    for name in BACKENDS:
        if device_for(name).type != "cpu":
            continue
        fv.set_backend(name)
        used.clear()
        _run(f, (mu, logvar, logits, target))
        assert used == [name] * 4, f"after set_backend({name!r}) ran on {used}"
    reference = results["torch"]
    for loss, grads in results.values():
        torch.testing.assert_close(loss, reference[0])
        for a, b in zip(grads, reference[1], strict=True):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# GPU: CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("name", [b for b in BACKENDS if device_for(b).type == "cuda"] or
                         ["triton"])
def test_cuda_graph_training_step(name):
    """A training step with the ops is captured in a CUDA graph and replayed; each replay draws
    fresh noise (graph-safe RNG) and matches an eager step with the same noise."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    mu = torch.randn(64, 16, device=device, requires_grad=True)
    logvar = torch.randn(64, 16, device=device, requires_grad=True)
    logits = torch.randn(64, 32, device=device, requires_grad=True)
    x = torch.rand(64, 32, device=device)

    def step():
        z, kl = fv.sample_and_kl(mu, logvar)
        loss = fv.bernoulli_nll(logits, x) + kl + z.square().mean()
        loss.backward()
        return z, loss

    with fv.use_backend(name):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up outside the graph
                step()
        torch.cuda.current_stream().wait_stream(stream)
        for t in (mu, logvar, logits):
            t.grad = None  # the captured backward allocates them from the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            z, _ = step()
        samples = []
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            samples.append(z.clone())
            # The replayed gradient of logvar equals the eager formula on the replay's noise.
            eps = (z - mu.detach()) / torch.exp(0.5 * logvar.detach())
            expected = (0.5 * torch.exp(0.5 * logvar.detach()) * eps * 2 * z / z.numel()
                        + 0.5 * torch.expm1(logvar.detach()) / mu.shape[0])
            torch.testing.assert_close(logvar.grad, expected, rtol=1e-4, atol=1e-5)
        assert not torch.equal(samples[0], samples[1])


# ---------------------------------------------------------------------------------------------
# Broadcast parameters: their gradients are summed once, never scattered into B x N zeros
# ---------------------------------------------------------------------------------------------


class _LargeAllocations(TorchDispatchMode):
    """Records the aten ops that produce a tensor of at least ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.ops.append(func.__name__)
        return out


@pytest.mark.parametrize("param_shape", [(), (1, 1, 1), (1, 6, 7), (6, 1)])
def test_broadcast_parameter_gradients_are_not_scattered(param_shape):
    """A scalar, per-channel or per-pixel log-variance (and a per-feature prior) reaches the op
    as an expanded row: backward runs the op's gradient and one sum over the batch, with no
    select/slice backward filling a B x N tensor of zeros first (the earlier row view did)."""
    B = 64
    mean = torch.randn(B, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(B, 3, 6, 7, dtype=torch.float64)
    logvar = torch.zeros(param_shape, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(B, 8, dtype=torch.float64, requires_grad=True)
    lv = torch.randn(B, 8, dtype=torch.float64, requires_grad=True)
    prior_logvar = torch.zeros(8, dtype=torch.float64, requires_grad=True)
    for loss_fn, params, numel in [
            (lambda: fv.gaussian_nll(mean, target, logvar), (mean, logvar), mean.numel()),
            (lambda: fv.gaussian_kl(mu, lv, 0.5, prior_logvar), (mu, lv, prior_logvar),
             mu.numel())]:
        loss = loss_fn()
        with _LargeAllocations(numel) as mode:
            grads = torch.autograd.grad(loss, params)
        assert not [op for op in mode.ops if "backward" in op or "zeros" in op or "fill" in op]
        with fv.use_backend("torch"):
            want = torch.autograd.grad(loss_fn(), params)
        for got, ref in zip(grads, want, strict=True):
            torch.testing.assert_close(got, ref)
