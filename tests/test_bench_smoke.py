"""The benchmark harness runs end to end: ``python -m bench --quick`` against a tiny model.

It starts real servers (flowserve, flowserve with batching off, the HTTP ceiling), loads them with
the real load generator (wrk when installed, else the Python one) and writes its results. This test
checks the structure of what it wrote, never a speed: speed is the harness's own business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.models import make_tiny

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_results(tmp_path: Path) -> None:
    models = tmp_path / "models"
    make_tiny(models, "tiny")
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--model-dir", str(models), "--models", "tiny", "--no-nsf8",
         "--out", str(out), "--name", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "smoke.json").read_text())
    report = (out / "smoke.md").read_text()

    assert results["mode"] == "quick" and results["models"] == ["tiny"]
    assert results["machine"]["cores"] >= 1 and results["machine"]["torch"]
    assert results["startup"]["models"] == ["tiny"] and results["startup"]["ready_seconds"] > 0
    assert results["limits"]["tiny"]["log_prob"]["rows_per_s"] > 0
    assert results["limits"]["tiny"]["sample"]["rows_per_s"] > 0

    sweep = results["scenarios"]["concurrency"]
    assert {(r["server"], r["concurrency"]) for r in sweep} == {
        (s, c) for s in ("ceiling", "flowserve", "flowserve-nobatch") for c in results["plan"]["concurrencies"]
    }
    for row in sweep:  # every request of the load runs was answered, and answered 2xx
        assert row["requests"] > 0 and row["failed"] == 0, row
        assert row["p50_ms"] <= row["p99_ms"]

    bulk = results["scenarios"]["bulk"] + results["scenarios"]["sample"]
    assert {(r["op"], r["format"]) for r in bulk} == {
        (op, fmt) for op in ("log_prob", "score", "sample") for fmt in ("json", "npy")
    }
    for row in bulk:
        assert "error" not in row, row
        assert row["rows"] == results["plan"]["bulk_rows"] and row["ratio"] > 0

    mixed = results["scenarios"]["mixed"]
    assert {r["op"] for r in mixed} == {"log_prob", "score", "sample", "inverse"}
    assert all(r["requests"] > 0 and r["failed"] == 0 for r in mixed)

    names = [t["name"] for t in results["targets"]]
    assert any("HTTP ceiling" in n for n in names) and any("batching on vs off" in n for n in names)
    assert any("start to ready" in n for n in names) and any("idle RSS" in n for n in names)
    assert all(t["met"] in (True, False) for t in results["targets"])
    assert "| tiny |" in report and "Targets" in report
