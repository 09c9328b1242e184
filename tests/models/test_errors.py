"""Bad input to the model API (building a VAE, using one): the right exception, with a message
naming the culprit."""

from __future__ import annotations

import re

import pytest
import torch

from fastvae.models.vae import VAE, build_vae, mlp_decoder, mlp_encoder

torch.manual_seed(0)
MODEL = build_vae([4], 2, hidden=[8])
X = torch.rand(3, 4)

# (id, call, exception type, words the message must contain)
BAD_CALLS = [
    # --- building a model
    ("build_arch", lambda: build_vae([4], 2, arch="rnn"), ValueError, ["arch", "'rnn'"]),
    ("build_conv_flat", lambda: build_vae([4], 2, arch="conv"), ValueError, ["conv"]),
    ("build_likelihood", lambda: build_vae([4], 2, likelihood="poisson"), ValueError,
     ["likelihood", "'poisson'"]),
    ("build_logvar_limit_zero", lambda: build_vae([4], 2, logvar_limit=0.0), ValueError,
     ["logvar_limit"]),
    ("build_logvar_limit_nan", lambda: build_vae([4], 2, logvar_limit=float("nan")),
     ValueError, ["logvar_limit"]),
    ("vae_likelihood", lambda: VAE(mlp_encoder([4], 2), mlp_decoder(2, [4]), 2,
                                     likelihood="gamma"), ValueError, ["likelihood"]),
    # --- using one
    ("interpolate_method", lambda: MODEL.interpolate(X, X, method="cubic"), ValueError,
     ["method", "'cubic'"]),
    ("interpolate_steps", lambda: MODEL.interpolate(X, X, steps=1), ValueError, ["steps"]),
    ("interpolate_shapes", lambda: MODEL.interpolate(X, X[:2]), ValueError, ["x1", "x2"]),
    ("log_likelihood_samples", lambda: MODEL.log_likelihood(X, n_samples=0), ValueError,
     ["n_samples"]),
    ("log_likelihood_chunk", lambda: MODEL.log_likelihood(X, chunk_size=0), ValueError,
     ["chunk_size"]),
    ("forward_reduction", lambda: MODEL(X, reduction="avg"), ValueError, ["reduction"]),
    ("forward_free_bits", lambda: MODEL(X, free_bits=-1.0), ValueError, ["free_bits"]),
]


@pytest.mark.parametrize(("call", "error", "words"),
                         [pytest.param(c, e, w, id=i) for i, c, e, w in BAD_CALLS])
def test_bad_model_input(call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [w for w in words if not re.search(re.escape(w), message)]
    assert not missing, f"{message!r} does not name {missing}"
