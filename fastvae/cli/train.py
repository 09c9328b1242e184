"""``fastvae train``: train a VAE (or, with ``--quantizer vq|rvq|fsq|lfq``, a VQ-VAE) on a data
set and write a checkpoint, metrics and pictures.

Under ``torchrun`` every process runs this command: each trains its shard (the trainer's
DistributedDataParallel) and rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .args import (
    UsageError,
    add_data_options,
    api_message,
    checkpoint_path,
    data_record,
    finite_float,
    int_list,
    load_data,
    non_negative_float,
    non_negative_int,
    number,
    positive_float,
    positive_int,
    resolve_device,
    seed,
)

# The fixed Gaussian likelihood's default log-variance: std exp(-2) = 0.135 for pixels in [0, 1].
# On the digits (40 epochs, latent 8) log-variances 0, -2, -3, -4, -5 gave 0, 5, 7, 8, 8
# active units and validation ELBOs -61.2, -6.5, 15.6, 30.0, 20.8 nats: -4 is the best of them;
# at 0 (std 1, more than the data's own spread) the posterior collapses.
GAUSSIAN_OBS_LOGVAR = -4.0

# The options of each --quantizer and their defaults, chosen on the digits: see the README's
# VQ section. An option given with a quantizer that does not take it is a UsageError.
QUANTIZER_DEFAULTS: dict[str, dict[str, Any]] = {
    "vq": {"codebook_size": 64, "codebook_dim": 16, "num_tokens": 4, "decay": 0.9,
           "commitment": 0.25, "dead_code_threshold": 1.0},
    "rvq": {"codebook_size": 32, "codebook_dim": 16, "num_tokens": 4, "num_quantizers": 4,
            "decay": 0.9, "commitment": 0.25, "dead_code_threshold": 1.0},
    "fsq": {"levels": (8, 5, 5, 5), "num_tokens": 4},
    "lfq": {"codebook_size": 1024, "num_tokens": 4, "commitment": 0.25,
            "entropy_weight": 0.1},
}
VQ_DEFAULTS = QUANTIZER_DEFAULTS["vq"]
# Adam's learning rate, and where a quantizer needs another: on the digits at 2e-3 FSQ's
# encoder outputs ran into the flat tails of its tanh bound in the first epoch at two seeds of
# four (every code but 3 or 4 unused for good, validation NLL 27.2 nats); at 1e-3 none did.
LR = 2e-3
LR_DEFAULTS = {"fsq": 1e-3}
# every quantizer option (argparse dest -> option)
QUANTIZER_OPTIONS = {dest: "--" + dest.replace("_", "-")
                     for dest in ("codebook_size", "codebook_dim", "num_tokens", "decay",
                                  "commitment", "dead_code_threshold", "levels",
                                  "num_quantizers", "entropy_weight")}
# the options of the VAE's objective (the KL and its schedules), refused with --quantizer
VAE_ONLY = {"latent_dim": "--latent-dim", "beta": "--beta", "warmup": "--warmup",
            "cycles": "--cycles", "cycle_ratio": "--cycle-ratio", "beta_shape": "--beta-shape",
            "capacity": "--capacity", "capacity_steps": "--capacity-steps",
            "free_bits": "--free-bits", "logvar_limit": "--logvar-limit"}


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def decay_value(text: str) -> float:
    value = number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (0: a learned codebook), got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a VAE (default: scikit-learn's 8x8 digits)",
                       description="Train a VAE with fastvae's fused losses and write a "
                                   "checkpoint, metrics and PNG grids to --out.")
    add_data_options(p, default="digits",
                     data_help="'digits' (embedded, default), a .npz file, an MNIST IDX images "
                               "file (optionally .gz) or a folder of image files (PNG, JPEG, "
                               "...; every one below it, read with Pillow)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<data name>)")
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"Adam's learning rate (default {LR:g}; {LR_DEFAULTS['fsq']:g} with "
                        "--quantizer fsq)")
    p.add_argument("--latent-dim", type=positive_int, default=8)
    p.add_argument("--hidden", type=int_list, default=None,
                   help="hidden sizes (mlp) or channels (conv), e.g. 256,256")
    p.add_argument("--arch", choices=("mlp", "conv"), default="mlp")
    p.add_argument("--likelihood", choices=("bernoulli", "gaussian", "gaussian_learned",
                                            "continuous_bernoulli", "dmol"),
                   default="bernoulli")
    p.add_argument("--obs-logvar", type=finite_float, default=None,
                   help="log-variance of the Gaussian likelihood (initial value if learned); "
                        f"default {GAUSSIAN_OBS_LOGVAR:g} for gaussian (std 0.135, for pixels "
                        "in [0, 1]), 0 for gaussian_learned")
    p.add_argument("--beta", type=non_negative_float, default=1.0,
                   help="KL weight (the top of a schedule)")
    p.add_argument("--warmup", type=non_negative_float, default=0.0,
                   help="monotonic KL warm-up: beta rises from 0 over this many epochs")
    p.add_argument("--cycles", type=non_negative_int, default=0,
                   help="cyclical KL annealing (Fu et al. 2019): this many cycles over the run")
    p.add_argument("--cycle-ratio", type=positive_float, default=0.5, metavar="R",
                   help="the part of each cycle in which beta rises (default 0.5)")
    p.add_argument("--beta-shape", choices=("linear", "logistic"), default="linear",
                   help="the shape of the rise of --warmup and --cycles")
    p.add_argument("--capacity", type=non_negative_float, default=None, metavar="C_MAX",
                   help="capacity objective (Burgess et al. 2018): beta * |KL - C|, C rising "
                        "linearly from 0 to C_MAX nats over --capacity-steps steps")
    p.add_argument("--capacity-steps", type=non_negative_int, default=0, metavar="N",
                   help="optimizer steps over which C rises to C_MAX")
    p.add_argument("--free-bits", type=non_negative_float, default=0.0,
                   help="floor of each latent dimension's KL (nats)")
    p.add_argument("--grad-clip", type=positive_float, default=None, help="max gradient norm")
    p.add_argument("--logvar-limit", type=positive_float, default=None,
                   help="soft clamp of the posterior log-variance to (-L, L)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default=None,
                   help="fastvae backend: auto, triton, cuda, cpu or torch")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU and CPU)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and its loss (the fused ops inside): for "
                        "small batches, where the host overhead of each step dominates")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="on a GPU: capture the training step (forward, loss, backward) once as "
                        "a CUDA graph and replay it for every full batch, for small batches "
                        "where the host overhead of each step dominates (a VAE; not with "
                        "--compile, --quantizer or torchrun)")
    p.add_argument("--val-fraction", type=number, default=0.1)
    p.add_argument("--iwae-samples", type=non_negative_int, default=1000,
                   help="K of the final IWAE log-likelihood (0: skip)")
    p.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop")
    p.add_argument("--mixtures", type=positive_int, default=10,
                   help="mixture components M of --likelihood dmol")
    p.add_argument("--bins", type=positive_int, default=None,
                   help="levels of the pixel grid for --likelihood dmol (default: 17 for the "
                        "digits, whose values are 0..16 / 16; else 256)")
    vq = p.add_argument_group(
        "VQ-VAE (van den Oord et al. 2017)",
        "each option applies to the quantizers named in its help (others refuse it); the "
        "defaults were chosen on the digits")
    vq.add_argument("--quantizer", choices=tuple(QUANTIZER_DEFAULTS), default=None,
                    help="train a VQ-VAE: a deterministic encoder, a quantizer and a decoder, on "
                         "the reconstruction NLL plus the quantizer's loss. vq: "
                         "fastvae.VectorQuantizer (exact nearest code, EMA codebook, k-means "
                         "initialisation, dead-code restarts); rvq: residual VQ, "
                         "--num-quantizers codebooks applied to what the previous left "
                         "(Zeghidour et al. 2021); fsq: finite scalar quantization, --levels "
                         "(Mentzer et al. 2023); lfq: lookup-free quantization, sign bits with "
                         "an entropy loss (Yu et al. 2023)")

    def defaults(dest: str) -> str:
        return ", ".join(f"{kind} {_show(d[dest])}" for kind, d in QUANTIZER_DEFAULTS.items()
                         if dest in d)

    vq.add_argument("--codebook-size", type=positive_int, default=None, metavar="K",
                    help="codes in the codebook (of each level for rvq; a power of 2 for lfq, "
                         f"whose latent has log2(K) bits); default {defaults('codebook_size')}")
    vq.add_argument("--codebook-dim", type=positive_int, default=None, metavar="D",
                    help=f"dimension of a code (vq, rvq); default {defaults('codebook_dim')}")
    vq.add_argument("--num-tokens", type=positive_int, default=None, metavar="T",
                    help="--arch mlp: codes per image (default 4); with --arch conv one code "
                         "per position of the encoder's feature map")
    vq.add_argument("--decay", type=decay_value, default=None,
                    help="EMA decay of the codebook (vq, rvq; 0: a codebook learned by the "
                         f"codebook loss); default {defaults('decay')}")
    vq.add_argument("--commitment", type=non_negative_float, default=None, metavar="BETA",
                    help=f"weight of the commitment loss (vq, rvq, lfq); default "
                         f"{defaults('commitment')}")
    vq.add_argument("--dead-code-threshold", type=non_negative_float, default=None,
                    metavar="T", help="restart the codes whose EMA cluster size falls below T "
                                      "from encoder outputs (vq, rvq; 0: never); default "
                                      f"{defaults('dead_code_threshold')}")
    vq.add_argument("--levels", type=int_list, default=None, metavar="L1,L2,...",
                    help="fsq: the number of levels of each latent dimension (the latent "
                         "dimension is their count, the codebook their product); default "
                         f"{defaults('levels')}")
    vq.add_argument("--num-quantizers", type=positive_int, default=None, metavar="L",
                    help=f"rvq: the number of residual levels; default "
                         f"{defaults('num_quantizers')}")
    vq.add_argument("--entropy-weight", type=non_negative_float, default=None, metavar="W",
                    help=f"lfq: weight of the entropy loss; default {defaults('entropy_weight')}")
    p.add_argument("--resume", default=None,
                   help="the checkpoint to continue from: a checkpoint file, or the --out "
                        "folder of a training run (its checkpoint.safetensors)")
    p.add_argument("--no-images", action="store_true", help="skip the PNG grids")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run, vae_only_defaults={k: p.get_default(k) for k in VAE_ONLY})


def run(args: argparse.Namespace) -> int:
    """Check every argument and input first (nothing is written before), train, report."""
    import fastvae as fv
    from fastvae.ops.backends import resolve
    from fastvae.training import data
    from fastvae.training.checkpoint import CheckpointError
    from fastvae.training.graphs import GraphCaptureError
    from fastvae.training.trainer import NonFiniteLossError, train

    if not 0 < args.val_fraction < 1:
        raise UsageError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(args.device, int(os.environ["LOCAL_RANK"]) if world > 1 else None)
    if args.backend is not None:
        try:
            fv.set_backend(args.backend)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--backend: {e}") from e
    _check_quantizer_options(args)
    _check_cuda_graphs(args, device, world)
    resume = checkpoint_path(args.resume, "--resume") if args.resume is not None else None
    config = _train_config(args)
    record = data_record(args)
    first = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 shows the bar
    images, name = load_data(record, command="train", progress=not args.no_progress and first)
    train_x, val_x = data.split(images, args.val_fraction, args.seed)
    record |= {"val_fraction": args.val_fraction, "split_seed": args.seed}
    model_config = (_vq_model_config(args, tuple(images.shape[1:])) if args.quantizer
                    else _model_config(args, tuple(images.shape[1:])))
    if args.cuda_graphs and train_x.shape[0] < args.batch_size:
        raise UsageError(f"--cuda-graphs: the training split has {train_x.shape[0]} images, "
                         f"fewer than one batch (--batch-size {args.batch_size}), so no step "
                         "would be captured: lower --batch-size or train without it")
    if args.likelihood == "dmol":  # before anything is written or trained
        try:
            data.check_unit_range(images, name, " for --likelihood dmol")
            data.check_grid(images, model_config["n_bins"], name, "--bins")
        except data.DataError as e:
            raise UsageError(str(e)) from e
    out_dir = _make_out_dir(Path(args.out) if args.out else Path("runs") / name)

    with _process_group(world, device) as rank:
        if rank == 0:
            model = (_vq_description(model_config) if args.quantizer
                     else f"{args.arch} VAE, latent {args.latent_dim}")
            print(f"{name}: {train_x.shape[0]} train / {val_x.shape[0]} validation images of "
                  f"shape {tuple(images.shape[1:])}; {model}, "
                  f"{args.likelihood} likelihood; device {device}, fastvae backend "
                  f"{fv.get_backend()} ({resolve(device)} here)"
                  + (f", {world} processes" if world > 1 else ""))
        t0 = time.perf_counter()
        try:
            result = train(model_config, train_x, val_x, config, device=device,
                           out_dir=out_dir, resume=resume, progress=not args.no_progress,
                           data_record=record)
        except CheckpointError as e:
            raise UsageError(f"--resume: {e}") from e
        except NonFiniteLossError as e:
            print(f"fastvae train: {e}", file=sys.stderr)
            return 1
        except GraphCaptureError as e:
            print(f"fastvae train: --cuda-graphs: {e}", file=sys.stderr)
            return 1
        seconds = time.perf_counter() - t0
    if rank != 0:
        return 0
    if result.resumed is not None:
        changed = result.resumed["changed"]
        print(f"resumed from {result.resumed['checkpoint']} after epoch "
              f"{result.resumed['epoch']}" + (", with " + ", ".join(
                  f"{k} {v['checkpoint']} -> {v['now']}" for k, v in changed.items())
                  if changed else ""))
    if not args.no_images:
        from fastvae.training import images as pictures

        save = pictures.save_all_vq if args.quantizer else pictures.save_all
        save(result.model, val_x, [asdict(m) for m in result.history], out_dir, seed=args.seed)
    print((_vq_summary if args.quantizer else _summary)(result.final, seconds))
    files = sorted(p.name for p in out_dir.iterdir() if not p.name.startswith("."))
    print(f"wrote {out_dir}/: {', '.join(files)}")
    return 0


def _train_config(args: argparse.Namespace):
    """The TrainConfig, or a UsageError saying what is wrong with it (in the options' names)."""
    from fastvae.training.trainer import TrainConfig

    try:
        lr = args.lr if args.lr is not None else LR_DEFAULTS.get(args.quantizer, LR)
        return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                           beta=args.beta, warmup_epochs=args.warmup, cycles=args.cycles,
                           cycle_ratio=args.cycle_ratio, beta_shape=args.beta_shape,
                           capacity=args.capacity, capacity_steps=args.capacity_steps,
                           free_bits=args.free_bits, grad_clip=args.grad_clip, seed=args.seed,
                           amp=args.amp, compile=args.compile, on_nonfinite=args.on_nonfinite,
                           iwae_samples=args.iwae_samples, cuda_graphs=args.cuda_graphs)
    except ValueError as e:  # TrainConfig's message, in the options' names
        raise UsageError(api_message(str(e), _OPTIONS)) from e


