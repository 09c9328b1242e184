#!/usr/bin/env python
"""The Python side of a Triton launch, on a machine with no GPU (target: <= 15 µs per launch).

    env -u TRITON_INTERPRET python benchmarks/triton_launch.py [--arch 90] [--shape 64x784]

How: Triton's active driver becomes the offline compile check's fake driver
(``scripts/check_triton_compile.py``: ``GPUTarget("cuda", arch, 32)``, imported, not copied),
extended with the pieces a *launch* (not only a compile) touches: ``launcher_cls`` is Triton's
own ``CudaLauncher`` (its Python ``__call__`` runs, scratch allocation and all) whose C entry
point ``utils.launch`` is a no-op that counts its calls, ``utils.load_binary`` returns a dummy
module, and the device properties are an H100's. The kernels compile for real (PTX and cubin by
Triton's bundled ptxas, on the first call); only the final C launch (argument unpacking,
``cuLaunchKernelEx``) is stubbed. Operands are ``meta`` tensors, as in the compile check: they
have dtype, shape, strides and a ``data_ptr()`` (the byte offset), and the launchers take their
GPU tiling for them.

What is timed, after a first call that compiles (median over batches of calls, µs per call):

* ``kernel[grid](*args, **meta)``: Triton's ``JITFunction.run`` (binding, specialization key,
  cache lookup, launcher) with the arguments a fastvae launcher passes;
* ``launch(op, kernel, grid, *args, **meta)``: fastvae's wrapper around it
  (``kernels/_common.py``), the path every launcher takes;
* the whole launcher (``kernels.bernoulli_nll_fwd(logits, target)`` etc.): output and
  partial-sum allocation, tiling, the launch(es), the host-side sum of partials if any.

The launch counter is checked after each timing: every timed call must reach the (stubbed)
launch exactly once per kernel launch, so nothing is measured that skipped the launch.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("triton_launch: unset TRITON_INTERPRET (it times the compiled-kernel path)")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import check_triton_compile as ctc  # noqa: E402  (the fake driver, SM counts)
import fastvae.kernels as K  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from fastvae.kernels import _common  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

META = torch.device("meta")


class StubUtils:
    """``driver.active.utils`` for a GPU that is absent: loading a binary and launching it do
    nothing; ``launches`` counts the launches."""

    def __init__(self):
        self.launches = 0

    def launch(self, *args) -> None:
        self.launches += 1

    def load_binary(self, name, kernel, shared, device):
        return 0, 0, 32, 0, 1024  # module, function, n_regs, n_spills, n_max_threads

    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                "mem_bus_width": 5120}

    def unload_module(self, module) -> None:
        pass

    def build_signature_metadata(self, kernel_signature) -> tuple:
        return tuple(kernel_signature)


class StubLaunchDriver(ctc.OfflineCudaDriver):
    """The compile check's offline driver, plus a launcher whose C launch is a counter."""

    def __init__(self, arch: int):
        super().__init__(arch)
        self.utils = StubUtils()
        try:  # Triton's own Python launcher: its __call__ is part of the host path
            from triton.backends.nvidia import driver as nvidia

            # Set by the C utilities (compiled against libcuda) that this driver never builds;
            # used once per kernel, to describe its arguments to the C launch.
            for name, value in (("ARG_CONSTEXPR", 0), ("ARG_KERNEL", 1), ("ARG_TUPLE", 2),
                                ("PyKernelArg", lambda nested_tuple, type: (nested_tuple, type))):
                if getattr(nvidia, name, None) is None:
                    setattr(nvidia, name, value)
            self.launcher_cls = nvidia.CudaLauncher
        except Exception:
            utils = self.utils

            def launcher_cls(src, metadata):
                return lambda *args: utils.launch(*args)
            self.launcher_cls = launcher_cls


@contextlib.contextmanager
def stubbed_gpu(arch: int):
    """Within: Triton compiles for sm_<arch> and launches into a counter (the yielded utils)."""
    fake, previous, sm_count = StubLaunchDriver(arch), driver._active, _common._sm_count
    driver.set_active(fake)
    _common._sm_count = lambda index: ctc.SM_COUNT.get(arch, 132)
    try:
        yield fake.utils
    finally:
        _common._sm_count = sm_count
        driver._active = previous


