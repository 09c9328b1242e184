"""Fault-safe training: non-finite steps skipped or stopped as the user chose,
with a message naming the step and the term; checkpoints (and metrics) that a killed process
never leaves half-written; the soft clamp of the log-variance. (The basics -- a NaN image
stopping or skipping a step, a failing rename, the clamp itself -- are in test_vae.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from fastvae.models.vae import build_vae
from fastvae.training import checkpoint, data
from fastvae.training import trainer as train_mod
from fastvae.training.trainer import NonFiniteLossError, TrainConfig, train

CONFIG = {"input_shape": [1, 8, 8], "latent_dim": 3, "arch": "mlp", "hidden": [16],
          "likelihood": "bernoulli", "obs_logvar": 0.0, "logvar_limit": None}


@pytest.fixture(scope="module")
def digits():
    images = data.load_digits()
    return images[:256], images[256:288]


def _poisoned_checkpoint(path: Path, poison) -> Path:
    """A checkpoint of CONFIG's model at epoch 0 whose weights ``poison`` edits."""
    torch.manual_seed(0)
    model = build_vae(**CONFIG)
    with torch.no_grad():
        poison(model)
    return checkpoint.save(path, checkpoint.Checkpoint(CONFIG, model.state_dict(), None,
                                                       {"epoch": 0}))


def _encoder_bias(model) -> torch.Tensor:
    return model.encoder[-1].bias  # [mu (3), logvar (3)]


def test_stop_names_the_kl_when_only_the_kl_overflows(tmp_path, digits):
    """mu = 3e19: mu^2 overflows float32 (KL = inf) while z and the reconstruction stay
    finite: the message names the KL alone, with its value, and the step."""
    resume = _poisoned_checkpoint(tmp_path / "poisoned.safetensors",
                                  lambda m: _encoder_bias(m)[:3].fill_(3e19))
    with pytest.raises(NonFiniteLossError, match=r"^step 1 \(epoch 1\): the KL \(inf\) became "
                                                 r"non-finite; .*on_nonfinite='skip'"):
        train(CONFIG, *digits, TrainConfig(epochs=1, batch_size=64, iwae_samples=0),
              resume=resume, progress=False)


def test_stop_names_every_term_that_broke(tmp_path, digits):
    """logvar = +inf: the KL is inf and the sample z, hence the reconstruction, is NaN."""
    resume = _poisoned_checkpoint(tmp_path / "poisoned.safetensors",
                                  lambda m: _encoder_bias(m)[3:].fill_(float("inf")))
    with pytest.raises(NonFiniteLossError) as info:
        train(CONFIG, *digits, TrainConfig(epochs=1, batch_size=64, iwae_samples=0),
              resume=resume, progress=False)
    message = str(info.value)
    assert message.startswith("step 1 (epoch 1): ")
    assert "the reconstruction NLL (nan)" in message
    assert "the KL (inf)" in message


class _GradientFault:
    """Wraps build_vae: the model's first encoder weight gets a NaN gradient at the given
    steps (the loss stays finite, as when a backward pass overflows)."""

    def __init__(self, steps: set[int]):
        self.steps, self.calls = steps, 0

    def __call__(self, **config):
        model = build_vae(**config)

        def hook(grad):
            self.calls += 1
            return grad * float("nan") if self.calls in self.steps else grad

        next(model.parameters()).register_hook(hook)
        return model


def test_nonfinite_gradient_with_a_finite_loss(monkeypatch, digits):
    monkeypatch.setattr(train_mod, "build_vae", _GradientFault({2}))
    with pytest.raises(NonFiniteLossError, match=r"^step 2 \(epoch 1\): the gradient of "
                                                 r"encoder\.1\.weight .*the loss terms did not"):
        train(CONFIG, *digits, TrainConfig(epochs=1, batch_size=64, iwae_samples=0),
              progress=False)


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_skip_leaves_the_weights_finite(monkeypatch, digits, grad_clip):
    """Skipped steps change nothing; the others train on; the count is in the metrics."""
    fault = _GradientFault({2, 3})
    monkeypatch.setattr(train_mod, "build_vae", fault)
    result = train(CONFIG, *digits, TrainConfig(epochs=2, batch_size=64, iwae_samples=0,
                                                on_nonfinite="skip", grad_clip=grad_clip),
                   progress=False)
    assert [m.skipped_steps for m in result.history] == [2, 0]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    assert all(torch.isfinite(torch.tensor(m.train_loss)) for m in result.history)


