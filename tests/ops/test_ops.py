"""Values and gradients of every op, on every backend, against the float64 oracle.

The matrix: op variant x geometry (shape and memory layout) x reduction x dtype x backend.
Inputs are drawn in float64, rounded to the test dtype, and the oracle (``helpers.Oracle``)
runs in float64 on those same rounded values, so the only differences left are the op's own
float32 (float64) arithmetic and the final rounding of samples and gradients to the input dtype.

Gradients are compared with a bound that follows from how they are computed: the op writes one
gradient term ``t_i`` per element it reads, rounded to the input's dtype, and autograd sums the
terms of broadcast (expanded, per-feature, scalar) inputs; hence
``|actual - expected| <= rtol * sum_i |t_i| + atol``, with ``sum_i |t_i|`` from the oracle.
"""

from __future__ import annotations

import zlib

import pytest
import torch
from cases import (
    ALL_REDUCTIONS_ON,
    CASES,
    GEOMETRIES,
    SEED,
    as_tuple,
    differentiable,
    make_inputs,
)
from helpers import (
    Oracle,
    assert_close,
    loss_dtype,
    to_oracle,
    tolerance,
)

import fastvae as fv


def _params():
    params = []
    for name, case in CASES.items():
        for geometry in GEOMETRIES:
            reductions = case.reductions if geometry in ALL_REDUCTIONS_ON else case.reductions[:1]
            params += [pytest.param(name, geometry, r, id=f"{name}-{geometry}-{r}")
                       for r in reductions]
    return params


# ---------------------------------------------------------------------------------------------
# The matrix
# ---------------------------------------------------------------------------------------------


def _check_grad(actual, expected, abs_terms, dtype, noisy, msg, floor=None):
    tol = tolerance(dtype, noisy, floor)
    assert actual.dtype == dtype, f"{msg}: gradient dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == expected.shape, f"{msg}: {actual.shape} != {expected.shape}"
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    bound = tol["rtol"] * abs_terms + tol["atol"] * scale
    err = (actual.detach().cpu().double() - expected).abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{msg}: {int(bad.sum())} of {bad.numel()} gradient elements off; worst error "
        f"{err[bad].max().item():.3g} vs bound {bound[bad][err[bad].argmax()].item():.3g}\n"
        f"actual {actual.flatten()[:8]}\nexpected {expected.flatten()[:8]}")


@pytest.mark.parametrize(("case", "geometry", "reduction"), _params())
def test_values_and_grads(case, geometry, reduction, dtype, backend, device):
    spec = CASES[case]
    shape, layout = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(zlib.crc32(f"{case}-{geometry}".encode()))
    leaves, views, bshapes = make_inputs(spec, shape, layout, dtype, device, g)

    out = as_tuple(spec.call(fv, {n: v(leaves[n]) for n, v in views.items()}, reduction, dtype))

    # The oracle sees each input already broadcast to the shape the op computes on, as a leaf
    # of its own: its gradients are the per-element terms t_i.
    o_leaves = {n: to_oracle(t) for n, t in leaves.items()}
    o_full = {n: views[n](o_leaves[n]).detach().expand(bshapes[n]).clone()
              .requires_grad_(t.requires_grad) for n, t in leaves.items()}
    expected = as_tuple(spec.call(Oracle, o_full, reduction, dtype))

    floor = (spec.least_tol or {}).get(dtype)
    assert len(out) == len(expected)
    for i, (o, e) in enumerate(zip(out, expected, strict=True)):
        sample = i in spec.samples
        assert o.device.type == device.type
        assert o.dtype == (dtype if sample else loss_dtype(dtype)), f"output {i}: {o.dtype}"
        assert_close(o, e, noisy=sample and spec.noisy, msg=f"output {i}",
                     floor=(spec.least_tol or {}).get(o.dtype))

    upstream = [torch.randn(o.shape, dtype=o.dtype, generator=g).to(device) for o in out]
    names = list(differentiable(spec, leaves))
    grads = torch.autograd.grad(out, [leaves[n] for n in names], upstream)
    terms = torch.autograd.grad(expected, [o_full[n] for n in names],
                                [to_oracle(u) for u in upstream])
    for name, grad, t in zip(names, grads, terms, strict=True):
        # Map the per-element terms back onto the leaf (sums over broadcast elements).
        seen = views[name](o_leaves[name]).expand(bshapes[name])
        want, abs_sum = (torch.autograd.grad(seen, o_leaves[name], v, retain_graph=True)[0]
                         for v in (t, t.abs()))
        _check_grad(grad, want, abs_sum, dtype, name in spec.noisy_grads, f"d/d{name}", floor)


