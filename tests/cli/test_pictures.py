"""Latent traversals and the per-dimension KL chart: exact against a model whose decoder is the
identity, and written by ``fastvae train`` beside the other pictures."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

from fastvae.cli import main
from fastvae.models.vae import VAE
from fastvae.training import images


class _Identity(nn.Module):
    """encoder: x (B, 1, 1, D) -> (mu = x, logvar = 0); decoder: z (B, D) -> (B, 1, 1, D)."""

    def __init__(self, encode: bool):
        super().__init__()
        self.encode = encode
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, t):
        if self.encode:
            flat = t.flatten(1) * self.scale
            return flat, torch.zeros_like(flat)
        return (t * self.scale).reshape(t.shape[0], 1, 1, -1)


def _identity_vae(d: int) -> VAE:
    return VAE(_Identity(True), _Identity(False), d, likelihood="gaussian", obs_logvar=-4.0)


@pytest.mark.parametrize("d", [1, 3, 6])
def test_traversal_rows_sweep_one_dimension_around_the_posterior_mean(d):
    model = _identity_vae(d)
    x = torch.rand(1, 1, d) - 0.5
    grid = images.latent_traversal(model, x)
    values = torch.linspace(-3, 3, 9)
    assert grid.shape == (d, 9, 1, 1, d)
    for dim in range(d):
        for j, v in enumerate(values):
            want = x.flatten().clone()
            want[dim] = v
            torch.testing.assert_close(grid[dim, j].flatten(), want, rtol=0, atol=0)
    custom = images.latent_traversal(model, x[None], values=[-1.0, 2.0])
    assert custom.shape == (d, 2, 1, 1, d)
    with pytest.raises(ValueError, match="one image"):
        images.latent_traversal(model, torch.rand(2, 1, 1, d))


def test_traversal_and_kl_pngs(tmp_path):
    model = _identity_vae(5)
    data = torch.rand(40, 1, 1, 5)
    data[:, 0, 0, 3] = 0.2  # dimension 3's posterior mean never moves: an inactive unit
    path = images.save_traversals(model, data[0], tmp_path / "t.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        # 5 rows (one per dimension) of 9 images of 1x5 pixels, 1-pixel gaps, scaled up
        assert image.width * (5 * 2 + 1) == image.height * (9 * 6 + 1)
    path = images.save_kl_bars(model, data, tmp_path / "kl.png")
    with Image.open(path) as image:
        image.verify()


def test_cli_writes_traversals_and_kl_chart(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--hidden", "16", "--latent-dim", "4",
                 "--iwae-samples", "0", "--no-progress", "--out", str(out)]) == 0
    assert "traversals.png" in capsys.readouterr().out
    with Image.open(out / "traversals.png") as image:
        image.verify()
    with Image.open(out / "traversals.png") as image:
        # 4 rows of 9 digits of 8x8 pixels with 1-pixel gaps, scaled by one integer factor
        rows, cols = 4 * 9 + 1, 9 * 9 + 1
        assert image.width * rows == image.height * cols
    with Image.open(out / "kl_per_dimension.png") as image:
        image.verify()
    assert len(json.loads((out / "metrics.json").read_text())["final"]["kl_per_dim"]) == 4
