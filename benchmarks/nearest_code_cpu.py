"""fv.nearest_code on the CPU backend against the full-matrix searches people write.

    python benchmarks/nearest_code_cpu.py                      # the default sizes, 2 threads
    python benchmarks/nearest_code_cpu.py 32768x16384x8 --threads 1

Per size N x K x D (float32, standard normal rows and codes), round-robin over the
implementations (`--rounds` rounds, the minimum and the median reported):
  * fastvae: ``fv.nearest_code(x, codebook)`` on the "cpu" backend (l2; and cosine);
  * cdist: ``torch.cdist(x, codebook).argmin(1)`` (the N x K matrix, float32);
  * expanded: ``(|x|^2 - 2 x e^T + |e|^2).argmin(1)`` (vector-quantize-pytorch's form);
  * addmm: ``torch.addmm(|e|^2, x, e^T, alpha=-2).argmin(1)`` (the cheapest full-matrix form).
The full-matrix forms also return wrong codes where the expanded form cancels; they are timed
on data where they do not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastvae as fv


def _timer(fn):
    fn()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _implementations(x, cb):
    e2 = (cb * cb).sum(1)
    return {
        "fastvae": lambda: fv.nearest_code(x, cb),
        "fastvae cosine": lambda: fv.nearest_code(x, cb, metric="cosine"),
        "cdist": lambda: torch.cdist(x, cb).argmin(1),
        "expanded": lambda: ((x * x).sum(1, keepdim=True) - 2 * x @ cb.T + e2).argmin(1),
        "addmm": lambda: torch.addmm(e2, x, cb.T, alpha=-2).argmin(1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", default=["32768x16384x8", "8192x16384x64",
                                                     "2048x16384x256"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fv.set_backend("cpu")
    g = torch.Generator().manual_seed(0)
    for size in args.sizes:
        N, K, D = map(int, size.split("x"))
        x = torch.randn(N, D, generator=g)
        cb = torch.randn(K, D, generator=g)
        impls = _implementations(x, cb)
        times = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                times[name].append(_timer(fn))
        base = min(times["fastvae"])
        print(f"N={N} K={K} D={D}, {args.threads} threads:")
        for name, ts in times.items():
            print(f"  {name:15s} min {min(ts) * 1e3:8.1f} ms  median "
                  f"{statistics.median(ts) * 1e3:8.1f} ms  ({min(ts) / base:5.1f}x fastvae)")


if __name__ == "__main__":
    main()
