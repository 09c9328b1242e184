#!/usr/bin/env python
"""Compile every GPU kernel of fastvae for NVIDIA GPUs on a machine that has none.

    python scripts/check_triton_compile.py [--full] [--arch 80,90] [--no-nvcc] [--list]

Part 1, Triton (``fastvae.kernels``). Triton's interpreter, which runs the test suite without a
GPU, accepts code that Triton's GPU compiler rejects (a module global read inside ``@jit`` code,
a Python call, a dtype mix, a misused ``tl.constexpr``). This part compiles the kernels as a GPU
run would, through the real launchers, and fails on any error:

* Target: Triton's active driver is replaced by one whose ``get_current_target()`` is
  ``GPUTarget("cuda", arch, 32)`` (sm_80 = A100, sm_90 = H100/H200); its current device is the
  arch number, so each arch has its own in-memory kernel cache. Triton's bundled ptxas turns the
  PTX into a cubin exactly as on a GPU machine; nothing is loaded or launched.
* Launches: ``JITFunction.run`` is wrapped to pass ``warmup=True`` (compile only). The wrapper
  also records each launch's grid and asserts it fits the hardware (x < 2**31, y and z <=
  65535, none empty).
* Tensors: the launchers in ``fastvae.kernels`` (the backend interface, the functions real
  calls reach) run unchanged on ``meta`` tensors: they carry dtype, shape, strides and storage
  offset but no memory, so views of 2**31 elements and more cost nothing, and ``data_ptr()`` is
  the byte offset, so Triton's pointer specialization (16-byte aligned or not) is the one a CUDA
  tensor with that offset gets. The launchers' own allocations (outputs, partial sums) and host
  arithmetic (``expand``, ``sum``) run on meta as well. ``kernels._common.interpreted(meta)`` is
  False, so ``tiling``/``split`` take the GPU path; the SM count is faked (108 for sm_80, 132 for
  sm_90), and the script asserts that meta and cuda devices get the same tiling.
* Specializations: Triton compiles one kernel per dtype signature, ``tl.constexpr`` value
  (flags, tile sizes, ``num_warps``), pointer alignment and integer class (== 1, multiple of 16,
  other, >= 2**31 which becomes i64). The cases below cover the four dtypes, contiguous, padded,
  transposed, misaligned and stride-0 (broadcast) operands, every flag and reduction
  combination, ``n_samples`` 1 / odd / multiple of 16, sizes and strides >= 2**31 and views past
  2**31 elements. The default set is representative (see ``points``): every flag combination
  in float32, every dtype with every flag combination but the gradient subsets, every dtype at
  the main shapes, every other variant once in float32. ``--full`` crosses every dtype and flag
  combination with every value of each other axis; the whole cross product (~96,000 kernels
  per arch) is out of reach.
* Report: a table per kernel and arch (registers, spill stores/loads, shared memory) from
  ``ptxas -v`` on the generated PTX, with Triton's own ptxas and flags; results are cached by
  PTX hash in the Triton cache directory.

Part 2, CUDA C++ (``csrc/cuda.cu``): nvcc ``-Xptxas -v`` for each arch, same table. Skipped with
``--no-nvcc``; an error when nvcc is missing otherwise.

Also a failure: a float64 kernel whose PTX holds a float32-rounded constant (a Python float
that became a float32 scalar before meeting a float64 operand) or takes a float32 parameter (a
Python float kernel argument, which Triton passes as float32).

Exit status 1 on any compile error, grid overflow or missing tool. Cost (2 cores, triton 3.9):
the default set is ~980 distinct kernels for sm_80 + sm_90, ~255 CPU-seconds cold, compiled in
one process per CPU; ~5 s with a warm Triton cache; nvcc ~20 s. ``--full`` is ~2700 kernels per
arch. Set ``TRITON_CACHE_DIR`` to a fresh directory to time a cold run (as in CI).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # @triton.jit reads it at decoration time: interpreted kernels never reach the compiler.
    sys.exit("check_triton_compile: unset TRITON_INTERPRET (the check compiles for the GPU)")

import warnings

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

try:  # a @triton.jit function passed as a tl.constexpr (Triton >= 3.5; JITFunction before)
    from triton.runtime.jit import JITCallable
except ImportError:
    JITCallable = JITFunction

# Triton 3.9 warns in every process that its FP-fusion default changes in 3.10; the check
# compiles with the default that real calls get.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

ROOT = Path(__file__).resolve().parent.parent
META = torch.device("meta")
SM_COUNT = {80: 108, 86: 84, 89: 128, 90: 132}
GRID_MAX = (2**31 - 1, 65535, 65535)


# ---------------------------------------------------------------------------------------------
# Offline target and compile-only launches
# ---------------------------------------------------------------------------------------------


class OfflineCudaDriver:
    """The part of Triton's driver interface that compiling needs, for a GPU that is absent."""

    def __init__(self, arch: int):
        self.arch = arch

    @staticmethod
    def is_active() -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return self.arch  # one kernel cache per arch

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return META


@dataclasses.dataclass
class Launch:
    case: str
    kernel: str
    grid: tuple[int, ...]
    meta: dict
    compiled: object | None


