"""flowserve sample --model NAME -n N: draw rows from a model.

Rows are drawn in chunks of --batch-size: chunk 0 with --seed itself (so up to one chunk,
the rows are exactly the server's /sample answer for that seed), chunk k with a seed derived
from (seed, k). The same seed, -n, --batch-size, temperature and context give the same
rows, in process or through a server.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from service.commands.common import (
    CommandError,
    add_source_arguments,
    chunks,
    Source,
    guarded,
    open_source,
    options,
    parse_context,
    progress,
    read_context,
    write_columns,
)
from service.serving import validation

__all__ = ["add_parser", "chunk_seed", "run"]

EXAMPLES = """\
examples:
  flowserve sample --model moons -n 1000 --seed 7 --output moons.csv
  flowserve sample --model moons -n 5 --temperature 0.7              # CSV on stdout
  flowserve sample --model digits-cond -n 16 --context label=3 --output threes.npy
  flowserve sample --model moons -n 100000 --url http://127.0.0.1:8000 --output x.npz --log-prob

output:
  .csv (or stdout)  a header row of the model's feature names (and log_prob with --log-prob)
  .npy              a 2-D float64 array, rows x features
  .npz              arrays "samples" (rows x features) and "log_prob"
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sample", help="draw rows from a model",
        description=__doc__.split("\n\n", 1)[1], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("-n", type=int, required=True, help="number of rows to draw")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible rows (default: fresh entropy)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="scale of the base noise, z = T * eps (default: 1; below 1 gives more typical rows)")
    p.add_argument("--context", default=None,
                   help="context for a conditional model, one row for all samples: '3' or '1,0.5' in the "
                        "model's order, or 'label=3' by name")
    p.add_argument("--context-file", type=Path, default=None,
                   help="context rows (.csv/.npy/.npz): one row for all samples, or one per sample")
    p.add_argument("--log-prob", action="store_true", help="add the log-density of each row to a CSV output")
    p.add_argument("--output", "-o", type=Path, default=None, help="OUT.csv, OUT.npy or OUT.npz (default: CSV on stdout)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per request or per pass (default: 4096)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar on stderr")
    add_source_arguments(p)
    p.set_defaults(run=run)
    return p


def chunk_seed(seed: int | None, k: int) -> int | None:
    """The seed of chunk ``k``: ``seed`` itself for chunk 0, else a 63-bit seed mixed from ``(seed, k)``."""
    if seed is None or k == 0:
        return seed
    return int(np.random.SeedSequence([seed, k]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@guarded
def run(args: argparse.Namespace) -> int:
    with options(n="-n", temperature="--temperature", seed="--seed"):
        validation.check_sample(args.n, args.temperature, args.seed)
    if args.batch_size < 1:
        raise CommandError("--batch-size must be >= 1")
    if args.context is not None and args.context_file is not None:
        raise CommandError("give --context or --context-file, not both")
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".npy", ".npz"):
        raise CommandError(f"{args.output}: unsupported output type; use .csv, .npy or .npz")
    with open_source(args) as source:
        return _sample(args, source)


def _sample(args: argparse.Namespace, source: Source) -> int:
    context = None
    if args.context is not None:
        context = parse_context(args.context, source.context_names)
    elif args.context_file is not None:
        context = read_context(args.context_file, source.context_names)
    if source.context_names and context is None:
        raise CommandError(f"model {source.name!r} is conditional: give --context or --context-file "
                           f"with its context {source.context_names}")
    if context is not None and context.shape[0] not in (1, args.n):
        raise CommandError(f"{context.shape[0]} context rows for -n {args.n}: give one row or one per sample")

    samples, log_prob = [], []
    with progress(args.n, args.quiet) as bar:
        for k, rows in enumerate(chunks(args.n, args.batch_size)):
            ctx = None if context is None else (context if context.shape[0] == 1 else context[rows])
            out = source.sample(rows.stop - rows.start, chunk_seed(args.seed, k), args.temperature, ctx)
            samples.append(np.asarray(out["samples"], dtype=np.float64))
            log_prob.append(np.asarray(out["log_prob"], dtype=np.float64))
            bar.update(rows.stop - rows.start)
    x, lp = np.concatenate(samples), np.concatenate(log_prob)

    suffix = args.output.suffix.lower() if args.output is not None else ".csv"
    if suffix == ".npy":
        np.save(args.output, x, allow_pickle=False)
    elif suffix == ".npz":
        np.savez(args.output, samples=x, log_prob=lp)
    else:
        columns = {name: x[:, j] for j, name in enumerate(source.feature_names)}
        if args.log_prob:
            columns["log_prob"] = lp
        write_columns(columns, args.output)
    return 0
