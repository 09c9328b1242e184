"""Times the VAE loss head on the CPU: eager PyTorch vs torch.compile vs fastvae's cpu backend.

The loss head is ``sample_and_kl`` (z = mu + exp(logvar / 2) * eps and the KL to N(0, I)) plus
``bernoulli_nll`` of the decoder's logits, forward and backward, ``loss = mean(nll + kl)``, with
``z``'s gradient a fixed random tensor (what the decoder would send back): the ``loss_head``
case of ``fastvae bench``. Default size: batch 4096, 784 pixels, latent 64 (the target of
docs/performance.md: cpu >= 2x eager, and no slower than torch.compile).

    python benchmarks/cpu_loss_head.py [--batch 4096] [--pixels 784] [--rounds 9]
                                       [--threads N] [--isa auto|avx512|avx2|baseline]

Implementations are timed round-robin in rounds (``fastvae.cli.bench.time_group``), so that a load
change on the machine hits all of them alike; the report gives medians and the load average.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile workers while timing

import torch

from fastvae.cli import bench
from fastvae.ops import native as _native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pixels", type=int, default=784)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--isa", default="auto", help="fastvae CPU kernel set")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reason = _native.unusable_reason("cpu")
    if reason is not None:
        raise SystemExit(f"the cpu backend is not usable: {reason}")
    _native.set_cpu_isa(args.isa)
    device = torch.device("cpu")
    impls = ["eager"] + ([] if args.no_compile else ["compile"]) + ["fastvae:cpu"]
    runners = {impl: bench.make_runner(bench.Case("loss_head", "fwd+bwd", impl, args.batch,
                                                  args.pixels, "float32"), device)
               for impl in impls}
    for run in runners.values():  # compile and warm up
        run()
    load_before = os.getloadavg()[0]
    ms = {impl: t * 1e3 for impl, t in
          bench.time_group(runners, device, rounds=args.rounds, min_round_time=0.2).items()}
    load_after = os.getloadavg()[0]
    print(f"loss head fwd+bwd, {args.batch} x {args.pixels} pixels, latent {bench.LATENT}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, fastvae cpu kernels "
          f"{_native.cpu_isa()}; load average {load_before:.2f} -> {load_after:.2f} on "
          f"{os.cpu_count()} cores")
    for impl, t in ms.items():
        print(f"  {impl:12s} median {t:8.2f} ms")
    native = ms["fastvae:cpu"]
    ratios = [f"{ms['eager'] / native:.2f}x eager"]
    if "compile" in ms:
        ratios.append(f"{ms['compile'] / native:.2f}x torch.compile")
    print(f"fastvae cpu: {', '.join(ratios)}")


if __name__ == "__main__":
    main()