class Recorder:
    """Wraps ``JITFunction.run``: compile only, check the grid, remember what was compiled."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.case = ""
        self._run = JITFunction.run

    def __enter__(self):
        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if callable(grid):
                raise AssertionError(f"{kernel.__name__}: grid is a callable; the check needs "
                                     "the launch grid as a tuple")
            grid = tuple(int(g) for g in grid)
            compiled = recorder._run(kernel, *args, grid=grid, warmup=True, **kwargs)
            recorder.launches.append(Launch(recorder.case, kernel_label(kernel, kwargs), grid,
                                            dict(kwargs), compiled))
            check_grid(kernel.__name__, grid)
            return compiled

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._run


def kernel_label(kernel, meta: dict) -> str:
    """The kernel's name, and the formulas it was given as ``tl.constexpr`` functions (a kernel
    that serves several ops: ``_likelihood_fwd_kernel[_bernoulli_value]``), so that each op's
    kernels have their own rows in the report."""
    formulas = [v.__name__ for v in meta.values() if isinstance(v, JITCallable)]
    return kernel.__name__ + "".join(f"[{name}]" for name in formulas)


@contextlib.contextmanager
def offline_gpu(arch: int) -> Iterator[Recorder]:
    """Within: Triton compiles for ``GPUTarget("cuda", arch, 32)``, launches only compile (the
    returned recorder lists them), and fastvae's kernels see that GPU's SM count."""
    from fastvae.kernels import _common

    sm_count, previous = _common._sm_count, driver._active
    driver.set_active(OfflineCudaDriver(arch))
    _common._sm_count = lambda index: SM_COUNT.get(arch, 132)
    try:
        with Recorder() as rec:
            yield rec
    finally:
        _common._sm_count = sm_count
        driver._active = previous


def check_grid(kernel: str, grid: tuple[int, ...]) -> None:
    if not 1 <= len(grid) <= 3:
        raise AssertionError(f"{kernel}: grid {grid} must have 1 to 3 dimensions")
    for axis, (size, limit) in enumerate(zip(grid, GRID_MAX, strict=False)):
        if not 1 <= size <= limit:
            raise AssertionError(f"{kernel}: grid {grid} axis {'xyz'[axis]} = {size} is outside "
                                 f"[1, {limit}]")


# ---------------------------------------------------------------------------------------------
# Operands (meta tensors)
# ---------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# (B, N): an image-sized event, a latent, N = 1, a single element, odd sizes, one long row; then
# int64: past 2**31 elements with 32-bit sizes, B >= 2**31, N >= 2**31 (a multiple of 16).
SHAPES = ((4096, 784), (256, 32), (4096, 1), (1, 1), (3, 5), (65539, 32769), (2**31 + 1, 1),
          (1, 2**31 + 16))
DTYPE_SHAPES = SHAPES[:4] + SHAPES[5:7]  # with every dtype in the default set
LAYOUTS = ("contiguous", "padded", "transposed", "misaligned", "row", "scalar", "wide")


def empty(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=META)


def operand(B: int, N: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A (B, N) operand with the given memory layout."""
    if layout == "contiguous":
        return empty(B, N, dtype=dtype)
    if layout == "padded":  # rows of a wider tensor: odd row stride
        return empty(B, N + 3, dtype=dtype)[:, :N]
    if layout == "transposed":  # column-major: strides (1, B)
        return empty(N, B, dtype=dtype).t()
    if layout == "misaligned":  # contiguous from an odd offset: pointer not 16-byte aligned
        return empty(B * N + 1, dtype=dtype)[1:].view(B, N)
    if layout == "row":  # one row broadcast over the batch: strides (0, 1)
        return empty(N, dtype=dtype).expand(B, N)
    if layout == "scalar":  # strides (0, 0)
        return empty(dtype=dtype).expand(B, N)
    if layout == "wide":  # rows of a tensor wider than 2**31 elements: i64 row stride
        return empty(B, max(N, 2**31) + 5, dtype=dtype)[:, :N]
    raise ValueError(layout)


