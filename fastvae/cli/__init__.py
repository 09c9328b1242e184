"""The ``fastvae`` command line: ``train``, ``bench``, ``info``.

Bad arguments and unreadable inputs end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or input: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def _number(text: str, kind: type = float):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


# "not lo <= x < inf" rather than "x < lo": NaN and infinities fail it too.
def _finite_float(text: str) -> float:
    value = _number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a VAE (default: scikit-learn's 8x8 digits)",
                       description="Train a VAE with fastvae's fused losses and write a "
                                   "checkpoint, metrics and PNG grids to --out.")
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded, default), a .npz file (array 'x'/'images' or the "
                        "first one) or an MNIST IDX images file (optionally .gz)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<data name>)")
    p.add_argument("--epochs", type=_positive_int, default=40)
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--lr", type=_positive_float, default=2e-3)
    p.add_argument("--latent-dim", type=_positive_int, default=8)
    p.add_argument("--hidden", type=_int_list, default=None,
                   help="hidden sizes (mlp) or channels (conv), e.g. 256,256")
    p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian", "gaussian_learned"),
                   default="bernoulli")
    p.add_argument("--obs-logvar", type=_finite_float, default=0.0,
                   help="log-variance of the Gaussian likelihood (initial value if learned)")
    p.add_argument("--beta", type=_non_negative_float, default=1.0, help="KL weight")
    p.add_argument("--warmup", type=_non_negative_float, default=0.0,
                   help="linear KL warm-up over this many epochs")
    p.add_argument("--cycles", type=_non_negative_int, default=0,
                   help="cyclical KL annealing cycles")
    p.add_argument("--free-bits", type=_non_negative_float, default=0.0,
                   help="floor of each latent dimension's KL (nats)")
    p.add_argument("--grad-clip", type=_positive_float, default=None, help="max gradient norm")
    p.add_argument("--logvar-limit", type=_positive_float, default=None,
                   help="soft clamp of the posterior log-variance to (-L, L)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default=None,
                   help="fastvae backend: auto, triton, cuda, cpu or torch")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU only)")
    p.add_argument("--val-fraction", type=_number, default=0.1)
    p.add_argument("--iwae-samples", type=_non_negative_int, default=1000,
                   help="K of the final IWAE log-likelihood (0: skip)")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop")
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--no-images", action="store_true", help="skip the PNG grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train)


def _resolve_device(name: str, local_rank: int | None):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UsageError(f"--device: {e}") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA GPU is available")
        if local_rank is not None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise UsageError(f"--device: unsupported device {name!r}")
    return device


def _run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    import fastvae as fv

    from ..training import data as data_mod
    from ..training import images as report
    from ..training.checkpoint import CheckpointError
    from ..training.trainer import NonFiniteLossError, TrainConfig, train

    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ["LOCAL_RANK"]) if world > 1 else None
    device = _resolve_device(args.device, local_rank)
    if args.backend is not None:
        try:
            fv.set_backend(args.backend)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--backend: {e}") from e
    try:
        images, name = data_mod.load(args.data)
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             beta=args.beta, warmup_epochs=args.warmup, cycles=args.cycles,
                             free_bits=args.free_bits, grad_clip=args.grad_clip, seed=args.seed,
                             amp=args.amp, on_nonfinite=args.on_nonfinite,
                             iwae_samples=args.iwae_samples)
    except (data_mod.DataError, ValueError) as e:
        raise UsageError(str(e)) from e
    train_x, val_x = data_mod.split(images, args.val_fraction, args.seed)
    model_config = {"input_shape": list(images.shape[1:]), "latent_dim": args.latent_dim,
                    "arch": args.arch, "hidden": list(args.hidden) if args.hidden else None,
                    "likelihood": args.likelihood, "obs_logvar": args.obs_logvar,
                    "logvar_limit": args.logvar_limit}
    try:  # a model that cannot take these images (too small for --arch conv) fails here
        from ..models.vae import build_vae

        build_vae(**model_config)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--arch {args.arch}: cannot build a model for images of shape "
                         f"{tuple(images.shape[1:])}: {e}") from e
    out_dir = Path(args.out) if args.out else Path("runs") / name
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out: {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out_dir}: {e.strerror or e}") from e
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if rank == 0:
        print(f"{name}: {train_x.shape[0]} train / {val_x.shape[0]} validation images of shape "
              f"{tuple(images.shape[1:])}; {args.arch} VAE, latent {args.latent_dim}, "
              f"{args.likelihood} likelihood; device {device}, fastvae backend "
              f"{fv.get_backend()} ({fv.ops.backends.resolve(device)} here)"
              + (f", {world} processes" if world > 1 else ""))
    try:
        t0 = time.perf_counter()
        result = train(model_config, train_x, val_x, config, device=device, out_dir=out_dir,
                       resume=args.resume, progress=not args.no_progress)
        elapsed = time.perf_counter() - t0
    except CheckpointError as e:
        raise UsageError(f"--resume: {e}") from e
    except NonFiniteLossError as e:
        print(f"fastvae train: {e}", file=sys.stderr)
        return 1
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank != 0:
        return 0
    if not args.no_images:
        report.save_all(result.model, val_x, [asdict(m) for m in result.history], out_dir,
                        seed=args.seed)
    final = result.final
    n_latent = len(final["kl_per_dim"])
    line = (f"final (validation, nats per image): ELBO {final['elbo']:.3f}, reconstruction "
            f"{final['nll']:.3f}, KL {final['kl']:.3f}")
    if "iwae_log_likelihood" in final:
        line += f", IWAE log p(x) (K={final['iwae_samples']}) {final['iwae_log_likelihood']:.3f}"
    print(line + f"; active units {final['active_units']}/{n_latent}; {elapsed:.1f} s")
    files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    print(f"wrote {out_dir}/: {', '.join(files)}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="versions, devices and fastvae backends")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    import torch

    import fastvae as fv
    from fastvae.ops import backends as _backend

    print(f"fastvae {fv.__version__}")
    print(f"python {platform.python_version()} ({platform.machine()}, {platform.system()})")
    print(f"torch {torch.__version__}")
    try:
        import triton

        print(f"triton {triton.__version__}"
              + (" (interpreter: TRITON_INTERPRET=1)" if _backend._triton_interpreting() else ""))
    except ImportError:
        print("triton not installed")
    print(f"CPU threads (torch): {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"sm_{props.major}{props.minor}")
    else:
        print("CUDA: no GPU")
    print("backends:")
    for name in _backend.CONCRETE:
        reason = _backend.unusable_reason(name)
        print(f"  {name:7s} {'usable' if reason is None else 'unusable: ' + reason}")
    from fastvae.ops import native as _native

    info = _native.build_info()
    if info is not None:
        print(f"native library: {info}; CPU kernels in use: {_native.cpu_isa()} "
              f"(this CPU runs: {', '.join(_native.cpu_isas())})")
    print(f"selected: {fv.get_backend()} (cpu tensors -> {_backend.resolve(torch.device('cpu'))}"
          + (f", cuda tensors -> {_backend.resolve(torch.device('cuda'))}"
             if torch.cuda.is_available() else "") + ")")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastvae", description="Fused VAE kernels: train, benchmark, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_info(sub)
    try:
        from .bench import add_parser as add_bench
    except ImportError:
        pass
    else:
        add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.run(args)
    except UsageError as e:
        command = f"fastvae {args.command}" if "args" in locals() else "fastvae"
        print(f"{command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
