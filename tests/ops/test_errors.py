"""Bad arguments to the public functions and loss modules: a clear error naming the argument,
and nothing else happens (no kernel runs, torch's generator and the backend choice are left
alone). Unusable backends are tested in test_backends.py, the opt-in data checks in
test_validation.py, empty and non-finite inputs in test_empty_and_nonfinite.py."""

from __future__ import annotations

import pytest
import torch
from helpers import missing_names, ramp

import fastvae as fv
from fastvae.ops import backends as _backend

# ---------------------------------------------------------------------------------------------
# The table: (id, call, exception type, words the message must contain)
# ---------------------------------------------------------------------------------------------


t = ramp
a, b = t(3, 4), t(3, 4)
i34 = torch.ones(3, 4, dtype=torch.int64)
meta = t(3, 4, device="meta")
scalar = torch.tensor(0.5)
P3, X3 = t(2, 20, 4, 4), t(2, 3, 4, 4) * 2 - 1

BAD_INPUTS = [
    # --- shapes -> ValueError naming the arguments
    ("kl_logvar_shape", lambda: fv.gaussian_kl(a, t(3, 5)), ValueError, ["logvar", "mu"]),
    ("kl_logvar_transposed", lambda: fv.gaussian_kl(a, t(4, 3)), ValueError, ["logvar"]),
    ("kl_prior_mu_shape", lambda: fv.gaussian_kl(a, b, t(5)), ValueError, ["prior_mu"]),
    ("kl_prior_logvar_shape", lambda: fv.gaussian_kl(a, b, None, t(2, 3, 4)), ValueError,
     ["prior_logvar"]),
    ("kl_0d", lambda: fv.gaussian_kl(scalar, scalar), ValueError, ["mu"]),
    ("bernoulli_target_shape", lambda: fv.bernoulli_nll(a, t(3, 5)), ValueError,
     ["target", "logits"]),
    ("continuous_bernoulli_target_shape", lambda: fv.continuous_bernoulli_nll(a, t(3, 5)),
     ValueError, ["target", "logits"]),
    ("continuous_bernoulli_0d", lambda: fv.continuous_bernoulli_nll(scalar, scalar), ValueError,
     ["logits"]),
    ("continuous_bernoulli_reduction",
     lambda: fv.continuous_bernoulli_nll(a, b, reduction="elementwise"), ValueError,
     ["reduction"]),
    ("continuous_bernoulli_int_target", lambda: fv.continuous_bernoulli_nll(a, i34), TypeError,
     ["target"]),
    ("continuous_bernoulli_device", lambda: fv.continuous_bernoulli_nll(a, meta), ValueError,
     ["target"]),
    ("module_continuous_bernoulli_forward_shape",
     lambda: fv.ContinuousBernoulliNLLLoss()(a, t(3, 5)), ValueError, ["target"]),
    ("vae_unknown_likelihood", lambda: fv.vae_loss(a, b, a, b, likelihood="beta"), ValueError,
     ["likelihood", "continuous_bernoulli"]),
    ("bernoulli_target_broadcast", lambda: fv.bernoulli_nll(a, t(4)), ValueError, ["target"]),
    ("bernoulli_0d", lambda: fv.bernoulli_nll(scalar, scalar), ValueError, ["logits"]),
    ("gaussian_nll_target_shape", lambda: fv.gaussian_nll(a, t(3, 1)), ValueError, ["target"]),
    ("gaussian_nll_logvar_shape", lambda: fv.gaussian_nll(a, b, t(5)), ValueError, ["logvar"]),
    ("gaussian_nll_logvar_bigger", lambda: fv.gaussian_nll(a, b, t(2, 3, 4)), ValueError,
     ["logvar"]),
    ("gaussian_nll_0d", lambda: fv.gaussian_nll(scalar, scalar), ValueError, ["mean"]),
    ("reparameterize_shape", lambda: fv.reparameterize(a, t(3, 5)), ValueError, ["logvar"]),
    ("reparameterize_eps_shape", lambda: fv.reparameterize(a, b, eps=t(3, 5)), ValueError,
     ["eps"]),
    ("reparameterize_eps_samples_shape", lambda: fv.reparameterize(a, b, eps=t(3, 4),
                                                                   n_samples=2),
     ValueError, ["eps"]),
    ("sample_and_kl_shape", lambda: fv.sample_and_kl(a, t(4, 3)), ValueError, ["logvar"]),
    ("sample_and_kl_0d", lambda: fv.sample_and_kl(scalar, scalar), ValueError, ["mu"]),
    ("vae_batch", lambda: fv.vae_loss(a, b, t(2, 2), t(2, 2)), ValueError, ["recon", "mu"]),
    ("vae_x_shape", lambda: fv.vae_loss(a, t(3, 5), t(3, 2), t(3, 2)), ValueError,
     ["x", "recon"]),
    ("vae_logvar_shape", lambda: fv.vae_loss(a, b, t(3, 2), t(3, 3)), ValueError,
     ["logvar", "mu"]),
    ("vae_obs_logvar_shape", lambda: fv.vae_loss(a, b, t(3, 2), t(3, 2), likelihood="gaussian",
                                                 obs_logvar=t(5)), ValueError, ["obs_logvar"]),
    # --- dtypes -> TypeError
    ("kl_int_mu", lambda: fv.gaussian_kl(i34, b), TypeError, ["mu"]),
    ("kl_bool_logvar", lambda: fv.gaussian_kl(a, b > 0.5), TypeError, ["logvar"]),
    ("kl_complex_mu", lambda: fv.gaussian_kl(a.to(torch.complex64), b), TypeError, ["mu"]),
    ("kl_mixed", lambda: fv.gaussian_kl(a, b.double()), TypeError, ["logvar", "mu"]),
    ("kl_prior_int", lambda: fv.gaussian_kl(a, b, None, i34), TypeError, ["prior_logvar"]),
    ("kl_prior_string", lambda: fv.gaussian_kl(a, b, "0"), TypeError, ["prior_mu"]),
    ("kl_list", lambda: fv.gaussian_kl([[0.0]], [[0.0]]), TypeError, ["mu"]),
    ("bernoulli_int_target", lambda: fv.bernoulli_nll(a, i34), TypeError, ["target"]),
    ("bernoulli_bool_target", lambda: fv.bernoulli_nll(a, b > 0.5), TypeError, ["target"]),
    ("bernoulli_int_logits", lambda: fv.bernoulli_nll(i34, b), TypeError, ["logits"]),
    ("gaussian_nll_int_logvar", lambda: fv.gaussian_nll(a, b, i34), TypeError, ["logvar"]),
    ("gaussian_nll_logvar_string", lambda: fv.gaussian_nll(a, b, "1"), TypeError, ["logvar"]),
    ("gaussian_nll_logvar_bool", lambda: fv.gaussian_nll(a, b, True), TypeError, ["logvar"]),
    ("gaussian_nll_int_target", lambda: fv.gaussian_nll(a, i34), TypeError, ["target"]),
    ("reparameterize_int_mu", lambda: fv.reparameterize(i34, b), TypeError, ["mu"]),
    ("reparameterize_int_eps", lambda: fv.reparameterize(a, b, eps=i34), TypeError, ["eps"]),
    ("reparameterize_eps_dtype", lambda: fv.reparameterize(a, b, eps=b.double()), TypeError,
     ["eps"]),
    ("reparameterize_n_samples_float", lambda: fv.reparameterize(a, b, n_samples=2.0),
     TypeError, ["n_samples"]),
    ("reparameterize_n_samples_bool", lambda: fv.reparameterize(a, b, n_samples=True),
     TypeError, ["n_samples"]),
    ("reparameterize_seed_float", lambda: fv.reparameterize(a, b, seed=1.5), TypeError,
     ["seed"]),
    ("reparameterize_seed_tensor_dtype", lambda: fv.reparameterize(a, b, seed=torch.tensor(1.0)),
     TypeError, ["seed"]),
    ("reparameterize_seed_tensor_size", lambda: fv.reparameterize(a, b,
                                                                  seed=torch.tensor([1, 2])),
     TypeError, ["seed"]),
    ("reparameterize_generator_type", lambda: fv.reparameterize(a, b, generator=3), TypeError,
     ["generator"]),
    ("sample_and_kl_int", lambda: fv.sample_and_kl(a, i34), TypeError, ["logvar"]),
    ("sample_and_kl_seed_str", lambda: fv.sample_and_kl(a, b, seed="1"), TypeError, ["seed"]),
    ("kl_free_bits_str", lambda: fv.gaussian_kl(a, b, free_bits="1"), TypeError, ["free_bits"]),
    ("vae_beta_str", lambda: fv.vae_loss(a, b, a, b, beta="1"), TypeError, ["beta"]),
    ("vae_int_x", lambda: fv.vae_loss(a, i34, a, b), TypeError, ["x"]),
    ("vae_obs_logvar_str", lambda: fv.vae_loss(a, b, a, b, likelihood="gaussian",
                                               obs_logvar="0"), TypeError, ["obs_logvar"]),
    # --- devices -> ValueError (meta stands for a second device)
    ("kl_device", lambda: fv.gaussian_kl(a, meta), ValueError, ["logvar", "mu", "meta"]),
    ("kl_prior_device", lambda: fv.gaussian_kl(a, b, t(4, device="meta")), ValueError,
     ["prior_mu"]),
    ("bernoulli_device", lambda: fv.bernoulli_nll(a, meta), ValueError, ["target"]),
    ("gaussian_nll_logvar_device", lambda: fv.gaussian_nll(a, b, t(4, device="meta")),
     ValueError, ["logvar"]),
    ("reparameterize_eps_device", lambda: fv.reparameterize(a, b, eps=meta), ValueError,
     ["eps"]),
    ("reparameterize_seed_device", lambda: fv.reparameterize(
        a, b, seed=torch.tensor(1, device="meta")), ValueError, ["seed"]),
    ("vae_device", lambda: fv.vae_loss(a, b, a, meta), ValueError, ["logvar"]),
    ("vae_latent_device", lambda: fv.vae_loss(a, b, meta, meta), ValueError, ["mu", "recon"]),
    # --- values and names -> ValueError
    ("kl_reduction", lambda: fv.gaussian_kl(a, b, reduction="avg"), ValueError, ["reduction"]),
    ("kl_reduction_none_object", lambda: fv.gaussian_kl(a, b, reduction=None), ValueError,
     ["reduction"]),
    ("bernoulli_reduction", lambda: fv.bernoulli_nll(a, b, reduction="elementwise"), ValueError,
     ["reduction"]),
    ("gaussian_nll_reduction", lambda: fv.gaussian_nll(a, b, reduction="Mean"), ValueError,
     ["reduction"]),
    ("sample_and_kl_reduction", lambda: fv.sample_and_kl(a, b, reduction="max"), ValueError,
     ["reduction"]),
    ("vae_reduction", lambda: fv.vae_loss(a, b, a, b, reduction="batchmean"), ValueError,
     ["reduction"]),
    ("vae_likelihood", lambda: fv.vae_loss(a, b, a, b, likelihood="poisson"), ValueError,
     ["likelihood"]),
    ("kl_free_bits_negative", lambda: fv.gaussian_kl(a, b, free_bits=-0.1), ValueError,
     ["free_bits"]),
    ("kl_free_bits_nan", lambda: fv.gaussian_kl(a, b, free_bits=float("nan")), ValueError,
     ["free_bits"]),
    ("kl_free_bits_none_reduction", lambda: fv.gaussian_kl(a, b, free_bits=0.5,
                                                           reduction="none"),
     ValueError, ["free_bits", "reduction"]),
    ("sample_and_kl_free_bits_none", lambda: fv.sample_and_kl(a, b, free_bits=0.5,
                                                              reduction="none"),
     ValueError, ["free_bits"]),
    ("vae_free_bits_none", lambda: fv.vae_loss(a, b, a, b, free_bits=0.5, reduction="none"),
     ValueError, ["free_bits"]),
    ("reparameterize_n_samples_zero", lambda: fv.reparameterize(a, b, n_samples=0), ValueError,
     ["n_samples"]),
    ("reparameterize_seed_negative", lambda: fv.reparameterize(a, b, seed=-1), ValueError,
     ["seed"]),
    ("reparameterize_seed_too_big", lambda: fv.reparameterize(a, b, seed=2**63), ValueError,
     ["seed"]),
    ("reparameterize_seed_and_generator", lambda: fv.reparameterize(
        a, b, seed=1, generator=torch.Generator()), ValueError, ["seed", "generator"]),
    ("reparameterize_eps_and_seed", lambda: fv.reparameterize(a, b, eps=a, seed=1), ValueError,
     ["eps", "seed"]),
    ("reparameterize_eps_and_generator", lambda: fv.reparameterize(
        a, b, eps=a, generator=torch.Generator()), ValueError, ["eps", "generator"]),
    ("sample_and_kl_seed_and_generator", lambda: fv.sample_and_kl(
        a, b, seed=1, generator=torch.Generator()), ValueError, ["seed", "generator"]),
    ("set_backend_unknown", lambda: fv.set_backend("tpu"), ValueError, ["backend", "tpu"]),
    ("set_backend_case", lambda: fv.set_backend("Triton"), ValueError, ["backend"]),
    ("set_backend_none", lambda: fv.set_backend(None), ValueError, ["backend"]),
    ("use_backend_unknown", lambda: fv.use_backend("jax").__enter__(), ValueError,
     ["backend", "jax"]),
    # --- iwae_log_likelihood(log_px (K, B), z (K, B, *event), mu, logvar)
    ("iwae_z_no_samples", lambda: fv.iwae_log_likelihood(t(2, 3), t(0, 3, 4), a, b), ValueError,
     ["z", "K"]),
    ("iwae_z_event", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 5), a, b), ValueError,
     ["z", "mu"]),
    ("iwae_log_px_shape", lambda: fv.iwae_log_likelihood(t(3, 2), t(2, 3, 4), a, b), ValueError,
     ["log_px_given_z"]),
    ("iwae_logvar_shape", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 4), a, t(2, 4)),
     ValueError, ["logvar", "mu"]),
    ("iwae_0d", lambda: fv.iwae_log_likelihood(t(2, 1), t(2, 1), scalar, scalar), ValueError,
     ["mu"]),
    ("iwae_log_px_device", lambda: fv.iwae_log_likelihood(t(2, 3, device="meta"), t(2, 3, 4),
                                                          a, b), ValueError, ["log_px_given_z"]),
    ("iwae_logvar_device", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 4), a, meta),
     ValueError, ["logvar"]),
    ("iwae_z_dtype", lambda: fv.iwae_log_likelihood(t(2, 3), t(2, 3, 4, dtype=torch.float64),
                                                    a, b), TypeError, ["z", "mu"]),
    ("iwae_int_log_px", lambda: fv.iwae_log_likelihood(torch.ones(2, 3, dtype=torch.int64),
                                                       t(2, 3, 4), a, b), TypeError,
     ["log_px_given_z"]),
    ("iwae_list_z", lambda: fv.iwae_log_likelihood(t(2, 3), [[0.0]], a, b), TypeError, ["z"]),
    # --- the discretized mixture of logistics: params (2, 20, 4, 4) holds M = 2 components of
    # x (2, 3, 4, 4)
    ("dmol_mixtures", lambda: fv.discretized_mix_logistic_nll(P3, X3, n_mixtures=3), ValueError,
     ["params", "n_mixtures", "30"]),
    ("dmol_spatial", lambda: fv.discretized_mix_logistic_nll(P3[:, :, :2], X3, n_mixtures=2),
     ValueError, ["params"]),
    ("dmol_batch", lambda: fv.discretized_mix_logistic_nll(P3[:1], X3, n_mixtures=2),
     ValueError, ["params"]),
    ("dmol_channels", lambda: fv.discretized_mix_logistic_nll(t(2, 14, 4), t(2, 2, 4),
                                                              n_mixtures=2), ValueError, ["x"]),
    ("dmol_no_channels", lambda: fv.discretized_mix_logistic_nll(P3[:, 0], X3[:, 0, 0],
                                                                 n_mixtures=2), ValueError, ["x"]),
    ("dmol_zero_mixtures", lambda: fv.discretized_mix_logistic_nll(P3, X3, n_mixtures=0),
     ValueError, ["n_mixtures"]),
    ("dmol_one_bin", lambda: fv.discretized_mix_logistic_nll(P3, X3, n_mixtures=2, n_bins=1),
     ValueError, ["n_bins"]),
    ("dmol_float_mixtures", lambda: fv.discretized_mix_logistic_nll(P3, X3, n_mixtures=2.0),
     TypeError, ["n_mixtures"]),
    ("dmol_bool_bins",
     lambda: fv.discretized_mix_logistic_nll(P3, X3, n_mixtures=2, n_bins=True), TypeError,
     ["n_bins"]),
    ("dmol_int_params", lambda: fv.discretized_mix_logistic_nll(P3.long(), X3, n_mixtures=2),
     TypeError, ["params"]),
    ("dmol_uint8_x",
     lambda: fv.discretized_mix_logistic_nll(P3, X3.to(torch.uint8), n_mixtures=2), TypeError,
     ["x"]),
    ("dmol_device", lambda: fv.discretized_mix_logistic_nll(P3, X3.to("meta"), n_mixtures=2),
     ValueError, ["x", "device"]),
    ("dmol_reduction",
     lambda: fv.discretized_mix_logistic_nll(P3, X3, n_mixtures=2, reduction="avg"),
     ValueError, ["reduction"]),
    ("dmol_sample_mixtures",
     lambda: fv.discretized_mix_logistic_sample(P3, n_mixtures=3), ValueError, ["params"]),
    ("dmol_sample_float_bins",
     lambda: fv.discretized_mix_logistic_sample(P3, n_mixtures=2, n_bins=2.5), TypeError,
     ["n_bins"]),
    # --- nearest_code
    ("nearest_code_dim", lambda: fv.nearest_code(t(3, 4), t(5, 3)), ValueError,
     ["x", "codebook"]),
    ("nearest_code_codebook_3d", lambda: fv.nearest_code(t(3, 4), t(2, 5, 4)), ValueError,
     ["codebook"]),
    ("nearest_code_x_0d", lambda: fv.nearest_code(scalar, t(5, 1)), ValueError, ["x"]),
    ("nearest_code_empty_codebook", lambda: fv.nearest_code(t(3, 4), t(0, 4)), ValueError,
     ["codebook", "empty"]),
    ("nearest_code_metric", lambda: fv.nearest_code(t(3, 4), t(5, 4), metric="dot"), ValueError,
     ["metric", "cosine"]),
    ("nearest_code_device", lambda: fv.nearest_code(t(3, 4), t(5, 4, device="meta")), ValueError,
     ["codebook", "device"]),
    ("nearest_code_int_x", lambda: fv.nearest_code(i34, t(5, 4)), TypeError, ["x"]),
    ("nearest_code_int_codebook", lambda: fv.nearest_code(t(3, 4), i34), TypeError,
     ["codebook"]),
    ("nearest_code_mixed", lambda: fv.nearest_code(t(3, 4), t(5, 4, dtype=torch.float64)),
     TypeError, ["codebook", "x"]),
    ("nearest_code_list", lambda: fv.nearest_code([[1.0]], t(5, 1)), TypeError, ["x"]),
    # --- finite_scalar_quantize
    ("fsq_dim", lambda: fv.finite_scalar_quantize(t(3, 4), [8, 5, 5]), ValueError, ["z"]),
    ("fsq_level_1", lambda: fv.finite_scalar_quantize(t(3, 2), [1, 5]), ValueError,
     ["levels"]),
    ("fsq_level_2", lambda: fv.finite_scalar_quantize(t(3, 2), [2, 5]), ValueError,
     ["levels", "preserve_symmetry"]),
    ("fsq_too_many_codes", lambda: fv.finite_scalar_quantize(t(3, 4), [2**16] * 4), ValueError,
     ["levels"]),
    ("fsq_int_z", lambda: fv.finite_scalar_quantize(i34, [8, 5, 5, 5]), TypeError, ["z"]),
    ("fsq_float_level", lambda: fv.finite_scalar_quantize(t(3, 2), [8.0, 5]), TypeError,
     ["levels"]),
    # --- the loss modules check at construction
    ("module_reduction", lambda: fv.BernoulliNLLLoss(reduction="avg"), ValueError,
     ["reduction"]),
    ("module_kl_free_bits_none", lambda: fv.GaussianKLLoss(reduction="none", free_bits=1.0),
     ValueError, ["free_bits"]),
    ("module_nll_logvar", lambda: fv.GaussianNLLLoss(logvar="x"), TypeError, ["logvar"]),
    ("module_forward_shape", lambda: fv.GaussianNLLLoss()(a, t(3, 5)), ValueError, ["target"]),
    ("module_kl_forward_dtype", lambda: fv.GaussianKLLoss()(a, i34), TypeError, ["logvar"]),
    ("module_bernoulli_forward_device", lambda: fv.BernoulliNLLLoss()(a, meta), ValueError,
     ["target"]),
    ("module_kl_free_bits_type", lambda: fv.GaussianKLLoss(free_bits="1"), TypeError,
     ["free_bits"]),
]


