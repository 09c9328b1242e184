"""The launch cache of ``kernels._common.launch`` (the fast path of a compiled Triton launch).

A compiled kernel launched again with the same arguments skips ``JITFunction.run`` and calls
the ``CompiledKernel``'s launcher directly. In this process (no GPU) a ``JITFunction`` stands in
with a fake compiled kernel, to pin the key: what hits, what misses, what the launcher gets.
In a subprocess, a real fastvae kernel compiles for sm_90 (the offline compile check's driver,
with the launch stubbed as in ``benchmarks/triton_launch.py``), and the cached launch passes
the launcher exactly what Triton's own path passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
jit = pytest.importorskip("triton.runtime.jit")

from fastvae.kernels import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _toy(x_ptr, n, flag, BLOCK: tl.constexpr, MODE: tl.constexpr = 3):
    pass


class FakeCompiled:
    """What ``_launch_fast`` uses of a ``CompiledKernel``; records the launcher calls."""

    function = "fn"
    packed_metadata = "md"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)

    def launch_metadata(self, grid, stream, *args):
        return "lm"


@pytest.fixture
def toy(monkeypatch):
    """A compiled-kernel stand-in: ``kernel.run`` (Triton's path) records its calls and
    returns the fake compiled kernel; the driver reports device 7, stream 11."""
    if _common._JITFunction is None:
        pytest.skip("this Triton has no fast path")
    kernel = jit.JITFunction(_toy)
    compiled = FakeCompiled()
    slow = []

    def run(*args, grid, warmup, **meta):
        slow.append((grid, args, meta))
        return compiled

    kernel.run = run
    active = SimpleNamespace(get_current_device=lambda: 7,
                             get_current_stream=lambda device: 11 + device - 7)
    monkeypatch.setattr(_common, "_driver", SimpleNamespace(active=active))
    monkeypatch.setattr(_common, "_FAST", {})
    return kernel, compiled, slow


def test_second_call_takes_the_cached_path(toy):
    kernel, compiled, slow = toy
    x = torch.zeros(8)
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16, num_warps=4)
    assert len(slow) == 1
    assert compiled.calls == []
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16, num_warps=4)
    assert len(slow) == 1
    # grid padded to 3-D, the stream, the launcher's handles, then every parameter in
    # signature order, constexprs and their defaults included (what JITFunction.run passes)
    hooks = (triton.knobs.runtime.launch_enter_hook, triton.knobs.runtime.launch_exit_hook)
    assert compiled.calls == [(5, 1, 1, 11, "fn", "md", "lm", *hooks, x, 8, True, 16, 3)]


@pytest.mark.parametrize("change", [
    dict(args=(torch.zeros(8, dtype=torch.float64), 8, True)),  # dtype
    dict(args=(torch.zeros(9)[1:], 8, True)),  # pointer not 16-byte aligned
    dict(args=(torch.zeros(8), 16, True)),  # an integer value
    dict(args=(torch.zeros(8), 8, 1)),  # True and 1 are not the same argument
    dict(args=(torch.zeros(8), 8.0, True)),  # nor 8 and 8.0
    dict(meta=dict(BLOCK=32, num_warps=4)),  # a constexpr
    dict(meta=dict(BLOCK=16, num_warps=8)),  # an option
    dict(meta=dict(BLOCK=16, MODE=True, num_warps=4)),  # a default overridden
])
def test_a_different_specialization_misses(toy, change):
    kernel, compiled, slow = toy
    base = dict(args=(torch.zeros(8), 8, True), meta=dict(BLOCK=16, num_warps=4))
    _common.launch("fastvae::toy", kernel, (5,), *base["args"], **base["meta"])
    other = {**base, **change}
    _common.launch("fastvae::toy", kernel, (5,), *other["args"], **other["meta"])
    assert len(slow) == 2
    assert compiled.calls == []
    _common.launch("fastvae::toy", kernel, (5,), *other["args"], **other["meta"])
    assert len(slow) == 2
    assert len(compiled.calls) == 1


def test_another_device_misses(toy, monkeypatch):
    kernel, compiled, slow = toy
    x = torch.zeros(8)
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)
    monkeypatch.setattr(_common._driver.active, "get_current_device", lambda: 8)
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)
    assert len(slow) == 2
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)
    assert compiled.calls[0][3] == 12  # device 8's stream


def test_no_fast_path_when_run_is_wrapped(toy, monkeypatch):
    """The offline compile check wraps JITFunction.run (compile only): every launch goes
    through it, cached or not."""
    kernel, compiled, _slow = toy
    x = torch.zeros(8)
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)
    wrapped = []
    monkeypatch.setattr(jit.JITFunction, "run",
                        lambda self, *a, **k: wrapped.append(1))
    kernel.__dict__.pop("run")  # kernel[grid] now reaches the class's (wrapped) run
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)
    assert wrapped == [1]
    assert compiled.calls == []


def test_failure_on_the_cached_path_names_the_op(toy):
    kernel, compiled, _slow = toy
    x = torch.empty(8, device="meta")  # a GPU's tensor for the error's wording
    _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)

    def fail(*args):
        raise RuntimeError("launch failed")

    compiled.run = fail
    with pytest.raises(_common.TritonKernelError, match=r"fastvae::toy.*_toy.*failed to launch"):
        _common.launch("fastvae::toy", kernel, (5,), x, 8, True, BLOCK=16)


_OFFLINE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import triton_launch as tlb
import fastvae.kernels as K
from fastvae.kernels import _common

def norm(a):
    if isinstance(a, torch.Tensor):
        return ("tensor", str(a.dtype), tuple(a.shape), a.stride(), a.data_ptr())
    if isinstance(a, (tuple, list)):
        return [norm(b) for b in a]
    if type(a).__name__ == "LazyDict":  # the launch metadata for hooks, made per launch
        return ("LazyDict", repr(sorted(a.data.items())), len(a.extras))
    return repr(a)

calls = []
with tlb.stubbed_gpu(90) as utils:
    utils.launch = lambda *args: calls.append(norm(args))
    l, x = (torch.empty(64, 784, device="meta") for _ in range(2))
    g = torch.empty((), device="meta").expand(64)
    for _ in range(3):
        K.bernoulli_nll_fwd(l, x)
        K.bernoulli_nll_bwd(g, l, x, [True, True])
print(json.dumps(dict(stats=_common.fast_path_stats, n=len(calls),
                      same=[calls[i] == calls[i + 2] for i in range(4)])))
"""


def test_cached_launch_passes_what_triton_passes(tmp_path):
    """Offline sm_90 (no GPU): the launcher of a real kernel gets the same arguments from the
    cached path (second and third calls) as from JITFunction.run (the first)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _OFFLINE, str(ROOT / "benchmarks")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["stats"] == {"hits": 4, "misses": 2}
    assert out["n"] == 6
    assert out["same"] == [True] * 4


def test_fast_path_only_for_the_known_launch_convention():
    """The fast path calls the launcher as JITFunction.run does; it is on only where run's
    source makes that call (this Triton: yes; a run that leaves the constexprs out: no)."""
    assert _common._convention_known(jit.JITFunction.run)

    def older_run(kernel, grid_0, grid_1, grid_2, stream, launch_metadata, vals):
        kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
                   launch_metadata, triton.knobs.runtime.launch_enter_hook,
                   triton.knobs.runtime.launch_exit_hook, *vals)

    assert not _common._convention_known(older_run)
