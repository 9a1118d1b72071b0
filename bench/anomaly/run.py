r"""The anomaly benchmark: ADBench's protocol on small offline sets, flowserve beside PyOD in one run.

For each set and seed :math:`s`: a random 70 % of the rows (drawn from :math:`s`) is the fit split,
with its anomalies unlabelled inside; every detector is fitted on it and scores the other 30 %; the
figure is the AUROC of those scores against the labels. Per set the table gives mean ± sd over seeds
and each detector's rank by mean AUROC (1 = best, ties share the mean rank); "mean rank" averages the
per-set ranks. Results go to ``bench/results/anomaly-<date>.{json,md}``.

``--known-density`` instead checks that the defaults on larger data are unchanged: it trains
``flowserve train``'s defaults on 20,000+ rows of a known 3-D density (a Gaussian pushed through a
known smooth bijection, so :math:`\log p` is exact) with ``robust`` off (what the defaults choose at
this size) and on, and reports :math:`\mathrm{KL}(p\,\|\,q)/D`, estimated as the mean of
:math:`\log p - \log q` over 20,000 fresh draws of :math:`p`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench.anomaly.datasets import SETS, build
from bench.anomaly.detectors import DETECTORS, flowserve_scores

__all__ = ["main", "run_benchmark", "known_density", "table"]

RESULTS = Path(__file__).resolve().parent.parent / "results"


def _auroc(y: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, scores))


def _fit_split(n: int, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random 70 / 30 split of ``n`` rows; redrawn (next seed of the same stream) until the test part
    holds both classes, which AUROC needs."""
    rng = np.random.default_rng(seed)
    while True:
        perm = rng.permutation(n)
        cut = round(0.7 * n)
        fit, test = np.sort(perm[:cut]), np.sort(perm[cut:])
        if 0 < y[test].sum() < test.size:
            return fit, test


def run_benchmark(
    sets: list[str], seeds: int, detectors: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]],
    log: Callable[[str], None] = print, first_seed: int = 0,
) -> dict[str, Any]:
    """AUROC of every detector on every set and seed (``first_seed`` .. ``first_seed + seeds - 1``), and the
    seconds each took."""
    auroc: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, dict[str, float]] = {}
    shapes: dict[str, list[int]] = {}
    for name in sets:
        data = build(name)
        shapes[name] = [int(data.x.shape[0]), int(data.x.shape[1]), int(data.y.sum())]
        auroc[name] = {d: [] for d in detectors}
        seconds[name] = {d: 0.0 for d in detectors}
        for seed in range(first_seed, first_seed + seeds):
            fit, test = _fit_split(data.x.shape[0], data.y, seed)
            mu, sd = data.x[fit].mean(axis=0), data.x[fit].std(axis=0)
            sd = np.where(sd > 0, sd, 1.0)
            x_fit, x_test = (data.x[fit] - mu) / sd, (data.x[test] - mu) / sd
            for det, score in detectors.items():
                t0 = time.perf_counter()
                s = score(x_fit, x_test, seed)
                seconds[name][det] += time.perf_counter() - t0
                auroc[name][det].append(_auroc(data.y[test], s))
        log(f"{name}: " + ", ".join(f"{d} {np.mean(v):.3f}" for d, v in auroc[name].items()))
    return {"auroc": auroc, "seconds": seconds, "shapes": shapes, "seeds": seeds, "first_seed": first_seed}


def _ranks(means: dict[str, float]) -> dict[str, float]:
    """Rank 1 = the highest mean; ties share the mean of their ranks."""
    order = sorted(means.values(), reverse=True)
    out = {}
    for d, m in means.items():
        first = order.index(m) + 1
        out[d] = first + (order.count(m) - 1) / 2
    return out


def table(result: dict[str, Any]) -> str:
    """The Markdown table: mean ± sd AUROC per set and detector (rank), then the mean rank."""
    auroc = result["auroc"]
    detectors = list(next(iter(auroc.values())))
    lines = [
        "| set (rows, features, anomalies) | " + " | ".join(detectors) + " |",
        "|---|" + "---|" * len(detectors),
    ]
    rank_sum = {d: 0.0 for d in detectors}
    for name, per in auroc.items():
        means = {d: float(np.mean(v)) for d, v in per.items()}
        ranks = _ranks(means)
        best = max(means.values())
        for d in detectors:
            rank_sum[d] += ranks[d]
        cells = []
        for d in detectors:
            text = f"{means[d]:.3f} ± {float(np.std(per[d], ddof=1)) if len(per[d]) > 1 else 0.0:.3f} ({ranks[d]:g})"
            cells.append(f"**{text}**" if means[d] == best else text)
        n, dim, anom = result["shapes"][name]
        lines.append(f"| {name} ({n}, {dim}, {anom}) | " + " | ".join(cells) + " |")
    lines.append("| **mean rank** | " + " | ".join(f"{rank_sum[d] / len(auroc):.2f}" for d in detectors) + " |")
    secs = {d: sum(result["seconds"][s][d] for s in auroc) for d in detectors}
    lines.append("| seconds (all sets and seeds) | " + " | ".join(f"{secs[d]:.1f}" for d in detectors) + " |")
    return "\n".join(lines)


