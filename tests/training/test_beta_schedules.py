"""The KL-weight schedules, step by step: the pure functions against values written out by
hand, and the trainer's per-step beta and capacity (recorded by a spy on its objective) against
them: monotonic (linear, logistic), cyclical with ratio R (Fu et al. 2019), the capacity
objective (Burgess et al. 2018), a callable beta(step)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fastvae.cli import main
from fastvae.training import schedules
from fastvae.training import trainer as trainer_mod
from fastvae.training.trainer import TrainConfig, train

CONFIG = {"input_shape": [1, 4, 4], "latent_dim": 2, "hidden": [8]}
torch.manual_seed(0)
DATA = torch.rand(256 + 32, 1, 4, 4)  # 256 training images: 4 steps of 64 an epoch
TRAIN, VAL = DATA[:256], DATA[256:]


def _logistic_by_hand(u: float) -> float:
    s = [1 / (1 + math.exp(-10 * (v - 0.5))) for v in (u, 0.0, 1.0)]
    return (s[0] - s[1]) / (s[2] - s[1])


def test_ramp_shapes():
    assert [schedules.ramp(u) for u in (-1, 0, 0.25, 0.5, 1, 2)] == [0, 0, 0.25, 0.5, 1, 1]
    for u in (0.0, 0.1, 0.3, 0.5, 0.7, 1.0):
        assert schedules.ramp(u, "logistic") == pytest.approx(_logistic_by_hand(u), abs=1e-15)
    assert schedules.ramp(0, "logistic") == 0
    assert schedules.ramp(1, "logistic") == 1
    with pytest.raises(ValueError, match="'cubic'"):
        schedules.ramp(0.5, "cubic")


@pytest.mark.parametrize(("ratio", "expected"), [
    # 2 cycles over 16 steps: period 8; beta rises over the first R * 8 steps of each
    (0.5, [0, 1 / 4, 2 / 4, 3 / 4, 1, 1, 1, 1] * 2),
    (0.25, [0, 1 / 2, 1, 1, 1, 1, 1, 1] * 2),
    (1.0, [0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8] * 2),
])
def test_cyclical_by_hand(ratio, expected):
    got = [schedules.cyclical(t, 16, 2, ratio) for t in range(16)]
    assert got == pytest.approx(expected, abs=1e-15)


def test_capacity_by_hand():
    assert [schedules.capacity(t, 5.0, 4) for t in range(7)] == [0, 1.25, 2.5, 3.75, 5, 5, 5]
    assert schedules.capacity(0, 5.0, 0) == 5.0


class Spy:
    """Records (beta, capacity) of every step the trainer takes, and checks the loss it
    optimizes against the objective's formula."""

    def __init__(self, monkeypatch):
        self.steps: list[tuple[float, float | None]] = []
        real = trainer_mod.objective

        def spy(out, beta, capacity):
            loss = real(out, beta, capacity)
            want = out.nll + beta * (out.kl if capacity is None else (out.kl - capacity).abs())
            torch.testing.assert_close(loss, want)
            self.steps.append((beta, capacity))
            return loss

        monkeypatch.setattr(trainer_mod, "objective", spy)

    @property
    def betas(self):
        return [b for b, _ in self.steps]


def _run(monkeypatch, **config):
    spy = Spy(monkeypatch)
    result = train(CONFIG, TRAIN, VAL, TrainConfig(batch_size=64, iwae_samples=0, **config),
                   progress=False)
    return spy, result


def test_linear_warmup_step_by_step(monkeypatch):
    spy, result = _run(monkeypatch, epochs=3, beta=2.0, warmup_epochs=2)  # over 8 steps
    assert spy.betas == pytest.approx([2 * t / 8 for t in range(8)] + [2.0] * 4, abs=1e-15)
    assert [m.beta for m in result.history] == pytest.approx([0.75, 1.75, 2.0])  # the last step's


def test_logistic_warmup_step_by_step(monkeypatch):
    spy, _ = _run(monkeypatch, epochs=2, warmup_epochs=1.5, beta_shape="logistic")  # 6 steps
    assert spy.betas == pytest.approx([_logistic_by_hand(t / 6) for t in range(6)] + [1.0] * 2,
                                      abs=1e-15)


