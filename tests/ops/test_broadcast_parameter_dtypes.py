"""Broadcast parameters of another floating dtype: the sigma-VAE pattern, a
float32 learned log-variance (scalar, per channel or full) next to a bfloat16 decoder mean under
autocast. Every op with a broadcast parameter tensor computes in the common dtype of all its
operands and returns each gradient in its own input's dtype: ``gaussian_nll``'s ``logvar``,
``vae_loss``'s ``obs_logvar``, ``gaussian_kl`` / ``gaussian_kl_per_dim``'s prior, the loss
modules, ``DiagonalNormal`` and ``DiagonalGaussianDistribution``. Values are held to the float64
formula on the very values the inputs hold, at the tolerance of the common dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, loss_dtype, to_oracle
from torch.distributions import kl_divergence

import fastvae as fv
from fastvae.ops import reference

SHAPE = (2, 3, 2, 2)
LOGVAR_SHAPES = {"scalar": (), "channel": (3, 1, 1), "full": SHAPE, "event": (1, 3, 2, 2)}
# (mean dtype, target dtype, logvar dtype): the common dtype is the widest of the three
DTYPE_TRIPLES = [
    (torch.bfloat16, torch.float32, torch.float32),  # autocast decoder, float32 data and noise
    (torch.bfloat16, torch.bfloat16, torch.float32),  # the noise alone is wider
    (torch.float16, torch.float32, torch.bfloat16),  # two half types: float32
    (torch.float32, torch.float32, torch.float64),  # a float64 parameter: float64
    (torch.float64, torch.float64, torch.float32),
]


def _ids(triple):
    return "-".join(str(d).removeprefix("torch.") for d in triple)


def _leaf(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return t.to(dtype).to(device).requires_grad_()


def _common(*dtypes):
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _check_grads(leaves, oracle_leaves, common):
    """Each gradient in its own leaf's dtype, equal to the float64 one to the tolerance of the
    rounding it carries (the common dtype's, then its own dtype's)."""
    for name, leaf in leaves.items():
        assert leaf.grad is not None, name
        assert leaf.grad.dtype == leaf.dtype, f"d/d{name}: {leaf.grad.dtype} != {leaf.dtype}"
        worst = max((common, leaf.dtype), key=lambda d: torch.finfo(d).eps)
        assert_close(leaf.grad, oracle_leaves[name].grad, dtype=worst, msg=f"d/d{name}")


@pytest.mark.parametrize("lv_shape", LOGVAR_SHAPES)
@pytest.mark.parametrize("dtypes", DTYPE_TRIPLES, ids=_ids)
def test_gaussian_nll_promotes_logvar(backend, device, dtypes, lv_shape):
    mean_dtype, target_dtype, lv_dtype = dtypes
    leaves = {"mean": _leaf(SHAPE, mean_dtype, device, 0),
              "target": _leaf(SHAPE, target_dtype, device, 1),
              "logvar": _leaf(LOGVAR_SHAPES[lv_shape], lv_dtype, device, 2, 0.5)}
    out = fv.gaussian_nll(*leaves.values(), reduction="sum")
    common = _common(*dtypes)
    assert out.dtype == loss_dtype(common)
    oracle = {k: to_oracle(v) for k, v in leaves.items()}
    expected = reference.gaussian_nll(*oracle.values(), reduction="sum")
    assert_close(out, expected, dtype=loss_dtype(common))
    out.backward()
    expected.backward()
    _check_grads(leaves, oracle, common)


PRIOR_PAIRS = [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
               (torch.float16, torch.bfloat16), (torch.float64, torch.float32)]


@pytest.mark.parametrize("prior", ["mu", "logvar", "both"])
@pytest.mark.parametrize("dtypes", PRIOR_PAIRS, ids=_ids)
def test_gaussian_kl_promotes_prior(backend, device, dtypes, prior):
    post_dtype, prior_dtype = dtypes
    leaves = {"mu": _leaf((3, 4), post_dtype, device, 0),
              "logvar": _leaf((3, 4), post_dtype, device, 1, 0.5)}
    if prior in ("mu", "both"):
        leaves["prior_mu"] = _leaf((4,), prior_dtype, device, 2)
    if prior in ("logvar", "both"):
        leaves["prior_logvar"] = _leaf((1, 4), prior_dtype, device, 3, 0.5)
    common = _common(post_dtype, prior_dtype)
    oracle = {k: to_oracle(v) for k, v in leaves.items()}
    out = fv.gaussian_kl(**leaves, reduction="none")
    per_dim = fv.gaussian_kl_per_dim(**leaves)
    assert out.dtype == per_dim.dtype == loss_dtype(common)
    expected = reference.gaussian_kl(**oracle, reduction="none")
    assert_close(out, expected, dtype=loss_dtype(common))
    assert_close(per_dim.sum(), expected.mean(), dtype=loss_dtype(common))
    (out.sum() + per_dim.sum()).backward()
    (expected.sum() + expected.mean()).backward()
    _check_grads(leaves, oracle, common)


@pytest.mark.parametrize("lv_shape", ["scalar", "channel", "full"])
def test_sigma_vae_under_autocast(backend, device, lv_shape):
    """A decoder under torch.autocast(cpu, bfloat16) returns a bfloat16 mean; the learned noise is
    a float32 Parameter. gaussian_nll, vae_loss and GaussianNLLLoss (logvar= and var=) run (a
    TypeError before), compute in float32 and give the Parameter a float32 gradient."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(SHAPE, generator=g).to(device)
    dec = torch.nn.Linear(4, 12).to(device)
    z = torch.randn(2, 4, generator=g).to(device)
    logvar = torch.nn.Parameter(0.3 * torch.randn(LOGVAR_SHAPES[lv_shape], generator=g).to(device))
    mu, lv_q = torch.zeros(2, 4, device=device), torch.zeros(2, 4, device=device)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=device.type == "cpu"):
        mean = dec(z).view(SHAPE)
        if device.type == "cpu":
            assert mean.dtype == torch.bfloat16
        losses = [fv.gaussian_nll(mean, x, logvar, reduction="sum"),
                  fv.vae_loss(mean, x, mu, lv_q, likelihood="gaussian", obs_logvar=logvar,
                              reduction="sum"),
                  fv.GaussianNLLLoss(reduction="sum")(mean, x, logvar=logvar),
                  fv.GaussianNLLLoss(reduction="sum")(mean, x, var=logvar.exp())]
    expected = reference.gaussian_nll(mean.double(), x.double(), logvar.double(), reduction="sum")
    for i, loss in enumerate(losses):
        assert loss.dtype == torch.float32, i
        assert_close(loss, expected, dtype=torch.float32, msg=f"loss {i}")
        logvar.grad = None
        dec.zero_grad()
        loss.backward(retain_graph=True)
        assert logvar.grad.dtype == torch.float32
        assert torch.isfinite(dec.weight.grad).all()
        lv64 = to_oracle(logvar)
        reference.gaussian_nll(mean.detach().double(), x.double(), lv64, reduction="sum").backward()
        assert_close(logvar.grad, lv64.grad, dtype=torch.float32, msg=f"d/dlogvar, loss {i}")


