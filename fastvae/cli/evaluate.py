"""``fastvae eval``, ``sample``, ``reconstruct``, ``interpolate``: a trained model's held-out
metrics and pictures, from its checkpoint.

Every command reads the checkpoint through ``load_model``, which finds the kind of model in it
(``model_config["kind"]``, ``"vae"`` when absent) in ``KINDS`` and builds it. A new kind of
model (the VQ-VAE) is one more ``ModelKind`` entry: how to build it from a checkpoint, how to
evaluate it, and the pictures it can draw (None: that command says the kind cannot). Every
quantizer of a VQ-VAE (``model_config["quantizer"]``: vq, rvq, fsq, lfq) is the one
``"vqvae"`` kind: its metrics, summary and pictures are per level where it has levels.
``sample``, ``reconstruct`` and ``interpolate`` run through one path (``_run_picture``).

Held-out data: ``--data`` (a file or a folder of images, read as ``fastvae train`` reads it),
or by default the validation split that ``fastvae train`` used for that checkpoint (the data
source, its options, the validation fraction and the split's seed are in the checkpoint), so
that ``fastvae eval`` on a run's checkpoint reproduces the trainer's final metrics.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .args import (
    CHECKPOINT_HELP,
    UsageError,
    add_data_options,
    checkpoint_path,
    data_record,
    load_data,
    non_negative_int,
    positive_int,
    resolve_device,
    seed,
)

HELD_OUT_HELP = ("held-out images: a .npz file, an MNIST IDX file or a folder of image files "
                 "(default: the validation split the checkpoint was trained with)")


@dataclass(frozen=True)
class ModelKind:
    """What the commands do with one kind of model.

    ``build(ckpt, path, device)``: the model of a checkpoint (``CheckpointError`` if it cannot
    be built), in eval mode. ``evaluate(model, images, args, seed)``: the metrics (a dict of
    JSON values) of ``fastvae eval``; ``summary(metrics)``: them in one line. ``sample(model,
    path, args, seed)``, ``reconstruct(model, images, path, args)``, ``interpolate(model,
    images, path, args)``: write that picture; None where the kind has none."""

    name: str
    build: Callable[..., Any]
    evaluate: Callable[..., dict[str, Any]]
    summary: Callable[[dict[str, Any]], str]
    input_shape: Callable[[Any], tuple[int, ...]]
    sample: Callable[..., Any] | None = None
    reconstruct: Callable[..., Any] | None = None
    interpolate: Callable[..., Any] | None = None


# -- the VAE ----------------------------------------------------------------------------------


def _vae_build(ckpt, path: Path, device):
    from fastvae.training.checkpoint import CheckpointError, vae_from_checkpoint

    if not ckpt.model_config:
        raise CheckpointError(
            f"{path} holds a VAE built around user networks (fastvae.VAE(encoder, decoder)), "
            "which cannot be rebuilt from the checkpoint: load it in Python with "
            "fastvae.load_vae(path, model=<the same VAE>)")
    return vae_from_checkpoint(ckpt, path, device)


def _vae_evaluate(model, images, args: argparse.Namespace, seed_: int) -> dict[str, Any]:
    from fastvae.training.trainer import evaluate

    metrics = evaluate(model, images, args.batch_size, iwae_samples=args.iwae_samples,
                       seed=seed_, progress=not args.no_progress)
    if "iwae_log_likelihood" in metrics:  # bits per dimension, as image-model papers report
        dims = math.prod(images.shape[1:])
        metrics["iwae_bits_per_dim"] = -metrics["iwae_log_likelihood"] / (dims * math.log(2))
    return metrics


def _vae_summary(metrics: dict[str, Any]) -> str:
    line = (f"ELBO {metrics['elbo']:.3f}, reconstruction {metrics['nll']:.3f}, KL "
            f"{metrics['kl']:.3f}")
    if "iwae_log_likelihood" in metrics:
        line += (f", IWAE log p(x) (K={metrics['iwae_samples']}) "
                 f"{metrics['iwae_log_likelihood']:.3f}")
    return line + f"; active units {metrics['active_units']}/{len(metrics['kl_per_dim'])}"


def _sample(model, path: Path, args: argparse.Namespace, seed_: int):
    """Samples of the model's prior: a VAE's Gaussian; a VQ-VAE's codes drawn independently at
    each position from ``--prior`` (default: the empirical prior, the code histogram of its
    last training steps, where its quantizer keeps one; else uniform)."""
    from fastvae.training import images

    options = {}
    if args.prior is not None:
        if not hasattr(model, "default_prior"):
            raise UsageError(f"--prior chooses a VQ-VAE's code prior; {args.checkpoint} holds a "
                             "VAE, which samples its Gaussian prior")
        options["prior"] = args.prior
    try:
        return images.save_samples(model, path, args.n, seed=seed_, ncols=args.ncols,
                                   **options)
    except ValueError as e:  # an empirical prior without a histogram
        why = str(e).split(";")[0]  # without the Python advice that follows
        raise UsageError(f"{args.checkpoint} holds a VQ-VAE with no empirical code prior to "
                         f"sample from ({why}): --prior uniform draws every code alike") from e


def _vae_reconstruct(model, x, path: Path, args: argparse.Namespace):
    from fastvae.training import images

    return images.save_reconstructions(model, x[:args.n], path, ncols=args.ncols)


def _vae_interpolate(model, x, path: Path, args: argparse.Namespace):
    from fastvae.training import images

    return images.save_interpolations(model, x, path, pairs=args.pairs, steps=args.steps,
                                      method=args.method)


# -- the VQ-VAE -------------------------------------------------------------------------------


def _vq_evaluate(model, images, args: argparse.Namespace, seed_: int) -> dict[str, Any]:
    """``evaluate_vq``: deterministic (no noise: the seed is unused), no IWAE bound."""
    from fastvae.training.trainer import evaluate_vq

    return evaluate_vq(model, images, args.batch_size, progress=not args.no_progress)


def vq_summary(metrics: dict[str, Any]) -> str:
    """A VQ-VAE's metrics (``evaluate_vq``) in one line; per level for a residual VQ."""
    usage, used, perplexity = (metrics[k] for k in ("usage", "codes_used", "perplexity"))
    if isinstance(usage, list):
        codebook = "; ".join(f"level {i}: {u}/{metrics['codebook_size']} ({f:.0%}), perplexity "
                             f"{p:.1f}" for i, (f, u, p) in
                             enumerate(zip(usage, used, perplexity, strict=True)))
    else:
        codebook = (f"{used}/{metrics['codebook_size']} ({usage:.0%}), perplexity "
                    f"{perplexity:.1f}")
    return (f"reconstruction {metrics['nll']:.3f} nats, VQ loss {metrics['vq_loss']:.4f} "
            f"(commitment {metrics['commitment_loss']:.4f}, codebook "
            f"{metrics['codebook_loss']:.4f}); codebook usage {codebook}")