# TrainConfig fields -> the options that set them.
_OPTIONS = {"warmup_epochs": "--warmup", "cycle_ratio": "--cycle-ratio",
            "beta_shape": "--beta-shape", "capacity_steps": "--capacity-steps",
            "capacity": "--capacity", "cycles": "--cycles", "free_bits": "--free-bits",
            "grad_clip": "--grad-clip", "batch_size": "--batch-size", "lr": "--lr",
            "beta": "--beta", "epochs": "--epochs"}


def _model_config(args: argparse.Namespace, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The build_vae arguments; a model that cannot take these images (too small for
    ``--arch conv``) is a UsageError here, before anything is written."""
    from fastvae.models.vae import build_vae

    model_config = {"input_shape": list(image_shape), "latent_dim": args.latent_dim,
                    "arch": args.arch, "hidden": list(args.hidden) if args.hidden else None,
                    "logvar_limit": args.logvar_limit, **_likelihood_options(args)}
    try:
        build_vae(**model_config)
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"--arch {args.arch}: cannot build a model for images of shape "
                         f"{image_shape}: {e}") from e
    return model_config


def _check_quantizer_options(args: argparse.Namespace) -> None:
    """The quantizer options only with a --quantizer that takes them; the VAE's KL options (at
    other values than their defaults) not with one."""
    given = [dest for dest in QUANTIZER_OPTIONS if getattr(args, dest) is not None]
    if args.quantizer is None:
        if given:
            raise UsageError(f"{', '.join(QUANTIZER_OPTIONS[d] for d in given)} apply to a "
                             "VQ-VAE: add --quantizer vq (or rvq, fsq, lfq)")
        return
    takes = QUANTIZER_DEFAULTS[args.quantizer]
    wrong = [QUANTIZER_OPTIONS[d] for d in given if d not in takes]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: not options of --quantizer {args.quantizer}, "
                         f"which takes {', '.join(QUANTIZER_OPTIONS[d] for d in takes)}")
    given = [option for dest, option in VAE_ONLY.items()
             if getattr(args, dest) != args.vae_only_defaults[dest]]
    if given:
        raise UsageError(f"{', '.join(given)} apply to the VAE's KL term, which a VQ-VAE "
                         f"(--quantizer {args.quantizer}) does not have")


def _check_cuda_graphs(args: argparse.Namespace, device, world: int) -> None:
    """--cuda-graphs only where the trainer can serve it, in the CLI's words."""
    if not args.cuda_graphs:
        return
    if args.compile:
        raise UsageError("--cuda-graphs and --compile cannot be combined: choose one (both cut "
                         "the host overhead of a step)")
    if args.quantizer is not None:
        raise UsageError(f"--cuda-graphs applies to a VAE, not a VQ-VAE (--quantizer "
                         f"{args.quantizer}): its codebook updates run host-side logic in the "
                         "forward")
    if world > 1:
        raise UsageError("--cuda-graphs does not run under torchrun (DistributedDataParallel): "
                         "train without it")
    if device.type != "cuda":
        raise UsageError(f"--cuda-graphs needs a CUDA device (--device cuda); this run is on "
                         f"{device}")


