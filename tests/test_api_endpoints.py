"""Every v1 endpoint over real HTTP, on an unconditional (``moons``) and a conditional (``cond``) model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.server import ServerProcess, metric_value


X = [[0.5, 0.25], [1.0, -0.5], [-0.8, 0.6], [0.0, 0.3]]
CTX = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]


def manifest(repo: Path, name: str, version: int) -> dict:
    return json.loads((repo / name / str(version) / "model.json").read_text())


# -- health, metrics, catalogue ------------------------------------------------------------------------
def test_healthz_and_readyz(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": {"cond": "ready", "moons": "ready", "nocal": "ready"}}


def test_model_list(client: httpx.Client) -> None:
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"moons", "cond", "nocal"}
    moons = models["moons"]
    assert moons == {"name": "moons", "version": 2, "versions": [1, 2], "features": 2, "context_features": 0,
                     "flow": "nsf", "device": "cpu", "ready": True, "state": "ready", "error": None}
    assert models["cond"]["context_features"] == 3 and models["cond"]["flow"] == "maf"


def test_model_card(client: httpx.Client, model_repo: Path) -> None:
    card = client.get("/v1/models/moons").json()
    m = manifest(model_repo, "moons", 2)
    assert card["version"] == 2 and card["versions"] == [1, 2]
    assert card["feature_names"] == ["x0", "x1"] and card["context_names"] == []
    assert card["flow_config"] == m["flow"]
    assert card["base"] == m["base"]
    assert card["training"]["rows"] == 800 and "val_nll" in card["training"] and "val_nll_per_dim" in card["training"]
    assert card["calibration"]["size"] == len(m["calibration"])
    assert card["calibration"]["quantiles"]["0.5"] == pytest.approx(float(np.quantile(m["calibration"], 0.5)))
    assert card["exactness"] == m["exactness"]
    assert card["sha256"] == m["weights"]["sha256"] and card["created_at"] == m["created_at"]
    assert card["anomaly_alpha"] == 0.01
    v1 = client.get("/v1/models/moons/versions/1").json()
    assert v1["version"] == 1 and v1["sha256"] == manifest(model_repo, "moons", 1)["weights"]["sha256"]
    assert client.get("/v1/models/nocal").json()["calibration"] is None
    assert client.get("/v1/models/cond").json()["context_names"] == ["c0", "c1", "c2"]


def test_model_card_calibration_histogram(client: httpx.Client, model_repo: Path) -> None:
    """The card's histogram is numpy's over the manifest's calibration log-densities: every value counted once."""
    hist = client.get("/v1/models/moons").json()["calibration"]["histogram"]
    cal = np.array(manifest(model_repo, "moons", 2)["calibration"])
    counts, edges = np.histogram(cal, bins=len(hist["counts"]))
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and len(hist["counts"]) >= 10
    assert hist["counts"] == counts.tolist() and sum(hist["counts"]) == cal.size
    assert np.allclose(hist["edges"], edges, rtol=0, atol=0)
    assert hist["edges"][0] == cal.min() and hist["edges"][-1] == cal.max()


def test_model_versions(client: httpx.Client, model_repo: Path) -> None:
    body = client.get("/v1/models/moons/versions").json()
    assert body["name"] == "moons" and body["latest"] == 2
    assert [v["version"] for v in body["versions"]] == [1, 2]
    assert body["versions"][0]["sha256"] == manifest(model_repo, "moons", 1)["weights"]["sha256"]