@pytest.mark.parametrize(("ratio", "cycle"), [
    (0.5, [0, 1 / 3, 2 / 3, 1, 1, 1]),   # 3 cycles of 6 steps over 18 steps
    (0.25, [0, 2 / 3, 1, 1, 1, 1]),
    (1.0, [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]),
])
def test_cyclical_step_by_step(monkeypatch, ratio, cycle):
    """Fu et al.: tau = (t mod P) / P with P = T / M; beta = beta_max * min(1, tau / R)."""
    spy, _ = _run(monkeypatch, epochs=6, beta=3.0, cycles=4, cycle_ratio=ratio)
    # 24 steps, 4 cycles: P = 6
    assert spy.betas == pytest.approx([3.0 * b for b in cycle] * 4, abs=1e-12)


def test_capacity_objective_step_by_step(monkeypatch):
    """Burgess et al.: nll + beta |KL - C|, C linear from 0 to C_max over N steps."""
    spy, result = _run(monkeypatch, epochs=2, beta=4.0, capacity=3.0, capacity_steps=6)
    assert spy.betas == [4.0] * 8
    assert [c for _, c in spy.steps] == pytest.approx([0.5 * t for t in range(6)] + [3.0] * 2)
    assert [m.capacity for m in result.history] == pytest.approx([1.5, 3.0])


def test_capacity_goes_on_from_the_checkpoint_step(monkeypatch, tmp_path):
    train(CONFIG, TRAIN, VAL, TrainConfig(epochs=1, batch_size=64, iwae_samples=0,
                                          capacity=8.0, capacity_steps=8),
          out_dir=tmp_path, progress=False)
    spy = Spy(monkeypatch)
    train(CONFIG, TRAIN, VAL, TrainConfig(epochs=2, batch_size=64, iwae_samples=0,
                                          capacity=8.0, capacity_steps=8),
          resume=tmp_path / "checkpoint.safetensors", progress=False)
    assert [c for _, c in spy.steps] == [4.0, 5.0, 6.0, 7.0]


def test_callable_beta_step_by_step(monkeypatch, tmp_path):
    def every_other(step: int) -> float:
        return 0.25 * (step % 2) + 0.1 * step

    spy = Spy(monkeypatch)
    train(CONFIG, TRAIN, VAL, TrainConfig(epochs=2, batch_size=64, iwae_samples=0,
                                          beta_schedule=every_other),
          out_dir=tmp_path, progress=False)
    assert spy.betas == [every_other(t) for t in range(8)]
    recorded = json.loads((tmp_path / "metrics.json").read_text())["train_config"]
    assert recorded["beta_schedule"].endswith("every_other")


@pytest.mark.parametrize(("config", "words"), [
    ({"warmup_epochs": 2, "cycles": 2}, "warmup_epochs and cycles"),
    ({"cycles": 2, "beta_schedule": lambda t: 1.0}, "cycles and beta_schedule"),
    ({"cycles": 2, "cycle_ratio": 0.0}, "cycle_ratio"),
    ({"cycles": 2, "cycle_ratio": 1.5}, "cycle_ratio"),
    ({"beta_shape": "cosine"}, "beta_shape"),
    ({"beta_schedule": 2.0}, "beta_schedule"),
    ({"capacity": -1.0}, "capacity"),
    ({"capacity": float("inf")}, "capacity"),
    ({"capacity": 1.0, "capacity_steps": -1}, "capacity_steps"),
])
def test_bad_schedules_are_refused(config, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**config)


def test_a_callable_beta_must_be_finite_and_non_negative():
    with pytest.raises(ValueError, match=r"beta_schedule\(0\).*nan"):
        train(CONFIG, TRAIN, VAL, TrainConfig(epochs=1, iwae_samples=0,
                                              beta_schedule=lambda t: math.nan), progress=False)


def test_cli_objectives(tmp_path, monkeypatch):
    spy = Spy(monkeypatch)
    common = ["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--iwae-samples",
              "0", "--no-progress", "--no-images", "--batch-size", "256"]  # 7 steps an epoch
    assert main([*common, "--out", str(tmp_path / "a"), "--capacity", "7", "--capacity-steps",
                 "7", "--beta", "4"]) == 0
    assert spy.steps == [(4.0, float(t)) for t in range(7)]
    config = json.loads((tmp_path / "a" / "metrics.json").read_text())["train_config"]
    assert (config["capacity"], config["capacity_steps"]) == (7.0, 7)
    spy.steps.clear()
    assert main([*common, "--out", str(tmp_path / "b"), "--cycles", "1", "--cycle-ratio",
                 "0.5", "--beta-shape", "logistic"]) == 0
    period_half = 3.5
    assert spy.betas == pytest.approx(
        [_logistic_by_hand(min(1.0, t / period_half)) for t in range(7)], abs=1e-12)
    assert main([*common, "--out", str(tmp_path / "c"), "--warmup", "1", "--cycles", "2"]) == 2
