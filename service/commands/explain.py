"""flowserve explain FILE --model NAME: each row's log-density split over its features.

Writes, for each row in the file's row order, its log_prob and one contribution per feature, as
POST /v1/models/{name}/explain computes them, by a running server (--url) or by the model loaded
in this process; both give the same numbers.

- method chain-rule (exact): where the flow's Jacobian is triangular in the feature order by
  construction (one autoregressive transform with the identity order: maf or nsf-ar trained with
  --transforms 1, or a model of one feature), contribution i is log p(x_i | x_<i) and each row's
  contributions sum to its log_prob.
- method occlusion (approximate), every other flow: log p(x) - log p(x with feature i set to the
  standardisation's centre); the sum need not equal log_prob.

The method is printed on stderr (unless --quiet) and stored in .npz outputs.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from service.commands.common import (
    EPILOG_FORMATS,
    CommandError,
    Source,
    add_rows_arguments,
    add_source_arguments,
    check_rows_arguments,
    guarded,
    open_source,
    read_inputs,
    rows_in_chunks,
    write_columns,
)

__all__ = ["LOG_PROB", "add_parser", "run"]

#: the column of each row's log-density, beside one column per feature
LOG_PROB = "log_prob"

EXAMPLES = """\
examples:
  flowserve explain points.csv --model moons                      # CSV to stdout, model loaded here
  flowserve explain points.csv --model moons --output why.csv
  flowserve explain x.npy --model moons --url http://127.0.0.1:8000 --output why.npz
  flowserve explain images.csv --model digits-cond --context-file labels.csv -o why.npy

output: one row per input row: log_prob, then one column per feature (named as the model's
features) holding that feature's contribution.
  .csv (or stdout)  a header row, then floats as Python writes them (exact)
  .npy              a structured array with float64 fields log_prob and one per feature:
                    np.load("why.npy")["x0"]
  .npz              arrays "contributions" (rows x features), "log_prob", "feature_names",
                    "method" ("chain-rule" or "occlusion") and "exact" (bool)
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explain", help="per-feature contributions to the log-density of the rows of a file",
        description=__doc__.split("\n\n", 1)[1], epilog=EXAMPLES + "\n" + EPILOG_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_rows_arguments(p, "rows to explain")
    add_source_arguments(p)
    p.set_defaults(run=run)
    return p


@guarded
def run(args: argparse.Namespace) -> int:
    check_rows_arguments(args)
    if args.output is not None and args.output.suffix.lower() not in (".csv", ".npy", ".npz"):
        raise CommandError(f"{args.output}: unsupported output type; use .csv, .npy or .npz")
    with open_source(args) as source:
        return _explain(args, source)


def _explain(args: argparse.Namespace, source: Source) -> int:
    x, context = read_inputs(args, source)
    suffix = args.output.suffix.lower() if args.output is not None else ".csv"
    if suffix != ".npz" and LOG_PROB in source.feature_names:
        raise CommandError(f"model {source.name!r} has a feature named {LOG_PROB!r}, which would clash with the "
                           "log_prob column; write an .npz output instead")

    parts = rows_in_chunks(args, x, context, source.explain)
    width = len(source.feature_names)
    contributions = np.concatenate([np.asarray(p["contributions"], dtype=np.float64).reshape(-1, width)
                                    for p in parts]) if parts else np.zeros((0, width))
    log_prob = np.concatenate([np.asarray(p["log_prob"], dtype=np.float64).reshape(-1)
                               for p in parts]) if parts else np.zeros(0)
    methods = {str(p["method"]) for p in parts}
    if len(methods) > 1:  # one model version: cannot happen unless the server changed under us
        raise CommandError(f"the chunks were explained by different methods {sorted(methods)}")
    method = methods.pop() if methods else "none"
    exact = bool(parts[0]["exact"]) if parts else False

    if suffix == ".npz":
        np.savez(args.output, contributions=contributions, log_prob=log_prob,
                 feature_names=np.array(source.feature_names), method=np.array(method), exact=np.array(exact))
    else:
        columns = {LOG_PROB: log_prob, **{name: contributions[:, j] for j, name in enumerate(source.feature_names)}}
        write_columns(columns, args.output)
    if not args.quiet:
        how = ("exact: each row's contributions sum to its log_prob" if exact
               else "approximate: the contributions need not sum to log_prob")
        print(f"{source.name} v{source.version}: {x.shape[0]} rows explained by {method} ({how})", file=sys.stderr)
    return 0
