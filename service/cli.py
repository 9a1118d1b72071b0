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
    "sample": "service.commands.sample",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowserve",
        description="Serve exact log-densities, samples, latents and anomaly scores from normalizing flows.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