KINDS: dict[str, ModelKind] = {
    "vae": ModelKind("VAE", build=_vae_build, evaluate=_vae_evaluate, summary=_vae_summary,
                     input_shape=lambda model: tuple(model.build_config["input_shape"]),
                     sample=_sample, reconstruct=_vae_reconstruct,
                     interpolate=_vae_interpolate),
    # every quantizer (vq, rvq, fsq, lfq; model_config["quantizer"]); no interpolate: the
    # latent is discrete, a path between two encodings leaves the codebook
    "vqvae": ModelKind("VQ-VAE", build=_vae_build, evaluate=_vq_evaluate,
                       summary=vq_summary,
                       input_shape=lambda model: tuple(model.build_config["input_shape"]),
                       sample=_sample, reconstruct=_vae_reconstruct),
}


@dataclass
class Loaded:
    kind: ModelKind
    model: Any
    checkpoint: Any  # fastvae.training.checkpoint.Checkpoint
    path: Path


def load_model(path: str, device) -> Loaded:
    """The one way every command reads a checkpoint: the file, its kind of model, the model
    built on ``device`` with its weights. What is wrong (a missing file, not a fastvae
    checkpoint, a model that cannot be rebuilt, an unknown kind) is a UsageError naming it."""
    from fastvae.training import checkpoint

    file = checkpoint_path(path)
    try:
        ckpt = checkpoint.load(file)
        name = ckpt.model_config.get("kind", "vae")
        kind = KINDS.get(name)
        if kind is None:
            raise UsageError(f"{file} holds a model of kind {name!r}; this fastvae reads "
                             f"{', '.join(map(repr, KINDS))}")
        model = kind.build(ckpt, file, device)
    except checkpoint.CheckpointError as e:
        raise UsageError(str(e)) from e
    return Loaded(kind, model, ckpt, file)