@pytest.mark.parametrize(("call", "error", "words"),
                         [pytest.param(c, e, w, id=i) for i, c, e, w in BAD_INPUTS])
def test_bad_input(call, error, words, spy):
    """The right exception, a message naming the argument, and nothing else: no kernel ran,
    torch's generator was not consumed, the backend choice did not change."""
    rng, backend, scopes = torch.get_rng_state(), fv.get_backend(), list(_backend._scopes)
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = missing_names(message, words)
    assert not missing, f"the message {message!r} does not name {missing}"
    assert spy == [], f"a kernel ran before the error: {spy}"
    assert torch.equal(torch.get_rng_state(), rng), "torch's generator was consumed"
    assert fv.get_backend() == backend
    assert _backend._scopes == scopes


def test_bad_input_table_is_complete():
    """Every public function appears in the table with each kind of error it can raise."""
    ids = [i for i, *_ in BAD_INPUTS]
    assert len(ids) == len(set(ids))
    for op in ("kl", "bernoulli", "gaussian_nll", "reparameterize", "sample_and_kl", "vae",
               "iwae", "continuous_bernoulli", "dmol", "nearest_code", "fsq"):
        kinds = {e for i, _, e, _ in BAD_INPUTS if i.startswith(op)}
        assert kinds == {ValueError, TypeError}, f"{op}: {kinds}"
