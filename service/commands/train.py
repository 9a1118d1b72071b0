"""``flowserve train``: fit a flow to a data file and write the next version into the model repository."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.model.artifact import MANIFEST_FILE
from service.training.data import load_dataset, parse_bounds, parse_columns
from service.model.flows import ARCHITECTURES
from service.training.run import train_and_save
from service.training.fit import TrainConfig
from service.commands.common import guarded, progress

__all__ = ["add_parser", "run"]

EPILOG = """\
DATA is a .csv with a header row, a .npy (one 2-D array) or a .npz (one array, or arrays
named x and context). Columns are chosen by name or 0-based index; by default every column
not given as --context is a feature. The data is checked before training: NaN or infinity,
non-numeric values, a constant feature column and too few rows are refused with the column
and row named.

The rows are shuffled (--seed) into 70% train, 15% validation (early stopping) and 15%
calibration (at most 10,000 rows: their log-densities are the calibration set of the
anomaly p-values, and the held-out NLL and exactness figures are measured on them).

Defaults scale with the data. Below 2,000 training rows (small data, where anomaly scoring
is the usual use and unlabelled anomalies are often among the rows) the objective is the
robust trimmed NLL (the least likely 10% of each batch and of the validation rows are
dropped, --trim), the flow is small unless --transforms or --hidden is given (1 transform
with 16,16 hidden units below 50 rows per feature, else 3 transforms with 32,32) and batches are rows/16 (16..256). From 2,000 rows on it is plain
maximum likelihood with the flow's defaults and batches of 256. --robust / --no-robust
override the objective; the model card records it (training.objective, training.robust).
With the robust objective, at least 2 rows per feature and no context the fit starts from the robust
(minimum covariance determinant) Gaussian of the training rows with an identity flow
(--start mcd; --start standard: per-feature standardisation and a random flow); the card
records it (training.start) and the Gaussian's matrix (preprocessing.linear).

examples:
  flowserve train data/moons.csv --name moons
  flowserve train sensors.csv --name sensors --features temp,pressure,flow --epochs 100
  flowserve train digits.npz --name digits --dequantize --bounds 0:17 --hidden 32,32 --bins 8
  flowserve train runs.csv --name runs --context dose,age --flow maf --max-minutes 5
  flowserve train x.npy --name x64 --float64 --seed 3 --model-dir /srv/models