# -- shared steps -------------------------------------------------------------------------------


def _add_common(p: argparse.ArgumentParser, *, data: bool) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    if data:
        add_data_options(p, default=None, data_help=HELD_OUT_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--backend", default=None,
                   help="fastvae backend: auto, triton, cuda, cpu or torch")


def _setup(args: argparse.Namespace) -> Loaded:
    """--device and --backend, then the model."""
    import fastvae as fv

    device = resolve_device(args.device)
    if args.backend is not None:
        try:
            fv.set_backend(args.backend)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--backend: {e}") from e
    return load_model(args.checkpoint, device)


_FILE_OPTIONS = ("key", "pixel_max", "shape", "channels", "image_size", "strict")


def held_out(args: argparse.Namespace, loaded: Loaded):
    """The held-out images and what they are (JSON values): ``--data``, or the validation split
    of the checkpoint's training data, checked against the model's input shape."""
    from fastvae.training import data

    want = loaded.kind.input_shape(loaded.model)
    if args.data is not None:
        record = data_record(args)
        if record["channels"] is None and Path(args.data).is_dir() and want[0] in (1, 3):
            record["channels"] = want[0]  # a folder is read with the model's channels
        images, _ = load_data(record, command=args.command,
                              progress=not getattr(args, "no_progress", False))
        about: dict[str, Any] = {"data": args.data, "images": int(images.shape[0])}
        origin = f"--data {args.data}"
    else:
        given = [f"--{n.replace('_', '-')}" for n in _FILE_OPTIONS if getattr(args, n)]
        if given:
            raise UsageError(f"{', '.join(given)} apply to --data; without it the checkpoint's "
                             "validation split is read as it was trained")
        record = loaded.checkpoint.trainer_state.get("data")
        if not record or "val_fraction" not in record:
            raise UsageError(f"{loaded.path} does not record the data it was trained on "
                             "(written by fastvae.train in Python, or by an older fastvae): "
                             "give the held-out images with --data")
        try:
            images, _ = load_data(record, command=args.command,
                                  progress=not getattr(args, "no_progress", False))
        except UsageError as e:
            raise UsageError(f"the training data recorded in {loaded.path}: {e}") from e
        _, images = data.split(images, record["val_fraction"], record["split_seed"])
        about = {"data": record["source"], "split": "validation",
                 "val_fraction": record["val_fraction"], "split_seed": record["split_seed"],
                 "images": int(images.shape[0])}
        origin = f"the checkpoint's validation split of {record['source']}"
    if tuple(images.shape[1:]) != want:
        raise UsageError(f"{origin}: images of shape {tuple(images.shape[1:])} do not match the "
                         f"model's input_shape {want}"
                         + ("; give --image-size to read a folder at that size"
                            if args.data is not None and Path(args.data).is_dir() else ""))
    return images, about


def _seed_of(args: argparse.Namespace, loaded: Loaded) -> int:
    """--seed, else the training seed of the checkpoint (what the trainer's final metrics and
    pictures used), else 0."""
    if args.seed is not None:
        return args.seed
    config = loaded.checkpoint.trainer_state.get("train_config") or {}
    return int(config.get("seed", 0))


