"""What every command shares: ``UsageError``, the parser that raises it, argument types and the
``--device`` rule."""

from __future__ import annotations

import argparse
import math

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument or input: reported in one line, exit status 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of argparse's usage block
        raise UsageError(message)


def number(text: str, kind: type = float):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def seed(text: str) -> int:
    value = number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32), got {value}")
    return value


# "not lo <= x < inf" rather than "x < lo": NaN and infinities fail it too.
def finite_float(text: str) -> float:
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return value


def split_list(text: str, what: str, separator: str = ",") -> list[str]:
    """The entries of a comma-separated option value, each stripped of spaces: the one parser
    of every list option of the CLI. An empty entry (``8,,5``, a trailing comma, an empty
    value) is refused, never dropped: ``expected comma-separated <what>, got '<text>'``.
    ``separator``: a regular expression where a comma alone is not one (FSQ sizes' brackets)."""
    import re

    entries = [s.strip() for s in re.split(separator, text)]
    if not all(entries):
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}")
    return entries


def int_list(text: str) -> tuple[int, ...]:
    message = f"expected comma-separated integers, got {text!r}"
    try:
        values = tuple(int(v) for v in split_list(text, "integers"))
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def api_message(message: str, options: dict[str, str]) -> str:
    """A Python API's error in the options' names, for the errors the CLI does not check in its
    own words first (it should, where a message could suggest what the CLI cannot do):
    ``name[i]`` -> ``--option entry i+1``, ``name='v'`` -> ``--option v``, ``name`` ->
    ``--option``, for each ``name -> --option`` of ``options``."""
    import re

    names = "|".join(sorted(map(re.escape, options), key=len, reverse=True))

    def one(m: re.Match) -> str:
        option = options[m["name"]]
        if m["index"] is not None:
            return f"{option} entry {int(m['index']) + 1}"
        if m["value"] is not None:
            return f"{option} {m['value'].strip(chr(39))}"
        return option

    return re.sub(rf"(?<![\w-])(?P<name>{names})(?:\[(?P<index>\d+)\]|=(?P<value>'[^']*'|\w+))?"
                  r"(?![\w-])", one, message)


CHECKPOINT_NAME = "checkpoint.safetensors"  # what fastvae train writes into its --out folder
CHECKPOINT_HELP = ("a checkpoint written by fastvae train (or save_vae), or the --out folder "
                   f"of a training run (its {CHECKPOINT_NAME})")


def checkpoint_path(text: str, option: str | None = None):
    """The checkpoint a command reads: a file as given, or, for a folder (a training run's
    ``--out``), the ``checkpoint.safetensors`` in it; a folder without one is a UsageError
    (prefixed by ``option`` where the checkpoint is an option's value)."""
    from pathlib import Path

    path = Path(text)
    if path.is_dir():
        file = path / CHECKPOINT_NAME
        if not file.is_file():
            prefix = f"{option}: " if option else ""
            raise UsageError(f"{prefix}{path} is a folder without a {CHECKPOINT_NAME} (not the "
                             "--out folder of a fastvae train run); give the checkpoint file")
        return file
    return path


def resolve_device(name: str, local_rank: int | None = None):
    """``--device`` (auto, cpu, cuda, cuda:N) as a torch.device; under torchrun a GPU rank
    takes ``cuda:<local rank>``."""
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


def add_data_options(p: argparse.ArgumentParser, *, default: str | None, data_help: str) -> None:
    """``--data`` and the options that say how to read it (``--key``, ``--pixel-max``,
    ``--shape`` for array files; ``--channels``, ``--image-size``, ``--strict`` for folders of
    images), shared by ``train`` and the commands that read held-out data."""
    p.add_argument("--data", default=default, help=data_help)
    p.add_argument("--key", default=None,
                   help="the array of a .npz file that holds several (default: its only one)")
    p.add_argument("--pixel-max", type=positive_float, default=None,
                   help="the pixel value that is white (default: 255 for uint8, 1 for bool and "
                        "float data; required for other integer types)")
    p.add_argument("--shape", type=int_list, default=None, metavar="C,H,W",
                   help="the image shape of each row (required for flat (N, D) arrays)")
    p.add_argument("--channels", type=channel_count, default=None, metavar="{1,3}",
                   help="a folder of images: read them grey (1) or RGB (3); default: RGB for "
                        "train, the model's channels for the commands that read a checkpoint")
    p.add_argument("--image-size", type=positive_int, default=None, metavar="S",
                   help="a folder of images: resize each so that its short side is S and crop "
                        "the centre S x S (required when their sizes differ)")
    p.add_argument("--strict", action="store_true",
                   help="a folder of images: fail on an unreadable file instead of skipping it")


def channel_count(text: str) -> int:
    value = number(text, int)
    if value not in (1, 3):
        raise argparse.ArgumentTypeError(f"must be 1 (grey) or 3 (RGB), got {value}")
    return value


def data_record(args: argparse.Namespace) -> dict:
    """The data options as JSON values, with a file or folder's absolute path: what a
    checkpoint records so that the data can be read again (``load_data``)."""
    from pathlib import Path

    source = args.data
    if source is not None and source != "digits":
        source = str(Path(source).expanduser().resolve())
    return {"source": source, "key": args.key, "pixel_max": args.pixel_max,
            "shape": list(args.shape) if args.shape else None, "channels": args.channels,
            "image_size": args.image_size, "strict": bool(args.strict)}


def load_data(record: dict, *, command: str, progress: bool = True):
    """The images of a ``data_record`` and their name, read by ``fastvae.training.data.load``;
    the image files of a folder that cannot be read are listed on stderr (one line), never
    skipped silently. A ``DataError`` becomes a ``UsageError``."""
    import sys
    import warnings

    from fastvae.training import data

    shape = record.get("shape")
    if shape is not None and len(shape) != 3:
        raise UsageError(f"--shape: expected three sizes C,H,W, got {tuple(shape)}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            images, name = data.load(record.get("source"), key=record.get("key"),
                                     pixel_max=record.get("pixel_max"),
                                     shape=tuple(shape) if shape else None,
                                     channels=record.get("channels"),
                                     image_size=record.get("image_size"),
                                     strict=bool(record.get("strict")), progress=progress)
    except data.DataError as e:
        raise UsageError(str(e)) from e
    for w in caught:
        print(f"fastvae {command}: warning: {w.message}", file=sys.stderr)
    return images, name
