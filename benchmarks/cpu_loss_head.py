"""Times the VAE loss head on the CPU: eager PyTorch vs torch.compile vs fastvae's cpu backend.

The loss head is ``sample_and_kl`` (z = mu + exp(logvar / 2) * eps and the KL to N(0, I)) plus
``bernoulli_nll`` of the decoder's logits, forward and backward: ``loss = mean(nll + kl)``, and
``z``'s gradient stands for what the decoder would send back (a fixed random tensor).
Default size: batch 4096, 784 pixels, latent 64 (SPEC §6: cpu >= 2x eager, and no slower than
torch.compile).

    python benchmarks/cpu_loss_head.py [--batch 4096] [--pixels 784] [--latent 64]
                                       [--iters 30] [--rounds 5] [--threads N] [--isa auto]

Each round times every implementation ``iters`` times, round-robin, so that a load change on
the machine hits all of them alike; the report gives medians over all steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# Compile workers would keep both cores busy while we time (see FIELD-NOTES.md).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fv-bench-inductor-"))

import torch
import torch.nn.functional as F

import fastvae as fv
from fastvae import _native


def eager_head(mu, logvar, logits, x):
    std = torch.exp(0.5 * logvar)
    z = mu + torch.randn_like(std) * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=1)
    nll = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
    return (nll + kl).mean(), z


def fastvae_head(mu, logvar, logits, x):
    z, kl = fv.sample_and_kl(mu, logvar, reduction="none")
    nll = fv.bernoulli_nll(logits, x, reduction="none")
    return (nll + kl).mean(), z


def make_step(head, leaves, x, grad_z):
    one = torch.ones(())

    def step():
        for t in leaves:
            t.grad = None
        loss, z = head(*leaves, x)
        torch.autograd.backward((loss, z), (one, grad_z))

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pixels", type=int, default=784)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--iters", type=int, default=30, help="steps per implementation per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--isa", default="auto",
                        help="fastvae CPU kernel set: auto|avx512|avx2|baseline")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    reason = _native.unusable_reason("cpu")
    if reason is not None:
        raise SystemExit(f"the cpu backend is not usable: {reason}")
    _native.set_cpu_isa(args.isa)
    fv.set_backend("cpu")

    torch.manual_seed(0)
    B, D, L = args.batch, args.pixels, args.latent
    mu = (0.5 * torch.randn(B, L)).requires_grad_()
    logvar = (0.3 * torch.randn(B, L) - 1.0).requires_grad_()
    logits = (2.0 * torch.randn(B, D)).requires_grad_()
    x = (torch.rand(B, D) < 0.3).float()
    grad_z = torch.randn(B, L) / B
    leaves = (mu, logvar, logits)

    impls = {"eager": make_step(eager_head, leaves, x, grad_z)}
    if not args.no_compile:
        impls["torch.compile"] = make_step(torch.compile(eager_head), leaves, x, grad_z)
    impls["fastvae cpu"] = make_step(fastvae_head, leaves, x, grad_z)

    for name, step in impls.items():  # warm-up (and compile)
        t0 = time.perf_counter()
        for _ in range(3):
            step()
        print(f"warm-up {name}: {time.perf_counter() - t0:.1f} s")

    times: dict[str, list[float]] = {name: [] for name in impls}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, step in impls.items():
            for _ in range(args.iters):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    load_after = os.getloadavg()[0]

    print(f"\nloss head fwd+bwd, B={B} x {D} pixels, latent {L}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, fastvae cpu kernels: {_native.cpu_isa()}")
    print(f"{args.rounds} rounds x {args.iters} steps each; load average "
          f"{load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} cores")
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    for name, ts in times.items():
        q = statistics.quantiles([t * 1e3 for t in ts], n=10)
        print(f"  {name:14s} median {med[name]:8.2f} ms   (p10 {q[0]:.2f}, p90 {q[-1]:.2f})")
    native = med["fastvae cpu"]
    print(f"speed-up of fastvae cpu: {med['eager'] / native:.2f}x eager", end="")
    if "torch.compile" in med:
        print(f", {med['torch.compile'] / native:.2f}x torch.compile")
    else:
        print()


if __name__ == "__main__":
    main()