def _check_out(option: str, path: Path, *, picture: bool) -> Path:
    """An output file that can be written: its folder exists, it is not a folder, and a picture
    has a suffix Pillow writes. Checked before any work is done."""
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"{option}: {path.parent} is not an existing directory")
    if picture:
        from PIL import Image

        Image.init()
        fmt = Image.registered_extensions().get(path.suffix.lower())
        if fmt is None or fmt not in Image.SAVE:
            raise UsageError(f"{option}: {path} does not end in a picture suffix Pillow "
                             "writes (.png, .jpg, ...)")
    return path


def _unsupported(loaded: Loaded, command: str, what: str):
    raise UsageError(f"{loaded.path} holds a {loaded.kind.name}, which has no {what}: "
                     f"fastvae {command} does not apply to it")


# -- the commands -------------------------------------------------------------------------------


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="ELBO, IWAE log-likelihood and active units of a checkpoint "
                                    "on held-out data",
                       description="Evaluate a checkpoint on held-out images: the ELBO, its "
                                   "reconstruction and KL terms, the IWAE bound on log p(x) "
                                   "(Burda et al. 2016; K importance samples, streamed) and "
                                   "the active units; of a VQ-VAE the reconstruction NLL, "
                                   "the commitment and codebook losses, the codebook usage "
                                   "and perplexity. Prints one line, writes JSON.")
    _add_common(p, data=True)
    p.add_argument("--iwae-samples", type=non_negative_int, default=1000, metavar="K",
                   help="importance samples of the IWAE bound (0: skip it; papers use 5000; "
                        "a VQ-VAE has none)")
    p.add_argument("--batch-size", type=positive_int, default=512,
                   help="images per batch (512, as the trainer's final metrics)")
    p.add_argument("--seed", type=seed, default=None,
                   help="the noise's seed (default: the checkpoint's training seed)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the metrics (default: eval.json beside the checkpoint; "
                        "'-': print the JSON instead of the summary)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_eval)

    p = sub.add_parser("sample", help="a grid of samples from a checkpoint's prior",
                       description="Decode samples of the prior into one picture.")
    _add_common(p, data=False)
    p.add_argument("--n", type=positive_int, default=64, help="samples (default 64)")
    p.add_argument("--ncols", type=positive_int, default=None,
                   help="samples per row (default: ceil(sqrt(n)))")
    p.add_argument("--seed", type=seed, default=None,
                   help="the noise's seed (default: the checkpoint's training seed: the "
                        "trainer's samples.png)")
    p.add_argument("--prior", choices=("empirical", "uniform"), default=None,
                   help="a VQ-VAE's code prior: the code histogram of its last training steps "
                        "(default) or uniform over the codebook")
    p.add_argument("--out", default="samples.png", help="the picture (default samples.png)")
    p.set_defaults(run=run_sample)

    p = sub.add_parser("reconstruct", help="held-out images beside their reconstructions",
                       description="Each held-out image followed by its reconstruction (the "
                                   "decoder's mean at the posterior mean).")
    _add_common(p, data=True)
    p.add_argument("--n", type=positive_int, default=32, help="images (default 32)")
    p.add_argument("--ncols", type=positive_int, default=8,
                   help="images per row, originals and reconstructions (default 8)")
    p.add_argument("--out", default="reconstructions.png",
                   help="the picture (default reconstructions.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_reconstruct)

    p = sub.add_parser("interpolate", help="decoded paths between pairs of held-out images",
                       description="One row per pair of held-out images (image i and image "
                                   "pairs + i): the decoded path between their posterior "
                                   "means.")
    _add_common(p, data=True)
    p.add_argument("--pairs", type=positive_int, default=8, help="rows (default 8)")
    p.add_argument("--steps", type=positive_int, default=10,
                   help="images per row, both ends included (default 10)")
    p.add_argument("--method", choices=("linear", "slerp"), default="linear",
                   help="straight or spherical paths (default linear)")
    p.add_argument("--out", default="interpolations.png",
                   help="the picture (default interpolations.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run_interpolate)


def run_eval(args: argparse.Namespace) -> int:
    """Check everything first (the checkpoint, the data, where the JSON goes), evaluate,
    print, write."""
    import fastvae as fv
    from fastvae.training import checkpoint

    loaded = _setup(args)
    to_stdout = args.json == "-"
    json_path = (None if to_stdout else _check_out(
        "--json", Path(args.json) if args.json else loaded.path.parent / "eval.json",
        picture=False))
    images, about = held_out(args, loaded)
    seed_ = _seed_of(args, loaded)
    t0 = time.perf_counter()
    metrics = loaded.kind.evaluate(loaded.model, images, args, seed_)
    seconds = time.perf_counter() - t0
    device = next(loaded.model.parameters()).device
    report = {"checkpoint": str(loaded.path), "kind": loaded.kind.name, **about,
              "seed": seed_, "batch_size": args.batch_size, "device": str(device),
              "backend": fv.get_backend(), **metrics, "seconds": seconds}
    text = json.dumps(report, indent=2) + "\n"
    if to_stdout:
        print(text, end="")
        return 0
    where = ("validation" if about.get("split") == "validation" else about["data"])
    print(f"{loaded.kind.summary(metrics)} ({where}, {about['images']} images, nats per "
          f"image); {seconds:.1f} s")
    try:
        checkpoint.atomic_write(json_path, text.encode())
    except OSError as e:
        raise UsageError(f"--json: cannot write {json_path}: {e.strerror or e}") from e
    print(f"wrote {json_path}")
    return 0


@dataclass(frozen=True)
class _Picture:
    """One picture command: the ``ModelKind`` field that draws it, what a kind without it
    lacks, whether it reads held-out images, and what it says when done."""

    field: str
    lacks: str
    held_out: bool
    done: Callable[[argparse.Namespace, Path, dict[str, Any], int], str]


_PICTURES = {
    "sample": _Picture("sample", "prior to sample from", False,
                       lambda args, out, about, seed_: f"wrote {out}: {args.n} samples, "
                                                       f"seed {seed_}"),
    "reconstruct": _Picture("reconstruct", "reconstructions", True,
                            lambda args, out, about, seed_: f"wrote {out}: "
                            f"{min(args.n, about['images'])} images and their reconstructions"),
    "interpolate": _Picture("interpolate", "latent paths", True,
                            lambda args, out, about, seed_: f"wrote {out}: "
                            f"{min(args.pairs, about['images'] // 2)} paths of {args.steps} "
                            f"steps ({args.method})"),
}


def _run_picture(args: argparse.Namespace) -> int:
    """``fastvae sample``, ``reconstruct`` and ``interpolate``: the model, the output checked,
    the kind's drawing (a kind without it says so), the held-out images where the picture
    needs them, then the picture."""
    picture = _PICTURES[args.command]
    loaded = _setup(args)
    out = _check_out("--out", Path(args.out), picture=True)
    draw = getattr(loaded.kind, picture.field)
    if draw is None:
        _unsupported(loaded, args.command, picture.lacks)
    if args.command == "interpolate" and args.steps < 2:
        raise UsageError(f"--steps must be >= 2 (both ends), got {args.steps}")
    if picture.held_out:
        images, about = held_out(args, loaded)
        if args.command == "interpolate" and about["images"] < 2:
            raise UsageError(f"interpolations need at least 2 held-out images, got "
                             f"{about['images']}")
        draw(loaded.model, images, out, args)
        print(picture.done(args, out, about, 0))
    else:
        seed_ = _seed_of(args, loaded)
        draw(loaded.model, out, args, seed_)
        print(picture.done(args, out, {}, seed_))
    return 0


run_sample = run_reconstruct = run_interpolate = _run_picture


__all__ = ["KINDS", "Loaded", "ModelKind", "add_parsers", "held_out", "load_model"]
