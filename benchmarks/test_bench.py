"""Every op x direction x implementation x size, and the quantizers (vq, rvq, fsq, lfq), timed
by pytest-benchmark.

    pytest benchmarks --benchmark-only [-k loss_head] [--benchmark-group-by=group]

Implementations: eager PyTorch, torch.distributions where it applies, torch.compile of eager,
and each fastvae backend that can serve the device. Sizes: from a small batch (64 x 784) to
large (65536 x 1024 = 64M elements, GPU only).
"""

from __future__ import annotations

import pytest
import torch

from fastvae.cli import bench, bench_quantizers

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


# The quantizers against vector-quantize-pytorch (eager, compiled), forward + backward of one
# training step with frozen codebooks (bench_quantizers.QUANTIZERS[op].work):
# - vq: with cdist + argmin and fastvae's function too, at bench_quantizers.VQ_SIZES (the
#   tokenizer sizes take seconds per call on the CPU: select with -k, e.g. -k 1024x512x64);
# - rvq, fsq, lfq: at small sizes (the full sizes, and the package's memory at them, are
#   ``fastvae bench --ops tokenizers``). The package's dense versions cannot run some sizes at
#   all (FSQ [4]*16 builds a 2^32-code codebook in its constructor): those are skipped with the
#   error they raise.
QUANTIZER_SIZES = {
    "vq": bench_quantizers.VQ_SIZES[DEVICE.type],
    "rvq": [(1024, 8, 1024, 128), (1024, 8, 1024, 8)],
    "fsq": [(1024, (8, 8, 8, 5, 5, 5)), (1024, (4,) * 16)],
    "lfq": [(1024, 10), (1024, 14)],
}
QUANTIZER_CASES = [(op, impl, size) for op, sizes in QUANTIZER_SIZES.items() for size in sizes
                   for impl in bench_quantizers.QUANTIZERS[op].impls]


def _quantizer_id(case) -> str:
    op, impl, size = case
    return f"{op}-{impl}-{bench_quantizers.QUANTIZERS[op].format_size(size)}"


@pytest.mark.parametrize("case", QUANTIZER_CASES, ids=_quantizer_id)
def test_quantizer(benchmark, case):
    op, impl, size = case
    if impl.startswith("vqp"):
        pytest.importorskip("vector_quantize_pytorch")
    quantizer = bench_quantizers.QUANTIZERS[op]
    limit = int(bench_quantizers.DEFAULT_MEMORY_LIMIT_GB * 2**30)
    with bench_quantizers.address_space_limit(limit if DEVICE.type == "cpu" else None):
        try:
            runner = _synchronized(quantizer.make_runner(impl, size, DEVICE))
            runner()  # compile / warm up outside the measurement
        except (RuntimeError, MemoryError) as e:
            error = f"{type(e).__name__}: {e}"
            if impl.startswith("vqp") and bench_quantizers.is_out_of_memory(error):
                pytest.skip(f"vector-quantize-pytorch: {bench_quantizers.short_error(error)}")
            raise
        benchmark.group = f"{op} fwd+bwd {quantizer.format_size(size)}"
        benchmark(runner)
