"""fv.VQVAE / fv.build_vqvae: shapes, the loss and its gradients, indices round trips, the code
priors, a short training run on the digits, and argument errors."""

from __future__ import annotations

import pytest
import torch

import fastvae as fv


@pytest.mark.parametrize(("arch", "spatial"), [("mlp", (4,)), ("conv", (2, 2))])
def test_shapes_loss_and_gradients(arch, spatial):
    torch.manual_seed(0)
    m = fv.build_vqvae((1, 8, 8), 16, codebook_dim=6, num_tokens=4, arch=arch,
                       hidden=(32, 32) if arch == "mlp" else (8, 8))
    x = torch.rand(5, 1, 8, 8)
    out = m(x)
    assert out.indices.shape == (5, *spatial)
    assert out.z_e.shape == out.z_q.shape == (5, 6, *spatial)
    assert out.recon.shape == x.shape
    torch.testing.assert_close(out.loss, out.nll + out.vq_loss)
    torch.testing.assert_close(out.nll, fv.bernoulli_nll(out.recon, x))
    out.loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name  # the encoder's through the straight-through
    m.eval()
    idx = m.encode_indices(x)
    torch.testing.assert_close(m.decode_indices(idx), m.decode(m.quantize(m.encode(x)).quantized))
    assert m.reconstruct(x).shape == x.shape
    assert m.reconstruct(x).min() >= 0
    assert m.sample(3, prior="uniform").shape == (3, 1, 8, 8)
    none = m(x, reduction="none")
    assert none.loss.shape == (5,)


def test_empirical_prior_follows_the_usage_histogram():
    m = fv.build_vqvae((1, 8, 8), 8, codebook_dim=4, num_tokens=2, hidden=(16,),
                       kmeans_init=False)
    with pytest.raises(ValueError, match="empirical"):
        m.sample(2)
    m.quantizer.usage_total.zero_()
    m.quantizer.usage_total[3] = 5  # only code 3 was ever used
    calls = []
    m.decode_indices = lambda idx: calls.append(idx) or torch.zeros(idx.shape[0], 1, 8, 8)
    m.sample(4, generator=torch.Generator().manual_seed(0))
    assert calls[0].shape == (4, 2)
    assert (calls[0] == 3).all()
    m.sample(50, prior="uniform", generator=torch.Generator().manual_seed(0))
    assert len(calls[1].unique()) == 8


@pytest.mark.slow
def test_short_training_on_digits_reconstructs_and_uses_the_codebook():
    from fastvae.training import data
    torch.manual_seed(0)
    images = data.load_digits()[:512]
    m = fv.build_vqvae((1, 8, 8), 32, codebook_dim=8, num_tokens=4, hidden=(64, 64))
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = None
    for _ in range(3):
        for i in range(0, len(images), 64):
            out = m(images[i:i + 64])
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            first = float(out.loss.detach()) if first is None else first
    assert float(out.loss.detach()) < 0.7 * first
    assert float(m.quantizer.codebook_usage()) > 0.5
    m.eval()
    error = (m.reconstruct(images[:64]) - images[:64]).square().mean()
    assert error < (images[:64] - images[:64].mean()).square().mean()


def test_argument_errors():
    q = fv.VectorQuantizer(4, 8)
    with pytest.raises(ValueError, match="latent_shape"):
        fv.VQVAE(torch.nn.Identity(), torch.nn.Identity(), q, (5, 2))
    with pytest.raises(TypeError, match="quantizer"):
        fv.VQVAE(torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity(), (4, 2))
    with pytest.raises(ValueError, match="arch"):
        fv.build_vqvae((1, 8, 8), 8, arch="rnn")
    with pytest.raises(ValueError, match="prior"):
        fv.build_vqvae((1, 8, 8), 8).sample(2, prior="gauss")