def _likelihood_options(args: argparse.Namespace) -> dict[str, Any]:
    """The likelihood's options of build_vae / build_vqvae: the Gaussian's log-variance, the
    mixture of logistics' components and bins."""
    options: dict[str, Any] = {
        "likelihood": args.likelihood,
        "obs_logvar": (args.obs_logvar if args.obs_logvar is not None
                       else GAUSSIAN_OBS_LOGVAR if args.likelihood == "gaussian" else 0.0)}
    if args.likelihood == "dmol":
        bins = args.bins or (17 if args.data == "digits" else 256)
        if bins < 2:
            raise UsageError(f"--bins must be >= 2, got {bins}")
        options |= {"n_mixtures": args.mixtures, "n_bins": bins}
    return options


def _vq_model_config(args: argparse.Namespace, image_shape: tuple[int, ...]) -> dict[str, Any]:
    """The build_vqvae arguments (with ``"kind": "vqvae"``): the --quantizer's options, its
    defaults for those not given; a model that cannot take these images is a UsageError here,
    before anything is written."""
    import torch

    from fastvae.models.vqvae import build_vqvae

    if args.arch == "conv" and args.num_tokens is not None:
        raise UsageError("--num-tokens applies to --arch mlp (with conv, one code per position "
                         "of the feature map)")
    options = {dest: default if getattr(args, dest) is None else getattr(args, dest)
               for dest, default in QUANTIZER_DEFAULTS[args.quantizer].items()}
    # the CLI's names -> build_vqvae's
    renamed = {"commitment": "commitment_weight"}
    options = {renamed.get(k, k): v for k, v in options.items()}
    if "levels" in options:
        options["levels"] = _check_levels(options["levels"])
    if args.quantizer == "lfq":
        size = options["codebook_size"]
        if size < 2 or size & (size - 1):
            raise UsageError(f"--codebook-size: --quantizer lfq's codes are the sign patterns of "
                             f"log2(size) bits, so it must be a power of 2 >= 2, got {size}")
    if "decay" in options:
        options["decay"] = options["decay"] or None  # 0: a learned codebook
    if args.quantizer in ("vq", "rvq"):
        options["kmeans_init"] = True
    config: dict[str, Any] = {
        "kind": "vqvae", "input_shape": list(image_shape), "quantizer": args.quantizer,
        "arch": args.arch, "hidden": list(args.hidden) if args.hidden else None,
        **options, **_likelihood_options(args)}
    try:
        model = build_vqvae(**{k: v for k, v in config.items() if k != "kind"}).eval()
        with torch.no_grad():  # the decoder's output must have the images' shape
            out = model.decode(model.quantize(model.encode(torch.zeros(1, *image_shape)))[0])
        if args.likelihood != "dmol" and tuple(out.shape[1:]) != tuple(image_shape):
            raise ValueError(f"the decoder makes images of shape {tuple(out.shape[1:])}")
    except (ValueError, RuntimeError) as e:
        message = api_message(str(e), {**QUANTIZER_OPTIONS, "quantizer": "--quantizer",
                                        "commitment_weight": "--commitment"})
        raise UsageError(f"--quantizer {args.quantizer}, --arch {args.arch}: cannot build a "
                         f"VQ-VAE for images of shape {image_shape}: {message}") from e
    config["codebook_size"], config["codebook_dim"] = model.build_config["codebook_size"], \
        model.build_config["codebook_dim"]
    return config


