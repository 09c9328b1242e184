"""``fastvae bench``: the roofline report, and the cases the pytest-benchmark suite times.

For each op, direction (forward, forward+backward), size and implementation: the median time,
the bytes the op must move (each input read once, each output written once; for backward the
upstream gradient read and each input gradient written once; noise is generated, never read),
the achieved GB/s, the percentage of the device-to-device copy bandwidth measured in the same
run, the speed ratio against eager PyTorch and against ``torch.compile`` of it, (GPU) the
peak memory the call allocates beyond its inputs, and (forward+backward) the bytes autograd
saves for backward (the distinct storages packed by ``saved_tensors_hooks``, inputs included).

Implementations: ``eager`` is what a user writes in plain PyTorch; ``distributions`` the same
with ``torch.distributions``; ``compile`` is ``torch.compile`` of ``eager``; ``fastvae:<b>``
each fastvae backend that serves the device.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Bernoulli, ContinuousBernoulli, Normal, kl_divergence

import fastvae as fv

from ..ops import backends as _backend
from . import bench_quantizers
from .args import split_list
from .bench_common import device_name, peak_extra_memory, steady_heap, time_group

LOG_2PI = math.log(2 * math.pi)
LATENT = 64  # latent width of the loss head and the training step


# ---------------------------------------------------------------------------------------------
# Ops: inputs, implementations, bytes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Leaves that receive gradients, constant tensors, and the upstream gradients of the
    outputs (None for a scalar loss)."""

    leaves: tuple[Tensor, ...]
    consts: tuple[Tensor, ...]
    out_grads: tuple[Tensor | None, ...]


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _latent_inputs(B: int, L: int, dtype, device, with_z_grad: bool) -> Inputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = (0.5 * torch.randn(B, L, generator=g)).to(device, dtype)
    logvar = (0.3 * torch.randn(B, L, generator=g) - 1.0).to(device, dtype)
    grads = (torch.randn(B, L, generator=g).to(device, dtype) / B,) if with_z_grad else ()
    return Inputs((_leaf(mu), _leaf(logvar)), (), grads)


def _pixel_inputs(B: int, N: int, dtype, device) -> tuple[Tensor, Tensor]:
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = (2.0 * torch.randn(B, N, generator=g)).to(device, dtype)
    x = (torch.rand(B, N, generator=g) < 0.3).to(device, dtype)
    return _leaf(logits), x


def _eager_kl(mu, logvar):
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp()) / mu.shape[0]


def _eager_sample(mu, logvar):
    std = torch.exp(0.5 * logvar)
    return mu + std * torch.randn_like(std)


def _eager_bce(logits, x):
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / logits.shape[0]


def _eager_gaussian_nll(mean, x):  # fixed unit variance (logvar = 0)
    return 0.5 * torch.sum((x - mean) ** 2 + LOG_2PI) / mean.shape[0]


def eager_loss_head(mu, logvar, logits, x):
    return _eager_bce(logits, x) + _eager_kl(mu, logvar), _eager_sample(mu, logvar)


def fastvae_loss_head(mu, logvar, logits, x):
    z, kl = fv.sample_and_kl(mu, logvar)
    return fv.bernoulli_nll(logits, x) + kl, z


@dataclass(frozen=True)
class Op:
    name: str
    make: Callable[[int, int, torch.dtype, torch.device], Inputs]
    impls: dict[str, Callable]  # "eager", "distributions" (optional), "fastvae"
    # bytes moved, in units of (B * N * itemsize), forward and backward: (fwd, bwd)
    traffic: tuple[float, float]
    # (B, N) sizes per device type when --sizes is not given (None: DEFAULT_SIZES)
    sizes: dict[str, list[tuple[int, int]]] | None = None


def _make_reparameterize(B, N, dtype, device):
    return _latent_inputs(B, N, dtype, device, with_z_grad=True)


def _make_kl(B, N, dtype, device):
    inputs = _latent_inputs(B, N, dtype, device, with_z_grad=False)
    return Inputs(inputs.leaves, (), (None,))


def _make_sample_and_kl(B, N, dtype, device):
    inputs = _latent_inputs(B, N, dtype, device, with_z_grad=True)
    return Inputs(inputs.leaves, (), (None, *inputs.out_grads))


def _make_bernoulli(B, N, dtype, device):
    logits, x = _pixel_inputs(B, N, dtype, device)
    return Inputs((logits,), (x,), (None,))


