"""``fastvae eval``, ``sample``, ``reconstruct`` and ``interpolate`` on a checkpoint of
``fastvae train``: the trainer's final metrics and pictures reproduced exactly from the
checkpoint alone, held-out files, and the dispatch on the kind of model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastvae.cli import evaluate as commands
from fastvae.cli import main
from fastvae.models.vae import build_vae
from fastvae.training import checkpoint, data

TINY = ["--epochs", "1", "--hidden", "16", "--latent-dim", "4", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch run on the digits, with its final IWAE (K = 20) and pictures."""
    out = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--iwae-samples", "20", "--seed", "3", "--out", str(out)]) == 0
    return out


def test_eval_reproduces_the_trainers_final_metrics(run, tmp_path, capsys):
    """Without --data: the checkpoint's own validation split, the training seed, the trainer's
    batch size: the same numbers, to the last bit."""
    capsys.readouterr()
    path = tmp_path / "m.json"
    assert main(["eval", str(run / "checkpoint.safetensors"), "--iwae-samples", "20",
                 "--no-progress", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "IWAE log p(x) (K=20)" in printed
    assert "(validation, 180 images" in printed
    got = json.loads(path.read_text())
    final = json.loads((run / "metrics.json").read_text())["final"]
    for key in ("elbo", "nll", "kl", "iwae_log_likelihood", "active_units", "kl_per_dim",
                "iwae_samples"):
        assert got[key] == final[key], key
    assert (got["data"], got["split"], got["images"], got["seed"]) == ("digits", "validation",
                                                                      180, 3)
    assert got["iwae_bits_per_dim"] == pytest.approx(-final["iwae_log_likelihood"]
                                                     / (64 * math.log(2)))
    # another seed draws other noise: the same metrics up to Monte-Carlo error
    assert main(["eval", str(run / "checkpoint.safetensors"), "--iwae-samples", "20",
                 "--seed", "4", "--no-progress", "--json", str(path)]) == 0
    other = json.loads(path.read_text())
    assert other["iwae_log_likelihood"] != final["iwae_log_likelihood"]
    assert other["iwae_log_likelihood"] == pytest.approx(final["iwae_log_likelihood"], abs=1.0)
    assert other["kl"] == pytest.approx(final["kl"], rel=1e-6)  # analytic: no noise


def test_eval_on_a_held_out_file_and_json_to_stdout(run, tmp_path, capsys):
    digits = data.load_digits()[:50]
    np.savez(tmp_path / "test.npz", x=(digits[:, 0] * 16).round().numpy().astype(np.uint8))
    capsys.readouterr()
    assert main(["eval", str(run / "checkpoint.safetensors"), "--data",
                 str(tmp_path / "test.npz"), "--pixel-max", "16", "--iwae-samples", "30",
                 "--batch-size", "7", "--json", "-", "--no-progress"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["images"] == 50
    assert got["data"] == str(tmp_path / "test.npz")
    # the IWAE bound lies above the ELBO (up to noise) and below 0 (discrete pixels)
    assert got["elbo"] - 1.0 < got["iwae_log_likelihood"] < 0
    assert got["elbo"] == pytest.approx(-(got["nll"] + got["kl"]))
    assert 0 <= got["active_units"] <= 4
    assert len(got["kl_per_dim"]) == 4


def test_eval_writes_beside_the_checkpoint_by_default(tmp_path, run, capsys):
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes((run / "checkpoint.safetensors").read_bytes())
    assert main(["eval", str(ckpt), "--iwae-samples", "0", "--no-progress"]) == 0
    got = json.loads((tmp_path / "eval.json").read_text())
    assert "iwae_log_likelihood" not in got
    assert f"wrote {tmp_path / 'eval.json'}" in capsys.readouterr().out


def test_pictures_are_the_trainers(run, tmp_path):
    """Defaults: the trainer's seed, its 32 validation images, its 8 pairs of 10 steps; the same
    PNG bytes."""
    ckpt = str(run / "checkpoint.safetensors")
    for command, name in (("sample", "samples.png"), ("reconstruct", "reconstructions.png"),
                          ("interpolate", "interpolations.png")):
        out = tmp_path / name
        extra = [] if command == "sample" else ["--no-progress"]
        assert main([command, ckpt, "--out", str(out), *extra]) == 0
        assert out.read_bytes() == (run / name).read_bytes(), name


def test_picture_options(run, tmp_path):
    ckpt = str(run / "checkpoint.safetensors")
    # 10 samples in rows of 5: 2 rows of 8x8 digits with 1-pixel gaps, scaled by one factor
    assert main(["sample", ckpt, "--n", "10", "--ncols", "5", "--seed", "1",
                 "--out", str(tmp_path / "s.jpg")]) == 0
    with Image.open(tmp_path / "s.jpg") as image:
        assert image.format == "JPEG"
        assert image.width * (2 * 9 + 1) == image.height * (5 * 9 + 1)
    assert main(["sample", ckpt, "--n", "10", "--ncols", "5", "--seed", "2",
                 "--out", str(tmp_path / "t.png")]) == 0
    assert main(["sample", ckpt, "--n", "10", "--ncols", "5", "--seed", "1",
                 "--out", str(tmp_path / "u.png")]) == 0
    assert (tmp_path / "t.png").read_bytes() != (tmp_path / "u.png").read_bytes()
    # 3 pairs of 5 slerp steps: 3 rows of 5
    assert main(["interpolate", ckpt, "--pairs", "3", "--steps", "5", "--method", "slerp",
                 "--out", str(tmp_path / "i.png"), "--no-progress"]) == 0
    with Image.open(tmp_path / "i.png") as image:
        assert image.width * (3 * 9 + 1) == image.height * (5 * 9 + 1)
    # 6 images and their reconstructions in rows of 4: 3 rows
    assert main(["reconstruct", ckpt, "--n", "6", "--ncols", "4", "--no-progress",
                 "--out", str(tmp_path / "r.png")]) == 0
    with Image.open(tmp_path / "r.png") as image:
        assert image.width * (3 * 9 + 1) == image.height * (4 * 9 + 1)


def test_log_likelihood_reports_each_chunk():
    torch.manual_seed(0)
    model = build_vae((1, 2, 2), 2, hidden=[4]).eval()
    chunks: list[int] = []
    model.log_likelihood(torch.rand(3, 1, 2, 2), 250, chunk_size=100, on_chunk=chunks.append)
    assert chunks == [100, 100, 50]


def test_commands_dispatch_on_the_kind_of_model(tmp_path, monkeypatch, capsys):
    """A new kind of model is one KINDS entry; a picture it cannot draw is a one-line error."""
    config = {"kind": "toy", "input_shape": [1, 2, 2], "latent_dim": 2, "hidden": [4]}
    ckpt = tmp_path / "toy.safetensors"
    torch.manual_seed(0)
    vae = build_vae((1, 2, 2), 2, hidden=[4])
    checkpoint.save(ckpt, checkpoint.Checkpoint(config, vae.state_dict()))
    np.savez(tmp_path / "x.npz", x=np.full((4, 2, 2), 0.5, np.float32))
    calls = []

    def build(ckpt_, path, device):
        calls.append(("build", path))
        model = build_vae((1, 2, 2), 2, hidden=[4])
        model.load_state_dict(ckpt_.model_state)
        return model.eval()

    def toy_evaluate(model, images, args, seed):
        calls.append(("evaluate", tuple(images.shape), seed))
        return {"score": 1.5}

    toy = commands.ModelKind("toy model", build=build, evaluate=toy_evaluate,
                             summary=lambda m: f"score {m['score']}",
                             input_shape=lambda model: (1, 2, 2))
    monkeypatch.setitem(commands.KINDS, "toy", toy)
    assert main(["eval", str(ckpt), "--data", str(tmp_path / "x.npz"), "--no-progress"]) == 0
    assert calls == [("build", ckpt), ("evaluate", (4, 1, 2, 2), 0)]
    assert "score 1.5" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["kind"] == "toy model"
    assert main(["sample", str(ckpt), "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err
    assert "toy model" in err
    assert "fastvae sample does not apply" in err
    assert not (tmp_path / "s.png").exists()


def test_every_command_reads_a_run_folder_as_its_checkpoint(run, tmp_path, capsys):
    """A training run's --out folder stands for its checkpoint.safetensors in every command
    that reads a checkpoint: the same metrics and the same pictures as the file itself."""
    file = str(run / "checkpoint.safetensors")
    for name, source in (("file", file), ("folder", str(run)), ("slash", f"{run}/")):
        assert main(["eval", source, "--iwae-samples", "3", "--no-progress",
                     "--json", str(tmp_path / f"{name}.json")]) == 0
        assert main(["sample", source, "--n", "4", "--out", str(tmp_path / f"s-{name}.png")]) == 0
        assert main(["reconstruct", source, "--n", "4", "--no-progress",
                     "--out", str(tmp_path / f"r-{name}.png")]) == 0
        assert main(["interpolate", source, "--pairs", "1", "--steps", "3", "--no-progress",
                     "--out", str(tmp_path / f"i-{name}.png")]) == 0
    capsys.readouterr()
    want = json.loads((tmp_path / "file.json").read_text())
    for name in ("folder", "slash"):
        got = json.loads((tmp_path / f"{name}.json").read_text())
        assert got["checkpoint"] == want["checkpoint"] == file
        drop = ("seconds",)  # wall time
        assert {k: v for k, v in got.items() if k not in drop} == \
            {k: v for k, v in want.items() if k not in drop}
        for picture in ("s", "r", "i"):
            assert np.array_equal(np.asarray(Image.open(tmp_path / f"{picture}-{name}.png")),
                                  np.asarray(Image.open(tmp_path / f"{picture}-file.png")))


def test_a_folder_without_a_checkpoint_is_refused(tmp_path, capsys):
    for command in ("eval", "sample", "reconstruct", "interpolate"):
        assert main([command, str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert str(tmp_path) in err, err
        assert "without a checkpoint.safetensors" in err, err


def test_the_cli_names_the_trainers_checkpoint_file():
    from fastvae.cli import args
    from fastvae.training import trainer

    assert args.CHECKPOINT_NAME == trainer.CHECKPOINT_NAME


def test_train_resumes_from_a_run_folder(run, tmp_path, capsys):
    capsys.readouterr()
    assert main(["train", *TINY, "--iwae-samples", "0", "--seed", "3", "--epochs", "2",
                 "--no-images", "--resume", str(run), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoint.safetensors'} after epoch 1" in printed, printed
