"""Every op x direction x implementation x size, and the vector quantizer, timed by
pytest-benchmark.

    pytest benchmarks --benchmark-only [-k loss_head] [--benchmark-group-by=group]

Implementations: eager PyTorch, torch.distributions where it applies, torch.compile of eager,
and each fastvae backend that can serve the device. Sizes: from a small batch (64 x 784) to
large (65536 x 1024 = 64M elements, GPU only).
"""

from __future__ import annotations

import pytest
import torch

from fastvae.cli import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

CASES = [
    bench.Case(op, direction, impl, B, N, "float32")
    for op in bench.OPS
    for B, N in bench.DEFAULT_SIZES[DEVICE.type]
    for direction in ("fwd", "fwd+bwd")
    for impl in bench.implementations(bench.OPS[op], DEVICE, None)
]


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(DEVICE)

    return run


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op(benchmark, case):
    runner = _synchronized(bench.make_runner(case, DEVICE))
    runner()  # compile / warm up outside the measurement
    benchmark.group = f"{case.op} {case.direction} {case.batch}x{case.features}"
    benchmark.extra_info["bytes"] = bench.op_bytes(bench.OPS[case.op], case.batch,
                                                   case.features, 4, case.direction)
    benchmark(runner)


TRAIN_IMPLS = ["eager", "compile"] + [
    f"fastvae:{b}" for b in bench.fv.backends()
    if bench._backend.unusable_reason(b, DEVICE) is None]


@pytest.mark.parametrize("impl", TRAIN_IMPLS)
@pytest.mark.parametrize("size", bench.DEFAULT_TRAIN_STEP[DEVICE.type],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_train_step(benchmark, impl, size):
    step = _synchronized(bench.make_train_step(impl, *size, DEVICE))
    step()
    benchmark.group = f"train step {size[0]}x{size[1]}"
    benchmark(step)


# The vector quantizer: forward + backward with a fixed codebook (bench.VQ_WORK) of fastvae
# against vector-quantize-pytorch (eager, compiled) and cdist + argmin, at bench.VQ_SIZES
# (the tokenizer sizes take seconds per call on the CPU: select with -k, e.g. -k 1024x512x64).
VQ_CASES = [(impl, size) for size in bench.VQ_SIZES[DEVICE.type] for impl in bench.VQ_IMPLS]


@pytest.mark.parametrize(("impl", "size"), VQ_CASES,
                         ids=[f"{impl}-{'x'.join(map(str, size))}" for impl, size in VQ_CASES])
def test_vq(benchmark, impl, size):
    if impl.startswith("vqp"):
        pytest.importorskip("vector_quantize_pytorch")
    runner = _synchronized(bench.make_vq_runner(impl, *size, DEVICE))
    runner()  # compile / warm up outside the measurement
    benchmark.group = f"vq fwd+bwd {'x'.join(map(str, size))}"
    benchmark(runner)
