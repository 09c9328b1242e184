"""``fv.build_vae(..., quantizer="vq", codebook_size=K)``: the VQ-VAE of ``build_vqvae``, its
rules, and its checkpoint recorded as a VQ-VAE by the trainer."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv
from fastvae.training import checkpoint


def test_build_vae_with_a_quantizer_is_build_vqvae():
    torch.manual_seed(0)
    model = fv.build_vae((1, 8, 8), 4, quantizer="vq", codebook_size=32, hidden=[16],
                         num_tokens=2, decay=0.8)
    torch.manual_seed(0)
    same = fv.build_vqvae((1, 8, 8), 32, codebook_dim=4, hidden=[16], num_tokens=2, decay=0.8)
    assert isinstance(model, fv.VQVAE)
    assert model.build_config == same.build_config
    assert model.latent_shape == (4, 2)
    state, other = model.state_dict(), same.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)
    assert isinstance(fv.build_vae((1, 8, 8), 4), fv.VAE)
    assert fv.build_vae((1, 8, 8), 4, hidden=[8]).build_config["hidden"] == [8]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"codebook_size": 8}, ["codebook_size", "quantizer='vq'"]),
    ({"quantizer": "pq", "codebook_size": 8}, ["quantizer", "'pq'", "'rvq'"]),
    ({"quantizer": "fsq"}, ["levels", "'fsq'"]),
    ({"quantizer": "vq"}, ["codebook_size"]),
    ({"quantizer": "vq", "codebook_size": 8, "beta": 2.0, "free_bits": 1.0},
     ["beta", "free_bits", "KL"]),
    ({"quantizer": "vq", "codebook_size": 0}, ["codebook_size"]),
])
def test_build_vae_quantizer_rules(kwargs, words):
    with pytest.raises(ValueError, match=words[0]) as info:
        fv.build_vae((1, 8, 8), 4, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)


def test_unknown_options_are_type_errors():
    with pytest.raises(TypeError, match="bogus"):
        fv.build_vae((1, 8, 8), 4, quantizer="vq", codebook_size=8, bogus=1)
    with pytest.raises(TypeError, match="num_tokens"):  # a VQ option without quantizer="vq"
        fv.build_vae((1, 8, 8), 4, num_tokens=2)


def test_the_trainer_records_it_as_a_vqvae(tmp_path):
    x = torch.rand(20, 1, 4, 4)
    config = {"input_shape": [1, 4, 4], "latent_dim": 2, "hidden": [8], "quantizer": "vq",
              "codebook_size": 4}
    result = fv.train(config, x[:16], x[16:], fv.TrainConfig(epochs=1, batch_size=8),
                      out_dir=tmp_path, progress=False)
    assert isinstance(result.model, fv.VQVAE)
    saved = checkpoint.load(tmp_path / "checkpoint.safetensors").model_config
    assert saved["kind"] == "vqvae"
    assert (saved["codebook_size"], saved["codebook_dim"]) == (4, 2)
    assert isinstance(fv.load_vae(tmp_path / "checkpoint.safetensors"), fv.VQVAE)
    assert set(result.final) >= {"nll", "usage", "perplexity", "codes_used"}
