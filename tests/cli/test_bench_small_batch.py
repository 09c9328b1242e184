"""The small-batch table (``fastvae bench --small-batch``): paired ratios, the large size held
against torch.compile, the crossover line and the files. No timing is asserted: the timer is
replaced by fixed samples, and each runner is called once to show it runs."""

from __future__ import annotations

import json
import platform
import sys

import pytest
import torch

from fastvae.cli import bench

CPU = torch.device("cpu")


def test_ratios_are_per_round_median_and_p10():
    slow = [10.0] * 10
    fast = [10.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 20.0]
    median, p10 = bench._ratios(slow, fast)
    assert median == 2.0  # ratios 0.5, 1, 2 (x8)
    assert p10 == 1.0  # the 10th percentile of 10 sorted ratios: the second
    with pytest.raises(ValueError, match=r"shorter|longer"):
        bench._ratios([1.0], [1.0, 2.0])


@pytest.fixture
def fake_timer(monkeypatch):
    """time_paired replaced: each runner runs once, then fixed samples per implementation;
    torch.compile is the identity here (compiling takes seconds and is not what is tested)."""
    per_impl = {"eager": 4.0, "compile": 3.0}
    calls = []

    def time_paired(fns, **_):
        calls.append(tuple(fns))
        for fn in fns.values():
            fn()
        return {name: [per_impl.get(name, 2.0) * (1 + 0.1 * i) for i in range(10)]
                for name in fns}

    monkeypatch.setattr(bench, "time_paired", time_paired)
    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    monkeypatch.setattr(bench, "SMALL_SIZES", [(1, 1), (2, 784)])
    monkeypatch.setattr(bench, "SMALL_LATENT_SIZES", [(3, 4)])
    monkeypatch.setattr(bench, "LARGE_SIZES", {"cpu": [(5, 784)]})
    return calls


def test_large_size_is_held_against_compile(fake_timer, tmp_path):
    rows = bench.run_small_batch(CPU, ["gaussian_kl", "bernoulli_nll"], log=lambda _: None)
    sizes = [(r.op, r.batch, r.features) for r in rows]
    assert sizes == [("gaussian_kl", 1, 1), ("gaussian_kl", 2, 784), ("gaussian_kl", 3, 4),
                     ("gaussian_kl", 5, 784), ("bernoulli_nll", 1, 1),
                     ("bernoulli_nll", 2, 784), ("bernoulli_nll", 5, 784)]
    for (op, B, N), impls in zip(sizes, fake_timer, strict=True):
        large = (B, N) == (5, 784)
        assert impls == (("eager", "compile", "fastvae:cpu") if large
                         else ("eager", "fastvae:cpu")), (op, B, N)
    for r in rows:
        assert r.ratio_median == pytest.approx(2.0)
        assert r.ratio_p10 == pytest.approx(2.0)
        if (r.batch, r.features) == (5, 784):
            assert r.compile_ratio_median == pytest.approx(1.5)
            assert r.compile_us == pytest.approx(3.0 * 1.45e6)
        else:
            assert r.compile_us is None
            assert r.compile_ratio_median is None

    path = bench.write_small_batch(rows, CPU, tmp_path)
    text = path.read_text().splitlines()
    header = text[2]
    assert "x compile (median)" in header
    large = [line for line in text if line.startswith("gaussian_kl") and "5x784" in line]
    small = [line for line in text if line.startswith("gaussian_kl") and "2x784" in line]
    assert len(large[0].split()) == len(small[0].split()) + 3
    # the crossover is read off the small sizes only
    assert "# gaussian_kl: at least as fast as eager from 1 x 1 on" in text
    saved = json.loads((tmp_path / path.name.replace(".txt", ".json")).read_text())
    assert saved["rows"][3]["compile_ratio_p10"] == pytest.approx(1.5)


def test_without_compile(fake_timer):
    bench.run_small_batch(CPU, ["bernoulli_nll"], with_compile=False, log=lambda _: None)
    assert all("compile" not in impls for impls in fake_timer)


def test_crossover_needs_every_larger_size():
    def row(B, N, ratio):
        return bench.SmallRow("op", B, N, 1.0, 1.0, ratio, ratio)

    rows = [row(1, 1, 0.8), row(16, 784, 1.1), row(64, 784, 0.9), row(256, 784, 1.2),
            row(4096, 784, 3.0)]
    assert bench.crossover(rows, "op") == "256 x 784"
    rows[0] = row(1, 1, 1.0)
    rows[2] = row(64, 784, 1.0)
    assert bench.crossover(rows, "op") == "1 x 1"
    assert bench.crossover([row(1, 1, 1.2), row(256, 784, 0.9), row(4096, 784, 2.0)],
                           "op") is None


def test_steady_heap_says_what_it_did():
    from fastvae.cli.bench_common import steady_heap

    said = steady_heap()
    assert said.startswith("heap: ")
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert "trimming off" in said
