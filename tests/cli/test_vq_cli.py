"""``fastvae train --quantizer vq`` end to end: the files, the metrics, the checkpoint that
``eval``, ``sample``, ``reconstruct`` and ``fastvae.load_vae`` read, resume, user data and
``torchrun``."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_checkpoint_reproduces_run, assert_pngs

import fastvae as fv
from fastvae.cli import main
from fastvae.training import checkpoint

TINY = ["--quantizer", "vq", "--hidden", "16", "--codebook-size", "16", "--codebook-dim", "4",
        "--no-progress"]
FILES = {"checkpoint.safetensors", "metrics.csv", "metrics.json", "samples.png",
         "reconstructions.png", "code_usage.png", "loss_curve.png"}
VQ_COLUMNS = {"epoch", "step", "train_loss", "train_nll", "train_vq_loss", "val_loss", "val_nll",
              "val_commitment_loss", "val_codebook_loss", "val_usage", "val_perplexity",
              "usage", "perplexity", "restarts", "skipped_steps", "seconds", "lr"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two epochs of a tiny VQ-VAE on the digits, with its pictures."""
    out = tmp_path_factory.mktemp("vq")
    assert main(["train", *TINY, "--epochs", "2", "--seed", "5", "--out", str(out)]) == 0
    return out


def test_train_writes_the_vq_files_and_metrics(run):
    assert {p.name for p in run.iterdir()} == FILES  # no interpolations, traversals, KL bars
    assert_pngs(run, FILES - {"checkpoint.safetensors", "metrics.csv", "metrics.json"})
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == VQ_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for r in rows:
        assert 0 < float(r["usage"]) <= 1
        assert 0 < float(r["val_usage"]) <= 1
        assert 1 <= float(r["perplexity"]) <= 16
        assert 1 <= float(r["val_perplexity"]) <= 16
        assert int(r["restarts"]) >= 0
        assert float(r["val_loss"]) == pytest.approx(float(r["val_nll"])
                                                     + float(r["val_commitment_loss"]))
    metrics = json.loads((run / "metrics.json").read_text())
    config = metrics["model_config"]
    assert (config["kind"], config["codebook_size"], config["codebook_dim"]) == ("vqvae", 16, 4)
    final = metrics["final"]
    assert final["codes_used"] == round(final["usage"] * 16)
    assert "iwae_log_likelihood" not in final
    assert "elbo" not in final
    # the final metrics are the last epoch's validation metrics
    assert final["nll"] == pytest.approx(float(rows[-1]["val_nll"]))
    assert final["usage"] == pytest.approx(float(rows[-1]["val_usage"]))


def test_the_checkpoint_is_a_vqvae(run):
    model = fv.load_vae(run / "checkpoint.safetensors")
    assert isinstance(model, fv.VQVAE)
    assert not model.training
    assert model.codebook_size == 16
    x = torch.rand(3, 1, 8, 8)
    assert model.encode_indices(x).shape == (3, 4)
    # save_vae / load_vae round trip, the kind recorded
    path = run.parent / "copy.safetensors"
    fv.save_vae(model, path)
    assert checkpoint.load(path).model_config["kind"] == "vqvae"
    again = fv.load_vae(path)
    assert torch.equal(again.reconstruct(x), model.reconstruct(x))
    assert torch.equal(again.quantizer.usage_total, model.quantizer.usage_total)


def test_eval_sample_reconstruct_on_the_checkpoint(run, tmp_path, capsys):
    ckpt = str(run / "checkpoint.safetensors")
    capsys.readouterr()
    got = assert_checkpoint_reproduces_run(run, tmp_path, (
        "loss", "nll", "commitment_loss", "codebook_loss", "usage", "codes_used", "perplexity"))
    printed = capsys.readouterr().out
    assert "codebook usage" in printed
    assert "perplexity" in printed
    assert "IWAE" not in printed
    assert got["kind"] == "VQ-VAE"
    # the uniform prior: other codes, another picture; an untrained VQ-VAE samples it too
    assert main(["sample", ckpt, "--prior", "uniform", "--out", str(tmp_path / "u.png")]) == 0
    assert (tmp_path / "u.png").read_bytes() != (run / "samples.png").read_bytes()
    assert main(["sample", ckpt, "--prior", "empirical", "--out", str(tmp_path / "e.png")]) == 0
    assert (tmp_path / "e.png").read_bytes() == (run / "samples.png").read_bytes()
    assert main(["interpolate", ckpt, "--out", str(tmp_path / "i.png"), "--no-progress"]) == 2
    assert "VQ-VAE" in capsys.readouterr().err
    assert not (tmp_path / "i.png").exists()


def test_resume_equals_an_uninterrupted_run(run, tmp_path):
    first = tmp_path / "first"
    assert main(["train", *TINY, "--epochs", "1", "--seed", "5", "--out", str(first),
                 "--no-images"]) == 0
    second = tmp_path / "second"
    assert main(["train", *TINY, "--epochs", "2", "--seed", "5", "--out", str(second),
                 "--no-images", "--resume", str(first / "checkpoint.safetensors")]) == 0
    resumed = json.loads((second / "metrics.json").read_text())
    straight = json.loads((run / "metrics.json").read_text())
    assert resumed["resumed"]["epoch"] == 1
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
            {k: v for k, v in b.items() if k != "seconds"}
    a = checkpoint.load(second / "checkpoint.safetensors").model_state
    b = checkpoint.load(run / "checkpoint.safetensors").model_state
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_on_user_data_with_conv_and_a_learned_codebook(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "toy.npz", x=(rng.random((40, 6, 5)) * 255).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["train", "--data", str(tmp_path / "toy.npz"), "--quantizer", "vq",
                 "--arch", "conv", "--hidden", "4,8", "--codebook-size", "8", "--decay", "0",
                 "--codebook-dim", "3", "--epochs", "1", "--out", str(out), "--no-progress",
                 "--no-images"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model_config"]["decay"] is None  # --decay 0: the codebook is learned
    model = fv.load_vae(out / "checkpoint.safetensors")
    assert isinstance(model.quantizer.codebook, torch.nn.Parameter)
    assert model.latent_shape == (3, 2, 2)
    assert metrics["final"]["loss"] == pytest.approx(metrics["final"]["nll"]
                                                     + metrics["final"]["commitment_loss"]
                                                     + metrics["final"]["codebook_loss"])


@pytest.mark.slow
def test_torchrun_trains_a_vqvae_with_ddp(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastvae", "train", *TINY, "--epochs", "2", "--out", str(out), "--no-images"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes" in result.stdout
    assert result.stdout.count("final (validation") == 1
    assert {p.name for p in Path(out).iterdir()} == {"checkpoint.safetensors", "metrics.csv",
                                                     "metrics.json"}
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 2
    assert all(0 < h["usage"] <= 1 for h in history)