def samples(K: int, B: int, N: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A (K, B, N) operand: contiguous, or one (B, N) tensor broadcast over K (stride 0)."""
    if layout == "contiguous":
        return empty(K, B, N, dtype=dtype)
    if layout == "broadcast":
        return empty(B, N, dtype=dtype).expand(K, B, N)
    if layout == "scalar":  # the gradient of a sum: one value everywhere
        return empty(dtype=dtype).expand(K, B, N)
    raise ValueError(layout)


def per_sample(M: int, dtype: torch.dtype, layout: str) -> torch.Tensor:
    """A loss gradient of M values: contiguous, or the gradient of a mean (stride 0)."""
    return empty(M, dtype=dtype) if layout == "contiguous" else empty(dtype=dtype).expand(M)


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seed() -> torch.Tensor:
    return empty(1, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Cases: every launcher of the Triton backend, over its specializations
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
    """One launcher. ``axes``: name -> values, the first value the base. ``flags``: the axes
    that select code (``tl.constexpr`` flags, n_samples); ``needs``: the gradient-subset axis.
    ``call(K, p)`` runs the launcher of module ``K`` for point ``p``; ``fix(p)`` turns a point
    into one a real call makes (no gradient asked for an absent operand), or None."""

    name: str
    axes: dict
    flags: tuple[str, ...]
    call: Callable
    fix: Callable = lambda p: p
    needs: str | None = None


def _drop_needs(p: dict, flag: str, first: int) -> dict | None:
    """Without the optional operands (``flag`` False) their gradients (``needs[first:]``) are
    not asked for; None when nothing is left."""
    if p[flag]:
        return p
    needs = p["needs"][:first] + (False,) * (len(p["needs"]) - first)
    return {**p, "needs": needs} if any(needs) else None


def subsets(n: int) -> list[tuple[bool, ...]]:
    """Non-empty gradient subsets, all-true first."""
    return sorted((c for c in itertools.product((True, False), repeat=n) if any(c)),
                  key=lambda c: -sum(c))


def _reparameterize_fwd(K, p):
    B, N = p["shape"]
    mu, lv = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    eps = samples(p["K"], B, N, p["dtype"], p["eps"]) if p["has_eps"] else None
    K.reparameterize_fwd(mu, lv, eps, None if eps is not None else seed(), p["K"], p["keep"])


def _reparameterize_bwd(K, p):
    B, N = p["shape"]
    mu, lv = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    eps = samples(p["K"], B, N, p["dtype"], p["eps"]) if p["has_eps"] else None
    grad = samples(p["K"], B, N, p["dtype"], p["grad"])
    noise = grad.new_empty((0,))  # not kept: regenerated (a kept one reads as a given eps)
    K.reparameterize_bwd(grad, noise, mu, lv, eps, None if eps is not None else seed(),
                         list(p["needs"]))


def _kl_operands(p):
    B, N = p["shape"]
    mu, lv = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    prior = tuple(operand(B, N, p["dtype"], p["prior"]) if p["has_prior"] else None
                  for _ in range(2))
    return mu, lv, prior


def _gaussian_kl_fwd(K, p):
    mu, lv, prior = _kl_operands(p)
    K.gaussian_kl_fwd(mu, lv, *prior, p["reduce_dim"])


def _gaussian_kl_bwd(K, p):
    mu, lv, prior = _kl_operands(p)
    B, N = p["shape"]
    grad = per_sample(B if p["reduce_dim"] == 1 else N, out_dtype(p["dtype"]), p["grad"])
    K.gaussian_kl_bwd(grad, mu, lv, *prior, p["reduce_dim"], list(p["needs"]))


def _logits_nll_fwd(op: str) -> Callable:
    """The forward of a likelihood of (logits, target): bernoulli_nll, continuous_bernoulli_nll."""
    def call(K, p):
        B, N = p["shape"]
        getattr(K, f"{op}_fwd")(*(operand(B, N, p["dtype"], p["layout"]) for _ in range(2)))
    return call


def _logits_nll_bwd(op: str) -> Callable:
    def call(K, p):
        B, N = p["shape"]
        grad = per_sample(B, out_dtype(p["dtype"]), p["grad"])
        getattr(K, f"{op}_bwd")(grad, *(operand(B, N, p["dtype"], p["layout"]) for _ in range(2)),
                                list(p["needs"]))
    return call


def _nll_operands(p):
    B, N = p["shape"]
    mean, target = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    logvar = operand(B, N, p["dtype"], p["logvar"]) if p["has_logvar"] else None
    return mean, target, logvar, -0.5


def _gaussian_nll_fwd(K, p):
    K.gaussian_nll_fwd(*_nll_operands(p))


def _gaussian_nll_bwd(K, p):
    grad = per_sample(p["shape"][0], out_dtype(p["dtype"]), p["grad"])
    K.gaussian_nll_bwd(grad, *_nll_operands(p), list(p["needs"]))


def _sample_and_kl_fwd(K, p):
    B, N = p["shape"]
    mu, lv = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    K.sample_and_kl_fwd(mu, lv, seed(), p["reduce_dim"])


def _sample_and_kl_bwd(K, p):
    B, N = p["shape"]
    mu, lv = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    grad_z = samples(1, B, N, p["dtype"], p["grad"])[0]
    grad_kl = per_sample(B if p["reduce_dim"] == 1 else N, out_dtype(p["dtype"]), p["grad"])
    K.sample_and_kl_bwd(grad_z, grad_kl, mu, lv, seed(), p["reduce_dim"], list(p["needs"]))


def _iwae_operands(p):
    B, N = p["shape"]
    z = samples(p["K"], B, N, p["dtype"], p["z"])
    mu, lv = (operand(B, N, p["dtype"], p["layout"]) for _ in range(2))
    log_px = empty(p["K"], B, dtype=p["lpx_dtype"] or p["dtype"])
    return log_px, z, mu, lv


def _iwae_fwd(K, p):
    K.iwae_fwd(*_iwae_operands(p))


def _iwae_bwd(K, p):
    log_px, z, mu, lv = _iwae_operands(p)
    B = p["shape"][0]
    out = empty(B, dtype=out_dtype(p["dtype"]))
    log_w = empty(p["K"], B, dtype=out_dtype(p["dtype"]))
    grad = per_sample(B, out_dtype(p["dtype"]), p["grad"])
    K.iwae_bwd(grad, out, log_w, log_px, z, mu, lv, list(p["needs"]))


def _dmol(K, p):
    """The discretized mixture of logistics on (B, P, S) parameters and (B, C, S) pixels."""
    B, S = p["shape"]
    C, M = p["channels"], p["mixtures"]
    P = M * (3 if C == 1 else 1 + 3 * C)
    params = operand(B * P, S, p["dtype"], p["layout"]).view(B, P, S)
    x = operand(B * C, S, p["dtype"], "contiguous").view(B, C, S)
    if p["backward"]:
        grad = per_sample(B, out_dtype(p["dtype"]), "contiguous")
        K.discretized_mix_logistic_nll_bwd(grad, params, x, M, p["n_bins"])
    else:
        K.discretized_mix_logistic_nll_fwd(params, x, M, p["n_bins"])


def _nearest_code(K, p):
    """x (N, D) and a codebook (K, D) of one dtype; the codebook contiguous or transposed."""
    N, D = p["shape"]
    x = operand(N, D, p["dtype"], p["layout"])
    codebook = operand(p["K"], D, p["dtype"], p["codebook"])
    K.nearest_code_fwd(x, codebook, p["metric"])


def _fsq(K, p):
    """Finite scalar quantization: z (B, D) in a layout, the (D,) levels, basis (int64) and the
    bound's constants (compute dtype); the backward with a gradient of z's dtype."""
    B, D = p["shape"]
    z = operand(B, D, p["dtype"], p["layout"])
    levels, basis = empty(D, dtype=torch.int64), empty(D, dtype=torch.int64)
    a, b = empty(D, dtype=out_dtype(p["dtype"])), empty(D, dtype=out_dtype(p["dtype"]))
    if p["backward"]:
        grad = operand(B, D, p["dtype"], p["grad"])
        K.finite_scalar_quantize_bwd(grad, z, levels, basis, a, b, p["mode"])
    else:
        K.finite_scalar_quantize_fwd(z, levels, basis, a, b, p["mode"])


def _fsq_dims(p: dict) -> dict | None:
    """FSQ has at most 62 dimensions (2**62 codes of two levels): not the wide shapes of
    DTYPE_SHAPES."""
    return p if p["shape"][1] <= 64 else None


def _lfq(K, p):
    """LFQ's bit logits (R, C, d): contiguous, or codebook-major (a transposed view)."""
    R, C, d = p["size"]
    if p["layout"] == "contiguous":
        logits = empty(R, C, d, dtype=p["dtype"])
    else:
        logits = empty(C, R, d, dtype=p["dtype"]).transpose(0, 1)
    if p["backward"]:
        cdt = out_dtype(p["dtype"])
        K.lfq_entropy_bwd(empty(C, 1 << d, dtype=cdt), empty(R, C, dtype=cdt), logits,
                          p["eps"], [True])
    else:
        K.lfq_entropy_fwd(logits, p["eps"])


def _residual_vq(K, p):
    """x (N, D) and codebooks (L, K, D) in a compute dtype (the op converts before it), the
    per-row level counts or none; the backward with its gradients (N, L) of a mean or not."""
    N, D = p["shape"]
    L, codes = p["levels"], p["K"]
    x = operand(N, D, p["dtype"], p["layout"])
    codebooks = empty(L, codes, D, dtype=p["dtype"])
    n_levels = empty(N, dtype=torch.int64) if p["dropout"] else None
    if not p["backward"]:
        K.residual_vq_fwd(x, codebooks, n_levels, 0)
        return
    grad_q = operand(N, D, p["dtype"], "contiguous")
    grad = (empty(N, L, dtype=p["dtype"]) if p["grad"] == "contiguous"
            else empty(L, dtype=p["dtype"]).expand(N, L))
    indices = empty(N, L, dtype=torch.int64)
    K.residual_vq_bwd(grad_q, grad, grad, indices, x, codebooks, n_levels, p["rotation"],
                      list(p["needs"]))


def _common_axes(**extra) -> dict:
    return {"dtype": DTYPES, "shape": SHAPES, "layout": LAYOUTS, **extra}


# Optional operands: a flag (the kernel's HAS_*) and, when present, a layout.
EPS = {"has_eps": (False, True), "eps": ("contiguous", "broadcast")}
PRIOR = {"has_prior": (False, True), "prior": ("contiguous", "row", "scalar")}
LOGVAR = {"has_logvar": (True, False), "logvar": ("contiguous", "row", "scalar")}
GRADS = ("contiguous", "broadcast")
FAMILIES = (
    # n_samples: the constant 1 (the default), odd, a multiple of 16
    # keep: the forward writes the noise it drew (KEEP, without eps only)
    Family("reparameterize_fwd", _common_axes(**EPS, K=(1, 3, 16), keep=(False, True)),
           ("has_eps", "keep"), _reparameterize_fwd,
           fix=lambda p: None if p["keep"] and p["has_eps"] else p),
    Family("reparameterize_bwd",
           _common_axes(**EPS, K=(1, 3, 16), needs=subsets(3), grad=("contiguous", "scalar")),
           ("has_eps", "needs"), _reparameterize_bwd,
           fix=lambda p: _drop_needs(p, "has_eps", 2), needs="needs"),
    Family("gaussian_kl_fwd", _common_axes(**PRIOR, reduce_dim=(1, 0)),
           ("has_prior", "reduce_dim"), _gaussian_kl_fwd),
    Family("gaussian_kl_bwd", _common_axes(**PRIOR, reduce_dim=(1, 0), needs=subsets(4),
                                           grad=GRADS),
           ("has_prior", "reduce_dim", "needs"), _gaussian_kl_bwd,
           fix=lambda p: _drop_needs(p, "has_prior", 2), needs="needs"),
    Family("bernoulli_nll_fwd", _common_axes(), (), _logits_nll_fwd("bernoulli_nll")),
    Family("bernoulli_nll_bwd", _common_axes(needs=subsets(2), grad=GRADS), ("needs",),
           _logits_nll_bwd("bernoulli_nll"), needs="needs"),
    Family("continuous_bernoulli_nll_fwd", _common_axes(), (),
           _logits_nll_fwd("continuous_bernoulli_nll")),
    Family("continuous_bernoulli_nll_bwd", _common_axes(needs=subsets(2), grad=GRADS),
           ("needs",), _logits_nll_bwd("continuous_bernoulli_nll"), needs="needs"),
    Family("gaussian_nll_fwd", _common_axes(**LOGVAR), ("has_logvar",), _gaussian_nll_fwd),
    Family("gaussian_nll_bwd", _common_axes(**LOGVAR, needs=subsets(3), grad=GRADS),
           ("has_logvar", "needs"), _gaussian_nll_bwd,
           fix=lambda p: _drop_needs(p, "has_logvar", 2), needs="needs"),
    Family("sample_and_kl_fwd", _common_axes(reduce_dim=(1, 0)), ("reduce_dim",),
           _sample_and_kl_fwd),
    Family("sample_and_kl_bwd", _common_axes(reduce_dim=(1, 0), needs=subsets(2), grad=GRADS),
           ("reduce_dim", "needs"), _sample_and_kl_bwd, needs="needs"),
    Family("discretized_mix_logistic_nll_fwd",
           {"dtype": DTYPES, "shape": ((16, 1024), (8, 4096)), "layout": ("contiguous",),
            "channels": (3, 1), "mixtures": (10, 1), "n_bins": (256, 2), "backward": (False,)},
           ("channels", "mixtures"), _dmol),
    Family("discretized_mix_logistic_nll_bwd",
           {"dtype": DTYPES, "shape": ((16, 1024), (8, 4096)), "layout": ("contiguous",),
            "channels": (3, 1), "mixtures": (10, 1), "n_bins": (256, 2), "backward": (True,)},
           ("channels", "mixtures"), _dmol),
    Family("iwae_fwd",
           _common_axes(K=(16, 1, 3), z=("contiguous", "broadcast"),
                        lpx_dtype=(None, torch.float32, torch.float16, torch.float64)),
           (), _iwae_fwd),
    Family("iwae_bwd",
           _common_axes(K=(16, 1, 3), z=("contiguous", "broadcast"),
                        lpx_dtype=(None, torch.float16), needs=subsets(4), grad=GRADS),
           ("needs",), _iwae_bwd, needs="needs"),
    # (N, D): a tokenizer batch at D = 64, D = 8, odd D, D past one BLOCK_D chunk, 1 x 1; the
    # codebook size K: 16384, odd, a single code, fewer codes than one tile
    Family("nearest_code_fwd",
           {"dtype": DTYPES, "shape": ((4096, 64), (32768, 8), (1000, 3), (256, 300), (1, 1)),
            "layout": ("contiguous", "padded", "transposed", "misaligned"),
            "metric": ("l2", "cosine"), "K": (16384, 1001, 1, 40),
            "codebook": ("contiguous", "transposed", "padded")},
           ("metric",), _nearest_code),
    # (B, D): tokenizer batches at D = 6 ([8, 8, 8, 5, 5, 5]) and 16 ([4] * 16), odd sizes, one
    # element, B >= 2**31; mode: the tanh bound, symmetric, hard clamp, both
    Family("finite_scalar_quantize_fwd",
           {"dtype": DTYPES, "shape": ((65536, 6), (4096, 16), (3, 5), (1, 1), (2**31 + 1, 6)),
            "layout": ("contiguous", "padded", "transposed", "misaligned"),
            "mode": (0, 1, 2, 3), "backward": (False,)},
           ("mode",), _fsq, fix=_fsq_dims),
    Family("finite_scalar_quantize_bwd",
           {"dtype": DTYPES, "shape": ((65536, 6), (4096, 16), (3, 5), (1, 1), (2**31 + 1, 6)),
            "layout": ("contiguous", "transposed"), "grad": ("contiguous", "row", "padded"),
            "mode": (0, 1, 2, 3), "backward": (True,)},
           ("mode",), _fsq, fix=_fsq_dims),
    # LFQ's entropy statistics, size (rows, codebooks, bits): MAGVIT-v2's d = 18 at a
    # tokenizer's batch, d = 10 with 4 codebooks, d = 1, an odd d; eps = 0 (exact) or the
    # package's clamp. Its own axis "size", not "shape": the (B, N) shapes do not apply
    Family("lfq_entropy_fwd",
           {"dtype": DTYPES, "size": ((16384, 1, 18), (4096, 4, 10), (7, 3, 1), (33, 2, 5)),
            "layout": ("contiguous", "transposed"), "eps": (0.0, 1e-5), "backward": (False,)},
           ("eps",), _lfq),
    Family("lfq_entropy_bwd",
           {"dtype": DTYPES, "size": ((16384, 1, 18), (4096, 4, 10), (7, 3, 1), (33, 2, 5)),
            "layout": ("contiguous", "transposed"), "eps": (0.0, 1e-5), "backward": (True,)},
           ("eps",), _lfq),
    # residual VQ: levels of the nearest-code search on the residual (above) and the update;
    # the backward's kernel per row block, D in one block (D = 300: 512 lanes)
    Family("residual_vq_fwd",
           {"dtype": (torch.float32, torch.float64),
            "shape": ((4096, 64), (32768, 8), (1000, 3), (256, 300), (1, 1)),
            "layout": ("contiguous", "padded", "transposed", "misaligned"),
            "levels": (8, 1), "K": (1024, 1001, 1), "dropout": (False, True),
            "backward": (False,)},
           ("dropout",), _residual_vq),
    Family("residual_vq_bwd",
           {"dtype": (torch.float32, torch.float64),
            "shape": ((4096, 64), (32768, 8), (1000, 3), (256, 300), (1, 1)),
            "layout": ("contiguous", "padded", "transposed", "misaligned"),
            "levels": (8, 1), "K": (1024, 1), "dropout": (False,), "backward": (True,),
            "rotation": (0, 1), "needs": subsets(2), "grad": ("contiguous", "broadcast")},
           ("rotation", "needs"), _residual_vq, needs="needs"),
)


def _fits(p: dict) -> bool:
    """A "wide" operand needs B * 2**31 elements of storage: at most 2**63 bytes."""
    return "wide" not in p.values() or p["shape"][0] < 2**28


def _points(fam: Family, vary: dict) -> Iterator[dict]:
    base = {name: values[0] for name, values in fam.axes.items()}
    names = list(vary)
    for combo in itertools.product(*(vary[n] for n in names)):
        p = fam.fix({**base, **dict(zip(names, combo, strict=True))})
        if p is not None and _fits(p):
            yield p


def points(fam: Family, full: bool) -> list[dict]:
    """The specializations to compile for one launcher (duplicates removed, order kept).

    Default: every flag combination in float32; every dtype with every flag combination (all
    gradients asked for); every dtype at the shapes of ``DTYPE_SHAPES``, float32 at the others;
    every value of every other axis (operand layouts, gradient layouts, ...) in float32.
    Full: every dtype x every flag combination; every dtype x every flag combination (all
    gradients) x every value of each other axis."""
    ax = fam.axes
    flags = {n: ax[n] for n in fam.flags}
    others = [n for n in ax if n not in ("dtype", *fam.flags)]
    flags_all_needs = {n: (ax[n][0],) if n == fam.needs else ax[n] for n in fam.flags}
    if full:
        sets = [{"dtype": ax["dtype"], **flags},
                *({"dtype": ax["dtype"], **flags_all_needs, n: ax[n]} for n in others)]
    else:
        sets = [flags,
                {"dtype": ax["dtype"], **flags_all_needs},
                {"dtype": ax["dtype"], "shape": DTYPE_SHAPES},
                *({n: ax[n]} for n in others)]
    seen, out = set(), []
    for vary in sets:
        for p in _points(fam, vary):
            key = repr(sorted(p.items()))
            if key not in seen:
                seen.add(key)
                out.append(p)
    return out


def label(fam: Family, p: dict) -> str:
    def fmt(v):
        if isinstance(v, torch.dtype):
            return str(v).removeprefix("torch.")
        if isinstance(v, tuple) and all(isinstance(x, bool) for x in v):
            return "".join("1" if x else "0" for x in v)
        if isinstance(v, tuple):
            return "x".join(map(str, v))
        return str(v)
    return f"{fam.name}(" + ", ".join(f"{k}={fmt(v)}" for k, v in p.items()) + ")"


# ---------------------------------------------------------------------------------------------
# ptxas -v
# ---------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_st": re.compile(r"(\d+) bytes spill stores"),
    "spill_ld": re.compile(r"(\d+) bytes spill loads"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict[str, int]:
    return {k: int(m.group(1)) if (m := rx.search(log)) else 0 for k, rx in _PTXAS_RE.items()}


def ptxas_command(arch: int) -> list[str]:
    """Triton's ptxas for ``arch`` with the flags Triton's own cubin step passes."""
    from triton.backends.nvidia import compiler as nv

    tool = nv.get_ptxas(arch) if "arch" in inspect.signature(nv.get_ptxas).parameters \
        else nv.get_ptxas()
    extra = (["--regAllocOptLevel=2"]
             if "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin) else [])
    return [tool.path, "-lineinfo", "-v", *extra, f"--gpu-name={nv.sm_arch_from_capability(arch)}"]


def ptxas_stats(ptx: str, cmd: list[str], cache: Path) -> dict[str, int]:
    """``ptxas -v`` numbers of one PTX module, cached by hash of PTX and command."""
    key = hashlib.sha256((ptx + "\0" + " ".join(cmd[1:])).encode()).hexdigest()
    hit = cache / f"{key}.json"
    if hit.exists():
        return json.loads(hit.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        res = subprocess.run([*cmd, str(src), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-2000:]}")
    stats = parse_ptxas(res.stdout + res.stderr)
    cache.mkdir(parents=True, exist_ok=True)
    tmp_hit = hit.with_suffix(f".{os.getpid()}.tmp")
    tmp_hit.write_text(json.dumps(stats))
    tmp_hit.replace(hit)
    return stats


def rounded_constants(ptx: str) -> list[float]:
    """float64 constants of the PTX that are float32 values with more than 8 significant bits:
    a Python float that became a float32 scalar before meeting a float64 operand (``acc = c``
    then ``acc * x``) and lost its low bits. Powers of two and short values (0.5, 0.125) are
    exact in both and not reported."""
    out = []
    for text in set(re.findall(r"0d([0-9A-Fa-f]{16})", ptx)):
        mantissa = int(text, 16) & ((1 << 52) - 1)
        if mantissa and mantissa & ((1 << 29) - 1) == 0:
            significant = 52 - ((mantissa & -mantissa).bit_length() - 1)
            if significant > 8:
                out.append(struct.unpack(">d", bytes.fromhex(text))[0])
    return sorted(out)


_F64_ARITHMETIC = re.compile(r"^\s*(?:add|sub|mul|fma|div)(?:\.rn)?\.f64\b", re.M)


def float32_params(ptx: str) -> list[str]:
    """The float32 parameters that a kernel computing in float64 reads: Python float kernel
    arguments, which Triton passes as float32 (rounded) whatever the kernel's dtype. A float64
    kernel takes its constants as ``tl.constexpr`` (or as tensors) instead."""
    if not _F64_ARITHMETIC.search(ptx):
        return []
    read = set(re.findall(r"ld\.param\.\w+\s+%\w+,\s*\[(\w+)\]", ptx))
    return [name for name in re.findall(r"\.param \.f32 (\w+)", ptx) if name in read]


def spec_of(launch: Launch) -> str:
    """The constexpr part of a launch (tile, warps, flags), short."""
    m = launch.meta
    if "BLOCK_S" in m:
        tile = f"{m['BLOCK_S']}"
    elif "BLOCK_M" in m:  # nearest_code's search: rows x codes x D chunk
        tile = f"{m['BLOCK_M']}x{m['BLOCK_K']}x{m['BLOCK_D']}"
    elif "BLOCK_D" in m and "BLOCK_B" in m:  # finite_scalar_quantize: rows x dimensions
        tile = f"{m['BLOCK_B']}x{m['BLOCK_D']}"
    elif "BLOCK_R" in m:
        tile = f"{m['BLOCK_R']}"
    else:
        tile = f"{m.get('BLOCK_B', '?')}x{m.get('BLOCK_N', '?')}"
    tile += f"/w{m.get('num_warps', 4)}"
    flags = " ".join(f"{k}" for k, v in m.items()
                     if k.isupper() and not k.startswith("BLOCK") and k != "DTYPE" and v is True)
    return f"{tile} {flags}".strip()


# ---------------------------------------------------------------------------------------------
# The Triton check
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    arch: int
    kernel: str
    n: int = 0
    regs: int = 0
    spill: int = 0
    smem: int = 0
    worst: str = ""


def _check_tiling(common) -> None:
    """The meta tensors must get the launch configuration of CUDA tensors."""
    for B, N in SHAPES:
        gpu, meta = common.tiling(B, N, torch.device("cuda")), common.tiling(B, N, META)
        if gpu != meta:
            raise AssertionError(f"tiling({B}, {N}) differs on meta ({meta}) and cuda ({gpu}): "
                                 "the check would not compile the GPU's kernels")
        for outer, inner in ((gpu.n_row_tiles, gpu.n_col_tiles), (gpu.n_col_tiles, 1)):
            if common.split(outer, inner, META) != common.split(outer, inner,
                                                                torch.device("cuda")):
                raise AssertionError("split() differs on meta and cuda")


def uncovered_launchers() -> list[str]:
    """The launchers of the Triton backend (``fastvae.kernels.__all__``) without a family here:
    a new op must add its cases, else the check would pass without compiling it."""
    from fastvae import kernels

    return sorted(set(kernels.__all__) - {fam.name for fam in FAMILIES})


def select_cases(full: bool, only: str) -> list[tuple[Family, dict]]:
    return [(fam, p) for fam in FAMILIES for p in points(fam, full)
            if re.search(only, label(fam, p))]


def compile_share(full: bool, only: str, archs: list[int], share: int,
                  jobs: int) -> list[dict]:
    """Compile cases ``share``, ``share + jobs``, ... for each arch (one worker process) and
    run ptxas -v on each distinct PTX. Returns one record per failure and per distinct kernel."""
    import fastvae.kernels as K
    from fastvae.kernels import _common

    cases = select_cases(full, only)[share::jobs]
    cache = Path(triton.knobs.cache.dir) / "fastvae-ptxas"
    out: list[dict] = []
    for arch in archs:
        with offline_gpu(arch) as rec:
            _check_tiling(_common)
            for fam, p in cases:
                rec.case = label(fam, p)
                try:
                    fam.call(K, p)
                except Exception as e:
                    detail = "" if isinstance(e, (AssertionError, _common.TritonKernelError)) \
                        else traceback.format_exc()
                    out.append(dict(arch=arch, case=rec.case, error=f"{type(e).__name__}: {e}",
                                    detail=detail))
        cmd = ptxas_command(arch)
        seen = set()
        for launch in rec.launches:
            ptx = launch.compiled.asm["ptx"]
            if ptx in seen:
                continue
            seen.add(ptx)
            if rounded := rounded_constants(ptx):
                out.append(dict(arch=arch, case=launch.case, detail="",
                                error=f"{launch.kernel}: float64 constants rounded to float32: "
                                      f"{rounded}"))
            if params := float32_params(ptx):
                out.append(dict(arch=arch, case=launch.case, detail="",
                                error=f"{launch.kernel}: float32 parameters of a float64 kernel "
                                      f"(Python float arguments, rounded): {params}"))
            try:
                stats = ptxas_stats(ptx, cmd, cache)
            except RuntimeError as e:
                out.append(dict(arch=arch, case=launch.case, error=str(e), detail=""))
                continue
            out.append(dict(arch=arch, case=launch.case, kernel=launch.kernel,
                            spec=spec_of(launch), shared=launch.compiled.metadata.shared,
                            ptx=hashlib.sha256(ptx.encode()).hexdigest(), **stats))
    return out


def _compile_share_args(args: tuple) -> list[dict]:
    return compile_share(*args)


def check_triton(archs: list[int], full: bool, only: str, jobs: int) -> tuple[int, list[Row]]:
    """Compile the cases in ``jobs`` processes (forked: no GPU, so nothing to re-initialize),
    each a share of the cases; print failures and spills; return (failures, table rows)."""
    import fastvae.kernels  # noqa: F401  (imported once, before the workers fork)

    t0 = time.perf_counter()
    n_cases = len(select_cases(full, only))
    shares = [(full, only, archs, share, jobs) for share in range(jobs)]
    if jobs == 1:
        records = compile_share(*shares[0])
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            records = [r for part in pool.map(_compile_share_args, shares) for r in part]
    failures = 0
    rows: dict[tuple[int, str], Row] = {}
    distinct = set()
    for r in records:
        if "error" in r:
            failures += 1
            print(f"FAIL sm_{r['arch']} {r['case']}\n  {r['error'][:4000]}\n{r['detail']}")
            continue
        if (r["arch"], r["ptx"]) in distinct:  # the same kernel compiled by two workers
            continue
        distinct.add((r["arch"], r["ptx"]))
        row = rows.setdefault((r["arch"], r["kernel"]), Row(r["arch"], r["kernel"]))
        row.n += 1
        spill = max(r["spill_st"], r["spill_ld"])
        if (spill, r["regs"]) > (row.spill, row.regs):
            row.worst = f"{r['case']}  [{r['spec']}]"
        row.regs = max(row.regs, r["regs"])
        row.spill = max(row.spill, spill)
        row.smem = max(row.smem, r["smem"], r["shared"])
        if spill:
            print(f"spill sm_{r['arch']} {r['kernel']}: {r['spill_st']} B stores, "
                  f"{r['spill_ld']} B loads, {r['regs']} regs: {r['case']} [{r['spec']}]")
    print(f"Triton: {n_cases} cases x {len(archs)} arch(s), {len(distinct)} distinct kernels, "
          f"{jobs} process(es), {time.perf_counter() - t0:.1f} s")
    return failures, sorted(rows.values(), key=lambda r: (r.arch, r.kernel))


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}")
    print(f"{'arch':6} {'kernel':58} {'specs':>5} {'regs':>5} {'spill B':>8} {'smem B':>7}  "
          "worst (most spill, then registers)")
    for r in rows:
        print(f"sm_{r.arch:<3} {r.kernel:58} {r.n:5} {r.regs:5} {r.spill:8} {r.smem:7}  "
              f"{r.worst}")


# ---------------------------------------------------------------------------------------------
# The CUDA C++ check
# ---------------------------------------------------------------------------------------------


def _short_names(mangled: list[str]) -> list[str]:
    """Demangled (c++filt, when present), without namespaces and parameter lists."""
    names = mangled
    if shutil.which("c++filt"):
        res = subprocess.run(["c++filt"], input="\n".join(mangled), capture_output=True,
                             text=True)
        names = res.stdout.splitlines() if res.returncode == 0 else mangled
    return [re.sub(r"\(.*\)$", "",
                   re.sub(r"\(anonymous namespace\)::|fv::gpu::|fv::|^void ", "", name))
            for name in names]


def check_cuda(archs: list[int]) -> tuple[int, list[Row]]:
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        print("FAIL nvcc not found (on PATH or /usr/local/cuda/bin): csrc/cuda.cu not checked "
              "(--no-nvcc skips it)")
        return 1, []
    t0 = time.perf_counter()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    with tempfile.TemporaryDirectory() as tmp:
        # the flags of the CMake build (Release, CUDA_STANDARD 17)
        cmd = [nvcc, "-O3", "-DNDEBUG", "-std=c++17", "-Xcompiler=-fno-math-errno", *gencode,
               "-Xptxas", "-v", "-c", str(ROOT / "csrc" / "cuda.cu"), "-o", f"{tmp}/cuda.o"]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        print(f"FAIL nvcc csrc/cuda.cu:\n{res.stdout}{res.stderr}")
        return 1, []
    found = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)a?'(.*?)(?=ptxas info\s+: "
                       r"Compiling entry function|\Z)", res.stdout + res.stderr, re.S)
    rows: dict[tuple[int, str], Row] = {}
    for (_, arch, log), name in zip(found, _short_names([f[0] for f in found]), strict=True):
        st = parse_ptxas(log)
        # one row per kernel template and functor (elementwise_kernel / GaussianNllBwd), and per
        # op for a functor that serves several (LogitsNllBwd<BernoulliLogits>), the worst of its
        # instantiations (dtypes, vector widths)
        family = re.sub(r"<\d+, (?:\w+, )?(\w+)<(?:(?!(?:float|double|Half|BFloat16)\b)(\w+), )?.*",
                        lambda m: f" / {m[1]}" + (f"<{m[2]}>" if m[2] else ""), name)
        row = rows.setdefault((int(arch), family), Row(int(arch), family))
        row.n += 1
        spill = max(st["spill_st"], st["spill_ld"])
        if (spill, st["regs"]) > (row.spill, row.regs):
            row.worst = name
        row.regs, row.spill = max(row.regs, st["regs"]), max(row.spill, spill)
        row.smem = max(row.smem, st["smem"])
    n = len(found)
    print(f"nvcc csrc/cuda.cu for sm_{', sm_'.join(map(str, archs))}: {n} kernels, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0, sorted(rows.values(), key=lambda r: (r.arch, r.kernel))


def print_cuda_table(rows: list[Row]) -> None:
    print("\nCUDA C++ kernels (csrc/cuda.cu, nvcc -Xptxas -v): worst instantiation per kernel")
    print(f"{'arch':6} {'kernel':42} {'inst':>4} {'regs':>5} {'spill B':>8} {'smem B':>7}  worst")
    for r in rows:
        print(f"sm_{r.arch:<3} {r.kernel:42} {r.n:4} {r.regs:5} {r.spill:8} {r.smem:7}  "
              f"{r.worst}")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the whole cross product of cases")
    ap.add_argument("--arch", default="80,90", help="compute capabilities (default 80,90)")
    ap.add_argument("--no-nvcc", action="store_true", help="skip csrc/cuda.cu")
    ap.add_argument("--only", default="", metavar="REGEX",
                    help="only the cases whose description matches REGEX")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="compile in this many processes (default: one per CPU)")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    t0 = time.perf_counter()
    missing = uncovered_launchers()
    if missing:
        print(f"FAILED: launchers with no cases in FAMILIES: {', '.join(missing)}")
        return 1
    if args.list:
        cases = select_cases(args.full, args.only)
        for fam, p in cases:
            print(label(fam, p))
        print(f"{len(cases)} cases per arch")
        return 0
    failures, rows = check_triton(archs, args.full, args.only, max(1, args.jobs))
    print_table("Triton kernels (ptxas -v on the generated PTX): worst case per kernel", rows)
    if not args.no_nvcc:
        cuda_failures, cuda_rows = check_cuda(archs)
        failures += cuda_failures
        print_cuda_table(cuda_rows)
    print(f"\n{'FAILED' if failures else 'OK'}: {failures} failure(s), "
          f"{time.perf_counter() - t0:.1f} s in all")
    return 1 if failures else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
