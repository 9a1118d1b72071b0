"""The targets of the issue, each a ratio (or an absolute figure) from one results file."""

from __future__ import annotations

from typing import Any

__all__ = ["evaluate", "KINDS", "TARGET_CONCURRENCY"]

TARGET_CONCURRENCY = 64


def _find(rows: list[dict], **match: Any) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


#: the kinds of target, in the order of the issue, with the summary's wording
KINDS: dict[str, str] = {
    "ceiling_rps": "one-row log_prob at c=64: requests/s vs the HTTP ceiling",
    "ceiling_p99": "one-row log_prob at c=64: p99 vs the HTTP ceiling's",
    "batching": "batching on vs off at c=64: requests/s",
    "bulk_npy": "bulk scoring (log_prob, score), .npy: rows/s vs the model limit",
    "bulk_json": "bulk scoring (log_prob, score), JSON: rows/s vs the model limit",
    "sample_npy": "sampling, .npy answer: rows/s vs the model limit",
    "sample_json": "sampling, JSON answer: rows/s vs the model limit",
    "rss": "idle RSS, default models",
    "ready": "start to ready",
}


def _target(kind: str, model: str | None, name: str, figure: float | None, op: str, threshold: float,
            unit: str = "", detail: str = "") -> dict:
    met = None if figure is None else (figure >= threshold if op == ">=" else figure < threshold)
    return {"kind": kind, "model": model, "name": name, "figure": figure, "op": op, "threshold": threshold,
            "unit": unit, "met": met, "detail": detail}


def _bulk_detail(row: dict) -> str:
    if row.get("error"):
        return f"failed: {row['error'][:120]}"
    return f"{row['rows_per_s']:.0f} vs {row['limit_rows_per_s']:.0f} rows/s"


def evaluate(results: dict[str, Any]) -> list[dict]:
    """Every target's figure, threshold and verdict (``met`` is ``None`` where the run lacks it)."""
    out: list[dict] = []
    scenarios = results.get("scenarios", {})
    sweep = scenarios.get("concurrency", [])
    c = TARGET_CONCURRENCY if any(r["concurrency"] == TARGET_CONCURRENCY for r in sweep) else max(
        (r["concurrency"] for r in sweep), default=0)
    for model in results.get("models", []):
        on = _find(sweep, model=model, server="flowserve", concurrency=c)
        ceiling = _find(sweep, model=model, server="ceiling", concurrency=c)
        off = _find(sweep, model=model, server="flowserve-nobatch", concurrency=c)
        if on and ceiling:
            out.append(_target("ceiling_rps", model, f"{model}: one-row log_prob at c={c}, requests/s vs HTTP ceiling",
                               on["rps"] / ceiling["rps"], ">=", 0.5, "x",
                               f"{on['rps']:.0f} vs {ceiling['rps']:.0f} req/s"))
            out.append(_target("ceiling_p99", model, f"{model}: one-row log_prob at c={c}, p99 vs HTTP ceiling's",
                               on["p99_ms"] / ceiling["p99_ms"], "<", 3.0, "x",
                               f"{on['p99_ms']:.1f} vs {ceiling['p99_ms']:.1f} ms"))
        if on and off:
            out.append(_target("batching", model, f"{model}: batching on vs off at c={c}, requests/s",
                               on["rps"] / off["rps"], ">=", 5.0, "x",
                               f"{on['rps']:.0f} vs {off['rps']:.0f} req/s"))
    for row in scenarios.get("bulk", []):
        threshold = 0.7 if row["format"] == "npy" else 0.35
        out.append(_target(f"bulk_{row['format']}", row["model"],
                           f"{row['model']}: bulk {row['op']} {row['rows']} rows, {row['format']}, rows/s vs model limit",
                           row["ratio"], ">=", threshold, "x", _bulk_detail(row)))
    for row in scenarios.get("sample", []):
        out.append(_target(f"sample_{row['format']}", row["model"],
                           f"{row['model']}: sample {row['rows']} rows, {row['format']}, rows/s vs model limit",
                           row["ratio"], ">=", 0.7, "x", _bulk_detail(row)))
    startup = results.get("startup")
    if startup:
        out.append(_target("rss", None, f"idle RSS with the default models {startup['models']}", startup["idle_rss_mb"], "<",
                           600.0, "MB", f"max of {len(startup['runs'])} starts"))
        out.append(_target("ready", None, "start to ready", startup["ready_seconds"], "<", 5.0, "s",
                           f"median of {len(startup['runs'])} starts, process start to first 200 from /readyz"))
    return out
