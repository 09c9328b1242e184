"""What every ``fastvae bench`` report shares: timing (``time_group``), the CUDA allocator's
peak (``peak_extra_memory``), the device's name for the results folder (``device_name``), the
steady host heap (``steady_heap``)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_group(fns: dict[str, Callable[[], object]], device: torch.device, *,
               rounds: int = 5, min_round_time: float = 0.05,
               warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function. GPU: CUDA-event timing (triton's do_bench).
    CPU: after ``warmup`` calls of each, ``rounds`` rounds that each time every function in
    turn for at least ``min_round_time`` seconds, so that a change of load on the machine hits
    all of them alike; the median over every call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
                for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                fn()
                t1 = time.perf_counter()
                samples[name].append(t1 - t0)
                if t1 - start >= min_round_time:
                    break
    return {name: statistics.median(ts) for name, ts in samples.items()}


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call beyond what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - base


# glibc's mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest M_MMAP_THRESHOLD on 64-bit


def steady_heap() -> str:
    """Keep freed host memory in the process (glibc only): no mmap per allocation up to 32 MiB,
    no trimming of the heap's top. A CPU benchmark frees a call's outputs (12 MB gradients at
    4096 x 784) and allocates them again in the next call; glibc returns such memory to the
    system whenever the free space at the top of the heap passes its trim threshold, and the
    next call page-faults it back in, one 4 KiB page at a time (measured: ~3100 faults, +10-20%
    of a fwd + bwd, hitting one implementation or another depending on the order of its
    allocations). Set for every implementation alike; a training process with a populated heap
    rarely trims. Returns what was done, for the report's header."""
    if platform.system() != "Linux":
        return "heap: allocator defaults"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "heap: allocator defaults (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) != 1 or \
            mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) != 1:
        return "heap: allocator defaults (mallopt refused)"
    return "heap: glibc trimming off, mmap above 32 MiB (mallopt)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name = f"cpu-{os.cpu_count()}c-{name}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")