def _make_gaussian(B, N, dtype, device):
    mean, x = _pixel_inputs(B, N, dtype, device)
    return Inputs((mean,), (x,), (None,))


def _make_continuous_bernoulli(B, N, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    logits = (2.0 * torch.randn(B, N, generator=g)).to(device, dtype)
    x = torch.rand(B, N, generator=g).to(device, dtype)  # intensities in [0, 1]
    return Inputs((_leaf(logits),), (x,), (None,))


def _eager_continuous_bernoulli(logits, x):
    return -ContinuousBernoulli(logits=logits).log_prob(x).sum() / logits.shape[0]


# Image sizes (B x 3 x 32 x 32, B x 3 x 64 x 64) and, on a GPU, 1024 x 65536 (67M elements).
IMAGE_SIZES = {"cpu": [(16, 3 * 32 * 32), (8, 3 * 64 * 64)],
               "cuda": [(16, 3 * 32 * 32), (8, 3 * 64 * 64), (1024, 65536)]}


def _make_loss_head(B, N, dtype, device):
    lat = _latent_inputs(B, LATENT, dtype, device, with_z_grad=True)
    logits, x = _pixel_inputs(B, N, dtype, device)
    return Inputs((*lat.leaves, logits), (x,), (None, *lat.out_grads))


DMOL_MIXTURES = 10  # the DMoL cases: B images of 3 channels, N pixels (H * W flattened)
# 16 x 3 x 32 x 32, 8 x 3 x 64 x 64; on a GPU also 16 x 3 x 256 x 256 (105 M parameter elements)
DMOL_SIZES = {"cpu": [(16, 32 * 32), (8, 64 * 64)],
              "cuda": [(16, 32 * 32), (8, 64 * 64), (16, 256 * 256)]}


def _make_dmol(B, N, dtype, device):
    from ..ops.reference import dmol_params_per_mixture

    g = torch.Generator(device="cpu").manual_seed(2)
    M, C = DMOL_MIXTURES, 3
    params = torch.randn(B, dmol_params_per_mixture(C) * M, N, generator=g)
    params[:, M:].view(B, C, 3, M, N)[:, :, 1] -= 3.0  # log-scales around -3
    k = torch.randint(0, 256, (B, C, N), generator=g)
    x = k.float() * (2.0 / 255.0) - 1.0
    return Inputs((_leaf(params.to(device, dtype)),), (x.to(device, dtype),), (None,))


def _eager_dmol(params, x):
    """The PixelCNN++ loss as plain PyTorch (fastvae's float64 oracle, run in the inputs'
    dtype)."""
    from ..ops.reference import discretized_mix_logistic_nll

    return discretized_mix_logistic_nll(params, x, n_mixtures=DMOL_MIXTURES)


OPS: dict[str, Op] = {op.name: op for op in [
    Op("reparameterize", _make_reparameterize,
       {"eager": _eager_sample,
        "distributions": lambda m, lv: Normal(m, (0.5 * lv).exp()).rsample(),
        "fastvae": lambda m, lv: fv.reparameterize(m, lv)},
       traffic=(3, 4)),  # fwd: mu, lv -> z; bwd: g, lv -> dmu, dlv (eps regenerated)
    Op("gaussian_kl", _make_kl,
       {"eager": _eager_kl,
        "distributions": lambda m, lv: kl_divergence(
            Normal(m, (0.5 * lv).exp()), Normal(torch.zeros_like(m), torch.ones_like(m))
        ).sum() / m.shape[0],
        "fastvae": lambda m, lv: fv.gaussian_kl(m, lv)},
       traffic=(2, 4)),  # fwd: mu, lv; bwd: mu, lv -> dmu, dlv
    Op("bernoulli_nll", _make_bernoulli,
       {"eager": _eager_bce,
        "distributions": lambda lg, x: -Bernoulli(logits=lg).log_prob(x).sum() / lg.shape[0],
        "fastvae": lambda lg, x: fv.bernoulli_nll(lg, x)},
       traffic=(2, 3)),  # fwd: logits, x; bwd: logits, x -> dlogits
    Op("gaussian_nll", _make_gaussian,
       {"eager": _eager_gaussian_nll,
        "distributions": lambda m, x: -Normal(m, torch.ones_like(m)).log_prob(x).sum()
        / m.shape[0],
        "fastvae": lambda m, x: fv.gaussian_nll(m, x)},
       traffic=(2, 3)),  # fwd: mean, x; bwd: mean, x -> dmean
    Op("sample_and_kl", _make_sample_and_kl,
       {"eager": lambda m, lv: (_eager_kl(m, lv), _eager_sample(m, lv)),
        "fastvae": lambda m, lv: fv.sample_and_kl(m, lv)[::-1]},
       traffic=(3, 5)),  # fwd: mu, lv -> z; bwd: gz, mu, lv -> dmu, dlv
    Op("loss_head", _make_loss_head,
       {"eager": eager_loss_head, "fastvae": fastvae_loss_head},
       # per pixel: fwd logits, x; bwd logits, x -> dlogits. The latent part (B x 64: 3 fwd,
       # 5 bwd) is added in op_bytes.
       traffic=(2, 3)),
    Op("continuous_bernoulli_nll", _make_continuous_bernoulli,
       {"eager": _eager_continuous_bernoulli,
        "fastvae": lambda lg, x: fv.continuous_bernoulli_nll(lg, x)},
       traffic=(2, 3), sizes=IMAGE_SIZES),  # fwd: logits, x; bwd: logits, x -> dlogits
    Op("dmol_nll", _make_dmol,
       {"eager": _eager_dmol,
        "fastvae": lambda p, x: fv.discretized_mix_logistic_nll(p, x, n_mixtures=DMOL_MIXTURES)},
       # per pixel: fwd 10 M params + 3 x; bwd those again + 10 M d params
       traffic=(10 * DMOL_MIXTURES + 3, 20 * DMOL_MIXTURES + 3), sizes=DMOL_SIZES),
]}


def op_bytes(op: Op, B: int, N: int, itemsize: int, direction: str) -> int:
    """Bytes the op must move: inputs read once, outputs written once (losses are B floats)."""
    fwd, bwd = op.traffic
    units = fwd if direction == "fwd" else fwd + bwd
    total = units * B * N * itemsize
    if op.name == "loss_head":
        total += (3 if direction == "fwd" else 8) * B * LATENT * itemsize
    return int(total)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def time_fn(fn: Callable[[], object], device: torch.device) -> float:
    """Median seconds per call of one function (see ``time_group``)."""
    return time_group({"fn": fn}, device)["fn"]


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), measured now."""
    nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def saved_for_backward(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd saves for backward during one forward call of
    ``fn`` (inputs it saves included), kept until the output is dropped."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    op: str
    direction: str  # "fwd" or "fwd+bwd"
    impl: str  # "eager", "distributions", "compile", "fastvae:<backend>"
    batch: int
    features: int
    dtype: str

    @property
    def id(self) -> str:
        return f"{self.op}-{self.direction}-{self.impl}-{self.batch}x{self.features}-{self.dtype}"


def _call_fn(op: Op, impl: str, device: torch.device) -> Callable:
    if impl == "compile":
        return torch.compile(op.impls["eager"])
    if impl.startswith("fastvae:"):
        backend = impl.split(":", 1)[1]
        body = op.impls["fastvae"]
        if _backend.resolve(device) == backend:
            return body  # the backend in effect: no use_backend block in the timed call

        def call(*args):
            with fv.use_backend(backend):
                return body(*args)

        return call
    return op.impls[impl]


def make_runner(case: Case, device: torch.device) -> Callable[[], object]:
    """A no-argument callable running one case once (inputs built once, grads reset)."""
    op = OPS[case.op]
    dtype = getattr(torch, case.dtype)
    inputs = op.make(case.batch, case.features, dtype, device)
    fn = _call_fn(op, case.impl, device)
    args = (*inputs.leaves, *inputs.consts)
    if case.direction == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    def run_backward():
        for leaf in inputs.leaves:
            leaf.grad = None
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(outs, [torch.ones_like(o) if g is None else g
                                       for o, g in zip(outs, inputs.out_grads, strict=True)])

    return run_backward


def make_forward(case: Case, device: torch.device) -> Callable[[], object]:
    """One forward call of a case with autograd recording (for ``saved_for_backward``)."""
    op = OPS[case.op]
    inputs = op.make(case.batch, case.features, getattr(torch, case.dtype), device)
    fn = _call_fn(op, case.impl, device)
    return lambda: fn(*inputs.leaves, *inputs.consts)


def implementations(op: Op, device: torch.device, backends: Sequence[str] | None,
                    with_compile: bool = True) -> list[str]:
    impls = ["eager"] + (["distributions"] if "distributions" in op.impls else [])
    if with_compile:
        impls.append("compile")
    for name in backends or fv.backends():
        if _backend.unusable_reason(name, device) is None:
            impls.append(f"fastvae:{name}")
    return impls


DEFAULT_SIZES = {"cpu": [(64, 784), (4096, 784)],
                 "cuda": [(64, 784), (4096, 784), (65536, 1024)]}
DEFAULT_TRAIN_STEP = {"cpu": [(4096, 784)], "cuda": [(65536, 784)]}


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    op: str
    direction: str
    impl: str
    batch: int
    features: int
    dtype: str
    ms: float
    bytes: int
    gb_per_s: float
    pct_copy_bw: float
    vs_eager: float | None = None
    vs_compile: float | None = None
    peak_extra_mb: float | None = None
    saved_mb: float | None = None  # saved for backward (fwd+bwd rows)


def run_report(device: torch.device, *, ops: Sequence[str],
               sizes: Sequence[tuple[int, int]] | None,
               dtypes: Sequence[str], backends: Sequence[str] | None,
               directions: Sequence[str], with_compile: bool = True,
               log: Callable[[str], None] = print,
               on_rows: Callable[[list[Row], float], None] | None = None,
               ) -> tuple[list[Row], float]:
    """Every case; ``on_rows(rows so far, bandwidth)`` after each (to save results as they
    come, so that a run cut short keeps what it measured)."""
    bandwidth = copy_bandwidth(device)
    log(f"device-to-device copy bandwidth: {bandwidth / 1e9:.1f} GB/s")
    rows: list[Row] = []
    for op_name in ops:
        op = OPS[op_name]
        for B, N in sizes or (op.sizes or DEFAULT_SIZES)[device.type]:
            for dtype in dtypes:
                itemsize = getattr(torch, dtype).itemsize
                for direction in directions:
                    runners: dict[str, Callable[[], object]] = {}
                    for impl in implementations(op, device, backends, with_compile):
                        case = Case(op_name, direction, impl, B, N, dtype)
                        try:
                            runners[impl] = make_runner(case, device)
                            runners[impl]()  # compiles, and fails here rather than mid-timing
                        except Exception as e:  # one failing implementation must not end it
                            runners.pop(impl, None)
                            log(f"  {case.id}: failed ({type(e).__name__}: {e})")
                    times = time_group(runners, device)
                    nbytes = op_bytes(op, B, N, itemsize, direction)
                    group = []
                    for impl, seconds in times.items():
                        peak = peak_extra_memory(runners[impl], device)
                        saved = (saved_for_backward(make_forward(
                            Case(op_name, direction, impl, B, N, dtype), device))
                            if direction == "fwd+bwd" else None)
                        group.append(Row(op_name, direction, impl, B, N, dtype, seconds * 1e3,
                                         nbytes, nbytes / seconds / 1e9,
                                         100 * nbytes / seconds / bandwidth,
                                         peak_extra_mb=None if peak is None else peak / 2**20,
                                         saved_mb=None if saved is None else saved / 2**20))
                    for r in group:
                        r.vs_eager = times["eager"] / (r.ms / 1e3) if "eager" in times else None
                        r.vs_compile = (times["compile"] / (r.ms / 1e3) if "compile" in times
                                        else None)
                        log(format_row(r))
                    rows.extend(group)
                    if on_rows is not None:
                        on_rows(rows, bandwidth)
    return rows, bandwidth


HEADER = (f"{'op':15s} {'dir':7s} {'impl':16s} {'size':>12s} {'dtype':8s} {'ms':>9s} "
          f"{'GB/s':>8s} {'%copy':>6s} {'x eager':>8s} {'x compile':>9s} {'peak MB':>8s} "
          f"{'saved MB':>8s}")


def format_row(r: Row) -> str:
    def ratio(v):
        return f"{v:.2f}" if v is not None else "-"

    peak = f"{r.peak_extra_mb:.1f}" if r.peak_extra_mb is not None else "-"
    saved = f"{r.saved_mb:.2f}" if r.saved_mb is not None else "-"
    return (f"{r.op:15s} {r.direction:7s} {r.impl:16s} {f'{r.batch}x{r.features}':>12s} "
            f"{r.dtype:8s} {r.ms:9.3f} {r.gb_per_s:8.2f} {r.pct_copy_bw:6.1f} "
            f"{ratio(r.vs_eager):>8s} {ratio(r.vs_compile):>9s} {peak:>8s} {saved:>8s}")


def write_results(rows: list[Row], bandwidth: float, device: torch.device, out_dir: Path,
                  extra: dict | None = None, with_plot: bool = True) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__,
            "fastvae": fv.__version__, "date": time.strftime("%Y-%m-%d"),
            "threads": torch.get_num_threads(), "copy_bandwidth_gb_s": bandwidth / 1e9,
            "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(),
            "backends": fv.backends()}
    with contextlib.suppress(ImportError):
        import triton

        meta["triton"] = triton.__version__
    records = [asdict(r) for r in rows]
    paths = [out_dir / "results.json", out_dir / "results.csv"]
    paths[0].write_text(json.dumps({"meta": meta, **(extra or {}), "rows": records}, indent=2))
    if records:
        with paths[1].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        if with_plot:
            paths.append(plot(rows, meta, out_dir / "roofline.png"))
    return paths


def plot(rows: list[Row], meta: dict, path: Path) -> Path:
    """Per op and direction at the largest size: % of copy bandwidth of each implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    largest = max(r.batch * r.features for r in rows)
    sel = [r for r in rows if r.batch * r.features == largest]
    groups = sorted({(r.op, r.direction) for r in sel}, key=lambda k: (list(OPS).index(k[0]), k[1]))
    impls = sorted({r.impl for r in sel}, key=lambda s: (s.startswith("fastvae"), s))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) + 2), 4.5), dpi=120)
    width = 0.8 / max(1, len(impls))
    for j, impl in enumerate(impls):
        values = [next((r.pct_copy_bw for r in sel if (r.op, r.direction) == g and r.impl == impl),
                       0.0) for g in groups]
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=impl)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{op}\n{d}" for op, d in groups], fontsize=7)
    ax.set_ylabel("% of device copy bandwidth")
    size = next(f"{r.batch}x{r.features}" for r in sel)
    ax.set_title(f"{meta['device']} - {size} {sel[0].dtype} - torch {meta['torch']}", fontsize=9)
    ax.axhline(100, color="gray", linewidth=0.5)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# End to end: one training step of an MLP VAE