def test_metrics_exposition(client: httpx.Client) -> None:
    client.post("/v1/models/moons/log_prob", json={"inputs": X})
    client.post("/v1/models/moons/log_prob", json={"inputs": [[1.0]]})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in ("flowserve_requests_total", "flowserve_request_duration_seconds_bucket",
                 "flowserve_queue_wait_seconds_bucket", "flowserve_batch_compute_seconds_bucket",
                 "flowserve_batch_rows_bucket", "flowserve_queue_rows", "flowserve_rows_total",
                 "flowserve_requests_in_flight", "flowserve_models_ready"):
        assert f"\n{name}" in text, name
    assert metric_value(text, "flowserve_requests_total", model="moons", operation="log_prob", status="200") >= 1
    assert metric_value(text, "flowserve_requests_total", model="moons", operation="log_prob", status="400") >= 1
    assert metric_value(text, "flowserve_rows_total", model="moons", operation="log_prob") >= len(X)
    assert metric_value(text, "flowserve_models_ready") == 1


# -- operations, unconditional ---------------------------------------------------------------------------
def test_log_prob_rows_and_records_agree(client: httpx.Client) -> None:
    rows = client.post("/v1/models/moons/log_prob", json={"inputs": X}).json()
    records = client.post("/v1/models/moons/log_prob",
                          json={"inputs": [{"x1": b, "x0": a} for a, b in X]}).json()
    assert rows["model"] == "moons" and rows["version"] == 2 and len(rows["log_prob"]) == len(X)
    assert rows["log_prob"] == records["log_prob"]
    v1 = client.post("/v1/models/moons/versions/1/log_prob", json={"inputs": X}).json()
    assert v1["version"] == 1 and v1["log_prob"] != rows["log_prob"]


def test_inverse_decomposition_and_round_trip(client: httpx.Client) -> None:
    inv = client.post("/v1/models/moons/inverse", json={"inputs": X}).json()
    assert set(inv) == {"model", "version", "latents", "log_det", "base_log_prob", "log_prob"}
    lp, base, ld = (np.array(inv[k]) for k in ("log_prob", "base_log_prob", "log_det"))
    np.testing.assert_allclose(lp, base + ld, rtol=1e-5, atol=1e-5)
    z = np.array(inv["latents"])
    np.testing.assert_allclose(base, -0.5 * (z**2).sum(1) - np.log(2 * np.pi), rtol=1e-4, atol=1e-4)
    lp_only = client.post("/v1/models/moons/log_prob", json={"inputs": X}).json()["log_prob"]
    np.testing.assert_allclose(lp, lp_only, rtol=1e-6)
    fwd = client.post("/v1/models/moons/forward", json={"latents": inv["latents"]}).json()
    assert set(fwd) == {"model", "version", "outputs", "log_prob"}
    np.testing.assert_allclose(fwd["outputs"], X, atol=1e-4)
    np.testing.assert_allclose(fwd["log_prob"], lp, rtol=1e-4, atol=1e-4)


def test_sample(client: httpx.Client) -> None:
    a = client.post("/v1/models/moons/sample", json={"n": 7, "seed": 11}).json()
    assert set(a) == {"model", "version", "samples", "seed"} and a["seed"] == 11
    assert np.array(a["samples"]).shape == (7, 2)
    b = client.post("/v1/models/moons/sample",
                    json={"n": 7, "seed": 11, "return_log_prob": True, "return_latents": True}).json()
    assert b["samples"] == a["samples"]
    # the answered log_prob is the model's density at the sample, and the latents decode to it
    lp = client.post("/v1/models/moons/log_prob", json={"inputs": b["samples"]}).json()["log_prob"]
    np.testing.assert_allclose(b["log_prob"], lp, rtol=1e-4, atol=1e-4)
    fwd = client.post("/v1/models/moons/forward", json={"latents": b["latents"]}).json()
    np.testing.assert_allclose(fwd["outputs"], b["samples"], rtol=1e-6)
    cold = client.post("/v1/models/moons/sample",
                       json={"n": 7, "seed": 11, "temperature": 0.5, "return_latents": True}).json()
    np.testing.assert_allclose(np.array(cold["latents"]), 0.5 * np.array(b["latents"]), rtol=1e-6)
    unseeded = client.post("/v1/models/moons/sample", json={"n": 3}).json()
    again = client.post("/v1/models/moons/sample", json={"n": 3, "seed": unseeded["seed"]}).json()
    assert again["samples"] == unseeded["samples"]


