"""``python -m bench``: run every scenario once and write ``bench/results/<date>.{json,md,png}``.

The order of a run:

1. start-up: start ``flowserve serve`` on the model repository as users do (all its models, default
   settings) a few times; record start-to-ready and idle resident memory;
2. model limits: each benchmarked model's in-process batched ``log_prob`` and sampling throughput
   (:mod:`bench.limits`), before any load server runs;
3. three servers at once on loopback (an idle one costs nothing): flowserve with default
   settings, flowserve with ``FLOWSERVE_MAX_BATCH_ROWS=1`` (batching off), and the HTTP ceiling
   (:mod:`bench.ceiling`); for each model and concurrency the three are loaded back to back, so each
   ratio compares runs a few seconds apart;
4. bulk scoring and sampling of 100,000 rows, JSON and ``.npy``, on flowserve;
5. a mixed load (log_prob, score, sample, inverse at once) on flowserve;
6. targets (:mod:`bench.targets`), the results JSON, the markdown report and the plot.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import orjson
import torch

from service.settings import default_batch_rows

from . import limits as lim
from .bodies import json_body, npy_body, rows_json
from .loadgen import Request, generator_name
from .machine import machine_info
from .models import make_nsf8
from .report import markdown, plot, summary, update_readme
from .scenarios import JSON, NPY, BulkFailed, bulk, mixed, sweep, warm_up
from .server import ServerProcess, ceiling_argv, flowserve_argv, free_port
from .targets import evaluate

#: the models a complete run benchmarks (besides the harness's own nsf8)
DEFAULT_MODELS = "moons,digits"

__all__ = ["main", "Plan"]

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent
SCENARIOS = ("startup", "concurrency", "bulk", "mixed")


@dataclass
class Plan:
    """How much to run. ``quick`` is a smoke run of a few tens of seconds."""

    concurrencies: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    duration: float = 6.0
    warmup: float = 1.0
    bulk_rows: int = 100_000
    bulk_repeats: int = 3
    limit_repeats: int = 3
    budget_s: float = 6.0  # time for the repeats of one measurement
    request_budget_s: float = 8.0  # a bulk request of a slow model gets fewer rows than bulk_rows past this
    mixed_connections: int = 16
    mixed_duration: float = 8.0
    startup_runs: int = 3
    idle_seconds: float = 3.0

    @classmethod
    def quick(cls) -> "Plan":
        return cls(concurrencies=[1, 16], duration=1.0, warmup=1.0, bulk_rows=2000, bulk_repeats=1,
                   limit_repeats=1, budget_s=2.0, mixed_connections=2, mixed_duration=1.0, startup_runs=1, idle_seconds=0.5)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: short runs, few rows, two concurrencies")
    p.add_argument("--model-dir", type=Path, default=Path("models"), help="the model repository (default: models)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help="comma-separated unconditional models of --model-dir to benchmark (default: moons,digits)")
    p.add_argument("--no-nsf8", dest="nsf8", action="store_false",
                   help="do not make and benchmark the harness's 8-feature NSF")
    p.add_argument("--startup-models", default=None,
                   help="FLOWSERVE_MODELS for the start-up/RSS measurement (default: every model of --model-dir)")
    p.add_argument("--device", default="cpu", help="FLOWSERVE_DEVICE for the servers and the model limits")
    p.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                   help="load generator (auto: wrk when installed, else the Python one)")
    p.add_argument("--concurrency", default=None, help="override the concurrencies, e.g. 1,16,64,256")
    p.add_argument("--duration", type=float, default=None, help="seconds per load run")
    p.add_argument("--rows", type=int, default=None, help="rows of the bulk and sampling requests")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"which parts to run, comma-separated (default: all of {','.join(SCENARIOS)})")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "results", help="where results go")
    p.add_argument("--name", default=None, help="results file stem (default: the date, plus the device if not cpu)")
    p.add_argument("--readme", type=Path, action="append", default=None,
                   help="README whose bench block (between bench markers) gets the report; repeatable "
                        "(default: bench/README.md and README.md of a full run; none for --quick)")
    return p.parse_args(argv)


def _plan(args: argparse.Namespace) -> Plan:
    plan = Plan.quick() if args.quick else Plan()
    if args.concurrency:
        plan.concurrencies = [int(c) for c in args.concurrency.split(",")]
    if args.duration:
        plan.duration = args.duration
    if args.rows:
        plan.bulk_rows = args.rows
    return plan


def _work_models(args: argparse.Namespace, work: Path) -> tuple[Path, list[str]]:
    """A model repository for the load servers: links to the chosen models, plus the harness's NSF."""
    repo = work / "models"
    repo.mkdir()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for name in names:
        src = (args.model_dir / name).resolve()
        if not src.is_dir():
            raise SystemExit(f"bench: no model {name!r} in {args.model_dir} (run `make models` first?)")
        os.symlink(src, repo / name)
    if args.nsf8:
        _log("making the 8-feature NSF (a few seconds of training)")
        make_nsf8(repo, "nsf8")
        names.append("nsf8")
    return repo, names


