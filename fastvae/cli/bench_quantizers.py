"""``fastvae bench --ops vq,rvq,fsq,lfq``: the quantizers against vector-quantize-pytorch.

One harness for every quantizer (``QUANTIZERS``): for each size, every implementation timed
side by side (``bench_common.time_group``: rounds that call each in turn, so that a change of
load on the machine hits all alike), and each one's peak extra memory: on the CPU in a fresh process
under an address-space limit (``peak_memory``; an implementation that needs more than the limit
fails there with the error it raises, which is recorded, instead of the kernel's OOM killer
taking the machine down), on a GPU from the CUDA allocator. The results go to
``<out>/<op>.txt`` (a summary per size: fastvae against the package eager and compiled, time and
memory; then every implementation), ``<op>.json`` and ``<op>.csv``.

The work of one call (``Quantizer.work``): one float32 training step of the quantizer, forward
+ backward, the gradient of ``sum(g * quantized) + loss`` reaching ``x``, nothing that changes
the state between calls (codebooks frozen), so that every call does the same work.

Implementations: ``vqp`` and ``vqp:compile`` are vector-quantize-pytorch's class eager and under
``torch.compile``; ``fastvae`` its fastvae drop-in (same constructor, same call, loaded from the
package's ``state_dict``); ``vq`` adds plain ``cdist`` + ``argmin`` and fastvae's functions.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import fastvae as fv

from . import bench_common as _common
from .args import split_list

Size = tuple  # one benchmark size of a quantizer (its own layout: see each Quantizer)

# Package eager and compiled: the columns every quantizer's summary compares fastvae with.
PACKAGE, PACKAGE_COMPILED, FASTVAE = "vqp", "vqp:compile", "fastvae"
DEFAULT_MEMORY_LIMIT_GB = 12.0  # what one implementation may add to a process (address space)


@dataclass(frozen=True)
class Quantizer:
    """One quantizer's benchmark: its sizes, implementations and one call of each."""

    name: str
    title: str
    work: str  # what one call does (written into the results)
    size_layout: str  # e.g. "N x K x D" (the shape column's header)
    sizes: dict[str, list[Size]]  # per device type
    impls: tuple[str, ...]  # by default
    extra_impls: tuple[str, ...]  # on request (--<name>-impls)
    baselines: tuple[str, ...]  # the "x <impl>" speed-up columns
    make_runner: Callable[[str, Size, torch.device], Callable[[], object]]
    parse_size: Callable[[str], Size]
    format_size: Callable[[Size], str]
    dense_elements: Callable[[Size], int]  # N x K: the matrix a dense implementation builds
    input_elements: Callable[[Size], int]  # the elements of x
    memory_of_compiled: bool = False  # also measure the compiled implementations' memory
    size_example: str = ""

    def all_impls(self) -> tuple[str, ...]:
        return self.impls + self.extra_impls


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_()


