"""The ``fastvae`` command line: ``train``, ``eval``, ``sample``, ``reconstruct``,
``interpolate``, ``bench``, ``info``.

Bad arguments and unreadable inputs end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import bench, evaluate, info, train
from .args import EXIT_USAGE, Parser, UsageError

__all__ = ["EXIT_USAGE", "UsageError", "build_parser", "main"]


def build_parser() -> Parser:
    parser = Parser(prog="fastvae", description="Fused VAE kernels: train, evaluate, sample, "
                                                "benchmark, inspect.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train.add_parser(sub)
    evaluate.add_parsers(sub)
    info.add_parser(sub)
    bench.add_parser(sub)
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
