"""TrainConfig(cuda_graphs=True) and ``fastvae train --cuda-graphs``: the VAE step captured once
and replayed. On the CPU the replay is emulated (GraphedStep's ``emulate``: the step function
re-run eagerly, its results copied into the static output and gradients) so that the plumbing
runs as on a GPU: the static input, beta and capacity filled before each step, the report and
the gradients read from fixed tensors, the eager step for the last partial batch. The training
must then be bitwise the eager one. What only a GPU shows (the capture itself, the graph-safe
noise) is in scripts/gpu_smoke.py's graphs check and scripts/gpu_check.sh's train phase."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from torch import nn

import fastvae as fv
from fastvae.training import checkpoint, data, graphs
from fastvae.training import trainer as train_mod
from fastvae.training.trainer import NonFiniteLossError, TrainConfig, train

CONFIG = {"input_shape": [1, 8, 8], "latent_dim": 4, "arch": "mlp", "hidden": [32],
          "likelihood": "bernoulli", "obs_logvar": 0.0}
MARK = 0.123  # pixel 0 of an image with this value poisons the step's gradient (not its loss)


@pytest.fixture(scope="module")
def images():
    """300 training images (four batches of 64 and a last one of 44) and 64 held out."""
    images = data.load_digits()
    return images[:300].clone(), images[300:364].clone()


@pytest.fixture
def replays(monkeypatch):
    """Graphs emulated on the CPU; the list of the GraphedSteps replayed, one entry a replay."""
    monkeypatch.setattr(train_mod, "EMULATE_GRAPHS", True)
    calls: list[graphs.GraphedStep] = []
    replay = graphs.GraphedStep.replay

    def counted(self):
        calls.append(self)
        return replay(self)

    monkeypatch.setattr(graphs.GraphedStep, "replay", counted)
    return calls


class _PoisonGrad(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by NaN where ``flag`` (a device
    bool, no host read) is set."""

    @staticmethod
    def forward(ctx, h, flag):
        ctx.save_for_backward(flag)
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        (flag,) = ctx.saved_tensors
        return grad * torch.where(flag, float("nan"), 1.0), None


class _Encoder(nn.Module):
    """An MLP encoder whose first layer's gradient is NaN for a batch holding an image marked
    with MARK at pixel 0: a non-finite gradient with finite loss terms, decided on the device
    from the batch (as a captured graph sees it), not by counting calls. ``norm``: a BatchNorm
    after it (running statistics, updated in place by each training forward)."""

    def __init__(self, latent: int, norm: bool = False):
        super().__init__()
        self.first = nn.Linear(64, 32)
        self.rest = nn.Sequential(*([nn.BatchNorm1d(32)] if norm else []), nn.ReLU(),
                                  nn.Linear(32, 2 * latent))

    def forward(self, x):
        flat = x.flatten(1)
        flag = (flat[:, 0] == MARK).any()
        return self.rest(_PoisonGrad.apply(self.first(flat), flag))


def _faulty_vae(latent: int = 4, norm: bool = False) -> fv.VAE:
    torch.manual_seed(3)
    decoder = nn.Sequential(nn.Linear(latent, 64), nn.Unflatten(1, (1, 8, 8)))
    return fv.VAE(_Encoder(latent, norm), decoder, latent_shape=latent)


CASES = {  # TrainConfig options, a caller-built model (None: CONFIG), poisoned images
    # beta warm-up over 1.5 epochs, capacity rising over 7 steps, clipping, free bits
    "warmup_capacity": (dict(warmup_epochs=1.5, capacity=3.0, capacity_steps=7, grad_clip=1.0,
                             free_bits=0.1), None, False),
    # cyclical beta (logistic rise) under bfloat16 autocast
    "cycles_amp": (dict(cycles=2, beta_shape="logistic", amp=True), None, False),
    # a NaN pixel (non-finite NLL) and a marked image (non-finite gradient): both skipped
    "skip": (dict(on_nonfinite="skip", grad_clip=5.0, warmup_epochs=1.0), _faulty_vae, True),
    # running statistics: the warm-up and the capture must leave them as they were
    "batchnorm": (dict(warmup_epochs=1.0), lambda: _faulty_vae(norm=True), False),
}


