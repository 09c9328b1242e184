"""Empty inputs give the right value (never a crash) and NaN/inf inputs propagate sample by
sample, on every backend."""

from __future__ import annotations

import pytest
import torch
from helpers import with_value

import fastvae as fv

NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------
# Empty inputs (docs/conventions.md): the right value, never a crash
# ---------------------------------------------------------------------------------------------

EMPTY_LOSSES = {
    "gaussian_kl": lambda x, **kw: fv.gaussian_kl(x, x, **kw),
    "gaussian_kl_prior": lambda x, **kw: fv.gaussian_kl(x, x, x[:1], 0.5, **kw),
    "bernoulli_nll": lambda x, **kw: fv.bernoulli_nll(x, x, **kw),
    "gaussian_nll": lambda x, **kw: fv.gaussian_nll(x, x, **kw),
    "gaussian_nll_logvar": lambda x, **kw: fv.gaussian_nll(x, x, x, **kw),
    "sample_and_kl": lambda x, **kw: fv.sample_and_kl(x, x, **kw)[1],
    "vae_loss": lambda x, **kw: fv.vae_loss(x, x, x, x, **kw),
    "continuous_bernoulli_nll": lambda x, **kw: fv.continuous_bernoulli_nll(x, x, **kw),
}


@pytest.mark.parametrize("op", EMPTY_LOSSES)
@pytest.mark.parametrize("shape", [(0, 5), (0,), (0, 2, 3), (4, 0), (4, 0, 3)],
                         ids=["empty_batch", "empty_1d", "empty_batch_3d", "empty_event",
                              "empty_event_3d"])
def test_empty(op, shape, backend, device):
    f = EMPTY_LOSSES[op]
    B = shape[0]
    x = torch.zeros(shape, device=device, requires_grad=True)
    none = f(x, reduction="none")
    assert none.shape == (B,)
    assert (none == 0).all()
    total = f(x, reduction="sum")
    assert total.shape == ()
    assert total.item() == 0
    mean = f(x, reduction="mean")
    assert mean.shape == ()
    assert (mean.isnan() if B == 0 else mean == 0).item()  # a mean over no samples is nan
    (grad,) = torch.autograd.grad(total, x)
    assert grad.shape == x.shape
    if op in ("gaussian_kl", "sample_and_kl", "vae_loss"):
        for reduction, expected in (("sum", 0.0), ("mean", float("nan") if B == 0 else 0.0)):
            out = f(x, reduction=reduction, free_bits=0.5)
            torch.testing.assert_close(out.cpu(), torch.tensor(expected), equal_nan=True)


@pytest.mark.parametrize("shape", [(0, 5), (4, 0), (0,)])
def test_empty_samples(shape, backend, device):
    x = torch.zeros(shape, device=device, requires_grad=True)
    assert fv.reparameterize(x, x).shape == shape
    assert fv.reparameterize(x, x, eps=x).shape == shape
    z = fv.reparameterize(x, x, n_samples=3)
    assert z.shape == (3, *shape)
    z, kl = fv.sample_and_kl(x, x, reduction="none")
    assert z.shape == shape
    assert kl.shape == (shape[0],)
    (grad,) = torch.autograd.grad(z.sum() + kl.sum(), x)
    assert grad.shape == shape


# ---------------------------------------------------------------------------------------------
# NaN and inf propagate (docs/conventions.md), sample by sample
# ---------------------------------------------------------------------------------------------

PROPAGATION = {
    "kl_mu_nan": (lambda m, lv, x: fv.gaussian_kl(m, lv, reduction="none"), "m", NAN),
    "kl_logvar_inf": (lambda m, lv, x: fv.gaussian_kl(m, lv, reduction="none"), "lv", INF),
    "kl_logvar_minus_inf": (lambda m, lv, x: fv.gaussian_kl(m, lv, reduction="none"), "lv",
                            -INF),
    "kl_prior_nan": (lambda m, lv, x: fv.gaussian_kl(m, lv, x, reduction="none"), "x", NAN),
    "bernoulli_logits_nan": (lambda m, lv, x: fv.bernoulli_nll(m, x, reduction="none"), "m",
                             NAN),
    "bernoulli_target_nan": (lambda m, lv, x: fv.bernoulli_nll(m, x, reduction="none"), "x",
                             NAN),
    "gaussian_nll_mean_inf": (lambda m, lv, x: fv.gaussian_nll(m, x, lv, reduction="none"), "m",
                              INF),
    "gaussian_nll_logvar_nan": (lambda m, lv, x: fv.gaussian_nll(m, x, lv, reduction="none"),
                                "lv", NAN),
    "sample_and_kl_mu_nan": (lambda m, lv, x: fv.sample_and_kl(m, lv, seed=1,
                                                               reduction="none")[1], "m", NAN),
    "vae_recon_nan": (lambda m, lv, x: fv.vae_loss(m, x, m, lv, reduction="none"), "m", NAN),
    "continuous_bernoulli_logits_nan": (
        lambda m, lv, x: fv.continuous_bernoulli_nll(m, x, reduction="none"), "m", NAN),
    "continuous_bernoulli_target_nan": (
        lambda m, lv, x: fv.continuous_bernoulli_nll(m, x, reduction="none"), "x", NAN),
}


@pytest.mark.parametrize("case", PROPAGATION)
def test_nan_inf_propagate(case, backend, device):
    """A NaN/inf in sample 1 makes sample 1's loss and gradient non-finite and leaves the
    others as they were."""
    f, which, value = PROPAGATION[case]
    g = torch.Generator().manual_seed(2)
    clean = {k: torch.rand(4, 6, generator=g).to(device) for k in ("m", "lv", "x")}
    dirty = {k: (with_value(v, value) if k == which else v).requires_grad_() for k, v in
             clean.items()}
    clean = {k: v.requires_grad_() for k, v in clean.items()}
    out_clean, out_dirty = f(**clean), f(**dirty)
    assert not torch.isfinite(out_dirty[1])
    others = [0, 2, 3]
    torch.testing.assert_close(out_dirty[others], out_clean[others])
    (grad,) = torch.autograd.grad(out_dirty.sum(), dirty[which])
    if not (case.startswith("kl_logvar") or case.endswith("bernoulli_target_nan")):
        # (d/dlogvar of the KL is +-inf or finite there; d/dtarget of the NLL is -logits.)
        assert not torch.isfinite(grad[1, 2])
    assert torch.isfinite(grad[others]).all()


def test_nan_in_sample_propagates(backend, device):
    mu = with_value(torch.zeros(3, 4), NAN).to(device)
    logvar = with_value(torch.zeros(3, 4), INF).to(device)
    for z in (fv.reparameterize(mu, torch.zeros_like(mu), seed=3),
              fv.reparameterize(torch.zeros_like(mu), logvar, seed=3),
              fv.sample_and_kl(mu, torch.zeros_like(mu), seed=3)[0]):
        assert not torch.isfinite(z[1, 2])
        finite = torch.ones_like(z, dtype=torch.bool)
        finite[1, 2] = False
        assert torch.isfinite(z[finite]).all()
