"""``fastvae train --likelihood dmol`` (and ``fastvae.train``) refuse data off the grid of
``--bins`` levels before training: unquantized floats, the digits (17
levels) at 256 bins, 8-bit images at 17 bins. The message names ``--bins`` (``n_bins`` in
Python) and the data; nothing is trained or written. Data on the grid passes the check."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastvae.cli import main
from fastvae.training import data as data_io
from fastvae.training.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dmol_data")
    rng = np.random.default_rng(0)
    np.savez(d / "unquantized.npz", x=rng.random((20, 6, 6)).astype(np.float32))
    np.savez(d / "bytes.npz", x=rng.integers(0, 256, (20, 6, 6)).astype(np.uint8))
    np.savez(d / "tenth_off.npz", x=(rng.integers(0, 255, (20, 6, 6)) + 0.1) / 255)
    return d


@pytest.mark.parametrize(("data", "bins"), [("unquantized.npz", None), ("unquantized.npz", "17"),
                                            ("tenth_off.npz", None), ("bytes.npz", "17"),
                                            ("digits", "256")])
def test_train_refuses_data_off_the_grid(files, tmp_path, capsys, monkeypatch, data, bins):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--likelihood", "dmol", "--mixtures", "2", "--epochs", "1",
            "--no-progress", "--no-images", "--iwae-samples", "0", "--out", str(tmp_path / "out")]
    argv += ["--data", data if data == "digits" else str(files / data)]
    if bins is not None:
        argv += ["--bins", bins]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert "--bins" in err
    assert data.removesuffix(".npz") in err
    assert "off it" in err
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())


def test_python_train_refuses_data_off_the_grid():
    x = torch.rand(8, 1, 2, 2)
    model = {"input_shape": [1, 2, 2], "latent_dim": 2, "hidden": [4], "likelihood": "dmol",
             "n_mixtures": 2, "n_bins": 256}
    with pytest.raises(data_io.DataError, match=r"train_data: .*n_bins 256"):
        train(model, x, x, TrainConfig(epochs=1, iwae_samples=0), progress=False)


@pytest.mark.parametrize(("n_bins", "images"), [
    (256, torch.arange(256, dtype=torch.uint8).float() / 255),  # 8-bit pixels as float32
    (17, torch.arange(17).double() / 16),
    (2, torch.tensor([0.0, 1.0])),
    (256, (torch.arange(256, dtype=torch.uint8).float() / 255).bfloat16()),
])
def test_data_on_the_grid_passes(n_bins, images):
    data_io.check_grid(images, n_bins, "data")