def test_cli_reports_a_nonfinite_step_in_one_line(tmp_path, capsys, monkeypatch):
    """``fastvae train`` ends with status 1 and one line naming the step and the term."""
    from fastvae.cli import main

    monkeypatch.setattr(train_mod, "build_vae", _GradientFault({3}))
    code = main(["train", "--epochs", "1", "--hidden", "16", "--latent-dim", "3",
                 "--out", str(tmp_path / "run"), "--no-progress", "--no-images",
                 "--iwae-samples", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("fastvae train: step 3 (epoch 1): the gradient of encoder.1.weight")


# ---------------------------------------------------------------------------------------------
# Distributed: ranks agree to skip or stop
# ---------------------------------------------------------------------------------------------

DDP_SCRIPT = """
import sys
import torch
import torch.distributed as dist
from fastvae.training import data
from fastvae.training import trainer as train_mod
from fastvae.training.trainer import NonFiniteLossError, TrainConfig, train
from fastvae.models.vae import build_vae

CONFIG = {config!r}

def poisoned(**config):
    # A NaN loss on rank 0 only, at its second step of every epoch.
    model = build_vae(**config)
    forward, calls = model.forward, [0]
    def patched(*args, **kwargs):
        out = forward(*args, **kwargs)
        if model.training:
            calls[0] += 1
            if dist.get_rank() == 0 and calls[0] % 2 == 0:
                out = out._replace(loss=out.loss * float("nan"), kl=out.kl * float("nan"))
        return out
    model.forward = patched
    return model

train_mod.build_vae = poisoned
dist.init_process_group("gloo")
rank = dist.get_rank()
images = data.load_digits()[:256]
with open(f"{{sys.argv[1]}}/rank{{rank}}.txt", "w") as report:
    for mode in ("skip", "stop"):
        try:
            result = train(CONFIG, images, images[:32], TrainConfig(
                epochs=1, batch_size=32, iwae_samples=0, on_nonfinite=mode), progress=False)
            print(f"rank {{rank}} {{mode}}: skipped {{result.history[-1].skipped_steps}}",
                  file=report)
        except NonFiniteLossError as e:
            print(f"rank {{rank}} {{mode}}: stopped: {{e}}", file=report)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ranks_skip_and_stop_together(tmp_path):
    """A non-finite loss on one rank only: every rank skips that step (a rank running its
    backward alone would wait forever for the others' gradients), or every rank stops."""
    script = tmp_path / "ddp_fault.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(config=CONFIG)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    assert rank0[0] == "rank 0 skip: skipped 2", rank0
    assert rank1[0] == "rank 1 skip: skipped 2", rank1
    assert rank0[1].startswith("rank 0 stop: stopped: step 2 (epoch 1): the KL (nan) became "
                               "non-finite;"), rank0
    assert rank1[1].startswith("rank 1 stop: stopped: step 2 (epoch 1): the KL became "
                               "non-finite on another rank;"), rank1


# ---------------------------------------------------------------------------------------------
# Checkpoints: a process killed in the middle of a save
# ---------------------------------------------------------------------------------------------

SLOW_SAVE = """
import os, sys, time
import torch
from fastvae.training import checkpoint

real_fdopen = os.fdopen

class HalfThenHang:
    # Writes half of what it is given, makes that reach the disk, says so, and hangs.
    def __init__(self, f):
        self.f = f
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
    def write(self, payload):
        self.f.write(payload[: len(payload) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        print("half written", len(payload), flush=True)
        time.sleep(120)
    def __getattr__(self, name):
        return getattr(self.f, name)

os.fdopen = lambda fd, mode: HalfThenHang(real_fdopen(fd, mode))
state = {{"w": torch.arange({n}, dtype=torch.float32)}}
checkpoint.save(sys.argv[1], checkpoint.Checkpoint({{"generation": "new"}}, state))
"""

BIG_SAVE = """
import sys
import torch
from fastvae.training import checkpoint
state = {{"w": torch.ones({n}, dtype=torch.float32)}}
print("saving", flush=True)
while True:
    checkpoint.save(sys.argv[1], checkpoint.Checkpoint({{"generation": "new"}}, state))
"""


def _old_checkpoint(path: Path) -> bytes:
    checkpoint.save(path, checkpoint.Checkpoint({"generation": "old"},
                                                {"w": torch.arange(10, dtype=torch.float32)}))
    return path.read_bytes()


def _temp_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(".ckpt.safetensors.*.tmp"))


def test_sigkill_in_the_middle_of_a_save_keeps_the_old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    old = _old_checkpoint(path)
    script = tmp_path / "slow_save.py"
    script.write_text(SLOW_SAVE.format(n=1_000_000))
    child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        line = child.stdout.readline()
        assert line.startswith("half written"), line
        total = int(line.split()[-1])
        (temp,) = _temp_files(tmp_path)
        assert 0 < temp.stat().st_size < total  # the new checkpoint, half on disk
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert path.read_bytes() == old
    ckpt = checkpoint.load(path)
    assert ckpt.model_config == {"generation": "old"}
    assert torch.equal(ckpt.model_state["w"], torch.arange(10, dtype=torch.float32))
    # What the kill left is a hidden temporary file; the next save replaces the checkpoint.
    assert all(p.name.startswith(".") for p in _temp_files(tmp_path))
    checkpoint.save(path, checkpoint.Checkpoint({"generation": "next"}, {}))
    assert checkpoint.load(path).model_config == {"generation": "next"}


def test_sigkill_during_real_saves_leaves_a_whole_checkpoint(tmp_path):
    """An unmodified save of a 32 MiB checkpoint, over and over, killed as soon as its
    temporary file appears (while it is being written, most likely): the file holds one whole
    checkpoint, the old or a new one, never a mixture or a fragment."""
    path = tmp_path / "ckpt.safetensors"
    _old_checkpoint(path)
    script = tmp_path / "big_save.py"
    script.write_text(BIG_SAVE.format(n=8 * 2**20))
    child = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline().startswith("saving")
        deadline = time.monotonic() + 60
        while not _temp_files(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.0005)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
    ckpt = checkpoint.load(path)
    generation = ckpt.model_config["generation"]
    assert generation in ("old", "new")
    if generation == "new":
        assert torch.equal(ckpt.model_state["w"], torch.ones(8 * 2**20))


def test_metrics_files_are_written_atomically(tmp_path, digits, monkeypatch):
    """metrics.json / metrics.csv go through the same atomic write: a failing rename leaves
    the previous epoch's files whole."""
    out = tmp_path / "run"
    train(CONFIG, *digits, TrainConfig(epochs=1, batch_size=64, iwae_samples=0),
          out_dir=out, progress=False)
    before = {name: (out / name).read_bytes() for name in ("metrics.json", "metrics.csv")}
    json.loads(before["metrics.json"])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        train(CONFIG, *digits, TrainConfig(epochs=2, batch_size=64, iwae_samples=0),
              out_dir=out, resume=out / "checkpoint.safetensors", progress=False)
    for name, content in before.items():
        assert (out / name).read_bytes() == content
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# The soft clamp of the log-variance
# ---------------------------------------------------------------------------------------------


def test_logvar_limit_keeps_a_runaway_encoder_trainable(tmp_path, digits):
    """The encoder's log-variance bias at 1e4 (exp overflows): without the clamp the first step
    stops on an infinite KL; with logvar_limit=10 the same weights train, finitely, and the
    clamp passes gradients (tanh, not a hard clip)."""
    def runaway(model):
        _encoder_bias(model)[3:].fill_(1e4)

    resume = _poisoned_checkpoint(tmp_path / "runaway.safetensors", runaway)
    with pytest.raises(NonFiniteLossError, match="the KL"):
        train(CONFIG, *digits, TrainConfig(epochs=1, batch_size=64, iwae_samples=0),
              resume=resume, progress=False)
    clamped = {**CONFIG, "logvar_limit": 10.0}
    torch.manual_seed(0)
    model = build_vae(**clamped)
    with torch.no_grad():
        runaway(model)
    resume = checkpoint.save(tmp_path / "clamped.safetensors",
                             checkpoint.Checkpoint(clamped, model.state_dict(), None,
                                                   {"epoch": 0}))
    result = train(clamped, *digits, TrainConfig(epochs=1, batch_size=64, iwae_samples=0),
                   resume=resume, progress=False)
    assert result.history[-1].skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    _, logvar = result.model.encode(digits[1])
    assert logvar.abs().max() <= 10.0