# ---------------------------------------------------------------------------------------------


def _mlp_vae(pixels: int, hidden: int, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    nn = torch.nn
    encoder = nn.Sequential(nn.Linear(pixels, hidden), nn.SiLU(), nn.Linear(hidden, 2 * LATENT))
    decoder = nn.Sequential(nn.Linear(LATENT, hidden), nn.SiLU(), nn.Linear(hidden, pixels))
    return encoder.to(device), decoder.to(device)


def make_train_step(impl: str, batch: int, pixels: int, device: torch.device,
                    hidden: int = 512) -> Callable[[], object]:
    """One Adam step of an MLP VAE (pixels -> hidden -> 2 x 64 -> hidden -> pixels) whose loss
    head is ``eager``, ``compile`` (the whole forward and loss compiled) or ``fastvae:<b>``."""
    torch.manual_seed(0)
    encoder, decoder = _mlp_vae(pixels, hidden, device)
    params = [*encoder.parameters(), *decoder.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    x = (torch.rand(batch, pixels, device=device) < 0.3).float()
    head = fastvae_loss_head if impl.startswith("fastvae:") else eager_loss_head

    def loss_of(x):
        mu, logvar = encoder(x).chunk(2, dim=-1)
        z = (fv.sample_and_kl(mu, logvar)[0] if impl.startswith("fastvae:")
             else _eager_sample(mu, logvar))
        return head(mu, logvar, decoder(z), x)[0]

    forward = torch.compile(loss_of) if impl == "compile" else loss_of
    backend = impl.split(":", 1)[1] if impl.startswith("fastvae:") else None

    def step():
        optimizer.zero_grad(set_to_none=True)
        with fv.use_backend(backend) if backend else contextlib.nullcontext():
            loss = forward(x)
        loss.backward()
        optimizer.step()

    return step


def run_train_step(device: torch.device, batch: int, pixels: int,
                   backends: Sequence[str] | None, with_compile: bool = True,
                   log: Callable[[str], None] = print) -> list[dict]:
    impls = ["eager"] + (["compile"] if with_compile else []) + [
        f"fastvae:{b}" for b in (backends or fv.backends())
        if _backend.unusable_reason(b, device) is None]
    steps = {impl: make_train_step(impl, batch, pixels, device) for impl in impls}
    for step in steps.values():
        step()
    times = time_group(steps, device)
    heads = time_group({impl: make_runner(Case("loss_head", "fwd+bwd", impl, batch, pixels,
                                               "float32"), device) for impl in impls}, device)
    results = []
    for impl in impls:
        peak = peak_extra_memory(steps[impl], device)
        row = {"impl": impl, "batch": batch, "pixels": pixels, "latent": LATENT,
               "step_ms": times[impl] * 1e3, "steps_per_s": 1 / times[impl],
               "vs_eager": times["eager"] / times[impl],
               "loss_head_ms": heads[impl] * 1e3, "loss_head_share": heads[impl] / times[impl],
               "peak_extra_mb": None if peak is None else peak / 2**20}
        log(f"train step {impl:16s} {batch}x{pixels}: {row['step_ms']:8.2f} ms "
            f"({row['steps_per_s']:7.1f} steps/s, {row['vs_eager']:.2f}x eager); loss head "
            f"{row['loss_head_ms']:.2f} ms = {100 * row['loss_head_share']:.0f}% of the step"
            + (f"; peak {row['peak_extra_mb']:.0f} MB" if peak is not None else ""))
        results.append(row)
    return results


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in split_list(text, "sizes")]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"sizes look like 64x784,4096x784; got {text!r}") \
            from None
    if any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise argparse.ArgumentTypeError(f"sizes look like 64x784,4096x784; got {text!r}")
    return sizes  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# The small-batch table: host overhead against eager PyTorch