# ---------------------------------------------------------------------------------------------
# Only the gradients asked for
# ---------------------------------------------------------------------------------------------

SUBSET_CASES = ("kl_prior", "bernoulli", "gaussian_nll_element", "reparameterize_eps",
                "reparameterize_seed", "sample_and_kl", "continuous_bernoulli", "dmol")


@pytest.mark.parametrize("case", SUBSET_CASES)
def test_gradient_subsets(case, backend, device):
    """Each input alone requiring grad gets the same gradient as when all do; the others get
    none. A constant (the observed x of the mixture of logistics) gets none even when it
    requires grad."""
    spec = CASES[case]
    reduction = spec.reductions[0]
    g = torch.Generator().manual_seed(1)
    leaves, views, _ = make_inputs(spec, (5, 6), "contiguous", torch.float32, device, g)
    out = as_tuple(spec.call(fv, {n: v(leaves[n]) for n, v in views.items()}, reduction,
                              torch.float32))
    upstream = [torch.randn(o.shape, generator=g).to(device) for o in out]
    wanted = differentiable(spec, leaves)
    full = dict(zip(wanted, torch.autograd.grad(out, list(wanted.values()), upstream),
                    strict=True))
    for name in [*leaves, None]:  # None: all at once
        alone = {n: t.detach().requires_grad_(n == name or name is None)
                 for n, t in leaves.items()}
        out = as_tuple(spec.call(fv, {n: v(alone[n]) for n, v in views.items()}, reduction,
                                  torch.float32))
        if not any(o.requires_grad for o in out):  # a constant alone: nothing to differentiate
            assert name in spec.constants, f"no gradient path from {name}"
            continue
        sum(((o * u).sum() for o, u in zip(out, upstream, strict=True)),
            torch.zeros((), device=device)).backward()
        for n, t in alone.items():
            if n in full and (n == name or name is None):
                torch.testing.assert_close(t.grad, full[n], rtol=1e-6, atol=1e-6)
            else:
                assert t.grad is None, f"{n} got a gradient"


# ---------------------------------------------------------------------------------------------
# Extreme values (docs/numerics.md), float32
# ---------------------------------------------------------------------------------------------

LOGVARS = torch.tensor([-100.0, -30.0, -1e-4, -1e-8, 0.0, 1e-8, 1e-6, 1e-4, 0.3, 20.0, 60.0,
                        80.0])


def _oracle_grads(fn, *inputs):
    leaves = [to_oracle(t) for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out.sum(), leaves)


def test_extreme_logits(backend, device):
    logits = torch.tensor([[-1e4, -80.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 80.0, 1e4]] * 3)
    target = torch.stack([torch.zeros(9), torch.ones(9), torch.full((9,), 0.3)])
    lf, tf = logits.to(device).requires_grad_(), target.to(device).requires_grad_()
    out = fv.bernoulli_nll(lf, tf, reduction="none")
    assert torch.isfinite(out).all()
    expected, (d_l, d_x) = _oracle_grads(
        lambda a, b: Oracle.bernoulli_nll(a, b, reduction="none"), logits, target)
    assert_close(out, expected)
    # Per element: one term per sample, with upstream gradient 1.
    gl, gx = torch.autograd.grad(out.sum(), (lf, tf))
    assert_close(gl, d_l)
    assert_close(gx, d_x)
    # -log sigmoid(-1e4) = 1e4 exactly in float32, and its gradient is exactly -1 (not 0).
    assert out[1].item() > 1e4
    assert gl[1, 0].item() == -1.0


