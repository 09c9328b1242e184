"""The discretized mixture of logistics on the CPU: forward + backward time and the bytes saved
for backward, fastvae against the eager PyTorch formula and torch.compile of it.

    nice -n 10 .venv/bin/python benchmarks/dmol_memory.py [--reps 20]

Saved bytes: every tensor autograd keeps for backward (torch.autograd.graph.saved_tensors_hooks),
counted once per storage; the inputs themselves included when saved. Time: median of --reps
runs of forward + backward after warm-up, and the minimum (the machine is shared: the
minimum is the less disturbed estimate).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastvae as fv
from fastvae.cli.bench import DMOL_MIXTURES, _eager_dmol, _make_dmol


def saved_bytes(fn, params, x) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(params, x)
    return sum(storages.values())


def median_time(fn, params, x, reps: int) -> float:
    for _ in range(3):
        fn(params, x).backward()
    times = []
    for _ in range(reps):
        params.grad = None
        t0 = time.perf_counter()
        fn(params, x).backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    impls = {"eager": _eager_dmol, "compile": torch.compile(_eager_dmol),
             "fastvae": lambda p, x: fv.discretized_mix_logistic_nll(p, x,
                                                                     n_mixtures=DMOL_MIXTURES)}
    print(f"threads {torch.get_num_threads()}, fastvae backend {fv.get_backend()}")
    for B, H in ((16, 32), (8, 64)):
        inputs = _make_dmol(B, H * H, torch.float32, torch.device("cpu"))
        params, x = inputs.leaves[0], inputs.consts[0]
        in_bytes = params.nbytes + x.nbytes
        times = {}
        for name, fn in impls.items():
            times[name], best = median_time(fn, params, x, args.reps)
            saved = saved_bytes(fn, params, x) if name != "compile" else None
            extra = "" if saved is None else f", saved {saved / 1e6:6.1f} MB " \
                f"({saved / in_bytes:.2f}x the inputs)"
            print(f"{B}x3x{H}x{H} M={DMOL_MIXTURES} {name:8s} fwd+bwd median "
                  f"{times[name] * 1e3:7.2f} ms, min {best * 1e3:7.2f} ms{extra}")
        print(f"  fastvae vs eager {times['eager'] / times['fastvae']:.2f}x, vs compile "
              f"{times['compile'] / times['fastvae']:.2f}x; inputs {in_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