def test_score_is_conformal(client: httpx.Client, model_repo: Path) -> None:
    rows = X + [[4.0, 4.0], [-3.0, 3.0]]
    r = client.post("/v1/models/moons/score", json={"inputs": rows}).json()
    assert set(r) == {"model", "version", "log_prob", "score", "p_value", "is_anomaly", "threshold"}
    cal = np.sort(np.array(manifest(model_repo, "moons", 2)["calibration"]))
    lp = np.array(r["log_prob"])
    expected = (1 + np.searchsorted(cal, lp, side="right")) / (cal.size + 1)
    np.testing.assert_array_equal(r["p_value"], expected)
    np.testing.assert_array_equal(r["score"], -lp)
    assert r["threshold"]["alpha"] == 0.01
    assert r["is_anomaly"] == [bool(p <= 0.01) for p in expected]
    assert r["is_anomaly"][-2:] == [True, True] and not any(r["is_anomaly"][:1])
    assert all((l < r["threshold"]["log_prob"]) == a for l, a in zip(lp, r["is_anomaly"]))
    loose = client.post("/v1/models/moons/score", json={"inputs": rows, "alpha": 0.5}).json()
    assert loose["threshold"]["alpha"] == 0.5
    assert loose["is_anomaly"] == [bool(p <= 0.5) for p in expected]


