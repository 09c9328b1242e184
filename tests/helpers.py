"""What the tests share: the backends and dtypes under test, tolerances, ``assert_close`` and the
float64 oracle. Imported as a module (``from helpers import ...``); the fixtures live in
conftest.py."""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

import fastvae as fv
from fastvae.ops import reference

CUDA = torch.cuda.is_available()

# Every concrete backend usable here, found at collection time: a newly built one (the native
# "cpu" library, "cuda" on a GPU machine) is picked up without changing any test.
BACKENDS = fv.backends()

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
REDUCTIONS = ("mean", "sum", "none")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the quantizer ops compute in for inputs of ``dtype``: float64 for float64,
    else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_for(backend: str) -> torch.device:
    """The device whose tensors ``backend`` serves in this test run."""
    if backend == "cuda" or (backend == "triton" and CUDA):
        return torch.device("cuda")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

# Keyed by the dtype of the value under test: losses of half-precision inputs come back in
# float32 and are computed in float32 from the same rounded inputs as the oracle, so they are
# held to float32's tolerance; gradients and samples come back in the input's dtype and carry
# one rounding to it (half an ulp: 4.9e-4 for float16, 3.9e-3 for bfloat16). Autograd rounds
# once more when it sums the gradient of a broadcast input, and Triton's interpreter converted
# float32 to bfloat16 by truncation (up to one ulp; the kernels' stores now round to nearest,
# kernels/_common.cast_rn): bfloat16 keeps three half-ulps.
# ``atol`` is relative to the largest magnitude of the expected tensor (see assert_close).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-5),
    torch.bfloat16: dict(rtol=1.2e-2, atol=1e-4),
}
# Noise is generated in float32 on every backend with each backend's own log/cos/sqrt (Box-Muller),
# so anything that depends on it agrees across backends to float32 rounding only, whatever the
# dtype: a few 1e-7 absolute on eps.
NOISE_TOL = dict(rtol=1e-5, atol=1e-5)


def tolerance(dtype: torch.dtype, noisy: bool = False,
              floor: dict[str, float] | None = None) -> dict[str, float]:
    """The tolerance of results in ``dtype``; ``floor``: the least one (the oracle's own error,
    where its formula cancels)."""
    tol = dict(TOL[dtype])
    for extra in (NOISE_TOL if noisy else None, floor):
        if extra is not None:
            tol = {k: max(v, extra[k]) for k, v in tol.items()}
    return tol


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, noisy: bool = False,
                 dtype: torch.dtype | None = None, msg: str = "",
                 floor: dict[str, float] | None = None) -> None:
    """``actual`` (any float dtype) against a float64 ``expected``: same shape, values within the
    tolerance of ``dtype`` (default: ``actual``'s dtype, at least ``floor``); NaN only where the
    oracle has NaN."""
    tol = tolerance(actual.dtype if dtype is None else dtype, noisy, floor)
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    finite = expected[torch.isfinite(expected)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               rtol=tol["rtol"], atol=tol["atol"] * scale, equal_nan=True,
                               msg=lambda m: f"{msg}\n{m}" if msg else m)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The float64 oracle: the reference ops of fastvae.reference, with fv's signatures, except the
# Bernoulli NLL, whose gradient comes from torch's binary_cross_entropy_with_logits (autograd of
# the max/abs formula is wrong at l = 0).
# ---------------------------------------------------------------------------------------------


def _reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def _per_sample(elementwise: torch.Tensor) -> torch.Tensor:
    B = elementwise.shape[0]
    return elementwise.reshape(B, math.prod(elementwise.shape[1:])).sum(1)


