"""The CUDA-graph training step (``fastvae train --cuda-graphs``) on a GPU: one phase of
scripts/gpu_check.sh.

1. noise: a ``GraphedStep`` around ``fv.sample_and_kl`` (forward and backward): two replays
   draw different noise; the first replay after ``torch.manual_seed(s)`` draws what an eager
   call after ``torch.manual_seed(s)`` draws (warm-up and capture consumed none of the
   generator), and the next replay what the next eager call draws.
2. train: the digits MLP of ``fastvae train`` (its defaults and its option parsing), 2 epochs
   at batch 64, seed 0, eager, then with ``cuda_graphs``, then eager again (the first run pays
   Triton's compiles): each epoch's seconds, the final metrics, and the graphed run's
   difference to the eager one (the same seeds draw the same noise, so they agree to the GPU
   kernels' rounding).

    python scripts/gpu_graphs.py [--dry-run] [--out graphs.txt]

``--dry-run``: on the CPU, the replay emulated (``fastvae.training.trainer.EMULATE_GRAPHS``),
so that the script cannot rot. Every result line starts with ``graphs:``; exit status 0 when
the noise checks pass and every run ends with finite metrics.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():  # before anything imports triton: its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastvae as fv  # noqa: E402
from fastvae.cli import build_parser  # noqa: E402
from fastvae.cli.args import data_record, load_data  # noqa: E402
from fastvae.cli.train import _model_config, _train_config  # noqa: E402
from fastvae.training import data, graphs  # noqa: E402
from fastvae.training import trainer as train_mod  # noqa: E402

SINK: list = []  # the --out file, when given


def emit(line: str) -> None:
    print(f"graphs: {line}", flush=True)
    for sink in SINK:
        sink.write(f"graphs: {line}\n")
        sink.flush()


def noise_check(device: torch.device, emulate: bool) -> bool:
    mu = torch.nn.Parameter(torch.zeros(64, 8, device=device))
    logvar = torch.zeros(64, 8, device=device)

    def fn():
        z, kl = fv.sample_and_kl(mu, logvar)
        (z.square().sum() + kl).backward()
        return z.detach()

    step = graphs.GraphedStep(fn, [mu], device, emulate=emulate)
    torch.manual_seed(11)
    first = step.replay().clone()
    second = step.replay().clone()
    torch.manual_seed(11)
    eager = []
    for _ in range(2):
        mu.grad = None
        eager.append(fn())
    grad_ok = bool(torch.equal(mu.grad, step.grads[0]))
    results = {
        "replays draw different noise": not torch.equal(first, second),
        "first replay = first eager call (same seed)": torch.equal(first, eager[0]),
        "second replay = second eager call": torch.equal(second, eager[1]),
        "static gradient = eager gradient of the last call": grad_ok,
        "noise is standard normal (|mean| < 0.2, |std - 1| < 0.2)":
            abs(float(first.mean())) < 0.2 and abs(float(first.std()) - 1) < 0.2,
    }
    for name, ok in results.items():
        emit(f"noise {'ok  ' if ok else 'FAIL'} {name}")
    return all(results.values())


def train_run(cuda_graphs: bool, device: torch.device, epochs: int) -> dict:
    argv = ["train", "--epochs", str(epochs), "--batch-size", "64", "--seed", "0",
            "--iwae-samples", "0"] + (["--cuda-graphs"] if cuda_graphs else [])
    args = build_parser().parse_args(argv)
    images, _ = load_data(data_record(args), command="train", progress=False)
    train_x, val_x = data.split(images, args.val_fraction, args.seed)
    model_config = _model_config(args, tuple(images.shape[1:]))
    t0 = time.perf_counter()
    result = train_mod.train(model_config, train_x, val_x, _train_config(args), device=device,
                             progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": [m.seconds for m in result.history], "total": time.perf_counter() - t0,
            "final": result.final, "loss": [m.train_loss for m in result.history],
            "steps": result.history[-1].step, "train": train_x.shape[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, replay emulated")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="also write the lines here")
    args = parser.parse_args()
    if args.out is not None:
        SINK.append(args.out.open("w"))
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        emit("FAIL no CUDA device (use --dry-run on the CPU)")
        return 1
    device = torch.device("cuda" if cuda else "cpu")
    train_mod.EMULATE_GRAPHS = not cuda
    emit(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu (emulated replay)'}, "
         f"torch {torch.__version__}, fastvae backend {fv.get_backend()}")
    ok = True
    try:
        ok = noise_check(device, emulate=not cuda)
    except Exception as e:
        ok = False
        emit(f"noise FAIL {traceback.format_exception_only(type(e), e)[-1].strip()[:400]}")
    runs = {}
    for name, on in (("eager", False), ("graphs", True), ("eager again", False)):
        try:
            runs[name] = run = train_run(on, device, args.epochs)
        except Exception as e:
            ok = False
            emit(f"train FAIL {name}: "
                 f"{traceback.format_exception_only(type(e), e)[-1].strip()[:400]}")
            continue
        final = run["final"]
        finite = all(math.isfinite(final[k]) for k in ("elbo", "nll", "kl"))
        ok &= finite
        emit(f"train {'ok  ' if finite else 'FAIL'} {name:<11}: digits MLP, batch 64, "
             f"{run['train']} images, {run['steps']} steps; epoch seconds "
             f"{', '.join(f'{s:.3f}' for s in run['seconds'])} (total {run['total']:.2f} s); "
             f"train loss {', '.join(f'{v:.4f}' for v in run['loss'])}; final ELBO "
             f"{final['elbo']:.4f}, NLL {final['nll']:.4f}, KL {final['kl']:.4f}, active "
             f"units {final['active_units']}")
    if "graphs" in runs and "eager again" in runs:
        eager, graphed = runs["eager again"], runs["graphs"]
        e, g = eager["seconds"][-1], graphed["seconds"][-1]
        diff = graphed["final"]["elbo"] - eager["final"]["elbo"]
        emit(f"train last epoch: eager {e:.3f} s, graphs {g:.3f} s ({e / g:.2f}x); final ELBO "
             f"graphs - eager {diff:+.2e}")
    emit("ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