def time_us(fn, launches_per_call: int, utils: StubUtils, batch: int = 200,
            batches: int = 40) -> tuple[float, float]:
    """(median, p10) µs per call of ``fn()`` over ``batches`` batches of ``batch`` calls;
    checks that each call launched ``launches_per_call`` kernels."""
    fn()  # the first call: compiles (or hits the on-disk cache), loads, fills caches
    per_call = []
    for _ in range(batches):
        before = utils.launches
        t0 = time.perf_counter_ns()
        for _ in range(batch):
            fn()
        per_call.append((time.perf_counter_ns() - t0) / batch / 1e3)
        got = utils.launches - before
        if got != batch * launches_per_call:
            raise AssertionError(f"{got} launches for {batch} calls, expected "
                                 f"{batch * launches_per_call}")
    per_call.sort()
    return statistics.median(per_call), per_call[len(per_call) // 10]


def captured_launches(fn) -> list[tuple]:
    """The (op, kernel, grid, args, meta) of each ``launch`` that ``fn()`` makes."""
    calls = []
    real = _common.launch

    def record(op, kernel, grid, *args, **meta):
        calls.append((op, kernel, grid, args, meta))
        return real(op, kernel, grid, *args, **meta)

    modules = [m for m in vars(K).values() if getattr(m, "launch", None) is real]
    modules += [sys.modules[n] for n in list(sys.modules)
                if n.startswith("fastvae.kernels.") and getattr(sys.modules[n], "launch",
                                                                 None) is real]
    for m in modules:
        m.launch = record
    try:
        fn()
    finally:
        for m in modules:
            m.launch = real
    return calls


def cases(B: int, N: int, dtype: torch.dtype) -> list[tuple[str, object]]:
    def t(*shape):
        return torch.empty(shape, dtype=dtype, device=META)

    logits, target, mu, lv = t(B, N), t(B, N), t(B, 64), t(B, 64)
    grad = torch.empty((), dtype=torch.float32, device=META).expand(B)  # d mean / d nll
    seed = torch.empty(1, dtype=torch.int64, device=META)
    return [
        ("bernoulli_nll_fwd", lambda: K.bernoulli_nll_fwd(logits, target)),
        ("bernoulli_nll_bwd", lambda: K.bernoulli_nll_bwd(grad, logits, target,
                                                          [True, False])),
        ("gaussian_kl_fwd", lambda: K.gaussian_kl_fwd(mu, lv, None, None, 1)),
        ("sample_and_kl_fwd", lambda: K.sample_and_kl_fwd(mu, lv, seed, 1)),
    ]


def breakdown(utils: StubUtils, batches: int, B: int, N: int) -> None:
    """The parts of one cached launch (bernoulli_nll's forward kernel): Triton's Python
    launcher (``CompiledKernel.run``, i.e. ``CudaLauncher.__call__`` down to the stubbed C
    launch), its ``launch_metadata`` (made for the launch hooks on every launch), and the
    host-side helpers of the launcher (tiling, the partial-sum allocation)."""
    logits = torch.empty(B, N, device=META)
    (_op, kernel, grid, kargs, meta), = captured_launches(lambda: K.bernoulli_nll_fwd(logits,
                                                                                      logits))
    compiled = next((e[1] for e in getattr(_common, "_FAST", {}).values() if e[0] is kernel),
                    None)
    print("parts (bernoulli_nll_fwd):")
    if compiled is not None:
        names = list(inspect.signature(kernel.fn).parameters)[len(kargs):]
        full = (*kargs, *(meta[n] for n in names))
        hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
        parts = [
            ("CompiledKernel.run (Triton's launcher)", 1, lambda: compiled.run(
                grid[0], 1, 1, 0, compiled.function, compiled.packed_metadata, None, *hooks,
                *full)),
            ("CompiledKernel.launch_metadata", 0,
             lambda: compiled.launch_metadata(grid, 0, *full)),
        ]
    else:
        parts = []
    parts += [
        ("tiling(B, N)", 0, lambda: _common.tiling(B, N, META)),
        ("Reduction(B, N) (tiling, split, empty)", 0,
         lambda: _common.Reduction(B, N, 1, META, torch.float32)),
        ("torch.empty(B, 1) on meta", 0, lambda: torch.empty(B, 1, device=META)),
        ("triton.next_power_of_2(N)", 0, lambda: triton.next_power_of_2(N)),
    ]
    for name, launches, fn in parts:
        med, p10 = time_us(fn, launches, utils, batches=batches)
        print(f"  {name:42} {med:6.2f} ({p10:5.2f})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--shape", default="64x784", help="B x N of the likelihood (latent: 64)")
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args(argv)
    B, N = (int(s) for s in args.shape.split("x"))
    print(f"triton {triton.__version__}, torch {torch.__version__}, sm_{args.arch} (fake "
          f"driver, launch stubbed), meta tensors {B}x{N} float32; µs per call, median (p10) "
          f"of {args.batches} batches of 200 calls")
    print(f"{'launcher':20} {'kernel[grid](...)':>18} {'launch(...)':>14} {'launcher':>14}"
          "  launches")
    with stubbed_gpu(args.arch) as utils:
        for name, fn in cases(B, N, torch.float32):
            calls = captured_launches(fn)  # compiles
            raw = wrapped = (0.0, 0.0)
            for op, kernel, grid, kargs, meta in calls:
                r = time_us(lambda k=kernel, g=grid, a=kargs, m=meta: k[g](*a, **m), 1, utils,
                            batches=args.batches)
                w = time_us(lambda o=op, k=kernel, g=grid, a=kargs, m=meta:
                            _common.launch(o, k, g, *a, **m), 1, utils, batches=args.batches)
                raw = (raw[0] + r[0], raw[1] + r[1])
                wrapped = (wrapped[0] + w[0], wrapped[1] + w[1])
            whole = time_us(fn, len(calls), utils, batches=args.batches)
            print(f"{name:20} {raw[0]:9.1f} ({raw[1]:5.1f}) {wrapped[0]:6.1f} ({wrapped[1]:5.1f})"
                  f" {whole[0]:6.1f} ({whole[1]:5.1f})  {len(calls)}")
        breakdown(utils, args.batches, B, N)
        empty = time_us(lambda: None, 0, utils, batches=args.batches)
        print(f"(an empty Python call in the same loop: {empty[0]:.2f} µs)")
    print(f"load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