class Oracle:
    """Namespace with fv's function signatures, computing in float64 from float64 inputs."""

    reparameterize = staticmethod(reference.reparameterize)
    gaussian_kl = staticmethod(reference.gaussian_kl)
    gaussian_nll = staticmethod(reference.gaussian_nll)
    sample_and_kl = staticmethod(reference.sample_and_kl)

    @staticmethod
    def bernoulli_nll(logits, target, *, reduction="mean"):
        per_element = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return _reduce(_per_sample(per_element), reduction)

    continuous_bernoulli_nll = staticmethod(reference.continuous_bernoulli_nll)

    @staticmethod
    def discretized_mix_logistic_nll(params, x, *, n_mixtures, n_bins=256, reduction="mean"):
        """PixelCNN++'s formula as written (inner bins as a difference of CDFs), with the tails
        as log sigmoid: the reference's softplus returns its argument past 20, which drops tail
        masses below e^-20 (a gradient e^7 e^-20 off for the sharpest components)."""
        B, C = x.shape[:2]
        S = math.prod(x.shape[2:])
        M, h = n_mixtures, 1.0 / (n_bins - 1)
        p, xv = params.reshape(B, params.shape[1], S), x.reshape(B, C, S)
        logits, means, raw_ls, raw_coeffs = reference._dmol_split(p, C, M)
        log_s = torch.clamp_min(raw_ls, reference.DMOL_LOG_SCALE_MIN)
        coeffs = None if raw_coeffs is None else torch.tanh(raw_coeffs)
        xe = xv.unsqueeze(2)
        centered = xe - reference._dmol_coupled_means(means, coeffs, xv)
        inv_s = torch.exp(-log_s)
        plus_in, min_in, mid_in = inv_s * (centered + h), inv_s * (centered - h), inv_s * centered
        cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
        log_pdf_mid = F.logsigmoid(mid_in) + F.logsigmoid(-mid_in) - log_s
        inner = torch.where(cdf_delta > reference.DMOL_MIN_BIN_PROB,
                            torch.log(torch.clamp_min(cdf_delta, 1e-300)),
                            log_pdf_mid - math.log((n_bins - 1) / 2.0))
        log_probs = torch.where(xe < -1.0 + h, F.logsigmoid(plus_in),
                                torch.where(xe > 1.0 - h, F.logsigmoid(-min_in), inner))
        joint = log_probs.sum(1) + torch.log_softmax(logits, 1)
        return _reduce(-torch.logsumexp(joint, 1).sum(1), reduction)

    @staticmethod
    def vae_loss(recon, x, mu, logvar, *, likelihood="bernoulli", obs_logvar=0.0, beta=1.0,
                 free_bits=0.0, reduction="mean"):
        if likelihood == "bernoulli":
            nll = Oracle.bernoulli_nll(recon, x, reduction=reduction)
        elif likelihood == "continuous_bernoulli":
            nll = Oracle.continuous_bernoulli_nll(recon, x, reduction=reduction)
        else:
            nll = Oracle.gaussian_nll(recon, x, obs_logvar, reduction=reduction)
        kl = Oracle.gaussian_kl(mu, logvar, reduction=reduction, free_bits=free_bits)
        return nll + beta * kl