exit status: 0 written and every exactness check passed; 2 refused (bad data or options,
nothing trained or written); 3 written, but an exactness check failed (see the summary).
"""


def _hidden(text: str) -> list[int]:
    try:
        sizes = [int(h) for h in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--hidden takes comma-separated integers such as 64,64, not {text!r}") from None
    if not sizes or any(h < 1 for h in sizes):
        raise argparse.ArgumentTypeError("--hidden sizes must be positive")
    return sizes


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 0.5:
        raise argparse.ArgumentTypeError(f"--trim must lie in [0, 0.5), got {text!r}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a flow on a data file and write it to the model repository",
        description="Train a normalizing flow on DATA and write the next version of --name to the model repository, "
        "with its calibration set, exactness figures and training summary.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("data", metavar="DATA", help="training data: .csv (with header), .npy or .npz")
    p.add_argument("--name", required=True, help="model name (letters, digits, '.', '_', '-')")
    p.add_argument("--model-dir", default="models", help="model repository folder (default: models)")
    p.add_argument("--features", metavar="COLS", help="comma-separated feature columns (names or 0-based indices)")
    p.add_argument("--context", metavar="COLS", help="comma-separated context columns: makes a conditional flow")
    p.add_argument("--dequantize", action="store_true", help="add U(0,1) noise to integer data (seeded), recorded in the manifest")
    p.add_argument("--bounds", metavar="LOW:HIGH",
                   help="features lie in the open interval (LOW, HIGH): LOW:HIGH for every feature, or "
                   "NAME=LOW:HIGH,... for some; modelled through a logit, so samples stay inside "
                   "(e.g. --dequantize --bounds 0:17 for pixels 0..16)")
    p.add_argument("--description", default="", help="one line for the model card")
    arch = p.add_argument_group("architecture")
    arch.add_argument("--flow", default="nsf", choices=sorted(ARCHITECTURES), help="flow architecture (default: nsf)")
    arch.add_argument("--transforms", type=_positive(int), help="number of transforms (default: per flow)")
    arch.add_argument("--hidden", type=_hidden, metavar="H1,H2", help="hidden layer sizes, e.g. 64,64")
    arch.add_argument("--bins", type=_positive(int), help="spline bins (nsf, nsf-ar)")
    arch.add_argument("--float64", action="store_true", help="train and serve in float64 (default float32)")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=_positive(int), default=200, help="most epochs (default 200)")
    opt.add_argument("--max-minutes", type=_positive(float), default=10.0, help="wall-time budget (default 10)")
    opt.add_argument("--batch-size", type=_positive(int), help="rows per step (default: rows/16 in 16..256 below 2,000 training rows, else 256)")
    opt.add_argument("--robust", action=argparse.BooleanOptionalAction, default=None,
                     help="trimmed-likelihood objective (default: on below 2,000 training rows, off from there)")
    opt.add_argument("--trim", type=_fraction, default=0.1, help="fraction of least likely rows the robust objective drops (default 0.1)")
    opt.add_argument("--start", choices=["mcd", "standard"], default=None,
                     help="initial model: the robust MCD Gaussian with an identity flow, or standardisation and a "
                          "random flow (default: mcd with the robust objective and at least 2 rows per feature, unconditional models only)")
    opt.add_argument("--threads", type=_positive(int), default=1, help="torch threads while training (default 1)")
    opt.add_argument("--lr", type=_positive(float), default=1e-3, help="Adam learning rate (default 1e-3)")
    opt.add_argument("--patience", type=_positive(int), default=20, help="epochs without validation gain before stopping (default 20)")
    opt.add_argument("--seed", type=int, default=0, help="seed of dequantization, split, initialisation and batches (default 0)")
    opt.add_argument("--alpha", type=float, default=0.01, help="the model's default anomaly level in (0, 1) (default 0.01)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _summary(path: Path) -> tuple[str, bool]:
    m = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8"))
    tr, ex = m["training"], m["exactness"]
    d, nll = len(m["feature_names"]), ex["nll"]
    lines = [
        f"trained {m['flow']['name']} ({tr.get('objective', 'nll')}) on {tr['split']['train']} rows ({d} features"
        + (f", {len(m['context_names'])} context" if m["context_names"] else "")
        + f"), {tr['epochs']} epochs, {tr['seconds']:.1f}s",
        f"held-out NLL ({nll['rows']} calibration rows): {nll['nll']:.4f} nats, {nll['nll_per_dim']:.4f} per dimension",
        f"   fitted Gaussian on the same rows:   {nll['gaussian_nll']:.4f} nats, {nll['gaussian_nll_per_dim']:.4f} per dimension"
        + ("" if nll["better_than_gaussian"] else "   (the flow is NOT better)"),
        f"validation {tr.get('objective', 'nll')}: {tr['val_nll']:.4f} ({tr['val_nll_per_dim']:.4f} per dimension)",
        f"exactness ({ex['dtype']}):",
    ]
    for name, check in ex["checks"].items():
        lines.append(
            f"  {'pass' if check['pass'] else 'FAIL'}  {name:<17} {check['value']:.3g} (tolerance {check['tolerance']:.3g})"
        )
    lines.append(f"written: {path}  (model {m['name']}, version {m['version']})")
    return "\n".join(lines), bool(ex["passed"])


@guarded
def run(args: argparse.Namespace) -> int:
    """Train, write, print the summary; bad data or options are refused (exit 2) before training.

    ``train_and_save`` checks everything before the first epoch, and the bar (shown after a
    second, on a terminal) has not appeared by then, so a refusal is one clean line.
    """
    data = load_dataset(args.data, parse_columns(args.features), parse_columns(args.context))
    bounds = parse_bounds(args.bounds, data.feature_names)
    config = TrainConfig(
        flow=args.flow, transforms=args.transforms, hidden_features=args.hidden, bins=args.bins,
        epochs=args.epochs, max_minutes=args.max_minutes, batch_size=args.batch_size, lr=args.lr,
        patience=args.patience, seed=args.seed, dtype="float64" if args.float64 else "float32",
        robust=args.robust, trim=args.trim, threads=args.threads, start=args.start,
    )
    best = float("inf")
    with progress(args.epochs, args.quiet, unit="epoch") as bar:
        bar.set_description(f"train {args.name}", refresh=False)
        bar.unit_scale = False  # whole epochs

        def on_epoch(row: dict[str, float]) -> None:
            nonlocal best
            best = min(best, row["val_nll"])
            bar.update(1)
            bar.set_postfix({"val_nll": f"{row['val_nll']:.4f}", "best": f"{best:.4f}", "train_nll": f"{row['train_nll']:.4f}"})

        path = train_and_save(
            data, args.name, args.model_dir, config, dequantize_data=args.dequantize, alpha=args.alpha,
            description=args.description, on_epoch=on_epoch, bounds=bounds,
        )
    text, passed = _summary(path)
    print(text)
    if not passed:
        print("flowserve train: warning: an exactness check failed; the model was written but its densities are not certified",
              file=sys.stderr)
        return 3
    return 0