# ---------------------------------------------------------------------------------------------

# B = 1, 16, 64, 256 images of 784 pixels (1 x 1: the host path alone), and the latent widths
SMALL_SIZES = [(1, 1), (16, 784), (64, 784), (256, 784)]
SMALL_LATENT_SIZES = [(16, 16), (64, 64), (256, 64)]
LATENT_OPS = ("reparameterize", "gaussian_kl", "sample_and_kl")
SMALL_OPS = ("loss_head", "bernoulli_nll", "gaussian_nll", "continuous_bernoulli_nll",
             "gaussian_kl", "reparameterize", "sample_and_kl")


# ... and the large size, where fastvae is held against torch.compile too
LARGE_SIZES = {"cpu": [(4096, 784)], "cuda": [(65536, 784)]}


@dataclass
class SmallRow:
    op: str
    batch: int
    features: int
    eager_us: float  # medians over the rounds
    fastvae_us: float
    ratio_median: float  # eager time / fastvae time: the median of the per-round ratios
    ratio_p10: float  # ... and their 10th percentile (the slow fastvae rounds)
    # (round i of eager against round i of fastvae: the same position in their blocks)
    compile_us: float | None = None  # the large sizes: torch.compile of the eager function
    compile_ratio_median: float | None = None  # compile time / fastvae time, per round
    compile_ratio_p10: float | None = None


