"""Determinism (docs/backends.md): the same inputs and seed give bitwise-identical outputs and
gradients, run after run, on every backend; on the cpu backend whatever the thread count; with
``torch.use_deterministic_algorithms(True)`` as without it. Reductions sum in a fixed order
(partial sums per tile, then a fixed-order sum; no atomics), so there is no deterministic
"mode" to turn on: every call is deterministic.

Every op variant of ``cases.CASES`` (free bits' per-feature sums included) runs on inputs large
enough to be split over several programs / threads. (Training twice from one seed gives the
same weights: training/test_trainer.py.)
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch
from cases import CASES, as_tuple, differentiable, make_inputs
from helpers import CUDA

import fastvae as fv

# Sizes that split the work: on the cpu backend three 16384-element units per thread (2 threads);
# on GPU many programs per row. Triton's interpreter runs one program per row block (and is
# slow), the torch backend has no split: small sizes there.
SHAPES = {"cpu": (48, 1031), "cuda": (512, 4099), "triton": (512, 4099) if CUDA else (13, 257),
          "torch": (13, 257)}


def _run(case_name: str, device, dtype=torch.float32, shape=SHAPES["cpu"],
         layout="contiguous"):
    """Outputs and gradients of one case, from fixed inputs, upstream gradients and seeds."""
    spec = CASES[case_name]
    g = torch.Generator().manual_seed(zlib.crc32(case_name.encode()))
    leaves, views, _ = make_inputs(spec, shape, layout, dtype, device, g)
    torch.manual_seed(7)  # for any seed drawn from torch's generator
    out = as_tuple(spec.call(fv, {n: v(leaves[n]) for n, v in views.items()},
                             spec.reductions[0], dtype))
    upstream = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(device) for o in out]
    grads = torch.autograd.grad(out, list(differentiable(spec, leaves).values()), upstream)
    return [t.detach() for t in (*out, *grads)]


def _assert_bitwise(runs, what):
    first = runs[0]
    for i, run in enumerate(runs[1:], 1):
        assert len(run) == len(first)
        for j, (a, b) in enumerate(zip(first, run, strict=True)):
            assert torch.equal(a, b), (f"{what}: result {j} of run {i} differs from run 0 by "
                                       f"up to {(a.double() - b.double()).abs().max().item()}")


@contextlib.contextmanager
def _deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("case", list(CASES))
def test_bitwise_identical_runs(case, backend, device):
    shape = SHAPES[backend]
    runs = [_run(case, device, shape=shape) for _ in range(2)]
    with _deterministic_algorithms():
        runs.append(_run(case, device, shape=shape))
    _assert_bitwise(runs, case)


@pytest.mark.parametrize("case", ["kl_prior", "kl_free_bits", "bernoulli", "gaussian_nll_element",
                                  "reparameterize_samples", "sample_and_kl",
                                  "sample_and_kl_free_bits", "vae_gaussian",
                                  "continuous_bernoulli", "dmol"])
def test_bitwise_identical_across_thread_counts(case):
    """The cpu backend splits the work over torch.get_num_threads() threads; the result does not
    depend on how many (a half-precision and a broadcast layout too)."""
    if "cpu" not in fv.backends():
        pytest.skip("the native cpu backend is not built")
    before = torch.get_num_threads()
    runs = []
    try:
        with fv.use_backend("cpu"):
            for threads in (1, 2, 3, 1):
                torch.set_num_threads(threads)
                runs.append(_run(case, "cpu")
                            + _run(case, "cpu", torch.bfloat16, layout="expanded_event"))
    finally:
        torch.set_num_threads(before)
    _assert_bitwise(runs, case)