def _run(case: str, images, out_dir, cuda_graphs: bool, epochs: int = 3, resume=None):
    options, build, poisoned = CASES[case]
    train_x, val_x = images
    if poisoned:
        train_x = train_x.clone()
        train_x[17, 0, 3, 3] = float("nan")
        train_x[101, 0, 0, 0] = MARK
    model = build() if build is not None else dict(CONFIG)
    config = TrainConfig(epochs=epochs, batch_size=64, iwae_samples=0, seed=2,
                         cuda_graphs=cuda_graphs, **options)
    return train(model, train_x, val_x, config, out_dir=out_dir, resume=resume, progress=False)


def _history(result) -> list[dict]:
    return [{k: v for k, v in asdict(m).items() if k != "seconds"} for m in result.history]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same_tensors(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def _checkpoint_parts(out_dir):
    saved = checkpoint.load(out_dir / train_mod.CHECKPOINT_NAME)
    state = dict(saved.trainer_state)
    state["history"] = [{k: v for k, v in m.items() if k != "seconds"}
                        for m in state["history"]]
    state["train_config"] = {k: v for k, v in state["train_config"].items()
                             if k != "cuda_graphs"}
    return saved.model_state, saved.optimizer_state, state


@pytest.mark.parametrize("case", list(CASES))
def test_graphed_training_is_bitwise_the_eager_training(case, images, tmp_path, replays):
    """Three epochs with the emulated graph step give the eager run's weights, optimizer state,
    metrics and checkpoint bit for bit; every full batch was a replay, the partial one eager."""
    eager = _run(case, images, tmp_path / "eager", cuda_graphs=False)
    assert replays == []
    graphed = _run(case, images, tmp_path / "graphed", cuda_graphs=True)
    assert len(replays) == 3 * 4  # 4 full batches of 64 per epoch; the 44 rows ran eagerly
    assert len({id(step) for step in replays}) == 1  # captured once

    assert _history(graphed) == _history(eager)
    _assert_same_tensors(graphed.model.state_dict(), eager.model.state_dict())
    assert ({**graphed.final, "train_seconds": 0} == {**eager.final, "train_seconds": 0})
    for got, want in zip(_checkpoint_parts(tmp_path / "graphed"),
                         _checkpoint_parts(tmp_path / "eager"), strict=True):
        _assert_same_tensors(got, want)
    betas = [m.beta for m in graphed.history]
    if case != "cycles_amp":
        assert betas[0] < betas[-1]  # the schedule moved: beta reached the graph as a tensor
    if case == "skip":
        skipped = [m.skipped_steps for m in graphed.history]
        assert all(s >= 1 for s in skipped), skipped
        assert all(torch.isfinite(p).all() for p in graphed.model.parameters())


def test_graphed_training_stops_with_the_eager_message(images, replays):
    """on_nonfinite='stop': the graphed step raises the eager step's error (the step, the term)."""
    messages = []
    for cuda_graphs in (False, True):
        config = TrainConfig(epochs=1, batch_size=64, iwae_samples=0, cuda_graphs=cuda_graphs)
        with pytest.raises(NonFiniteLossError) as info:
            train(_faulty_vae(), _poisoned(images[0]), images[1], config, progress=False)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert "the gradient of encoder.first.weight" in messages[1]
    assert len(replays) >= 1


def _poisoned(train_x):
    train_x = train_x.clone()
    train_x[:, 0, 0, 0] = MARK  # every batch's gradient is non-finite
    return train_x


def test_resumed_graphed_training_matches_uninterrupted(images, tmp_path, replays):
    """A graphed run resumed after epoch 2 ends where an uninterrupted one does: the warm-up and
    the capture of the resumed run draw none of the run's random numbers."""
    whole = _run("warmup_capacity", images, tmp_path / "whole", cuda_graphs=True)
    _run("warmup_capacity", images, tmp_path / "part", cuda_graphs=True, epochs=2)
    resumed = _run("warmup_capacity", images, tmp_path / "part", cuda_graphs=True,
                   resume=tmp_path / "part" / train_mod.CHECKPOINT_NAME)
    assert _history(resumed) == _history(whole)
    _assert_same_tensors(resumed.model.state_dict(), whole.model.state_dict())


def _noisy_step():
    """A step drawing noise through the fused op: a parameter mu, z = mu + eps, loss sum(z) +
    KL; returns z (a new draw each call)."""
    mu = nn.Parameter(torch.zeros(4, 3))
    logvar = torch.zeros(4, 3)

    def fn():
        z, kl = fv.sample_and_kl(mu, logvar)
        (z.sum() + kl).backward()
        return z.detach()

    return mu, fn


def test_graphed_step_draws_new_noise_per_replay_and_none_in_warmup():
    """Each replay draws a new seed (the noise differs between replays); warm-up and capture
    consume none of torch's random numbers: the first replay draws what the eager call would;
    the output is one static tensor; the gradient is the static one, reinstalled when replaced."""
    mu, fn = _noisy_step()
    step = graphs.GraphedStep(fn, [mu], "cpu", emulate=True)
    torch.manual_seed(5)
    first = step.replay()
    first_values = first.clone()
    static_grad = mu.grad
    second = step.replay()
    assert second is first
    assert not torch.equal(first_values, second)
    torch.manual_seed(5)
    mu.grad = None
    assert torch.equal(fn(), first_values)
    mu.grad = torch.full_like(mu, 7.0)  # an eager step in between replaced it
    step.replay()
    assert mu.grad is static_grad
    assert torch.equal(mu.grad, torch.ones(4, 3))  # d(sum z)/d mu, the KL's gradient at mu=0 is 0


def test_graphed_step_needs_cuda_or_emulation():
    mu, fn = _noisy_step()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got cpu"):
        graphs.GraphedStep(fn, [mu], "cpu")


def test_refusals_name_cuda_graphs(images, tmp_path):
    """On the CPU (no emulation), with compile, for a VQ-VAE, under torch.distributed: a
    ValueError naming cuda_graphs, before anything is written."""
    with pytest.raises(ValueError, match="cuda_graphs and compile cannot be combined"):
        TrainConfig(cuda_graphs=True, compile=True)
    config = TrainConfig(epochs=1, batch_size=64, iwae_samples=0, cuda_graphs=True)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device, got cpu"):
        train(dict(CONFIG), *images, config, out_dir=tmp_path / "cpu", progress=False)
    assert not (tmp_path / "cpu").exists()
    vq = {"kind": "vqvae", "input_shape": [1, 8, 8], "quantizer": "vq", "codebook_size": 16,
          "codebook_dim": 4, "num_tokens": 2}
    with pytest.raises(ValueError, match="cuda_graphs applies to a VAE, not a VQ-VAE"):
        train(vq, *images, config, out_dir=tmp_path / "vq", progress=False)
    model = fv.build_vae(**CONFIG)
    with pytest.raises(ValueError, match=r"cuda_graphs is not supported under torch\.distributed"):
        train_mod._check_cuda_graphs(model, torch.device("cuda"), world=2)


def test_refuses_a_training_set_without_a_full_batch(images, tmp_path, replays):
    """The graph serves full batches: with fewer rows than one batch every step would run
    eagerly under a run that says it is graphed. A ValueError instead; one full batch is
    enough (it is captured and replayed)."""
    train_data, val_data = images
    config = TrainConfig(epochs=1, batch_size=64, iwae_samples=0, cuda_graphs=True)
    with pytest.raises(ValueError, match="the training set has 63 rows, fewer than one batch "
                                         "of 64"):
        train(dict(CONFIG), train_data[:63], val_data, config, out_dir=tmp_path / "a",
              progress=False)
    assert not (tmp_path / "a").exists()
    assert not replays
    train(dict(CONFIG), train_data[:64], val_data, config, out_dir=tmp_path / "b",
          progress=False)
    assert len(replays) == 1


def test_cli_option_sets_the_config():
    from fastvae.cli import build_parser
    from fastvae.cli.train import _train_config

    args = build_parser().parse_args(["train", "--cuda-graphs"])
    assert _train_config(args).cuda_graphs is True
    assert _train_config(build_parser().parse_args(["train"])).cuda_graphs is False


# ---------------------------------------------------------------------------------------------
# On a GPU: the real capture and replay


@pytest.mark.gpu
def test_cuda_graphed_step_noise_and_gradients():
    """A captured sample_and_kl step: each replay draws new noise, the first replay after a
    seed the eager call's noise (warm-up and capture consumed none), the gradient in place."""
    mu = nn.Parameter(torch.zeros(64, 8, device="cuda"))
    logvar = torch.zeros(64, 8, device="cuda")

    def fn():
        z, kl = fv.sample_and_kl(mu, logvar)
        (z.square().sum() + kl).backward()
        return z.detach()

    step = graphs.GraphedStep(fn, [mu], "cuda")
    torch.manual_seed(11)
    first = step.replay().clone()
    second = step.replay().clone()
    assert step.graph is not None
    assert not torch.equal(first, second)
    torch.manual_seed(11)
    mu.grad = None
    assert torch.equal(fn(), first)
    mu.grad = None
    assert torch.equal(fn(), second)
    assert torch.equal(mu.grad, step.grads[0])


@pytest.mark.gpu
def test_cuda_graphed_training_follows_eager(images):
    """Two epochs on the GPU, eager and captured: the same noise (same seeds), so the metrics
    agree to the kernels' rounding."""
    runs = [train(dict(CONFIG), *images,
                  TrainConfig(epochs=2, batch_size=64, iwae_samples=0, warmup_epochs=1.0,
                              capacity=2.0, capacity_steps=5, grad_clip=1.0,
                              cuda_graphs=on), device="cuda", progress=False)
            for on in (False, True)]
    for eager, graphed in zip(runs[0].history, runs[1].history, strict=True):
        assert graphed.beta == eager.beta
        assert graphed.capacity == eager.capacity
        assert graphed.train_loss == pytest.approx(eager.train_loss, rel=1e-3)
        assert graphed.val_elbo == pytest.approx(eager.val_elbo, rel=1e-3)


def test_data_checks_pause_while_a_graph_is_captured(monkeypatch):
    """Validation's host reads would break a capture: they are skipped while one is under way
    (the warm-up steps before it still check)."""
    from fastvae.ops import validation

    monkeypatch.setattr(validation, "_validate", True)
    assert validation.data_checks_on()
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not validation.data_checks_on()


def test_a_failed_capture_is_one_clear_error():
    """The warm-up ran the step but the capture broke it (here: the step raises from its
    fourth call on, the capture's): GraphCaptureError saying what failed and what to do."""
    mu, fn = _noisy_step()
    calls = []

    def breaks_in_capture():
        calls.append(1)
        if len(calls) > graphs.WARMUP_STEPS:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        return fn()

    step = graphs.GraphedStep(breaks_in_capture, [mu], "cpu", emulate=True)
    with pytest.raises(graphs.GraphCaptureError,
                       match=r"^capturing the training step as a CUDA graph failed \("
                             r"RuntimeError: operation not permitted when stream is "
                             r"capturing\); train without CUDA graphs$"):
        step.replay()


def test_cli_reports_a_failed_capture_in_one_line(tmp_path, capsys, monkeypatch):
    from fastvae.cli import main

    def fails(*args, **kwargs):
        raise graphs.GraphCaptureError("capturing the training step as a CUDA graph failed "
                                       "(RuntimeError: x); train without CUDA graphs")

    monkeypatch.setattr(train_mod, "train", fails)
    code = main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--no-progress",
                 "--no-images", "--iwae-samples", "0"])
    assert code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("fastvae train: --cuda-graphs: capturing the training step")