def test_extreme_logvar_kl(backend, device):
    # Row 1 has mu = 0: the KL is then 0.5 * (expm1(lv) - lv), 5e-17 at lv = 1e-8.
    mu = torch.stack([torch.linspace(-3, 3, LOGVARS.numel()), torch.zeros(LOGVARS.numel())])
    logvar = LOGVARS.reshape(1, -1).repeat(2, 1)
    m, lv = mu.to(device).requires_grad_(), logvar.to(device).requires_grad_()
    out = fv.gaussian_kl(m, lv, reduction="none")
    per_element, (d_mu, d_lv) = _oracle_grads(
        lambda a, b: Oracle.gaussian_kl(a.reshape(-1, 1), b.reshape(-1, 1), reduction="none"),
        mu, logvar)
    assert torch.isfinite(out).all()
    assert_close(out, per_element.reshape(2, -1).sum(1))
    gm, glv = torch.autograd.grad(out.sum(), (m, lv))
    assert torch.isfinite(glv).all()
    assert_close(gm, d_mu)
    assert_close(glv, d_lv)
    # Element by element, through reduction "none" of a one-element event.
    col = fv.gaussian_kl(mu.to(device).reshape(-1, 1), logvar.to(device).reshape(-1, 1),
                         reduction="none")
    assert_close(col, per_element)
    # Relative accuracy everywhere, however small the value (no atol floor here).
    torch.testing.assert_close(col.double().cpu(), per_element, rtol=1e-5, atol=0)


@pytest.mark.parametrize("op", ["reparameterize", "sample_and_kl"])
def test_extreme_logvar_sampling(op, backend, device):
    mu = torch.linspace(-3, 3, LOGVARS.numel()).reshape(2, -1)
    logvar = LOGVARS.reshape(2, -1)
    m, lv = mu.to(device).requires_grad_(), logvar.to(device).requires_grad_()
    if op == "reparameterize":
        z = fv.reparameterize(m, lv, seed=SEED)
        z_ref = Oracle.reparameterize(to_oracle(mu), to_oracle(logvar), seed=SEED)
    else:
        z, kl = fv.sample_and_kl(m, lv, seed=SEED, reduction="none")
        z_ref, kl_ref = Oracle.sample_and_kl(to_oracle(mu), to_oracle(logvar), seed=SEED,
                                             reduction="none")
        assert_close(kl, kl_ref)
    # Noise agrees across backends to float32 rounding: compare element by element, relative
    # to each element's own scale (std reaches e^40).
    std = torch.exp(0.5 * logvar.double())
    eps = (z_ref - mu.double()) / std
    assert torch.isfinite(z).all()
    bound = 1e-5 * (mu.double().abs() + std * (eps.abs() + 1))
    assert ((z.double().cpu() - z_ref).abs() <= bound).all()
    gm, glv = torch.autograd.grad(z.sum(), (m, lv))
    assert torch.isfinite(glv).all()
    assert (gm == 1).all()
    assert ((glv.double().cpu() - 0.5 * std * eps).abs() <= 0.5 * bound).all()


def test_extreme_logvar_gaussian_nll(backend, device):
    """logvar from -100 to 80 with residuals of the matching scale: the true NLL is finite."""
    logvar = LOGVARS.reshape(3, 4)
    r = torch.linspace(-2, 2, 12).reshape(3, 4)
    target = torch.exp(0.5 * logvar) * r  # float32, no underflow down to exp(-50)
    mean = torch.zeros(3, 4)
    m, x, lv = (t.to(device).requires_grad_() for t in (mean, target, logvar))
    out = fv.gaussian_nll(m, x, lv, reduction="none")
    expected, grads = _oracle_grads(
        lambda a, b, c: Oracle.gaussian_nll(a, b, c, reduction="none"), mean, target, logvar)
    assert torch.isfinite(out).all()
    assert_close(out, expected)
    for got, want in zip(torch.autograd.grad(out.sum(), (m, x, lv)), grads, strict=True):
        assert torch.isfinite(got).all()
        # d/dmean reaches 1e22 at logvar -100: relative comparison only.
        torch.testing.assert_close(got.double().cpu(), want, rtol=1e-5, atol=1e-30)