def test_kl_loss_module_and_distributions(backend, device):
    """GaussianKLLoss with a float32 prior for bfloat16 moments; DiagonalNormal with a bfloat16
    loc and a float32 log-variance (samples, log_prob, entropy and KLs in float32, as torch's
    Normal); DiagonalGaussianDistribution.kl against a float32 prior."""
    mu = _leaf((3, 4), torch.bfloat16, device, 0)
    lv = _leaf((3, 4), torch.bfloat16, device, 1, 0.5)
    pm, plv = _leaf((4,), torch.float32, device, 2), _leaf((4,), torch.float32, device, 3, 0.5)
    kl = fv.GaussianKLLoss(reduction="none")(mu, lv, pm, plv)
    expected = reference.gaussian_kl(*(to_oracle(t) for t in (mu, lv, pm, plv)), reduction="none")
    assert kl.dtype == torch.float32
    assert_close(kl, expected, dtype=torch.float32)
    kl.sum().backward()
    assert (mu.grad.dtype, pm.grad.dtype) == (torch.bfloat16, torch.float32)

    loc = _leaf((3, 4), torch.bfloat16, device, 4)
    logvar = torch.nn.Parameter(torch.full((4,), -0.5, device=device))
    d = fv.DiagonalNormal(loc, logvar)
    z = d.rsample((2,))
    assert (z.dtype, z.shape) == (torch.float32, (2, 3, 4))
    value = _leaf((3, 4), torch.float32, device, 5)
    lp = d.log_prob(value)
    lp64 = -reference.gaussian_nll(loc.double(), value.double(), logvar.double(),
                                   reduction="none")
    assert_close(lp, lp64, dtype=torch.float32)
    prior = fv.DiagonalNormal(torch.zeros(4, device=device), torch.zeros(4, device=device))
    kls = [kl_divergence(d, prior), kl_divergence(prior.expand((3,)), d)]
    (z.sum() + lp.sum() + d.entropy().sum() + sum(k.sum() for k in kls)).backward()
    assert all(k.dtype == torch.float32 for k in kls)
    assert (loc.grad.dtype, logvar.grad.dtype) == (torch.bfloat16, torch.float32)

    moments = _leaf((2, 4, 2, 2), torch.bfloat16, device, 6)
    posterior = fv.DiagonalGaussianDistribution(moments)

    class Prior:
        mean = torch.zeros(2, 2, 2, device=device)
        logvar = torch.nn.Parameter(torch.zeros(2, 1, 1, device=device))

    out = posterior.kl(Prior)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert (moments.grad.dtype, Prior.logvar.grad.dtype) == (torch.bfloat16, torch.float32)
