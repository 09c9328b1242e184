"""What a new user dropping fastvae into existing code hit: observations of another dtype
(autocast), explicit noise for sample_and_kl, GaussianNLLLoss's variance argument."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, loss_dtype, to_oracle

import fastvae as fv
from fastvae.ops import reference


def _data(shape, device, seed=0):
    """Observations in (0, 1) that bfloat16 and float16 cannot hold exactly."""
    g = torch.Generator().manual_seed(seed)
    return (0.05 + 0.9 * torch.rand(shape, generator=g, dtype=torch.float64)).float().to(device)


def _param(shape, dtype, device, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return t.to(dtype).to(device).requires_grad_()


def test_vae_loss_under_autocast(backend, device):
    """The classic loss under CPU autocast: bfloat16 logits and latents, float32 data. It runs
    (it raised a TypeError) and equals the float64 formula on the same values to float32
    rounding: the data is not rounded to bfloat16 on the way (that would cost ~1e-3)."""
    x = _data((4, 12), device)
    dec = torch.nn.Linear(3, 12).to(device)
    enc = torch.nn.Linear(12, 6).to(device)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu"):
        mu, logvar = enc(x).chunk(2, dim=1)
        logits = dec(mu)
        assert logits.dtype == mu.dtype == torch.bfloat16
        loss = fv.vae_loss(logits, x, mu, logvar, reduction="sum")
        classic = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    assert loss.dtype == torch.float32
    expected = (F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="sum")
                + reference.gaussian_kl(mu.double(), logvar.double(), reduction="sum"))
    assert_close(loss, expected)
    assert torch.isclose(classic.double(), expected - reference.gaussian_kl(
        mu.double(), logvar.double(), reduction="sum"), rtol=1e-5)
    loss.backward()
    assert dec.weight.grad is not None
    assert torch.isfinite(enc.weight.grad).all()


PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
         (torch.float32, torch.float64), (torch.bfloat16, torch.float16),
         (torch.float64, torch.float32)]


@pytest.mark.parametrize(("param_dtype", "target_dtype"), PAIRS,
                         ids=[f"{str(a)[6:]}-{str(b)[6:]}" for a, b in PAIRS])
def test_targets_of_another_dtype(backend, device, param_dtype, target_dtype):
    """A target of another floating dtype computes in the common dtype, as torch's losses:
    the same as promoting both by hand (bit for bit), the float64 formula on those values to
    the common dtype's rounding, each gradient in its input's dtype."""
    common = torch.promote_types(param_dtype, target_dtype)
    target = _data((3, 10), device).to(target_dtype)
    logits = _param((3, 10), param_dtype, device)
    mean = _param((3, 10), param_dtype, device, seed=2, scale=0.5)
    obs_logvar = _param((10,), param_dtype, device, seed=3, scale=0.3)
    for name, fn, params, oracle in (
        ("bernoulli_nll", lambda p, t: fv.bernoulli_nll(p[0], t, reduction="none"), (logits,),
         lambda p, t: F.binary_cross_entropy_with_logits(p[0], t, reduction="none").sum(1)),
        ("gaussian_nll", lambda p, t: fv.gaussian_nll(p[0], t, p[1], reduction="none"),
         (mean, obs_logvar),
         lambda p, t: reference.gaussian_nll(p[0], t, p[1], reduction="none")),
        ("continuous_bernoulli_nll",
         lambda p, t: fv.continuous_bernoulli_nll(p[0], t, reduction="none"), (logits,),
         lambda p, t: reference.continuous_bernoulli_nll(p[0], t, reduction="none")),
    ):
        out = fn(params, target)
        assert out.dtype == loss_dtype(common), name
        by_hand = fn([p.to(common) for p in params], target.to(common))
        torch.testing.assert_close(out, by_hand, rtol=0, atol=0, msg=name)
        leaves = [to_oracle(p) for p in params]
        expected = oracle(leaves, target.double().cpu())
        assert_close(out, expected, msg=name)
        grads = torch.autograd.grad(out.sum(), params)
        want = torch.autograd.grad(expected.sum(), leaves)
        for p, g_a, g_e in zip(params, grads, want, strict=True):
            assert g_a.dtype == p.dtype, name
            assert_close(g_a, g_e, msg=f"gradient of {name}")


def test_paired_parameters_stay_strict():
    a32, a16 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="logvar"):
        fv.gaussian_kl(a32, a16)
    with pytest.raises(TypeError, match="logvar"):
        fv.vae_loss(a32, a32, a32, a16)
    # a broadcast parameter (gaussian_nll's logvar) promotes instead: see
    # test_broadcast_parameter_dtypes.py
    with pytest.raises(TypeError, match="target"):
        fv.bernoulli_nll(a32, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="target"):
        fv.bernoulli_nll(a32, torch.zeros(2, 4, dtype=torch.float64))


def test_sample_and_kl_takes_explicit_noise(backend, device, dtype):
    """sample_and_kl(eps=) reproduces code that draws randn_like: z = mu + exp(lv/2) eps and the
    KL, values and gradients, as reparameterize(eps=) and gaussian_kl."""
    mu = _param((4, 6), dtype, device, scale=1.0)
    logvar = _param((4, 6), dtype, device, seed=2, scale=0.5)
    torch.manual_seed(5)
    eps = torch.randn_like(mu)
    for reduction, free_bits in (("mean", 0.0), ("none", 0.0), ("sum", 0.3)):
        z, kl = fv.sample_and_kl(mu, logvar, eps=eps, reduction=reduction, free_bits=free_bits)
        mu64, lv64 = to_oracle(mu), to_oracle(logvar)
        z_ref = mu64 + torch.exp(0.5 * lv64) * eps.double().cpu()
        kl_ref = reference.gaussian_kl(mu64, lv64, reduction=reduction, free_bits=free_bits)
        assert z.dtype == dtype
        assert_close(z, z_ref)
        assert_close(kl, kl_ref)
        for out, ref in ((z, z_ref), (kl, kl_ref)):  # apart: each gradient rounds once
            grads = torch.autograd.grad(out.sum(), (mu, logvar), retain_graph=True)
            want = torch.autograd.grad(ref.sum(), (mu64, lv64), retain_graph=True)
            for g_a, g_e in zip(grads, want, strict=True):
                assert_close(g_a, g_e, dtype=dtype)
    with pytest.raises(ValueError, match="seed"):
        fv.sample_and_kl(mu, logvar, eps=eps, seed=1)
    with pytest.raises(ValueError, match="eps"):
        fv.sample_and_kl(mu, logvar, eps=eps[:2])


def test_gaussian_nll_loss_takes_the_variance_by_keyword(backend, device):
    """A variance passed by torch's habit (third positional argument) is a TypeError, not a
    log-variance; var= and logvar= name what they are; min_var soft-clips learned ones."""
    mean, target = _param((4, 5), torch.float64, device), _data((4, 5), device).double()
    var = torch.full((5,), 0.3, dtype=torch.float64, device=device, requires_grad=True)
    loss = fv.GaussianNLLLoss(reduction="sum")
    with pytest.raises(TypeError, match="var="):
        loss(mean, target, var)
    with pytest.raises(TypeError):
        fv.GaussianNLLLoss(0.5)
    by_var = loss(mean, target, var=var)
    expected = reference.gaussian_nll(to_oracle(mean), target.cpu(), torch.log(var.detach()).cpu(),
                                      reduction="sum")
    assert_close(by_var, expected)
    torch.testing.assert_close(loss(mean, target, logvar=torch.log(var)), by_var)
    torch.testing.assert_close(fv.GaussianNLLLoss(var=0.3, reduction="sum")(mean, target),
                               fv.gaussian_nll(mean, target, math.log(0.3), reduction="sum"))
    with pytest.raises(ValueError, match="not both"):
        loss(mean, target, var=var, logvar=var)
    with pytest.raises(ValueError, match="var must be finite and > 0"):
        fv.GaussianNLLLoss(var=0.0)
    # min_var: log-variances far below log(min_var) are held near it, with a gradient
    floor = fv.GaussianNLLLoss(min_var=1e-2, reduction="sum")
    low = torch.full((5,), -20.0, dtype=torch.float64, device=device, requires_grad=True)
    bounded = floor(mean, target, logvar=low)
    at_floor = fv.gaussian_nll(mean, target, math.log(1e-2), reduction="sum")
    torch.testing.assert_close(bounded, at_floor, rtol=1e-6, atol=0)
    (g,) = torch.autograd.grad(bounded, low)
    assert (g != 0).all()
    # ... the variance used is var + min_var
    some = torch.linspace(-6, 3, 5, dtype=torch.float64, device=device)
    torch.testing.assert_close(floor(mean, target, logvar=some),
                               loss(mean, target, logvar=torch.log(some.exp() + 1e-2)))
    assert fv.GaussianNLLLoss(min_var=0.5, logvar=-1.0).forward(mean, target).item() == \
        pytest.approx(fv.gaussian_nll(mean, target, math.log(math.exp(-1) + 0.5),
                                      reduction="mean").item(), rel=1e-12)
    assert "min_var=0.01" in repr(floor)


def test_torch_func_and_double_backward_as_documented():
    """What the README says of torch.func and second derivatives (torch's custom-op limits):
    vmap gives the per-slice values; grad raises; a second backward raises. A torch release that
    lifts a limit fails this test: then update the README."""
    mu = torch.randn(2, 3, 4, dtype=torch.float64)
    logvar = torch.randn(2, 3, 4, dtype=torch.float64)
    batched = torch.func.vmap(fv.gaussian_kl)(mu, logvar)
    torch.testing.assert_close(batched, torch.stack([fv.gaussian_kl(m, v)
                                                     for m, v in zip(mu, logvar, strict=True)]))
    with pytest.raises(RuntimeError, match="functorch"):
        torch.func.grad(lambda m: fv.gaussian_kl(m, logvar[0]))(mu[0])
    leaf = mu[0].clone().requires_grad_()
    (g,) = torch.autograd.grad(fv.gaussian_kl(leaf, logvar[0]), leaf, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        g.sum().backward()
