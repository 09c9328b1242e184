"""The quantizer benchmark harness (``fastvae bench --ops vq,rvq,fsq,lfq``): sizes, the memory
limit, the peak-memory process, the report and its files. No timing is asserted: tiny sizes,
one round."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from fastvae.cli import bench_quantizers as bq
from fastvae.cli import main

LINUX = sys.platform.startswith("linux")
CPU = torch.device("cpu")


def test_sizes_parse_and_format_round_trip():
    for q in bq.QUANTIZERS.values():
        for sizes in q.sizes.values():
            text = ",".join(map(q.format_size, sizes))
            assert bq.parse_sizes(q, text) == sizes, q.name
    fsq = bq.QUANTIZERS["fsq"]
    assert bq.parse_sizes(fsq, "16384x[4]*16,8x[8, 5,5]") == [(16384, (4,) * 16), (8, (8, 5, 5))]
    assert fsq.format_size((16384, (4,) * 16)) == "16384x[4]*16"
    for bad in ("16384", "16384x[]", "0x[8,5]", "16x[8,1]", "16x[8,5]*0x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bq.parse_sizes(fsq, bad)
    with pytest.raises(argparse.ArgumentTypeError):
        bq.parse_sizes(bq.QUANTIZERS["rvq"], "64x8x1024")


def test_tokenizers_group_and_order():
    assert bq.selected(["loss_head", "tokenizers", "vq"]) == ["rvq", "fsq", "lfq", "vq"]
    assert bq.selected(["lfq", "tokenizers"]) == ["lfq", "rvq", "fsq"]


def test_errors_are_shortened_for_the_table():
    e = ("RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
         "can't allocate memory: you tried to allocate 34359738368 bytes. Error code 12")
    assert bq.short_error(e) == "RuntimeError: can't allocate 32.0 GiB"
    assert bq.is_out_of_memory(e)
    assert bq.is_out_of_memory("MemoryError: ")
    assert not bq.is_out_of_memory("AttributeError: module 'fastvae' has no attribute 'LFQ'")
    assert len(bq.short_error("ValueError: " + "x" * 200)) <= 40


@pytest.mark.skipif(not LINUX, reason="RLIMIT_AS and /proc are Linux's")
def test_address_space_limit_turns_a_large_allocation_into_an_error():
    import resource

    before = resource.getrlimit(resource.RLIMIT_AS)
    with bq.address_space_limit(256 << 20):
        torch.empty(16 << 20)  # 64 MB: fine
        with pytest.raises(RuntimeError, match="allocate"):
            torch.empty(1 << 28)  # 1 GiB
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    torch.empty(1 << 28)  # the limit is gone


@pytest.mark.skipif(not LINUX, reason="VmHWM and RLIMIT_AS are Linux's")
def test_peak_memory_in_a_fresh_process_and_the_error_beyond_the_limit():
    pytest.importorskip("vector_quantize_pytorch")
    peak, state = bq.peak_memory("vq", "cdist", (2048, 512, 8), 4 << 30)
    assert isinstance(peak, int)
    assert state is None  # a function: no module
    # cdist's 2048 x 512 float32 distance matrix (4 MiB) exists at the peak
    assert 4 << 20 <= peak < 64 << 20
    # the package's FSQ builds its implicit codebook (2^32 codes) in the constructor
    error, _ = bq.peak_memory("fsq", "vqp", (8, (4,) * 16), 1 << 30)
    assert isinstance(error, str)
    assert bq.is_out_of_memory(error), error


@pytest.mark.skipif(not LINUX, reason="RLIMIT_AS is Linux's")
def test_report_records_the_package_error_and_writes_the_files(tmp_path):
    pytest.importorskip("vector_quantize_pytorch")
    fsq = bq.QUANTIZERS["fsq"]
    sizes = [(16, (8, 5, 5)), (16, (4,) * 16)]
    rows = bq.run_report(fsq, CPU, sizes=sizes, impls=["vqp"], rounds=1, memory=False,
                         memory_limit_bytes=1 << 30, log=lambda _: None)
    assert [(r.shape, r.impl) for r in rows] == [("16x[8,5,5]", "vqp"), ("16x[4]*16", "vqp")]
    ok, failed = rows
    assert ok.ms is not None
    assert ok.ms > 0
    assert ok.error is None
    assert ok.calls >= 1
    assert ok.vs == {"vqp": 1.0}
    # the package's FSQ holds its implicit codebook: 8 x 5 x 5 codes x 3 float32 (and _levels,
    # _basis: 3 int32 each)
    assert ok.state_mb * 2**20 == 200 * 3 * 4 + 2 * 3 * 4
    assert failed.ms is None
    assert bq.is_out_of_memory(failed.error)
    paths = bq.write_results(fsq, rows, CPU, tmp_path, memory_limit_bytes=1 << 30)
    assert [p.name for p in paths] == ["fsq.txt", "fsq.json", "fsq.csv"]
    text = paths[0].read_text()
    assert "can't allocate 32.0 GiB" in text
    assert "load average" in text
    assert "threads" in text
    assert "16x[4]*16" in text
    assert "no memory" in text
    record = json.loads(paths[1].read_text())
    assert record["meta"]["memory_limit_gib"] == 1.0
    assert record["meta"]["threads"] >= 1
    assert record["rows"][1]["error"] == failed.error


def test_summary_compares_fastvae_with_the_package():
    q = bq.QUANTIZERS["lfq"]
    rows = [bq.QuantizerRow("lfq", "vqp", "64x4", (64, 4), 4.0, 3, {"vqp": 1.0},
                            peak_extra_mb=40.0),
            bq.QuantizerRow("lfq", "vqp:compile", "64x4", (64, 4), 2.0, 3,
                            {"vqp": 2.0, "vqp:compile": 1.0}),
            bq.QuantizerRow("lfq", "fastvae", "64x4", (64, 4), 1.0, 3,
                            {"vqp": 4.0, "vqp:compile": 2.0}, peak_extra_mb=1.0,
                            peak_vs_package=1 / 40)]
    header, line = bq.summary_lines(q, rows)
    assert header.split()[:4] == ["N", "x", "d", "fastvae"]
    assert line.split() == ["64x4", "1.00", "4.00", "4.00", "2.00", "2.00", "1.00", "40.0",
                            "1/40"]


@pytest.mark.skipif(not LINUX, reason="RLIMIT_AS is Linux's")
def test_the_command_writes_each_quantizers_files(tmp_path, capsys):
    pytest.importorskip("vector_quantize_pytorch")
    code = main(["bench", "--device", "cpu", "--ops", "fsq,lfq", "--fsq-sizes", "8x[8,5]",
                 "--lfq-sizes", "8x3", "--fsq-impls", "vqp", "--lfq-impls", "vqp",
                 "--quantizer-rounds", "1", "--no-memory", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fsq.csv", "fsq.json", "fsq.txt", "lfq.csv", "lfq.json", "lfq.txt"]
    assert "8x[8,5]" in out
    assert "8x3" in out