def _flowserve(name: str, repo: Path, device: str, **env: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(name, flowserve_argv(repo, HOST, port), port,
                         env={"FLOWSERVE_DEVICE": device, **env})


def measure_startup(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    """Start flowserve on the model repository ``plan.startup_runs`` times; ready time and idle RSS."""
    env = {"FLOWSERVE_MODELS": args.startup_models} if args.startup_models else {}
    runs = []
    for _ in range(plan.startup_runs):
        server = _flowserve("startup", args.model_dir, args.device, **env)
        with server:
            time.sleep(plan.idle_seconds)
            runs.append({"ready_seconds": server.ready_seconds, "idle_rss_mb": server.rss_bytes() / 1e6})
            import httpx

            listed = httpx.get(server.url + "/v1/models").json()
            models = sorted({m["name"] for m in listed.get("models", [])})
    return {
        "model_dir": str(args.model_dir),
        "models": models,
        "runs": runs,
        "ready_seconds": statistics.median(r["ready_seconds"] for r in runs),
        "idle_rss_mb": max(r["idle_rss_mb"] for r in runs),
    }


def _rows_within(rows_per_s: float, plan: Plan) -> int:
    """``plan.bulk_rows``, or fewer for a model so slow that one such request would outlast the budget."""
    if rows_per_s * plan.request_budget_s >= plan.bulk_rows:
        return plan.bulk_rows
    return max(min(plan.bulk_rows, 16_384), int(rows_per_s * plan.request_budget_s) // 1000 * 1000)


def _bulk(server: ServerProcess, path: str, body: bytes, content_type: str, accept: str, rows: int, field: str,
          plan: Plan, limit: float, warm_body: bytes, warm_rows: int, **labels: Any) -> dict[str, Any]:
    """:func:`bench.scenarios.bulk` with its ratio to ``limit``; a refused request is recorded, not fatal."""
    try:
        row = bulk(server, path, body, content_type, accept, rows, field, plan.bulk_repeats, plan.budget_s,
                   warm_body, warm_rows, **labels)
    except BulkFailed as e:
        _log(f"bulk {labels} FAILED: {e}")
        return {**labels, "path": path, "rows": rows, "request_bytes": len(body), "response_bytes": 0,
                "seconds": None, "rows_per_s": None, "limit_rows_per_s": limit, "ratio": None, "error": str(e)}
    row.update(limit_rows_per_s=limit, ratio=row["rows_per_s"] / limit)
    _log(f"bulk {' '.join(map(str, labels.values()))}: {row['rows_per_s']:,.0f} rows/s = {row['ratio']:.2f} of the limit")
    return row


def _paths(name: str) -> dict[str, str]:
    base = f"/v1/models/{name}"
    return {op: f"{base}/{op}" for op in ("log_prob", "score", "sample", "inverse", "forward")}


def run(args: argparse.Namespace, results: dict[str, Any],
        checkpoint: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Run every phase, filling ``results`` as it goes (``checkpoint(results)`` after each phase)."""
    plan = _plan(args)
    generator = generator_name(args.generator)
    started = time.perf_counter()
    results.update({
        "schema": 1,
        "complete": False,
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "mode": "quick" if args.quick else "full",
        "device": args.device,
        "command": "python -m bench " + shlex.join(sys.argv[1:]),
        "machine": machine_info(),
        "plan": asdict(plan),
        "generator": generator,
        "settings": {"flowserve": "defaults (no FLOWSERVE_* set) except FLOWSERVE_DEVICE",
                     "flowserve-nobatch": "defaults + FLOWSERVE_MAX_BATCH_ROWS=1"},
        "models": [],
        "scenarios": {"concurrency": [], "bulk": [], "sample": [], "mixed": []},
    })
    _log(f"plan: {asdict(plan)}; load generator: {generator}")
    # servers must not inherit FLOWSERVE_* from the caller: default settings means defaults
    for key in [k for k in os.environ if k.startswith("FLOWSERVE_")]:
        os.environ.pop(key)

    chosen = {name.strip() for name in args.scenarios.split(",") if name.strip()}
    if unknown := chosen - set(SCENARIOS):
        raise SystemExit(f"bench: unknown scenarios {sorted(unknown)}; choose from {list(SCENARIOS)}")
    results["scenarios_run"] = [name for name in SCENARIOS if name in chosen]
    if "startup" in chosen:
        _log("start-up and idle memory")
        results["startup"] = measure_startup(args, plan)
        _log(f"  ready in {results['startup']['ready_seconds']:.2f} s, "
             f"idle RSS {results['startup']['idle_rss_mb']:.0f} MB")
        checkpoint(results)

    with tempfile.TemporaryDirectory(prefix="flowserve-bench-") as tmp, ExitStack() as stack:
        repo, names = _work_models(args, Path(tmp))
        results["models"] = names

        # -- model limits (no server busy) --------------------------------------------------------
        device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else args.device)
        limits: dict[str, Any] = {}
        data: dict[str, np.ndarray] = {}
        rows_for: dict[str, dict[str, int]] = {}
        server_batch_rows = default_batch_rows(device)  # what the flowserve server batches by on it
        results["settings"]["max_batch_rows"] = server_batch_rows
        batch_sizes = [server_batch_rows, plan.bulk_rows]
        thread_counts = [torch.get_num_threads(), 1]  # the server's (torch's default) and one
        for name in names:
            model = lim.load_model(repo, name, device)
            if model.context_features:
                raise SystemExit(f"bench: {name!r} is conditional; benchmark unconditional models only")
            data[name] = lim.realistic_rows(model, plan.bulk_rows)
            if "bulk" not in chosen:
                continue
            _log(f"model limit: {name} ({model.features} features, {model.dtype}, {device})")
            entry: dict[str, Any] = {"features": model.features, "dtype": str(model.dtype).removeprefix("torch.")}
            rows_for[name] = {}
            for op, limit in (("log_prob", lim.encode_limit(model, data[name])),
                              ("sample", lim.decode_limit(model, plan.bulk_rows))):
                n = _rows_within(limit.probe(server_batch_rows), plan)
                entry[op] = limit.measure(n, batch_sizes, thread_counts, plan.limit_repeats, plan.budget_s)
                rows_for[name][op] = n
                _log(f"  {op}: {entry[op]['rows_per_s']:,.0f} rows/s over {n:,} rows ({entry[op]['best']}; "
                     + ", ".join(f"{k} {v:,.0f}" for k, v in entry[op]["rows_per_s_by_config"].items()) + ")")
            limits[name] = entry
            del model
        results["limits"] = limits
        checkpoint(results)

        # -- servers ------------------------------------------------------------------------------
        _log("starting flowserve, flowserve (max_batch_rows=1) and the HTTP ceiling")
        servers = {
            "flowserve": _flowserve("flowserve", repo, args.device),
            "flowserve-nobatch": _flowserve("flowserve-nobatch", repo, args.device, FLOWSERVE_MAX_BATCH_ROWS="1"),
        }
        port = free_port()
        servers["ceiling"] = ServerProcess("ceiling", ceiling_argv(HOST, port), port)
        for server in servers.values():
            stack.enter_context(server)
        results["servers"] = {k: {"argv": s.argv, "ready_seconds": s.ready_seconds,
                                  "rss_mb_after_start": s.rss_bytes() / 1e6} for k, s in servers.items()}

        # -- 1, 2: one-row log_prob sweeps --------------------------------------------------------
        sweep_rows: list[dict] = results["scenarios"]["concurrency"]
        for name in names if "concurrency" in chosen else []:
            body = rows_json(data[name][:1])
            request = Request(_paths(name)["log_prob"], body)
            for kind, server in servers.items():
                warm_up(server, request, plan.warmup, generator)
            for c in plan.concurrencies:
                for kind in ("ceiling", "flowserve", "flowserve-nobatch"):
                    row = sweep(servers[kind], request, [c], plan.duration, generator, model=name, server=kind)[0]
                    sweep_rows.append(row)
                    _log(f"{name} c={c:<3} {kind:<17} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                         f"p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}  server {row['server_cores']:.2f} cores"
                         + (f"  {row['mean_batch_rows']:.1f} rows/batch" if "mean_batch_rows" in row else ""))
        results["scenarios"]["concurrency"] = sweep_rows
        checkpoint(results)

        # -- 3, 4: bulk ---------------------------------------------------------------------------
        fs = servers["flowserve"]
        bulk_rows, sample_rows = results["scenarios"]["bulk"], results["scenarios"]["sample"]
        for name in names if "bulk" in chosen else []:
            n = rows_for[name]["log_prob"]
            warm_n = min(n, 1024)
            x = data[name][:n]
            paths = _paths(name)
            lp_limit = limits[name]["log_prob"]["rows_per_s"]
            for op in ("log_prob", "score"):
                for fmt in ("json", "npy"):
                    encode = rows_json if fmt == "json" else npy_body
                    ctype = JSON if fmt == "json" else NPY
                    row = _bulk(fs, paths[op], encode(x), ctype, ctype, n, "log_prob", plan, lp_limit,
                                encode(x[:warm_n]), warm_n, model=name, op=op, format=fmt)
                    bulk_rows.append(row)
            s_limit = limits[name]["sample"]["rows_per_s"]
            n = rows_for[name]["sample"]
            warm_n = min(n, 1024)
            for fmt in ("json", "npy"):
                accept = NPY if fmt == "npy" else JSON
                row = _bulk(fs, paths["sample"], json_body({"n": n, "seed": 1}), JSON, accept, n, "samples", plan,
                            s_limit, json_body({"n": warm_n, "seed": 1}), warm_n,
                            model=name, op="sample", format=fmt)
                sample_rows.append(row)
        checkpoint(results)

        # -- 5: mixed -----------------------------------------------------------------------------
        if "mixed" in chosen:
            _mixed(fs, names[0], data[names[0]], plan, generator, sweep_rows, results)

    results["complete"] = True
    results["wall_seconds"] = time.perf_counter() - started
    return results


def _mixed(fs: ServerProcess, name: str, x: np.ndarray, plan: Plan, generator: str, sweep_rows: list[dict],
           results: dict[str, Any]) -> None:
    """Scenario 5 on model ``name``: every operation at once, each from its own load generator."""
    paths = _paths(name)
    requests = {
        "log_prob": (Request(paths["log_prob"], rows_json(x[:1])), 1),
        "score": (Request(paths["score"], rows_json(x[:16])), 16),
        "sample": (Request(paths["sample"], json_body({"n": 64, "seed": 3})), 64),
        "inverse": (Request(paths["inverse"], rows_json(x[:4])), 4),
    }
    _log(f"mixed load on {name}: {plan.mixed_connections} connections per operation")
    mixed_rows = mixed(fs, requests, plan.mixed_connections, plan.mixed_duration, generator, model=name)
    total = plan.mixed_connections * len(requests)
    ceiling_at = next((r for r in sweep_rows if r["model"] == name and r["server"] == "ceiling"
                       and r["concurrency"] == total), None)
    for row in mixed_rows:
        row["total_concurrency"] = total
        row["p99_ratio_to_ceiling"] = row["p99_ms"] / ceiling_at["p99_ms"] if ceiling_at else None
        _log(f"  {row['op']:<8} {row['rps']:7.0f} req/s p50 {row['p50_ms']:6.1f} ms p99 {row['p99_ms']:6.1f} ms")
    results["scenarios"]["mixed"] = mixed_rows


def write(results: dict[str, Any], out: Path, stem: str, readmes: list[Path]) -> dict[str, Path]:
    """The JSON, the markdown report, the plot, and the README blocks."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "md": out / f"{stem}.md", "png": out / f"{stem}.png"}
    _write_json(results, paths["json"])
    has_plot = plot(results, paths["png"])
    if not has_plot:
        paths.pop("png")
    paths["md"].write_text(markdown(results, paths["png"].name if has_plot else None), encoding="utf-8")
    for readme in readmes:
        rel = os.path.relpath(out, readme.parent)
        png = f"{rel}/{paths['png'].name}" if has_plot else None
        if readme.resolve().parent == BENCH_DIR:  # the harness's own README: the whole report
            block = markdown(results, png)
        else:
            block = summary(results, png, f"{rel}/{paths['md'].name}")
        if update_readme(readme, block):
            _log(f"updated the bench block of {readme}")
    return paths


def _write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    stem = args.name or (_dt.date.today().isoformat() + ("" if args.device == "cpu" else f"-{args.device}")
                         + ("-quick" if args.quick else ""))
    results: dict[str, Any] = {}

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (e.g. from `timeout`) and SIGINT, even when started in the background, stop the run
    # cleanly: servers are stopped and the partial results written.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    def checkpoint(partial: dict[str, Any]) -> None:
        _write_json({**partial, "targets": evaluate(partial)}, args.out / f"{stem}.json")

    try:
        run(args, results, checkpoint)
    except KeyboardInterrupt:
        _log("interrupted: writing the partial results")
        if results:
            results["targets"] = evaluate(results)
            write(results, args.out, stem, [])
        return 130
    results["targets"] = evaluate(results)
    # only a complete run (every scenario, every default model, not --quick) replaces the READMEs' report
    complete = (not args.quick and results.get("scenarios_run") == list(SCENARIOS)
                and args.models == DEFAULT_MODELS and args.nsf8 and args.concurrency is None)
    readmes = args.readme if args.readme is not None else (
        [BENCH_DIR / "README.md", BENCH_DIR.parent / "README.md"] if complete else [])
    paths = write(results, args.out, stem, readmes)
    for t in results["targets"]:
        verdict = {True: "met", False: "NOT MET", None: "n/a"}[t["met"]]
        fig = "n/a" if t["figure"] is None else f"{t['figure']:.2f}"
        print(f"{verdict:>8}  {fig:>8} {t['op']} {t['threshold']:g}  {t['name']} ({t['detail']})")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