def time_paired(fns: dict[str, Callable[[], object]], *, blocks: int = 6, rounds: int = 7,
                min_round_time: float = 0.02) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``blocks`` x ``rounds`` rounds: the
    functions take turns block by block (each block ``rounds`` rounds of one function), so that
    a change of load hits all alike while each function runs back to back, as in a training
    loop (interleaving single calls let torch's OpenMP workers fall asleep between eager calls
    and stall for milliseconds on this 2-core VM)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(20):
            fn()
    for _ in range(blocks):
        for name, fn in fns.items():
            for _ in range(rounds):
                n, start = 0, time.perf_counter()
                while True:
                    fn()
                    n += 1
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_round_time:
                        break
                samples[name].append(elapsed / n)
    return samples


def _ratios(slow: list[float], fast: list[float]) -> tuple[float, float]:
    """The median and 10th percentile of the per-round ratios slow / fast."""
    ratios = sorted(s / f for s, f in zip(slow, fast, strict=True))
    return statistics.median(ratios), ratios[len(ratios) // 10]


def run_small_batch(device: torch.device, ops: Sequence[str], *, with_compile: bool = True,
                    log: Callable[[str], None] = print) -> list[SmallRow]:
    """Forward + backward, float32, eager PyTorch against fastvae's default backend, at the
    small sizes (``SMALL_SIZES``, and ``SMALL_LATENT_SIZES`` for the latent ops), then at the
    large size (``LARGE_SIZES``) with torch.compile beside them (unless ``with_compile`` is
    False), all timed by ``time_paired``."""
    rows = []
    backend = _backend.resolve(device)
    fast_impl = f"fastvae:{backend}"
    for op_name in ops:
        sizes = SMALL_SIZES + (SMALL_LATENT_SIZES if op_name in LATENT_OPS else [])
        large = LARGE_SIZES[device.type]
        for B, N in sizes + large:
            impls = ["eager", fast_impl]
            if with_compile and (B, N) in large:
                impls.insert(1, "compile")
            runners = {impl: make_runner(Case(op_name, "fwd+bwd", impl, B, N, "float32"), device)
                       for impl in impls}
            # a round of a large size holds several calls (~2-10 ms each), so that its ratio
            # is not one call's against another's
            samples = time_paired(runners, min_round_time=0.1 if (B, N) in large else 0.02)
            eager, fast = samples["eager"], samples[fast_impl]
            row = SmallRow(op_name, B, N, statistics.median(eager) * 1e6,
                           statistics.median(fast) * 1e6, *_ratios(eager, fast))
            if "compile" in samples:
                row.compile_us = statistics.median(samples["compile"]) * 1e6
                row.compile_ratio_median, row.compile_ratio_p10 = _ratios(samples["compile"],
                                                                          fast)
            log(format_small(row))
            rows.append(row)
    return rows


SMALL_HEADER = (f"{'op':25s} {'size':>9s} {'eager us':>9s} {'fastvae us':>10s} "
                f"{'x eager (median)':>16s} {'(p10)':>6s} {'compile us':>10s} "
                f"{'x compile (median)':>18s} {'(p10)':>6s}")


def format_small(r: SmallRow) -> str:
    line = (f"{r.op:25s} {f'{r.batch}x{r.features}':>9s} {r.eager_us:9.1f} {r.fastvae_us:10.1f} "
            f"{r.ratio_median:16.2f} {r.ratio_p10:6.2f}")
    if r.compile_us is not None:
        line += (f" {r.compile_us:10.1f} {r.compile_ratio_median:18.2f} "
                 f"{r.compile_ratio_p10:6.2f}")
    return line


def crossover(rows: Sequence[SmallRow], op: str) -> str | None:
    """The smallest size (1 x 1, then B x 784 by batch) from which on fastvae is at least as
    fast as eager (by the median ratio), or None when it is slower at the largest."""
    sizes = sorted((r.batch, r.features, r.ratio_median) for r in rows
                   if r.op == op and (r.batch, r.features) in SMALL_SIZES)
    start = None
    for batch, features, ratio in sizes:
        if ratio >= 1.0 and start is None:
            start = f"{batch} x {features}"
        elif ratio < 1.0:
            start = None
    return start


def write_small_batch(rows: Sequence[SmallRow], device: torch.device, out_dir: Path,
                      heap: str = "heap: allocator defaults") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name(device), "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(), "backend": _backend.resolve(device), "heap": heap}
    lines = [f"# fastvae bench --small-batch: {meta['device']}, torch {meta['torch']}, "
             f"{meta['threads']} threads, {meta['date']}, load average "
             f"{' '.join(f'{v:.2f}' for v in meta['load_average'])}, {heap}",
             "# forward + backward, float32; x eager = eager time / fastvae time, x compile = "
             "torch.compile time / fastvae time (median and 10th percentile of per-round "
             "ratios)", SMALL_HEADER]
    lines += [format_small(r) for r in rows]
    for op in dict.fromkeys(r.op for r in rows):
        b = crossover(rows, op)
        lines.append(f"# {op}: " + (f"at least as fast as eager from {b} on"
                                    if b is not None else "slower than eager at every batch"))
    stem = f"small_batch_{meta['threads']}t"
    path = out_dir / f"{stem}.txt"
    path.write_text("\n".join(lines) + "\n")
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    return path


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="roofline report of every op, backend and size",
                       description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(op for op in OPS if op != "dmol_nll"),
                   help=f"comma-separated: {', '.join(OPS)}, "
                        f"{', '.join(bench_quantizers.QUANTIZERS)}, tokenizers (dmol_nll: not "
                        "by default; its sizes are B x pixels of 3-channel images, e.g. "
                        "16x1024,8x4096; the quantizers, not by default: vq, rvq, fsq, lfq "
                        "against vector-quantize-pytorch (eager and compiled), tokenizers = "
                        "rvq,fsq,lfq; their sizes given by --vq-sizes etc., each written to "
                        "<op>.txt, <op>.json, <op>.csv)")
    p.add_argument("--sizes", type=_sizes, default=None,
                   help="BxN list, e.g. 64x784,4096x784 (default depends on the device)")
    p.add_argument("--dtypes", default="float32", help="e.g. float32,bfloat16")
    p.add_argument("--backends", default=None, help="fastvae backends (default: all usable)")
    p.add_argument("--directions", default="fwd,fwd+bwd")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--train-step", default=None, type=_sizes,
                   help="BxPIXELS sizes of the MLP VAE training-step benchmark "
                        "(default: 4096x784 on CPU, 65536x784 on GPU)")
    p.add_argument("--no-train-step", action="store_true", help="skip the training step")
    bench_quantizers.add_arguments(p)
    p.add_argument("--no-memory", action="store_true",
                   help="--ops vq/rvq/fsq/lfq on the CPU: skip the peak-memory processes")
    p.add_argument("--out", default=None,
                   help="results directory (default: benchmarks/results/<device name>)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (and the native CPU kernels' threads) for the run")
    p.add_argument("--default-heap", action="store_true",
                   help="CPU: leave glibc's heap trimming on (by default the bench turns it off "
                        "for every implementation alike, so that a call does not page-fault "
                        "the memory the previous call freed back in)")
    p.add_argument("--small-batch", action="store_true",
                   help="only the small-batch table: forward + backward against eager at "
                        "B = 1, 16, 64, 256 x 784 and the latent sizes (host overhead), and "
                        "against eager and torch.compile at 4096 x 784 (65536 x 784 on a "
                        "GPU; --no-compile leaves compile out), timed in paired rounds; "
                        "--ops selects among " + ", ".join(SMALL_OPS))
    p.set_defaults(run=run_command)


