"""The opt-in data checks (``fv.set_validation`` / ``FASTVAE_VALIDATE``): with them on, NaN and
inf inputs and Bernoulli targets outside [0, 1] are a ValueError naming the argument, before any
kernel runs; off (the default), the same inputs compute."""

from __future__ import annotations

import pytest
import torch
from helpers import missing_names, ramp, with_value

import fastvae as fv

a, b = ramp(3, 4), ramp(3, 4)
NAN, INF = float("nan"), float("inf")
target01 = (b > 0.5).float()

INVALID_DATA = [
    ("kl_mu_nan", lambda: fv.gaussian_kl(with_value(a, NAN), b), ["mu"]),
    ("kl_logvar_inf", lambda: fv.gaussian_kl(a, with_value(b, INF)), ["logvar"]),
    ("kl_prior_mu_nan", lambda: fv.gaussian_kl(a, b, with_value(a, NAN)), ["prior_mu"]),
    ("kl_prior_logvar_inf", lambda: fv.gaussian_kl(a, b, None, with_value(b, -INF)),
     ["prior_logvar"]),
    ("bernoulli_logits_nan", lambda: fv.bernoulli_nll(with_value(a, NAN), target01), ["logits"]),
    ("bernoulli_target_above_1", lambda: fv.bernoulli_nll(a, with_value(target01, 1.5)),
     ["target"]),
    ("bernoulli_target_below_0", lambda: fv.bernoulli_nll(a, with_value(target01, -0.1)),
     ["target"]),
    ("bernoulli_target_nan", lambda: fv.bernoulli_nll(a, with_value(target01, NAN)), ["target"]),
    ("gaussian_nll_mean_inf", lambda: fv.gaussian_nll(with_value(a, INF), b), ["mean"]),
    ("gaussian_nll_target_nan", lambda: fv.gaussian_nll(a, with_value(b, NAN)), ["target"]),
    ("gaussian_nll_logvar_nan", lambda: fv.gaussian_nll(a, b, with_value(b, NAN)), ["logvar"]),
    ("reparameterize_mu_nan", lambda: fv.reparameterize(with_value(a, NAN), b), ["mu"]),
    ("reparameterize_logvar_inf", lambda: fv.reparameterize(a, with_value(b, INF), n_samples=2),
     ["logvar"]),
    ("reparameterize_eps_nan", lambda: fv.reparameterize(a, b, eps=with_value(a, NAN)), ["eps"]),
    ("sample_and_kl_logvar_nan", lambda: fv.sample_and_kl(a, with_value(b, NAN)), ["logvar"]),
    ("vae_x_above_1", lambda: fv.vae_loss(a, with_value(target01, 2.0), a, b), ["x"]),
    ("vae_recon_nan", lambda: fv.vae_loss(with_value(a, NAN), target01, a, b), ["recon"]),
    ("vae_logvar_nan", lambda: fv.vae_loss(a, target01, a, with_value(b, NAN)), ["logvar"]),
    ("continuous_bernoulli_logits_inf",
     lambda: fv.continuous_bernoulli_nll(with_value(a, INF), b), ["logits"]),
    ("continuous_bernoulli_target_above_1",
     lambda: fv.continuous_bernoulli_nll(a, with_value(b, 1.5)), ["target"]),
    ("continuous_bernoulli_target_below_0",
     lambda: fv.continuous_bernoulli_nll(a, with_value(b, -0.1)), ["target"]),
    ("dmol_x_above_1",
     lambda: fv.discretized_mix_logistic_nll(ramp(2, 6, 3), with_value(b[:2, :3], 1.5)
                                             .unsqueeze(1), n_mixtures=2), ["x"]),
    ("dmol_x_below_minus_1",
     lambda: fv.discretized_mix_logistic_nll(ramp(2, 6, 3), (b[:2, :3] * 2 - 1 - 1.5)
                                             .unsqueeze(1), n_mixtures=2), ["x"]),
    ("dmol_params_nan",
     lambda: fv.discretized_mix_logistic_nll(ramp(2, 6, 3) * NAN, b[:2, :3].unsqueeze(1),
                                             n_mixtures=2), ["params"]),
    ("dmol_x_inf",
     lambda: fv.discretized_mix_logistic_nll(ramp(2, 6, 3), (b[:2, :3] + INF).unsqueeze(1),
                                             n_mixtures=2), ["x"]),
    ("vae_continuous_bernoulli_x_above_1",
     lambda: fv.vae_loss(a, with_value(b, 2.0), a, b, likelihood="continuous_bernoulli"),
     ["x"]),
]


@pytest.mark.parametrize(("call", "words"), [pytest.param(c, w, id=i) for i, c, w in
                                             INVALID_DATA])
def test_validation_on(call, words, spy):
    fv.set_validation(True)
    assert fv.validation_enabled()
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match="validation") as info:
        call()
    missing = missing_names(str(info.value), words)
    assert not missing, f"the message {str(info.value)!r} does not name {missing}"
    assert spy == []
    assert torch.equal(torch.get_rng_state(), rng), "torch's generator was consumed"


@pytest.mark.parametrize(("call", "words"), [pytest.param(c, w, id=i) for i, c, w in
                                             INVALID_DATA])
def test_validation_off(call, words):
    """Off by default: the same inputs compute, and a NaN or inf input shows in the output."""
    assert not fv.validation_enabled()
    out = call()
    out = out if isinstance(out, tuple) else (out,)
    assert all(isinstance(o, torch.Tensor) for o in out)


def test_validation_accepts_valid_data():
    fv.set_validation(True)
    fv.bernoulli_nll(a, target01)
    fv.bernoulli_nll(a, b)  # continuous targets in [0, 1]
    fv.vae_loss(a, b, a, b)
    fv.reparameterize(a, b)
    fv.set_validation(False)
    assert not fv.validation_enabled()
    fv.bernoulli_nll(a, with_value(target01, 1.5))