def _inputs(seed: int, N: int, dim: int, device: torch.device,
            scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """x (1, N, dim) (a leaf) and the upstream gradient of ``quantized``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = (scale * torch.randn(1, N, dim, generator=g)).to(device)
    grad = (torch.randn(1, N, dim, generator=g) / N).to(device)
    return _leaf(x), grad


def _module_runner(impl: str, make_package: Callable[[], torch.nn.Module],
                   make_fastvae: Callable[[], torch.nn.Module], x: Tensor, grad: Tensor,
                   device: torch.device, call_kwargs: dict | None = None,
                   has_loss: bool = True, copy_state: bool = True) -> Callable[[], object]:
    """One forward + backward of the package's module (``vqp``, ``vqp:compile``) or fastvae's
    drop-in (``fastvae``; with ``copy_state`` loaded from the package's ``state_dict``), in
    train mode: the gradient of ``sum(grad * quantized) + sum(loss)`` to ``x``."""
    if impl == FASTVAE:
        module = make_fastvae().to(device)
        if copy_state:
            module.load_state_dict(make_package().to(device).state_dict())
    elif impl in (PACKAGE, PACKAGE_COMPILED):
        module = make_package().to(device)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    module.train()
    body = torch.compile(module) if impl == PACKAGE_COMPILED else module
    kwargs = call_kwargs or {}

    def run():
        x.grad = None
        out = body(x, **kwargs)
        if has_loss and out[2].requires_grad:
            torch.autograd.backward((out[0], out[2].sum()), (grad, None))
        else:
            torch.autograd.backward(out[0], grad)

    run.state_bytes = module_state_bytes(module)  # type: ignore[attr-defined]
    return run


def module_state_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages of a module's parameters and buffers (persistent or not):
    what it holds between calls (the package's FSQ and LFQ: their implicit codebooks)."""
    storages: dict[int, int] = {}
    for t in (*module.parameters(), *module.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _int_sizes(count: int, layout: str, example: str) -> Callable[[str], Size]:
    def parse(text: str) -> Size:
        try:
            size = tuple(int(v) for v in text.lower().split("x"))
        except ValueError:
            size = ()
        if len(size) != count or min(size) < 1:
            raise argparse.ArgumentTypeError(f"{layout} (e.g. {example}); got {text!r}")
        return size
    return parse


# ---------------------------------------------------------------------------------------------
# vq: N vectors x K codes x D dimensions
# ---------------------------------------------------------------------------------------------

VQ_BETA = 0.25
# (N, K, D): small, then the tokenizer sizes (f8 tokens of 32 images of 256^2 = 32768 with a
# 16384 x 8 codebook as LlamaGen's; 4096 x 64; 16384 x 256 as taming's VQGAN at 8192 tokens).
# On a GPU also 4x the tokens and the wide codebook at 32768 tokens.
VQ_SIZES = {"cpu": [(1024, 512, 64), (32768, 4096, 64), (8192, 16384, 256), (32768, 16384, 8)],
            "cuda": [(1024, 512, 64), (32768, 4096, 64), (8192, 16384, 256), (32768, 16384, 8),
                     (131072, 16384, 8), (32768, 16384, 256)]}
# "cdist": plain eager torch.cdist + argmin, gather, straight-through, losses; "vqp" and
# "vqp:compile": vector_quantize_pytorch.VectorQuantize eager and under torch.compile;
# "fastvae": fastvae.VectorQuantize (the drop-in); "fastvae:vector_quantize": the function;
# "fastvae:nearest_code": cdist's code with fv.nearest_code for the search (not by default: the
# search alone, where the functions above are not there, e.g. on a branch).
VQ_IMPLS = ("cdist", PACKAGE, PACKAGE_COMPILED, FASTVAE, "fastvae:vector_quantize")
VQ_EXTRA_IMPLS = ("fastvae:nearest_code",)
VQ_WORK = ("float32 forward + backward, one step of training with a fixed codebook: the modules "
           "in train mode called with freeze_codebook=True (no EMA update, no k-means), the "
           "straight-through estimator (rotation_trick=False), commitment loss (weight 1); the "
           "gradient of sum(g * quantized) + loss to x. cdist and fastvae:vector_quantize also "
           "give the codebook its gradient (codebook loss, beta 0.25 on the commitment).")


def _vq_inputs(N: int, K: int, D: int, device: torch.device,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
    """x (1, N, D) (a leaf), the codebook (K, D) and the upstream gradient of ``quantized``."""
    g = torch.Generator(device="cpu").manual_seed(3)
    x = torch.randn(1, N, D, generator=g).to(device, dtype)
    codebook = torch.randn(K, D, generator=g).to(device, dtype)
    grad = (torch.randn(1, N, D, generator=g) / N).to(device, dtype)
    return _leaf(x), codebook, grad


def eager_vq(x: Tensor, codebook: Tensor, beta: float = VQ_BETA, search: str = "cdist"):
    """What a user writes in plain PyTorch: ``cdist`` + ``argmin`` (the N x K matrix), gather,
    straight-through, codebook and commitment losses (``search="nearest_code"``: the indices
    from ``fv.nearest_code`` instead)."""
    if search == "nearest_code":
        indices = fv.nearest_code(x.detach(), codebook.detach())[0]
    else:
        indices = torch.cdist(x, codebook[None]).argmin(dim=-1)
    q = codebook[indices]
    quantized = x + (q - x).detach()
    loss = F.mse_loss(q, x.detach()) + beta * F.mse_loss(x, q.detach())
    return quantized, indices, loss


def make_vq_runner(impl: str, N: int, K: int, D: int,
                   device: torch.device) -> Callable[[], object]:
    """A no-argument callable: one forward + backward of ``impl`` at N x K x D (``VQ_WORK``)."""
    x, codebook, grad = _vq_inputs(N, K, D, device)
    if impl in ("cdist", "fastvae:vector_quantize", "fastvae:nearest_code"):
        codebook = _leaf(codebook)
        leaves = (x, codebook)
        if impl != "fastvae:vector_quantize":
            search = "cdist" if impl == "cdist" else "nearest_code"

            def call():
                return eager_vq(x, codebook, search=search)
        else:
            def call():
                out = fv.vector_quantize(x, codebook, beta=VQ_BETA)
                return out.quantized, out.indices, out.loss

        def run():
            for leaf in leaves:
                leaf.grad = None
            quantized, _, loss = call()
            torch.autograd.backward((quantized, loss), (grad, None))

        return run
    if impl not in (PACKAGE, PACKAGE_COMPILED, FASTVAE):
        raise ValueError(f"unknown VQ implementation {impl!r}; choose from "
                         f"{', '.join(VQ_IMPLS + VQ_EXTRA_IMPLS)}")

    def make_package():
        from vector_quantize_pytorch import VectorQuantize

        package = VectorQuantize(dim=D, codebook_size=K, rotation_trick=False)
        with torch.no_grad():
            package._codebook.embed.copy_(codebook[None])
        return package

    return _module_runner(impl, make_package,
                          lambda: fv.VectorQuantize(dim=D, codebook_size=K, rotation_trick=False),
                          x, grad, device, {"freeze_codebook": True})


# ---------------------------------------------------------------------------------------------
# rvq: N vectors x L levels x K codes x D dimensions
# ---------------------------------------------------------------------------------------------

# 8 levels of 1024 codes: Encodec's and DAC's residual VQ. D = 128 (Encodec's codebooks) and
# D = 8 (DAC's factorized codes, looked up in an 8-dimensional projection).
RVQ_SIZES = {"cpu": [(1024, 8, 1024, 128), (16384, 8, 1024, 128), (16384, 8, 1024, 8)],
             "cuda": [(16384, 8, 1024, 128), (16384, 8, 1024, 8), (262144, 8, 1024, 128)]}
RVQ_WORK = ("float32 forward + backward of ResidualVQ(dim=D, num_quantizers=L, codebook_size=K, "
            "rotation_trick=False) in train mode called with freeze_codebook=True (no EMA "
            "update), level l's codebook random with scale 2^-l; the gradient of "
            "sum(g * quantized) + sum(commitment losses) to x. "
            "fastvae:residual_vector_quantize (the function, beta 1) also gives the codebooks "
            "their gradient (the codebook losses).")


RVQ_IMPLS = (PACKAGE, PACKAGE_COMPILED, FASTVAE, "fastvae:residual_vector_quantize")


def make_rvq_runner(impl: str, size: Size, device: torch.device) -> Callable[[], object]:
    """One forward + backward of ``impl`` at N x L x K x D (``RVQ_WORK``)."""
    N, L, K, D = size
    x, grad = _inputs(4, N, D, device)
    g = torch.Generator(device="cpu").manual_seed(5)
    codebooks = torch.randn(L, K, D, generator=g) * 0.5 ** torch.arange(L)[:, None, None]
    if impl == "fastvae:residual_vector_quantize":
        codebooks = _leaf(codebooks.to(device))

        def run():
            x.grad = codebooks.grad = None
            out = fv.residual_vector_quantize(x, codebooks, beta=1.0)
            torch.autograd.backward((out.quantized, out.loss), (grad, None))

        return run

    def make_package():
        from vector_quantize_pytorch import ResidualVQ

        package = ResidualVQ(dim=D, num_quantizers=L, codebook_size=K, rotation_trick=False)
        with torch.no_grad():
            for layer, codebook in zip(package.layers, codebooks, strict=True):
                layer._codebook.embed.copy_(codebook[None])
        return package

    return _module_runner(
        impl, make_package,
        lambda: fv.ResidualVQ(dim=D, num_quantizers=L, codebook_size=K, rotation_trick=False),
        x, grad, device, {"freeze_codebook": True})


# ---------------------------------------------------------------------------------------------
# fsq: N vectors x the levels per dimension
# ---------------------------------------------------------------------------------------------

# [8, 8, 8, 5, 5, 5] (64000 codes, Mentzer et al. 2023's 2^16 setting) and [4] * 16 (2^32
# codes: the package builds its implicit codebook in the constructor).
FSQ_LEVELS = ((8, 8, 8, 5, 5, 5), (4,) * 16)
FSQ_SIZES = {"cpu": [(1024, FSQ_LEVELS[0]), (16384, FSQ_LEVELS[0]), (16384, FSQ_LEVELS[1])],
             "cuda": [(N, levels) for levels in FSQ_LEVELS for N in (16384, 1048576)]}
FSQ_WORK = ("float32 forward + backward of FSQ(levels) (dim = the number of levels, no "
            "projection) in train mode: bounded rounding with the straight-through estimator "
            "and the indices; the gradient of sum(g * quantized) to x (x ~ 2 N(0, 1)).")


def make_fsq_runner(impl: str, size: Size, device: torch.device) -> Callable[[], object]:
    """One forward + backward of ``impl`` at N x levels (``FSQ_WORK``)."""
    N, levels = size
    x, grad = _inputs(6, N, len(levels), device, scale=2.0)

    def make_package():
        from vector_quantize_pytorch import FSQ

        return FSQ(levels=list(levels))

    return _module_runner(impl, make_package, lambda: fv.FSQ(levels=list(levels)), x, grad,
                          device, has_loss=False, copy_state=False)


def format_fsq_size(size: Size) -> str:
    N, levels = size
    if len(levels) > 3 and len(set(levels)) == 1:
        return f"{N}x[{levels[0]}]*{len(levels)}"
    return f"{N}x[{','.join(map(str, levels))}]"


def parse_fsq_size(text: str) -> Size:
    """``16384x[8,8,8,5,5,5]`` or ``16384x[4]*16``."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*\[([\d,\s]+)\]\s*(?:\*\s*(\d+))?\s*", text)
    if m is not None:
        try:
            levels = tuple(int(v) for v in split_list(m.group(2), "levels"))
        except argparse.ArgumentTypeError:
            levels = ()  # an empty entry: refused below
        levels *= int(m.group(3) or 1)
        if int(m.group(1)) >= 1 and levels and min(levels) >= 2:
            return int(m.group(1)), levels
    raise argparse.ArgumentTypeError(
        f"N x [levels] (e.g. 16384x[8,8,8,5,5,5] or 16384x[4]*16, each level >= 2); got {text!r}")


# ---------------------------------------------------------------------------------------------
# lfq: N vectors x d bits (2^d codes)
# ---------------------------------------------------------------------------------------------

LFQ_BITS = (10, 14, 18)
# CPU: every d at N = 16384 (at d = 18 the package's N x 2^d float32 matrix is 16 GiB), and d = 18
# at N = 1024, where the package still runs (7 GB); the whole --ops tokenizers run stays under
# 10 minutes on 2 cores.
LFQ_SIZES = {"cpu": [(16384, 10), (16384, 14), (1024, 18), (16384, 18)],
             "cuda": [(N, d) for d in LFQ_BITS for N in (16384, 262144)]}
LFQ_WORK = ("float32 forward + backward of LFQ(dim=d, codebook_size=2^d, "
            "entropy_loss_weight=0.1, commitment_loss_weight=0.25) in train mode "
            "(inv_temperature 100, diversity_gamma 1): sign quantization with the "
            "straight-through estimator, the entropy loss (per-sample entropy minus the entropy of "
            "the batch-average distribution over the 2^d codes) and the commitment loss; the "
            "gradient of sum(g * quantized) + loss to x.")


def make_lfq_runner(impl: str, size: Size, device: torch.device) -> Callable[[], object]:
    """One forward + backward of ``impl`` at N x d (``LFQ_WORK``)."""
    N, d = size
    x, grad = _inputs(7, N, d, device, scale=0.1)
    kwargs = {"dim": d, "codebook_size": 2 ** d, "entropy_loss_weight": 0.1,
              "commitment_loss_weight": 0.25}

    def make_package():
        from vector_quantize_pytorch import LFQ

        return LFQ(**kwargs)

    return _module_runner(impl, make_package, lambda: fv.LFQ(**kwargs), x, grad, device,
                          copy_state=False)


# ---------------------------------------------------------------------------------------------
# The quantizers
# ---------------------------------------------------------------------------------------------

QUANTIZERS: dict[str, Quantizer] = {q.name: q for q in [
    Quantizer("vq", "vector quantization", VQ_WORK, "N x K x D", VQ_SIZES, VQ_IMPLS,
              VQ_EXTRA_IMPLS, ("cdist", PACKAGE, PACKAGE_COMPILED),
              lambda impl, size, device: make_vq_runner(impl, *size, device),
              _int_sizes(3, "N x K x D", "1024x512x64"), lambda s: "x".join(map(str, s)),
              dense_elements=lambda s: s[0] * s[1], input_elements=lambda s: s[0] * s[2],
              memory_of_compiled=True, size_example="1024x512x64,32768x16384x8"),
    Quantizer("rvq", "residual vector quantization", RVQ_WORK, "N x L x K x D", RVQ_SIZES,
              RVQ_IMPLS, (), (PACKAGE, PACKAGE_COMPILED),
              make_rvq_runner, _int_sizes(4, "N x L x K x D", "16384x8x1024x128"),
              lambda s: "x".join(map(str, s)),
              dense_elements=lambda s: s[0] * s[2], input_elements=lambda s: s[0] * s[3],
              size_example="16384x8x1024x128,16384x8x1024x8"),
    Quantizer("fsq", "finite scalar quantization", FSQ_WORK, "N x [levels]", FSQ_SIZES,
              (PACKAGE, PACKAGE_COMPILED, FASTVAE), (), (PACKAGE, PACKAGE_COMPILED),
              make_fsq_runner, parse_fsq_size, format_fsq_size,
              dense_elements=lambda s: s[0] * math.prod(s[1]),
              input_elements=lambda s: s[0] * len(s[1]),
              size_example="'16384x[8,8,8,5,5,5],16384x[4]*16'"),
    Quantizer("lfq", "lookup-free quantization", LFQ_WORK, "N x d", LFQ_SIZES,
              (PACKAGE, PACKAGE_COMPILED, FASTVAE), (), (PACKAGE, PACKAGE_COMPILED),
              make_lfq_runner, _int_sizes(2, "N x d", "16384x18"),
              lambda s: "x".join(map(str, s)),
              dense_elements=lambda s: s[0] * 2 ** s[1], input_elements=lambda s: s[0] * s[1],
              size_example="1024x10,16384x18"),
]}
# --ops tokenizers: the quantizers of audio and image tokenizers
GROUPS = {"tokenizers": ("rvq", "fsq", "lfq")}


def parse_sizes(quantizer: Quantizer, text: str) -> list[Size]:
    """A comma-separated list of sizes (commas inside [...] belong to an FSQ size)."""
    try:
        items = split_list(text, "sizes", r",(?![^\[]*\])")
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (e.g. {quantizer.size_example})") from None
    return [quantizer.parse_size(s) for s in items]


# ---------------------------------------------------------------------------------------------
# Peak extra memory, and the memory limit
# ---------------------------------------------------------------------------------------------


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` field (VmRSS, VmHWM, VmSize) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no {field} in /proc/self/status")


def cpu_peak_extra_memory(run: Callable[[], object]) -> int:
    """Peak bytes one call of ``run`` adds to the process's resident memory (Linux).

    After a warm-up call (compilation, lazy initialisation), freed heap memory is handed back
    to the system (``malloc_trim``), the resident size is read (``VmRSS``: the inputs, the
    module, the libraries) and its high-water mark reset (``echo 5 > /proc/self/clear_refs``);
    after the call the high-water mark (``VmHWM``) minus that baseline is the peak of what the
    call touched beyond what was live before: every allocation (torch's CPU allocator hands
    large blocks to malloc, which maps them; memory is counted when written), at page
    granularity. A tensor allocated and never written would not count (none here is)."""
    import ctypes
    import gc

    run()
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _proc_status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run()
    return max(0, _proc_status("VmHWM") - base)


@contextlib.contextmanager
def address_space_limit(extra_bytes: int | None):
    """Within the block, the process may map at most ``extra_bytes`` more than it has mapped now
    (``RLIMIT_AS``, soft): an allocation beyond fails with torch's ``RuntimeError`` ("can't
    allocate memory") or a ``MemoryError`` instead of waking the kernel's OOM killer. Linux;
    elsewhere, or with ``None``, no limit. Not for CUDA processes (the driver maps far more
    address space than it uses)."""
    try:
        import resource

        base = _proc_status("VmSize")
    except (ImportError, OSError):
        extra_bytes = None
    if extra_bytes is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = base + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _memory_child(op: str, impl: str, size_json: str, limit_bytes: int | None) -> None:
    """The body of the subprocess of ``peak_memory``: prints the JSON of the measurement, or of
    the error that building or running the implementation raised."""
    torch.manual_seed(0)
    torch.ones(1 << 16).sum()  # the thread pool starts before the limit
    quantizer = QUANTIZERS[op]
    size = _size_from_json(size_json)
    with address_space_limit(limit_bytes):
        try:
            run = quantizer.make_runner(impl, size, torch.device("cpu"))
            result = {"peak_extra_bytes": cpu_peak_extra_memory(run),
                      "state_bytes": getattr(run, "state_bytes", None)}
        except (Exception, MemoryError) as e:
            result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result))


def _size_from_json(text: str) -> Size:
    return tuple(tuple(v) if isinstance(v, list) else v for v in json.loads(text))


def peak_memory(op: str, impl: str, size: Size, limit_bytes: int | None,
                timeout: float = 1800) -> tuple[int | str, int | None]:
    """``cpu_peak_extra_memory`` of one forward + backward in a fresh process (nothing left over
    from the other implementations: caches, compiled graphs, the heap's free lists), whose
    address space may grow by at most ``limit_bytes`` from before building the implementation
    (``address_space_limit``). Returns the bytes, or the error (a string) it raised, and the
    bytes its module holds (``module_state_bytes``; None for a function or on an error)."""
    import subprocess
    import sys

    code = ("import importlib.util, sys\n"
            "spec = importlib.util.spec_from_file_location("
            f"'fastvae.cli._bench_quantizers_child', {__file__!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m\n"
            "spec.loader.exec_module(m)\n"
            f"m._memory_child({op!r}, {impl!r}, {json.dumps(size)!r}, {limit_bytes!r})\n")
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return f"TimeoutExpired: no result within {timeout:.0f} s", None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return f"exit status {done.returncode}: {done.stderr.strip()[-400:]}", None
    result = json.loads(lines[-1])
    if "error" in result:
        return result["error"], None
    return int(result["peak_extra_bytes"]), result.get("state_bytes")


def is_out_of_memory(error: str) -> bool:
    return bool(re.search(r"(?i)MemoryError|out of memory|can't allocate|cannot allocate",
                          error))


def short_error(error: str) -> str:
    """An error in a few words for the table (the JSON keeps it whole)."""
    kind = error.split(":", 1)[0]
    m = re.search(r"tried to allocate (\d+) bytes", error)
    if m is not None:
        return f"{kind}: can't allocate {int(m.group(1)) / 2**30:.1f} GiB"
    m = re.search(r"Tried to allocate ([\d.]+ [KMGT]iB)", error)  # CUDA
    if m is not None:
        return f"OutOfMemoryError: can't allocate {m.group(1)}"
    first = error.splitlines()[0] if error else "error"
    return first if len(first) <= 40 else first[:37] + "..."


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizerRow:
    op: str
    impl: str
    shape: str  # the size as the table writes it
    size: tuple
    ms: float | None  # median over every timed call (None: it failed)
    calls: int
    vs: dict[str, float] = field(default_factory=dict)  # baseline's time / this time
    peak_extra_mb: float | None = None
    peak_error: str | None = None  # the error its memory measurement ended with
    peak_vs_package: float | None = None  # peak extra memory / vqp's
    peak_dense: float | None = None  # ... in units of one N x K float32 matrix
    peak_input: float | None = None  # ... in units of x (N x dim float32)
    state_mb: float | None = None  # what the module holds between calls (parameters, buffers)
    load_average: tuple[float, float] | None = None  # 1-minute load before, after timing
    error: str | None = None  # the error building or calling it raised (then no time)


def _header(q: Quantizer) -> str:
    return (f"{'impl':32s} {q.size_layout:>18s} {'ms':>10s} {'calls':>5s} "
            + " ".join(f"{'x ' + _short(b):>7s}" for b in q.baselines)
            + f" {'peak MB':>9s} {'/ vqp':>6s} {'/ NxK':>7s} {'/ x':>8s} {'state MB':>9s} "
              f"{'load':>9s}")


def _short(impl: str) -> str:
    return "vqp:c" if impl == PACKAGE_COMPILED else impl


def _num(v, fmt: str) -> str:
    return format(v, fmt) if v is not None else "-"


def _small(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v >= 1e-3 or v == 0 else f"{v:.1e}"


def format_row(q: Quantizer, r: QuantizerRow) -> str:
    load = f"{r.load_average[0]:.1f}-{r.load_average[1]:.1f}" if r.load_average else "-"
    line = (f"{r.impl:32s} {r.shape:>18s} {_num(r.ms, '10.2f'):>10s} {r.calls:5d} "
            + " ".join(f"{_num(r.vs.get(b), '.2f'):>7s}" for b in q.baselines)
            + f" {_mb(r.peak_extra_mb):>9s} {_small(r.peak_vs_package):>6s} "
              f"{_small(r.peak_dense):>7s} {_times(r.peak_input):>8s} {_mb(r.state_mb):>9s} "
              f"{load:>9s}")
    notes = [f"failed: {short_error(r.error)}"] if r.error else []
    if r.peak_error and r.peak_error != r.error:
        notes.append(f"memory: {short_error(r.peak_error)}")
    return line + (f"  ({'; '.join(notes)})" if notes else "")


def _fraction(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"1/{1 / v:.0f}" if v < 1 else f"{v:.2f}"


def _mb(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _times(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v < 1000 else f"{v:.0f}"


SUMMARY_HEADER = (f"{'fastvae ms':>10s} {'vqp ms':>10s} {'x vqp':>7s} {'vqp:c ms':>10s} "
                  f"{'x vqp:c':>7s} {'fastvae MB':>10s} {'vqp MB':>40s} {'memory':>8s}")


def summary_lines(q: Quantizer, rows: Sequence[QuantizerRow]) -> list[str]:
    """One line per size: fastvae (the drop-in) against the package eager and compiled, time
    and ratio, peak extra memory (or the error the package's run raised) and fastvae's / the
    package's."""
    def ms(r: QuantizerRow | None) -> str:
        if r is None:
            return "-"
        if r.error is not None:
            return "no memory" if is_out_of_memory(r.error) else "failed"
        return _num(r.ms, ".2f")

    def mb(r: QuantizerRow | None) -> str:
        if r is None:
            return "-"
        if r.peak_extra_mb is not None:
            return _mb(r.peak_extra_mb)
        error = r.peak_error or r.error
        return short_error(error) if error else "-"

    lines = [f"{q.size_layout:>18s} {SUMMARY_HEADER}"]
    for shape in dict.fromkeys(r.shape for r in rows):
        by = {r.impl: r for r in rows if r.shape == shape}
        fast, pkg, comp = by.get(FASTVAE), by.get(PACKAGE), by.get(PACKAGE_COMPILED)
        vs = fast.vs if fast is not None else {}
        memory = _fraction(fast.peak_vs_package) if fast is not None else "-"
        lines.append(f"{shape:>18s} {ms(fast):>10s} {ms(pkg):>10s} "
                     f"{_num(vs.get(PACKAGE), '.2f'):>7s} {ms(comp):>10s} "
                     f"{_num(vs.get(PACKAGE_COMPILED), '.2f'):>7s} {mb(fast):>10s} "
                     f"{mb(pkg):>40s} {memory:>8s}")
    return lines


def run_report(quantizer: Quantizer, device: torch.device, *,
               sizes: Sequence[Size] | None = None, impls: Sequence[str] | None = None,
               rounds: int = 5, memory: bool = True, timing: bool = True,
               memory_limit_bytes: int | None = int(DEFAULT_MEMORY_LIMIT_GB * 2**30),
               log: Callable[[str], None] = print,
               on_rows: Callable[[list[QuantizerRow]], None] | None = None
               ) -> list[QuantizerRow]:
    """Each size: (CPU, ``memory``) each implementation's peak extra memory in a fresh process
    under the limit (``peak_memory``); then every implementation that did not run out of memory
    there built, called once (compilation, warm-up) and timed side by side (``time_group``:
    ``rounds`` rounds, each calling every implementation in turn; the median over every call).
    On the CPU this process runs under the same limit (``address_space_limit``), so an
    implementation that asks for more fails with its error, recorded in its row. GPU: the peak
    from the CUDA allocator's statistics, the out-of-memory error recorded likewise. Without
    ``timing`` (CPU) only the memory processes run."""
    impls = list(impls or quantizer.impls)
    rows: list[QuantizerRow] = []
    cpu = device.type == "cpu"
    for size in sizes or quantizer.sizes[device.type]:
        shape = quantizer.format_size(size)
        peaks: dict[str, int | str] = {}
        states: dict[str, int | None] = {}
        if cpu and memory:
            for impl in impls:
                if impl.endswith(":compile") and not quantizer.memory_of_compiled:
                    continue
                peaks[impl], states[impl] = peak_memory(quantizer.name, impl, size,
                                                        memory_limit_bytes)
                if isinstance(peaks[impl], str):
                    log(f"  {quantizer.name} {impl} {shape}: memory not measured "
                        f"({short_error(peaks[impl])})")
        errors: dict[str, str] = {}
        runners: dict[str, Callable[[], object]] = {}
        first_call: dict[str, float] = {}
        with address_space_limit(memory_limit_bytes if cpu else None):
            for impl in impls if timing or not cpu else ():
                peak = peaks.get(impl)
                if isinstance(peak, str) and is_out_of_memory(peak):
                    errors[impl] = peak  # it would fail here too: not tried again
                    continue
                try:
                    runners[impl] = quantizer.make_runner(impl, size, device)
                    states[impl] = getattr(runners[impl], "state_bytes", None)
                    t0 = time.perf_counter()
                    runners[impl]()  # compiles, and fails here rather than mid-timing
                    _common.sync(device)
                    first_call[impl] = time.perf_counter() - t0
                except (Exception, MemoryError) as e:  # one failing implementation: its row
                    runners.pop(impl, None)
                    errors[impl] = f"{type(e).__name__}: {e}"
                    log(f"  {quantizer.name} {impl} {shape}: failed ({short_error(errors[impl])})")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            counts: dict[str, int] = {}

            def counted(name, fn, counts=counts):
                def call():
                    counts[name] = counts.get(name, 0) + 1
                    return fn()
                return call

            # small: the first call of each implementation but the compiled ones (which
            # compiled) took < 0.25 s: 2 warm-up calls, then rounds of >= 50 ms; else the
            # first call was the warm-up and each round is one call
            eager_first = [t for i, t in first_call.items() if not i.endswith(":compile")]
            small = max(eager_first, default=0.0) < 0.25
            load_before = os.getloadavg()[0]
            times = _common.time_group({k: counted(k, f) for k, f in runners.items()}, device,
                                      rounds=rounds, min_round_time=0.05 if small else 0.0,
                                      warmup=2 if small else 0) if runners else {}
            load_after = os.getloadavg()[0]
            if device.type == "cuda":
                for impl in times:
                    peaks[impl] = _common.peak_extra_memory(runners[impl], device)
        runners.clear()
        group = []
        for impl in impls:
            peak = peaks.get(impl)
            peak_bytes = peak if isinstance(peak, int) else None
            seconds = times.get(impl)
            row = QuantizerRow(
                quantizer.name, impl, shape, size, None if seconds is None else seconds * 1e3,
                max(0, counts.get(impl, 0) - (2 if small else 0)),
                peak_extra_mb=None if peak_bytes is None else peak_bytes / 2**20,
                peak_error=peak if isinstance(peak, str) else None,
                peak_dense=None if peak_bytes is None
                else peak_bytes / (4 * quantizer.dense_elements(size)),
                peak_input=None if peak_bytes is None
                else peak_bytes / (4 * quantizer.input_elements(size)),
                load_average=(load_before, load_after), error=errors.get(impl),
                state_mb=None if states.get(impl) is None else states[impl] / 2**20)
            if seconds is not None:
                row.vs = {b: times[b] / seconds for b in quantizer.baselines if b in times}
            group.append(row)
        package_peak = peaks.get(PACKAGE)
        for r in group:
            if isinstance(package_peak, int) and package_peak > 0 and r.peak_extra_mb is not None:
                r.peak_vs_package = r.peak_extra_mb * 2**20 / package_peak
            log(format_row(quantizer, r))
        rows.extend(group)
        if on_rows is not None:
            on_rows(rows)
    return rows


def _git_commit() -> str | None:
    import subprocess

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(Path(fv.__file__).parent), "rev-parse",
                               "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if done.returncode == 0:
            return done.stdout.strip()
    return None


MEASURES = ("ms: median of every call (rounds interleaving the implementations); x <impl>: "
            "that implementation's time / this one's (x vqp:c: the package under "
            "torch.compile); peak MB: peak extra resident memory of one forward + backward "
            "(CPU: a fresh process, VmHWM after resetting it minus VmRSS before, its address "
            "space limited to {limit} more than before building the implementation; GPU: the "
            "CUDA allocator's), or the error it raised; / vqp: that over vqp's (memory: "
            "fastvae's / vqp's); / NxK: over one N x K float32 matrix (K: the codes of one "
            "level); / x: over the input x; state MB: the parameters and buffers the module holds "
            "between calls; load: 1-minute load average before-after the timing")


def write_results(quantizer: Quantizer, rows: list[QuantizerRow], device: torch.device,
                  out_dir: Path, extra: dict | None = None, stem: str | None = None,
                  memory_limit_bytes: int | None = None) -> list[Path]:
    """``<op>.txt`` (how it was measured, the summary per size, every implementation),
    ``<op>.json`` and ``<op>.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or quantizer.name
    meta = {"op": quantizer.name, "device": _common.device_name(device),
            "torch": torch.__version__, "fastvae": fv.__version__,
            "fastvae_commit": _git_commit(), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_now": os.getloadavg(), "backends": fv.backends(),
            "memory_limit_gib": None if memory_limit_bytes is None
            else memory_limit_bytes / 2**30, "work": quantizer.work, **(extra or {})}
    with contextlib.suppress(ImportError):
        from importlib.metadata import version

        meta["vector_quantize_pytorch"] = version("vector-quantize-pytorch")
    records = [asdict(r) for r in rows]
    paths = [out_dir / f"{stem}.{ext}" for ext in ("txt", "json", "csv")]
    limit = "no limit" if memory_limit_bytes is None else f"{memory_limit_bytes / 2**30:g} GiB"
    load = " ".join(f"{v:.2f}" for v in meta["load_average_now"])
    lines = [f"fastvae bench --ops {quantizer.name} ({quantizer.title}): {meta['device']}, "
             f"{meta['date']}, torch {meta['torch']}, vector-quantize-pytorch "
             f"{meta.get('vector_quantize_pytorch', '-')}, fastvae {meta['fastvae']} "
             f"({meta['fastvae_commit']}), {meta['threads']} threads, load average {load}",
             f"work: {quantizer.work}",
             *(f"{key}: {value}" for key, value in (extra or {}).items()),
             MEASURES.format(limit=limit),
             "", "fastvae (the drop-in) against vector-quantize-pytorch (vqp) eager and "
             "compiled (vqp:c); memory: fastvae's peak / vqp's",
             *summary_lines(quantizer, rows),
             "", "every implementation:", _header(quantizer),
             *(format_row(quantizer, r) for r in rows)]
    paths[0].write_text("\n".join(lines) + "\n")
    paths[1].write_text(json.dumps({"meta": meta, "rows": records}, indent=2))
    if records:
        with paths[2].open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return paths


# ---------------------------------------------------------------------------------------------
# The command's part
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--<op>-sizes`` and ``--<op>-impls`` of each quantizer, and the options they share."""
    for q in QUANTIZERS.values():
        default = "; ".join(f"{d}: " + ",".join(map(q.format_size, v)) for d, v in q.sizes.items())
        p.add_argument(f"--{q.name}-sizes", default=None,
                       type=lambda text, q=q: parse_sizes(q, text),
                       help=f"--ops {q.name}: {q.size_layout} list, e.g. {q.size_example} "
                            f"(default: {default})")
        p.add_argument(f"--{q.name}-impls", default=",".join(q.impls),
                       help=f"--ops {q.name}: implementations among "
                            f"{', '.join(q.all_impls())} (default {','.join(q.impls)})")
    p.add_argument("--quantizer-rounds", "--vq-rounds", dest="quantizer_rounds", type=int,
                   default=5, help="--ops vq/rvq/fsq/lfq: timing rounds, each calling every "
                                   "implementation in turn")
    p.add_argument("--memory-only", action="store_true",
                   help="--ops vq/rvq/fsq/lfq on the CPU: only the peak-memory processes, no "
                        "timing (the results say ms -)")
    p.add_argument("--memory-limit-gb", type=float, default=DEFAULT_MEMORY_LIMIT_GB,
                   help="--ops vq/rvq/fsq/lfq on the CPU: the address space an implementation "
                        "may add to its process (its memory process and the timing process); "
                        "beyond it fails with the error it raises, recorded in its row "
                        f"(default {DEFAULT_MEMORY_LIMIT_GB:g}; 0: no limit)")


def selected(ops: Sequence[str]) -> list[str]:
    """The quantizers among ``--ops`` names (``tokenizers``: rvq, fsq, lfq), in order."""
    names: list[str] = []
    for op in ops:
        for name in GROUPS.get(op, (op,)):
            if name in QUANTIZERS and name not in names:
                names.append(name)
    return names


@dataclass
class Plan:
    """What ``run`` does: each quantizer with its implementations and sizes (None: its
    defaults), the rounds, whether memory is measured, and the memory limit in bytes."""

    quantizers: list[tuple[Quantizer, list[str], list[Size] | None]]
    rounds: int
    memory: bool
    memory_limit_bytes: int | None
    timing: bool = True

    def __bool__(self) -> bool:
        return bool(self.quantizers)


def prepare(names: Sequence[str], args: argparse.Namespace,
            names_of: Callable[[str, str, Sequence[str]], list[str]]) -> Plan:
    """The plan of the selected quantizers from the command's options, checked before anything
    runs (a ``UsageError`` naming the option). ``names_of(option, text, known)`` parses a
    comma-separated option of names."""
    from .args import UsageError

    if args.quantizer_rounds < 1:
        raise UsageError(f"--quantizer-rounds (--vq-rounds): must be at least 1, got "
                         f"{args.quantizer_rounds}")
    if not (math.isfinite(args.memory_limit_gb) and args.memory_limit_gb >= 0):
        raise UsageError(f"--memory-limit-gb: must be a finite number >= 0, got "
                         f"{args.memory_limit_gb}")
    quantizers = []
    for name in QUANTIZERS:  # every --<op>-impls is checked, selected or not
        q = QUANTIZERS[name]
        impls = names_of(f"--{name}-impls", getattr(args, f"{name}_impls"), q.all_impls())
        if args.no_compile:
            impls = [i for i in impls if not i.endswith(":compile")]
        if name in names:
            quantizers.append((q, impls, getattr(args, f"{name}_sizes")))
    quantizers.sort(key=lambda t: list(names).index(t[0].name))
    limit = int(args.memory_limit_gb * 2**30) if args.memory_limit_gb > 0 else None
    if args.memory_only and (args.no_memory or args.device.startswith("cuda")):
        raise UsageError("--memory-only: the CPU's memory processes alone; not with "
                         "--no-memory or a GPU --device")
    return Plan(quantizers, args.quantizer_rounds, not args.no_memory, limit,
                timing=not args.memory_only)


def run(plan: Plan, device: torch.device, out: Path) -> None:
    """Each quantizer's report, its files written after each size (a run cut short keeps what
    it measured). The compiled implementations compile with one thread
    (``TORCHINDUCTOR_COMPILE_THREADS=1`` unless set) into a cache of their own (a fresh
    ``TORCHINDUCTOR_CACHE_DIR``, removed at the end, unless set)."""
    created_cache = None
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        import tempfile

        created_cache = tempfile.mkdtemp(prefix="fastvae-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = created_cache
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    limit = plan.memory_limit_bytes
    try:
        for q, impls, sizes in plan.quantizers:
            print(f"{q.title}: {q.work}")
            print(_header(q))

            def save(rows, q=q):
                return write_results(q, rows, device, out, memory_limit_bytes=limit)

            rows = run_report(q, device, sizes=sizes, impls=impls, rounds=plan.rounds,
                              memory=plan.memory, timing=plan.timing or device.type != "cpu",
                              memory_limit_bytes=limit, on_rows=save)
            paths = save(rows)
            print("\n".join(summary_lines(q, rows)))
            print(f"wrote {', '.join(str(p) for p in paths)}")
    finally:
        if created_cache is not None:
            import shutil

            shutil.rmtree(created_cache, ignore_errors=True)
            del os.environ["TORCHINDUCTOR_CACHE_DIR"]