def run_command(args: argparse.Namespace) -> int:
    from .args import UsageError

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                              if args.device == "auto" else args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device: unknown device {args.device!r}; use auto, cpu, cuda or "
                         "cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")

    def names(option: str, text: str, known: Sequence[str]) -> list[str]:
        """A comma-separated list: at least one name, each one known."""
        try:
            given = split_list(text, "names")
        except argparse.ArgumentTypeError as e:
            raise UsageError(f"{option}: {e}; choose from {', '.join(known)}") from None
        unknown = [v for v in given if v not in known]
        if unknown:
            raise UsageError(f"{option}: unknown {', '.join(unknown)}; choose from "
                             f"{', '.join(known)}")
        return given

    heap = ("heap: allocator defaults (--default-heap)" if args.default_heap or
            device.type != "cpu" else steady_heap())
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.small_batch:
        given = names("--ops", args.ops, OPS)
        ops = [op for op in SMALL_OPS if op in given] or list(SMALL_OPS)
        out = Path(args.out) if args.out else Path("benchmarks") / "results" / device_name(device)
        print(f"fastvae bench --small-batch on {device_name(device)}; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; backend {_backend.resolve(device)}; {heap}")
        print(SMALL_HEADER)
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        rows = run_small_batch(device, ops, with_compile=not args.no_compile)
        print(f"wrote {write_small_batch(rows, device, out, heap)}")
        return 0
    ops = names("--ops", args.ops, [*OPS, *bench_quantizers.QUANTIZERS,
                                    *bench_quantizers.GROUPS])
    quantizers = bench_quantizers.prepare(bench_quantizers.selected(ops), args, names)
    ops = [op for op in ops if op in OPS]
    dtypes = names("--dtypes", args.dtypes, ("float32", "float16", "bfloat16", "float64"))
    directions = names("--directions", args.directions, ("fwd", "fwd+bwd"))
    backends = None
    if args.backends is not None:
        backends = names("--backends", args.backends, _backend.CONCRETE)
        for b in backends:
            reason = _backend.unusable_reason(b, device)
            if reason is not None:
                raise UsageError(f"--backends: {b!r} cannot run here: {reason}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    sizes = args.sizes  # None: each op's default sizes
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    print(f"fastvae bench on {device_name(device)}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; backends {', '.join(backends or fv.backends())}; "
          f"{heap}")
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / device_name(device)
    if ops:
        print(HEADER)
        rows, bandwidth = run_report(
            device, ops=ops, sizes=sizes, dtypes=dtypes, backends=backends,
            directions=directions, with_compile=not args.no_compile,
            on_rows=lambda rows, bw: write_results(rows, bw, device, out, with_plot=False))
        train_steps = []
        if not args.no_train_step:
            for B, P in args.train_step or DEFAULT_TRAIN_STEP[device.type]:
                train_steps += run_train_step(device, B, P, backends, not args.no_compile)
        paths = write_results(rows, bandwidth, device, out, {"train_step": train_steps})
        print(f"wrote {', '.join(str(p) for p in paths)}")
    if quantizers:
        bench_quantizers.run(quantizers, device, out)
    return 0
