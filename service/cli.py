"""The ``flowserve`` command line: one subcommand per module in :mod:`service.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

#: subcommand name -> module in service.commands exposing ``add_parser(subparsers)`` and ``run(args)``
SUBCOMMANDS: dict[str, str] = {
    "train": "service.commands.train",
    "serve": "service.commands.serve",
    "models": "service.commands.models",
    "score": "service.commands.score",
    "explain": "service.commands.explain",
    "sample": "service.commands.sample",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with ``only`` that one (so that ``flowserve models``
    does not pay for importing torch when another subcommand needs it)."""
    parser = argparse.ArgumentParser(
        prog="flowserve",
        description="Serve exact log-densities, samples, latents, anomaly scores and their per-feature explanations "
                    "from normalizing flows.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is None or name == only:
            importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return its exit status."""
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv[0] if argv and argv[0] in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
