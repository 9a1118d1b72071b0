"""flowserve score FILE --model NAME: anomaly scores of every row of a file.

Writes log_prob, score (= -log_prob), p_value (conformal, against the model's
calibration set) and is_anomaly (p_value <= alpha) for each row, in the file's row order,
computed by a running server (--url) or by the model loaded in this process; both give the same
numbers.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from service.commands.common import (
    EPILOG_FORMATS,
    Source,
    add_rows_arguments,
    add_source_arguments,
    check_rows_arguments,
    guarded,
    open_source,
    options,
    read_inputs,
    rows_in_chunks,
    write_columns,
)
from service.serving import validation

__all__ = ["add_parser", "run"]

EXAMPLES = """\
examples:
  flowserve score points.csv --model moons                       # CSV to stdout, model loaded here
  flowserve score points.csv --model moons --output scores.csv --alpha 0.05
  flowserve score x.npy --model moons --url http://127.0.0.1:8000 --output scores.npy
  flowserve score images.csv --model digits-cond --context-file labels.csv

output: one row per input row, columns log_prob, score, p_value, is_anomaly.
  .csv (or stdout)  a header row, then floats as Python writes them (exact) and true/false
  .npy              a structured array with float64 fields log_prob, score, p_value and a
                    bool field is_anomaly: np.load("scores.npy")["p_value"]
  .npz              one array per column
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score", help="anomaly scores (log_prob, score, p_value, is_anomaly) of the rows of a file",
        description=__doc__.split("\n\n", 1)[1], epilog=EXAMPLES + "\n" + EPILOG_FORMATS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_rows_arguments(p, "rows to score")
    p.add_argument("--alpha", type=float, default=None,
                   help="level at which a row is an anomaly, p_value <= alpha (default: the model's, else 0.01)")
    add_source_arguments(p)
    p.set_defaults(run=run)
    return p


@guarded
def run(args: argparse.Namespace) -> int:
    check_rows_arguments(args)
    with options(alpha="--alpha"):
        validation.check_alpha(args.alpha)
    with open_source(args) as source:
        return _score(args, source)


def _score(args: argparse.Namespace, source: Source) -> int:
    x, context = read_inputs(args, source)

    parts = rows_in_chunks(args, x, context, lambda rows, ctx: source.score(rows, ctx, args.alpha))
    columns = {key: _concat([p[key] for p in parts], bool if key == "is_anomaly" else np.float64)
               for key in ("log_prob", "score", "p_value", "is_anomaly")}
    write_columns(columns, args.output)
    if not args.quiet and parts:
        threshold = parts[0]["threshold"]
        print(f"{source.name} v{source.version}: {int(columns['is_anomaly'].sum())} of {x.shape[0]} rows are "
              f"anomalies at alpha={threshold['alpha']} (log_prob below {threshold['log_prob']})", file=sys.stderr)
    return 0


def _concat(arrays: list[np.ndarray], dtype: type) -> np.ndarray:
    return np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