def to_oracle(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf with the values of ``t`` (already rounded to the test dtype)."""
    return t.detach().cpu().double().requires_grad_(t.requires_grad)


# ---------------------------------------------------------------------------------------------
# Inputs and messages of the error tests
# ---------------------------------------------------------------------------------------------


def ramp(*shape: int, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """Values in (0, 1), without drawing from torch's generator (the error tests check that a
    failed call leaves it alone)."""
    return torch.linspace(0.1, 0.9, math.prod(shape), dtype=dtype).reshape(shape).to(device)


def with_value(x: torch.Tensor, value: float) -> torch.Tensor:
    """A copy of the 2-d ``x`` with ``value`` at [1, 2] (sample 1)."""
    x = x.clone()
    x[1, 2] = value
    return x


def missing_names(message: str, words: list[str]) -> list[str]:
    """The words that ``message`` does not contain as whole words."""
    return [w for w in words if not re.search(rf"\b{re.escape(w)}\b", message)]


# The small VAE of the model and training tests, on the embedded 8x8 digits.
DIGITS_CONFIG = {"input_shape": [1, 8, 8], "latent_dim": 4, "arch": "mlp", "hidden": [64],
                 "likelihood": "bernoulli", "obs_logvar": 0.0}


def assert_pngs(folder, names) -> None:
    """Every file ``names`` in ``folder`` is a whole PNG."""
    from PIL import Image

    for name in names:
        with Image.open(folder / name) as image:
            image.verify()
            assert image.format == "PNG", name


def assert_checkpoint_reproduces_run(run, out, keys) -> dict:
    """``fastvae eval`` on the checkpoint of the ``fastvae train`` run in folder ``run`` gives
    the trainer's final metrics ``keys`` exactly, and ``sample`` and ``reconstruct`` write the
    trainer's pictures byte for byte (its seed, its validation images); files go to ``out``.
    Returns eval's JSON."""
    import json

    from fastvae.cli import main

    ckpt = str(run / "checkpoint.safetensors")
    assert main(["eval", ckpt, "--no-progress", "--json", str(out / "m.json")]) == 0
    got = json.loads((out / "m.json").read_text())
    final = json.loads((run / "metrics.json").read_text())["final"]
    for key in keys:
        assert got[key] == final[key], key
    for command, name in (("sample", "samples.png"), ("reconstruct", "reconstructions.png")):
        extra = [] if command == "sample" else ["--no-progress"]
        assert main([command, ckpt, "--out", str(out / name), *extra]) == 0
        assert (out / name).read_bytes() == (run / name).read_bytes(), name
    return got


_TWO_RANK_SCRIPT = """
import sys
import torch
import torch.distributed as dist
sys.path[:0] = [{tests!r}, {helpers!r}]
from {module} import KINDS, run

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.save({{kind: run(kind, rank) for kind in KINDS}}, f"{{sys.argv[1]}}/rank{{rank}}.pt")
dist.destroy_process_group()
"""


def run_ranks(tmp_path, test_file: str, world: int = 2) -> list[dict]:
    """Runs ``run(kind, rank)`` for every kind in ``KINDS`` of the test module ``test_file``
    (its ``__file__``) on ``world`` processes (torchrun, gloo, one thread each) and returns each
    rank's ``{kind: result}``; fails the test with the processes' output if they fail."""
    import os
    import subprocess
    import sys

    tests, name = os.path.split(os.path.abspath(test_file))
    module = os.path.splitext(name)[0]
    script = tmp_path / f"{module}_ranks.py"
    script.write_text(_TWO_RANK_SCRIPT.format(tests=tests, module=module,
                                              helpers=os.path.dirname(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(world), str(script), str(tmp_path)], capture_output=True, text=True, timeout=180,
        env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def assert_ranks_hold_the_single_process_state(ranks: list[dict], run, kinds, steps: int) -> None:
    """For each kind, the ``(state_dict, per-step indices)`` of ``run(kind, rank)`` on two ranks:
    the same state on both (bit for bit), the single process's (``run(kind, None)``) to float
    rounding (the all-reduce adds partial sums), and the rank's indices those of its half."""
    for kind in kinds:
        (state0, idx0), (state1, idx1) = ranks[0][kind], ranks[1][kind]
        single, idx = run(kind, None)
        assert list(state0) == list(single)
        for key in single:
            assert torch.equal(state0[key], state1[key]), (kind, key)
            torch.testing.assert_close(state0[key], single[key], rtol=1e-5, atol=1e-5,
                                       msg=f"{kind} {key}")
        for step in range(steps):
            assert torch.equal(torch.cat([idx0[step], idx1[step]]), idx[step]), (kind, step)


def cpu_isas_and_threads(threads=(1, 2, 3)):
    """Yields ``(isa, n)`` for every instruction set of the native CPU library and every thread
    count ``n`` in ``threads``, with that set and count in effect; restores ``"auto"`` and the
    thread count after (for the bitwise-reproducibility tests)."""
    from fastvae.ops import native

    before = torch.get_num_threads()
    try:
        for isa in native.cpu_isas():
            native.set_cpu_isa(isa)
            for n in threads:
                torch.set_num_threads(n)
                yield isa, n
    finally:
        native.set_cpu_isa("auto")
        torch.set_num_threads(before)
