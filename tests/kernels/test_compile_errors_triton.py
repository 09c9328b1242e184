"""A Triton kernel that fails to compile or run raises an error naming the op, the backend and
the specialization, and nothing falls back to another backend.

Under Triton's interpreter (this process) a failing kernel fails when it runs. The GPU compiler
is exercised in a subprocess, offline, for sm_90 (the driver of
``scripts/check_triton_compile.py``): a kernel that reads a plain module global compiles under
the interpreter and fails there, which is the fault this error exists to report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fastvae as fv

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from fastvae.kernels import _common, _likelihood  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
needs_interpreter = pytest.mark.skipif(
    "triton" not in fv.backends() or torch.cuda.is_available(),
    reason="runs the Triton backend under its interpreter on CPU tensors")


@triton.jit
def _broken_kernel(partial_ptr, a_ptr, x_ptr, c_ptr, c_value, B, N, tiles_per_prog, n_split,
                   s_a_b, s_a_n, s_x_b, s_x_n, s_c_b, s_c_n, VALUE: tl.constexpr,
                   HAS_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                   DTYPE: tl.constexpr):
    tl.static_assert(BLOCK_B < 0, "deliberately broken")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_failing_kernel_names_op_backend_and_specialization(monkeypatch, dtype):
    monkeypatch.setattr(_likelihood, "_likelihood_fwd_kernel", _broken_kernel)
    logits = torch.zeros(3, 5, dtype=dtype)[:, 1:]  # a strided view: strides (5, 1)
    with fv.use_backend("triton"), pytest.raises(_common.TritonKernelError) as info:
        fv.bernoulli_nll(logits, torch.zeros(3, 4, dtype=dtype))
    e = info.value
    assert (e.op, e.kernel, e.stage) == ("fastvae::bernoulli_nll", "_broken_kernel", "run")
    msg = str(e)
    name = str(dtype).removeprefix("torch.")
    for part in ("fastvae::bernoulli_nll", "backend 'triton'", f"a_ptr: {name}",
                 f"x_ptr: {name}", "(not 16-byte aligned)", "B=3", "N=4", "s_a_b=5",
                 "VALUE=_bernoulli_value", "BLOCK_B=4", "BLOCK_N=4", "num_warps=4",
                 "deliberately broken"):
        assert part in msg, f"{part!r} missing from: {msg}"
    assert "deliberately broken" in str(e.__cause__)


@needs_interpreter
def test_failing_backward_kernel_is_reported_not_replaced(monkeypatch):
    """A backward kernel's failure surfaces from backward(), as the backward op's."""
    def broken(*args, **kwargs):
        raise AssertionError("deliberately broken")

    class Broken:
        fn = broken

        def __getitem__(self, grid):
            return broken

    monkeypatch.setattr(_likelihood, "_likelihood_bwd_kernel", Broken())
    logits = torch.zeros(2, 3, requires_grad=True)
    with fv.use_backend("triton"):
        loss = fv.bernoulli_nll(logits, torch.zeros(2, 3))
        with pytest.raises(_common.TritonKernelError, match="fastvae::bernoulli_nll_backward"):
            loss.backward()
    assert logits.grad is None


_OFFLINE_COMPILE = """
import importlib.util, json, sys
import torch
spec = importlib.util.spec_from_file_location("check", sys.argv[1])
check = importlib.util.module_from_spec(spec)
sys.modules["check"] = check
spec.loader.exec_module(check)
from fastvae.kernels import _common, _likelihood, gaussian_nll
sys.path.insert(0, sys.argv[2])
import broken

mean = torch.empty(8, 48, dtype=torch.float16, device="meta")
results = {}
with check.offline_gpu(90) as rec:
    gaussian_nll.gaussian_nll_fwd(mean, mean, None, 0.0)  # the real kernel compiles
    results["compiled"] = [launch.kernel for launch in rec.launches]
    _likelihood._likelihood_fwd_kernel = broken.reads_a_global
    try:
        gaussian_nll.gaussian_nll_fwd(mean, mean, None, 0.0)
    except _common.TritonKernelError as e:
        results.update(op=e.op, stage=e.stage, message=str(e),
                       cause=type(e.__cause__).__name__)
print(json.dumps(results))
"""

_BROKEN_MODULE = """
import triton
import triton.language as tl

HALF = 0.5


@triton.jit
def reads_a_global(partial_ptr, a_ptr, x_ptr, c_ptr, c_value, B, N, tiles_per_prog, n_split,
                   s_a_b, s_a_n, s_x_b, s_x_n, s_c_b, s_c_n, VALUE: tl.constexpr,
                   HAS_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                   DTYPE: tl.constexpr):
    tl.store(partial_ptr + tl.arange(0, BLOCK_B), tl.full([BLOCK_B], HALF, DTYPE))
"""


def test_gpu_compile_failure_names_op_backend_and_specialization(tmp_path):
    """Offline compile for sm_90 (no GPU needed): the real Gaussian NLL kernel compiles; one
    that reads a plain module global fails to compile, reported with its specialization."""
    (tmp_path / "broken.py").write_text(textwrap.dedent(_BROKEN_MODULE))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    res = subprocess.run(
        [sys.executable, "-c", _OFFLINE_COMPILE,
         str(ROOT / "scripts" / "check_triton_compile.py"), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["compiled"] == ["_likelihood_fwd_kernel[_gaussian_value]"]
    assert (out["op"], out["stage"], out["cause"]) == (
        "fastvae::gaussian_nll", "compile", "CompilationError")
    msg = out["message"]
    for part in ("fastvae::gaussian_nll", "backend 'triton'", "reads_a_global",
                 "failed to compile", "a_ptr: float16", "x_ptr: float16", "B=8", "N=48",
                 "VALUE=_gaussian_value", "HAS_C=False", "BLOCK_B=", "BLOCK_N=64", "DTYPE=fp32",
                 "num_warps=",
                 "HALF"):
        assert part in msg, f"{part!r} missing from: {msg}"