# the most levels per FSQ dimension: every code exact in float32 (fastvae.ops.fsq.MAX_LEVEL)
MAX_LEVEL = 2**24


def _check_levels(levels: tuple[int, ...]) -> list[int]:
    """--levels in the CLI's own words, naming the bad entry (1-based) before the Python API
    sees them: the CLI builds FSQ without preserve_symmetry, so each entry is in [3, 2**24],
    and their product (the codebook size) an int64."""
    for i, level in enumerate(levels, 1):
        if level < 3:
            raise UsageError(
                f"--levels: entry {i} is {level}; FSQ needs at least 3 levels per dimension on "
                "the command line" + (" (a level of 2 needs preserve_symmetry, which the CLI "
                                      "does not offer)" if level == 2 else ""))
        if level > MAX_LEVEL:
            raise UsageError(f"--levels: entry {i} is {level}; at most 2**24 = {MAX_LEVEL} "
                             "levels per dimension (beyond, float32 cannot hold every code "
                             "exactly)")
    if math.prod(levels) > 2**63 - 1:
        raise UsageError(f"--levels: the codebook size, the product of the levels, is "
                         f"{math.prod(levels)}, beyond 2**63 - 1 (the largest int64 code)")
    return list(levels)


def _vq_description(config: dict[str, Any]) -> str:
    kind = config["quantizer"]
    codes = {"vq": f"{config['codebook_size']} codes of dimension {config['codebook_dim']}",
             "rvq": f"{config.get('num_quantizers')} levels of {config['codebook_size']} codes "
                    f"of dimension {config['codebook_dim']}",
             "fsq": f"levels {config.get('levels')} ({config['codebook_size']} codes)",
             "lfq": f"{config['codebook_dim']} bits ({config['codebook_size']} codes)"}[kind]
    return f"{config['arch']} VQ-VAE ({kind}), {codes}"


def _make_out_dir(out_dir: Path) -> Path:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out: {out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out: cannot create {out_dir}: {e.strerror or e}") from e
    return out_dir


@contextlib.contextmanager
def _process_group(world: int, device) -> Iterator[int]:
    """This process's rank; under torchrun (``world`` > 1) inside a process group (nccl on GPU,
    gloo on CPU) that is destroyed on the way out, whatever happens."""
    if world == 1:
        yield 0
        return
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield dist.get_rank()
    finally:
        dist.destroy_process_group()


def _summary(final: dict[str, Any], seconds: float) -> str:
    line = (f"final (validation, nats per image): ELBO {final['elbo']:.3f}, reconstruction "
            f"{final['nll']:.3f}, KL {final['kl']:.3f}")
    if "iwae_log_likelihood" in final:
        line += f", IWAE log p(x) (K={final['iwae_samples']}) {final['iwae_log_likelihood']:.3f}"
    return (line + f"; active units {final['active_units']}/{len(final['kl_per_dim'])}; "
            f"{seconds:.1f} s")


def _vq_summary(final: dict[str, Any], seconds: float) -> str:
    from .evaluate import vq_summary

    return f"final (validation, per image): {vq_summary(final)}; {seconds:.1f} s"
