"""``fastvae train --quantizer rvq|fsq|lfq`` on the digits: the files and the metrics columns
(per level for the residual VQ), ``eval`` equal to the trainer's final numbers, ``sample`` and
``reconstruct`` on the checkpoint, and options given to a quantizer that does not take them."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from helpers import assert_checkpoint_reproduces_run, assert_pngs

import fastvae as fv
from fastvae.cli import main

TINY = {
    "rvq": ["--codebook-size", "8", "--codebook-dim", "4", "--num-quantizers", "2"],
    "fsq": ["--levels", "5,4,3"],
    "lfq": ["--codebook-size", "16", "--entropy-weight", "0.05"],
}
FILES = {"checkpoint.safetensors", "metrics.csv", "metrics.json", "samples.png",
         "reconstructions.png", "code_usage.png", "loss_curve.png"}
COMMON = {"epoch", "step", "train_loss", "train_nll", "train_vq_loss", "val_loss", "val_nll",
          "val_commitment_loss", "val_codebook_loss", "restarts", "skipped_steps", "seconds",
          "lr"}
CODEBOOK = {"usage", "perplexity", "val_usage", "val_perplexity"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two epochs of a tiny VQ-VAE of each kind on the digits, with its pictures."""
    out = {}
    for kind, options in TINY.items():
        out[kind] = tmp_path_factory.mktemp(kind)
        assert main(["train", "--quantizer", kind, *options, "--hidden", "16", "--epochs", "2",
                     "--seed", "3", "--out", str(out[kind]), "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("kind", TINY)
def test_train_writes_the_files_and_the_codebook_columns(runs, kind):
    run = runs[kind]
    assert {p.name for p in run.iterdir()} == FILES
    assert_pngs(run, FILES - {"checkpoint.safetensors", "metrics.csv", "metrics.json"})
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    levels = 2 if kind == "rvq" else 1
    codebook = ({f"{c}_l{i}" for c in CODEBOOK for i in range(levels)} if levels > 1
                else CODEBOOK)
    assert set(rows[0]) == COMMON | codebook
    K = {"rvq": 8, "fsq": 60, "lfq": 16}[kind]
    for r in rows:
        for column in codebook:
            value = float(r[column])
            if "usage" in column:
                assert 0 < value <= 1, column
            else:
                assert 1 <= value <= K, column
        assert float(r["val_loss"]) >= float(r["val_nll"])
    metrics = json.loads((run / "metrics.json").read_text())
    config, final = metrics["model_config"], metrics["final"]
    assert (config["kind"], config["quantizer"], config["codebook_size"]) == ("vqvae", kind, K)
    assert config["codebook_dim"] == {"rvq": 4, "fsq": 3, "lfq": 4}[kind]
    assert final["num_levels"] == levels
    assert final["loss"] == pytest.approx(final["nll"] + final["vq_loss"])
    # the final metrics are the last epoch's validation metrics
    assert final["nll"] == pytest.approx(float(rows[-1]["val_nll"]))
    last = [float(rows[-1][f"val_usage_l{i}"]) for i in range(levels)] if levels > 1 else \
        float(rows[-1]["val_usage"])
    assert final["usage"] == pytest.approx(last)


def test_the_learning_rate_is_the_common_one_for_the_others(runs):
    for kind, run in runs.items():
        lr = json.loads((run / "metrics.json").read_text())["train_config"]["lr"]
        assert lr == (1e-3 if kind == "fsq" else 2e-3), kind


@pytest.mark.parametrize("kind", TINY)
def test_eval_sample_reconstruct_on_each_checkpoint(runs, kind, tmp_path, capsys):
    run = runs[kind]
    ckpt = str(run / "checkpoint.safetensors")
    model = fv.load_vae(ckpt)
    assert isinstance(model, fv.VQVAE)
    assert model.build_config["quantizer"] == kind
    capsys.readouterr()
    assert_checkpoint_reproduces_run(run, tmp_path, (
        "loss", "nll", "vq_loss", "commitment_loss", "codebook_loss", "usage", "codes_used",
        "perplexity", "num_levels"))
    printed = capsys.readouterr().out
    assert "codebook usage" in printed
    assert ("level 1:" in printed) == (kind == "rvq")
    assert main(["sample", ckpt, "--prior", "uniform", "--out", str(tmp_path / "u.png")]) == 0
    assert main(["interpolate", ckpt, "--out", str(tmp_path / "i.png"), "--no-progress"]) == 2
    assert "VQ-VAE" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "words"), [
    (["--quantizer", "vq", "--levels", "3,3"], ["--levels", "--quantizer vq"]),
    (["--quantizer", "fsq", "--codebook-size", "9", "--decay", "0.5"],
     ["--codebook-size", "--decay", "--quantizer fsq", "--levels"]),
    (["--quantizer", "lfq", "--num-quantizers", "2", "--dead-code-threshold", "1"],
     ["--num-quantizers", "--dead-code-threshold", "--quantizer lfq", "--entropy-weight"]),
    (["--quantizer", "rvq", "--entropy-weight", "0.1"], ["--entropy-weight", "--quantizer rvq"]),
    (["--num-quantizers", "2"], ["--num-quantizers", "add --quantizer"]),
    (["--quantizer", "lfq", "--codebook-size", "12"], ["power of 2"]),
    (["--quantizer", "fsq", "--levels", "4,1"], ["--levels"]),
])
def test_options_of_another_quantizer_are_refused(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", *argv, "--epochs", "1", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not out.exists()


def test_levels_are_parsed(tmp_path):
    out = tmp_path / "out"
    assert main(["train", "--quantizer", "fsq", "--levels", "8,5,5,5", "--hidden", "8",
                 "--epochs", "1", "--out", str(out), "--no-progress", "--no-images"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = metrics["model_config"]
    assert (config["levels"], config["codebook_size"], config["codebook_dim"]) == \
        ([8, 5, 5, 5], 1000, 4)
    assert metrics["train_config"]["lr"] == 1e-3  # FSQ's default learning rate
    model = fv.load_vae(out / "checkpoint.safetensors")
    assert model.encode_indices(torch.rand(2, 1, 8, 8)).shape == (2, 4)
