"""The ``fastvae`` command line end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvae.cli import main

EXPECTED_FILES = {"checkpoint.safetensors", "metrics.csv", "metrics.json", "samples.png",
                  "reconstructions.png", "interpolations.png", "loss_curve.png"}


def test_train_writes_every_file(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--epochs", "2", "--out", str(out), "--iwae-samples", "20",
                 "--no-progress", "--hidden", "32"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "digits: 1617 train / 180 validation" in printed
    assert "IWAE log p(x) (K=20)" in printed
    assert {p.name for p in out.iterdir()} >= EXPECTED_FILES
    for name in ("samples.png", "reconstructions.png", "interpolations.png", "loss_curve.png"):
        with Image.open(out / name) as image:
            image.verify()
            assert image.format == "PNG"
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert final["iwae_log_likelihood"] >= final["elbo"] - 0.5
    assert len(final["kl_per_dim"]) == 8
    assert metrics["model_config"]["input_shape"] == [1, 8, 8]


def test_train_on_npz_and_idx(tmp_path):
    rng = np.random.default_rng(0)
    images = (rng.random((40, 6, 5)) * 255).astype(np.uint8)
    np.savez(tmp_path / "toy.npz", x=images)
    idx = tmp_path / "toy-idx3-ubyte"
    idx.write_bytes(bytes([0, 0, 8, 3]) + np.array([40, 6, 5], ">u4").tobytes()
                    + images.tobytes())
    for i, source in enumerate((tmp_path / "toy.npz", idx)):
        out = tmp_path / f"out{i}"
        assert main(["train", "--data", str(source), "--epochs", "1", "--out", str(out),
                     "--iwae-samples", "0", "--no-progress", "--no-images"]) == 0
        assert json.loads((out / "metrics.json").read_text())["model_config"]["input_shape"] \
            == [1, 6, 5]


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--epochs", "0"], "--epochs: must be >= 1"),
    (["train", "--data", "/nonexistent/x.npz"], "no such data file"),
    (["train", "--data", "{bad_npz}"], "cannot read"),
    (["train", "--data", "{bad_idx}"], "not an IDX file"),
    (["train", "--device", "cuda"] if not __import__("torch").cuda.is_available()
     else ["train", "--device", "tpu"], "--device"),
    (["train", "--backend", "bogus"], "unknown backend 'bogus'"),
    (["train", "--likelihood", "poisson"], "invalid choice: 'poisson'"),
    (["train", "--hidden", "a,b"], "comma-separated integers"),
    (["train", "--val-fraction", "1.5"], "--val-fraction"),
    (["train", "--resume", "{bad_ckpt}", "--epochs", "1"], "--resume"),
    (["train", "--cuda-graphs", "--device", "cpu"],
     "--cuda-graphs needs a CUDA device (--device cuda); this run is on cpu"),
    (["train", "--cuda-graphs", "--compile", "--device", "cpu"],
     "--cuda-graphs and --compile cannot be combined"),
    (["train", "--cuda-graphs", "--quantizer", "vq", "--device", "cpu"],
     "--cuda-graphs applies to a VAE, not a VQ-VAE (--quantizer vq)"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "required: command"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 garbage")
    (tmp_path / "bad-idx").write_bytes(b"\x01\x02\x03\x04\x05")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    subst = {"{bad_npz}": str(tmp_path / "bad.npz"), "{bad_idx}": str(tmp_path / "bad-idx"),
             "{bad_ckpt}": str(tmp_path / "bad.safetensors")}
    argv = [subst.get(a, a) for a in argv] + (["--out", str(tmp_path / "o"), "--no-progress"]
                                              if argv[:1] == ["train"] else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("fastvae")
    assert message in err


def test_cuda_graphs_without_a_full_batch_exits_2(tmp_path, capsys, monkeypatch):
    """--cuda-graphs with a training split smaller than one batch: no step would be captured.
    (The device check, which refuses the CPU first, is bypassed to reach it here.)"""
    from fastvae.cli import train as cli_train

    monkeypatch.setattr(cli_train, "_check_cuda_graphs", lambda args, device, world: None)
    out = tmp_path / "o"
    assert main(["train", "--cuda-graphs", "--batch-size", "5000", "--out", str(out),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert ("--cuda-graphs: the training split has 1617 images, fewer than one batch "
            "(--batch-size 5000)") in err
    assert not out.exists()


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "torch " in printed
    assert "backends:" in printed
    assert "usable" in printed


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "fastvae", "info"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fastvae ")


@pytest.mark.slow
def test_torchrun_trains_with_ddp_on_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fastvae", "train", "--epochs", "2", "--out", str(out), "--iwae-samples", "10",
         "--no-progress", "--no-images", "--hidden", "32"],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes" in result.stdout
    assert result.stdout.count("final (validation") == 1  # rank 0 reports and writes
    assert {p.name for p in Path(out).iterdir()} == {"checkpoint.safetensors", "metrics.csv",
                                                     "metrics.json"}
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert len(history) == 2
    assert history[-1]["val_elbo"] > history[0]["val_elbo"] - 1.0


def test_train_with_the_dmol_likelihood(tmp_path, capsys):
    """``--likelihood dmol`` on the digits: 17 bins (their levels 0..16), M mixtures."""
    out = tmp_path / "run"
    code = main(["train", "--epochs", "1", "--out", str(out), "--iwae-samples", "10",
                 "--no-progress", "--hidden", "32", "--likelihood", "dmol", "--mixtures", "3"])
    assert code == 0
    assert "dmol likelihood" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= EXPECTED_FILES
    config = json.loads((out / "metrics.json").read_text())["model_config"]
    assert (config["n_mixtures"], config["n_bins"]) == (3, 17)