# -- the known-density check ------------------------------------------------------------------------
def _known_density(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    r"""Draws of a known 3-D density and their exact :math:`\log p`.

    :math:`u \sim \mathcal{N}(0, \Sigma)` with :math:`\Sigma` a fixed correlated covariance, then the
    bijection :math:`x_1 = u_1,\ x_2 = u_2 + 0.5 u_1^2,\ x_3 = u_3 + \sin(2 u_1)` (unit Jacobian), so
    :math:`\log p(x) = \log \mathcal{N}(u; 0, \Sigma)`: a curved, skewed density.
    """
    cov = np.array([[1.0, 0.5, 0.2], [0.5, 1.0, 0.3], [0.2, 0.3, 1.0]])
    rng = np.random.default_rng(seed)
    u = rng.multivariate_normal(np.zeros(3), cov, size=n)
    x = np.column_stack([u[:, 0], u[:, 1] + 0.5 * u[:, 0] ** 2, u[:, 2] + np.sin(2 * u[:, 0])])
    prec = np.linalg.inv(cov)
    _, logdet = np.linalg.slogdet(cov)
    log_p = -0.5 * np.einsum("ij,jk,ik->i", u, prec, u) - 0.5 * logdet - 1.5 * math.log(2 * math.pi)
    return x, log_p


def known_density(rows: int = 30_000, seed: int = 0, epochs: int | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """KL(p || q)/D of the defaults (robust off at this size) and of the robust objective.

    ``rows`` is the whole data set given to ``train_and_save`` (70 % of it trains); ``epochs`` caps
    the training of both fits alike (``None``: the default budget).
    """
    x, _ = _known_density(rows, seed)
    x_eval, log_p = _known_density(20_000, seed + 1)
    out: dict[str, Any] = {"rows": rows, "eval_rows": 20_000, "epochs": epochs}
    for label, robust in (("defaults", None), ("robust", True)):
        t0 = time.perf_counter()
        # flowserve_scores returns -log q on the eval rows
        neg_log_q = flowserve_scores(x, x_eval, seed, robust=robust, epochs=epochs)
        kl = float(np.mean(log_p + neg_log_q)) / 3
        out[label] = {"kl_per_dim": kl, "seconds": time.perf_counter() - t0}
        log(f"known density, {label}: KL/D = {kl:.4f} nats ({time.perf_counter() - t0:.0f} s)")
    return out


# -- the command line -----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.anomaly", description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default=",".join(SETS), help=f"comma-separated sets (default: all of {list(SETS)})")
    p.add_argument("--seeds", type=int, default=10, help="seeds per set (default 10)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed (default 0): seeds first..first+seeds-1, e.g. 10 for a draw the defaults were not chosen on")
    p.add_argument("--with-plain", action="store_true",
                   help="also flowserve with plain NLL and the previous default size (flowserve-nll)")
    p.add_argument("--known-density", action="store_true", help="run the known-density KL check instead")
    p.add_argument("--known-rows", type=int, default=30_000, help="rows of the known-density set (default 30,000)")
    p.add_argument("--known-epochs", type=int, help="cap on the known-density fits' epochs (default: the defaults' 200)")
    p.add_argument("--out", default=str(RESULTS),
                   help="folder for anomaly-<date>[-seeds-<first>-<last>].{json,md} (default bench/results)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    args = p.parse_args(argv)

    import torch
    torch.set_num_threads(1)
    stamp = dt.date.today().isoformat()
    meta = {"date": stamp, "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
            "torch": torch.__version__}
    if args.known_density:
        result = {**meta, **known_density(args.known_rows, epochs=args.known_epochs)}
        text = (f"known 3-D density, {result['rows']} rows, epochs {args.known_epochs or 'default'}: KL/D defaults {result['defaults']['kl_per_dim']:.4f}, "
                f"robust {result['robust']['kl_per_dim']:.4f} nats")
        print(text)
        if not args.no_write:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / f"anomaly-known-density-{stamp}.json").write_text(json.dumps(result, indent=2))
        return 0

    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        p.error(f"unknown sets {unknown}; choose from {list(SETS)}")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.first_seed < 0:
        p.error("--first-seed must be >= 0")
    detectors = dict(DETECTORS)
    if args.with_plain:
        detectors["flowserve-nll"] = lambda a, b, s: flowserve_scores(a, b, s, robust=False, default_size=True)
    t0 = time.perf_counter()
    result = {**meta, **run_benchmark(sets, args.seeds, detectors, first_seed=args.first_seed)}
    result["total_seconds"] = time.perf_counter() - t0
    md = table(result)
    command = "python -m bench.anomaly " + " ".join(argv if argv is not None else sys.argv[1:])
    last_seed = args.first_seed + args.seeds - 1
    seeds = f"{args.seeds} seeds" + (f" ({args.first_seed}..{last_seed})" if args.first_seed else "")
    header = (f"AUROC on the 30 % test rows, mean ± sd over {seeds} (rank by mean in brackets); "
              f"`{command.strip()}`, {result['total_seconds']:.0f} s, {meta['date']}")
    print(header)
    print(md)
    if not args.no_write:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"anomaly-{stamp}" + (f"-seeds-{args.first_seed}-{last_seed}" if args.first_seed else "")
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
        (out / f"{stem}.md").write_text(header + "\n\n" + md + "\n")
    return 0