def test_versioned_paths_answer_every_operation(client: httpx.Client) -> None:
    for op, body in (("log_prob", {"inputs": X}), ("inverse", {"inputs": X}), ("forward", {"latents": X}),
                     ("sample", {"n": 2, "seed": 1}), ("score", {"inputs": X})):
        r = client.post(f"/v1/models/moons/versions/1/{op}", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "moons" and r.json()["version"] == 1


def test_non_finite_results_are_null(client: httpx.Client) -> None:
    r = client.post("/v1/models/moons/forward", json={"latents": [[0.0, 0.0], [1e30, 1.0]]})
    assert r.status_code == 200
    body = r.json()  # strict JSON: parses without NaN/Infinity literals
    assert body["log_prob"][0] is not None and body["log_prob"][1] is None
    assert b"NaN" not in r.content and b"Infinity" not in r.content
    r = client.post("/v1/models/moons/log_prob", json={"inputs": [[1e300, -1e300], [0.5, 0.25]]})
    assert r.status_code == 200 and r.json()["log_prob"][1] is not None


# -- operations, conditional -----------------------------------------------------------------------------
def test_conditional_operations(client: httpx.Client) -> None:
    lp = client.post("/v1/models/cond/log_prob", json={"inputs": X, "context": CTX}).json()["log_prob"]
    records = client.post("/v1/models/cond/log_prob", json={
        "inputs": [{"x0": a, "x1": b} for a, b in X],
        "context": [{"c0": c[0], "c1": c[1], "c2": c[2]} for c in CTX],
    }).json()["log_prob"]
    assert lp == records
    # the context matters: the same rows under other labels have other densities
    other = client.post("/v1/models/cond/log_prob", json={"inputs": X, "context": CTX[1:] + CTX[:1]}).json()
    assert other["log_prob"] != lp
    inv = client.post("/v1/models/cond/inverse", json={"inputs": X, "context": CTX}).json()
    np.testing.assert_allclose(inv["log_prob"], np.add(inv["base_log_prob"], inv["log_det"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inv["log_prob"], lp, rtol=1e-6)
    fwd = client.post("/v1/models/cond/forward", json={"latents": inv["latents"], "context": CTX}).json()
    np.testing.assert_allclose(fwd["outputs"], X, atol=1e-4)
    score = client.post("/v1/models/cond/score", json={"inputs": X, "context": CTX}).json()
    assert len(score["p_value"]) == len(X) and all(0 < p <= 1 for p in score["p_value"])


def test_conditional_sample_broadcasts_one_context_row(client: httpx.Client) -> None:
    one = client.post("/v1/models/cond/sample", json={"n": 5, "seed": 4, "context": [[0, 0, 1]]}).json()
    flat = client.post("/v1/models/cond/sample", json={"n": 5, "seed": 4, "context": [0, 0, 1]}).json()
    record = client.post("/v1/models/cond/sample", json={"n": 5, "seed": 4, "context": {"c0": 0, "c1": 0, "c2": 1}})
    full = client.post("/v1/models/cond/sample", json={"n": 5, "seed": 4, "context": [[0, 0, 1]] * 5}).json()
    assert one["samples"] == flat["samples"] == record.json()["samples"] == full["samples"]
    # blob 2 is centred at (0, 2.5): the samples sit near it
    assert np.abs(np.array(one["samples"]).mean(0) - [0.0, 2.5]).max() < 1.5
    mixed = client.post("/v1/models/cond/sample",
                        json={"n": 3, "seed": 4, "context": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]})
    assert mixed.status_code == 200 and len(mixed.json()["samples"]) == 3


def test_docs_document_every_operation(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert client.get("/docs").status_code == 200
    for op in ("log_prob", "inverse", "forward", "sample", "score"):
        for path in (f"/v1/models/{{name}}/{op}", f"/v1/models/{{name}}/versions/{{version}}/{op}"):
            post = doc["paths"][path]["post"]
            media = post["requestBody"]["content"]["application/json"]
            name = media["schema"]["$ref"].rsplit("/", 1)[1]
            props = schemas[name]["properties"]
            assert props and all("description" in p for p in props.values()), (name, props)
            assert media["examples"], path
            for code in ("200", "400", "404", "413", "415", "422", "503", "504"):
                assert code in post["responses"], (path, code)
            # the docs' moons examples in row form work against any 2-feature moons model (the
            # record examples name the default model's features; test_api_default_models runs them)
            for example_name, example in media["examples"].items():
                if example_name.startswith("moons") and "records" not in example_name:
                    r = client.post(f"/v1/models/moons/{op}", json=example["value"])
                    assert r.status_code == 200, (op, example_name, r.text)


def test_a_model_that_fails_to_load_keeps_the_server_unready(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "moons", repo / "moons")
    shutil.copytree(model_repo / "nocal", repo / "broken")
    (repo / "broken" / "1" / "model.json").write_text(
        (repo / "broken" / "1" / "model.json").read_text().replace('"name": "nocal"', '"name": "broken"'))
    with open(repo / "broken" / "1" / "weights.safetensors", "r+b") as f:  # flip bits: the digest no longer fits
        f.seek(-8, 2)
        tail = f.read(8)
        f.seek(-8, 2)
        f.write(bytes(b ^ 0xFF for b in tail))
    proc = ServerProcess(repo, tmp_path / "server.log")
    try:
        with proc.client() as c:
            end = time.monotonic() + 120
            while True:  # wait until loading has finished, one way or the other
                try:
                    states = {m["name"]: m["state"] for m in c.get("/v1/models").json()["models"]}
                    if "loading" not in states.values():
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < end and proc.proc.poll() is None, proc.log()
                time.sleep(0.05)
            assert states == {"moons": "ready", "broken": "failed"}
            r = c.get("/readyz")
            assert r.status_code == 503 and "retry-after" in r.headers
            assert "model 'broken' failed to load" in r.json()["detail"] and "sha256" in r.json()["detail"]
            assert r.json()["models"] == {"broken": "failed", "moons": "ready"}
            entry = next(m for m in c.get("/v1/models").json()["models"] if m["name"] == "broken")
            assert entry["ready"] is False and "sha256" in entry["error"]
            r = c.post("/v1/models/broken/log_prob", json={"inputs": [[0.0, 0.0]]})
            assert r.status_code == 503 and r.json()["type"].endswith(":not-ready")
            assert c.post("/v1/models/moons/log_prob", json={"inputs": [[0.0, 0.0]]}).status_code == 200
    finally:
        proc.terminate()
