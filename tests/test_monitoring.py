"""The per-model watch of the inputs (issue 11, item 5): flag counts, log-density histogram, drift.

Unit tests drive :class:`~service.serving.monitoring.ModelMonitor` with seeded samples; the HTTP
tests score rows on a real server over the default ``moons`` model (``models/``) and read
``/metrics`` and the model card.

Why the thresholds hold. Under the hypothesis that the window and the calibration set come from one
continuous distribution, the KS p-value is (asymptotically) uniform on [0, 1]: a fresh
in-distribution window gives p > 0.01 with probability 0.99 for a random seed, and the seeds here
are fixed, so each assertion below either always passes or always fails on a given numpy. A window
of 1,000 rows against ~450 calibration rows (effective size ~310) detects a shift of 0.5 standard
deviations with :math:`D \\approx 0.19` (the distance of two normal CDFs so shifted), i.e.
:math:`\\lambda \\approx 0.19 \\sqrt{310} \\approx 3.4` and p ~ 1e-10, far below the 1e-6 asserted;
moons shifted by +1.5 in both coordinates leave the moons entirely (almost every row is flagged).
"""

from __future__ import annotations

import re
from typing import Iterator

import httpx
import numpy as np
import pytest
import scipy.stats
from prometheus_client import CollectorRegistry, generate_latest

from service.serving.monitoring import (
    MIN_ROWS,
    NOT_ENOUGH_DATA,
    QUANTILE_LEVELS,
    WINDOW_ROWS,
    ModelMonitor,
    MonitorCollector,
    kolmogorov_sf,
    ks_two_sample,
)
from tests.server import ROOT, ServerProcess, start_server

DEFAULT_MODELS = ROOT / "models"


def _calibration(seed: int = 0, m: int = 450) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).standard_normal(m))


def _feed(monitor: ModelMonitor, values: np.ndarray, sizes: tuple[int, ...] = (1, 7, 50, 300)) -> None:
    """Feed ``values`` in requests of cycling sizes (both the few-rows and the vectorised path)."""
    i, k = 0, 0
    while i < values.size:
        n = sizes[k % len(sizes)]
        monitor.observe(values[i:i + n].astype(np.float32))
        i, k = i + n, k + 1


def _exposition(monitor: ModelMonitor) -> str:
    registry = CollectorRegistry()
    registry.register(MonitorCollector([monitor]))
    return generate_latest(registry).decode()


def _samples(text: str, name: str, **labels: str) -> list[float]:
    """Every sample of ``name`` whose labels include ``labels`` (empty when the series is absent)."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                out.append(float(m.group(2)))
    return out


# -- the test's math ------------------------------------------------------------------------------
def test_ks_statistic_and_p_value_agree_with_scipy() -> None:
    rng = np.random.default_rng(3)
    for n, m in ((100, 450), (1000, 450), (1000, 270), (1000, 10_000), (300, 300)):
        for shift in (0.0, 0.1, 0.2, 0.3):
            a = np.sort(rng.standard_normal(n) + shift)
            b = np.sort(rng.standard_normal(m))
            d, p = ks_two_sample(a, b)
            ref = scipy.stats.ks_2samp(a, b, method="asymp")
            assert d == pytest.approx(ref.statistic, abs=1e-12)
            # Stephens' correction vs scipy's exact one-sample law at n_e (module docstring)
            assert abs(p - ref.pvalue) <= 0.02
            if ref.pvalue < 0.01:
                assert p == pytest.approx(ref.pvalue, rel=0.10)
    for lam in (0.2, 0.5, 0.99, 1.0, 1.5, 3.0):  # both branches of the series, against scipy
        assert kolmogorov_sf(lam) == pytest.approx(scipy.stats.kstwobign.sf(lam), rel=1e-9, abs=1e-15)


# -- drift: still on fresh data, moving on shifted data -------------------------------------------
def test_drift_stays_still_on_fresh_in_distribution_data() -> None:
    monitor = ModelMonitor("m", 1, _calibration())
    fresh = np.random.default_rng(11).standard_normal(3 * WINDOW_ROWS)
    p_values = []
    for chunk in np.split(fresh, 6):  # checkpoints every 500 rows as the window rolls
        _feed(monitor, chunk)
        p_values.append(monitor.drift()["p_value"])
    drift = monitor.drift()
    assert drift["status"] == "ok" and drift["window_rows"] == WINDOW_ROWS and drift["rows_seen"] == fresh.size
    assert min(p_values) > 0.01, p_values
    text = _exposition(monitor)
    assert _samples(text, "flowserve_drift_p_value", model="m", version="1") == [pytest.approx(drift["p_value"])]


def test_drift_moves_on_shifted_data() -> None:
    monitor = ModelMonitor("m", 1, _calibration())
    rng = np.random.default_rng(12)
    _feed(monitor, rng.standard_normal(WINDOW_ROWS))
    before = monitor.drift()["p_value"]
    assert before > 0.01
    _feed(monitor, rng.standard_normal(WINDOW_ROWS) + 0.5)  # the whole window shifted by half a sd
    after = monitor.drift()
    assert after["p_value"] < 1e-6 and after["statistic"] > 0.1
    text = _exposition(monitor)
    assert _samples(text, "flowserve_drift_p_value", model="m", version="1") == [pytest.approx(after["p_value"])]
    assert _samples(text, "flowserve_drift_ks", model="m", version="1") == [pytest.approx(after["statistic"])]


def test_window_holds_the_latest_rows_only() -> None:
    cal = _calibration()
    monitor = ModelMonitor("m", 1, cal)
    values = np.random.default_rng(5).standard_normal(2 * WINDOW_ROWS + 345)
    _feed(monitor, values, sizes=(3, 401, 1, 977))
    d, p = ks_two_sample(np.sort(values[-WINDOW_ROWS:]), cal)
    drift = monitor.drift()
    assert drift["statistic"] == pytest.approx(d, abs=1e-12) and drift["p_value"] == pytest.approx(p)
    big = np.random.default_rng(6).standard_normal(5 * WINDOW_ROWS)  # one request larger than the window
    monitor.observe(big)
    d, _ = ks_two_sample(np.sort(big[-WINDOW_ROWS:]), cal)
    assert monitor.drift()["statistic"] == pytest.approx(d, abs=1e-12)


def test_not_enough_data_until_min_rows() -> None:
    monitor = ModelMonitor("m", 2, _calibration())
    monitor.observe(np.zeros(MIN_ROWS - 1))
    drift = monitor.drift()
    assert drift["status"] == NOT_ENOUGH_DATA and drift["p_value"] is None and drift["statistic"] is None
    assert drift["window_rows"] == MIN_ROWS - 1
    text = _exposition(monitor)
    assert _samples(text, "flowserve_drift_p_value") == [] and _samples(text, "flowserve_drift_ks") == []
    assert _samples(text, "flowserve_drift_window_rows", model="m", version="2") == [MIN_ROWS - 1]
    monitor.observe(np.zeros(1))
    assert monitor.drift()["status"] == "ok" and monitor.drift()["window_rows"] == MIN_ROWS


def test_no_calibration_keeps_histogram_without_drift() -> None:
    monitor = ModelMonitor("m", 1, None)
    monitor.observe(np.full(500, -3.0))
    assert monitor.drift()["status"] == "no calibration set" and monitor.drift()["p_value"] is None
    buckets, total = monitor.histogram()
    assert dict(buckets)["-2.0"] == 500 and dict(buckets)["-5.0"] == 0 and total == -1500.0


# -- histogram and counters -----------------------------------------------------------------------
def test_histogram_buckets_are_calibration_quantiles_and_both_paths_agree() -> None:
    cal = _calibration()
    values = np.random.default_rng(8).standard_normal(2000) * 1.3
    values[[3, 500, 1700]] = [np.nan, -np.inf, np.inf]
    one_by_one, bulk = ModelMonitor("m", 1, cal), ModelMonitor("m", 1, cal)
    for v in values:
        one_by_one.observe(np.array([v]))
    bulk.observe(values)
    edges = np.quantile(cal, QUANTILE_LEVELS)
    expected = [float(np.sum(np.where(np.isnan(values), -np.inf, values) <= e)) for e in edges] + [2000.0]
    finite_sum = float(np.sum(values[np.isfinite(values)]))
    for monitor in (one_by_one, bulk):
        buckets, total = monitor.histogram()
        assert [float(le) for le, _ in buckets[:-1]] == pytest.approx(edges.tolist())
        assert [c for _, c in buckets] == expected
        assert total == pytest.approx(finite_sum, rel=1e-12)
    assert one_by_one.drift()["statistic"] == pytest.approx(bulk.drift()["statistic"], abs=1e-12)
    text = _exposition(bulk)
    assert _samples(text, "flowserve_log_prob_count", model="m", version="1") == [2000.0]
    assert _samples(text, "flowserve_log_prob_bucket", model="m", version="1", le="+Inf") == [2000.0]


def test_flag_counts() -> None:
    monitor = ModelMonitor("m", 1, _calibration())
    flags = np.random.default_rng(9).random(777) < 0.1
    monitor.observe(np.zeros(700), flags[:700])
    for i in range(700, 777):
        monitor.observe(np.zeros(1), flags[i:i + 1])
    monitor.observe(np.zeros(50))  # log_prob: counted in the histogram, not in the flag counts
    assert (monitor.flagged, monitor.not_flagged) == (int(flags.sum()), 777 - int(flags.sum()))
    text = _exposition(monitor)
    assert _samples(text, "flowserve_anomaly_rows_total", model="m", flagged="true") == [flags.sum()]
    assert _samples(text, "flowserve_anomaly_rows_total", model="m", flagged="false") == [777 - flags.sum()]
    assert _samples(text, "flowserve_log_prob_count", model="m") == [827.0]


# -- over HTTP, on the default moons model --------------------------------------------------------
@pytest.fixture(scope="module")
def moons_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(DEFAULT_MODELS, tmp_path_factory.mktemp("monitoring"), models="moons") as proc:
        yield proc


def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.08, random_state=seed)  # as the default model's data
    return x


def _score_all(client: httpx.Client, rows: np.ndarray, per_request: int = 100) -> int:
    """Score ``rows`` in requests of ``per_request`` rows; the number the answers flagged."""
    flagged = 0
    for i in range(0, len(rows), per_request):
        r = client.post("/v1/models/moons/score", json={"inputs": rows[i:i + per_request].tolist()})
        assert r.status_code == 200, r.text
        flagged += sum(r.json()["is_anomaly"])
    return flagged


def _metrics(server: ServerProcess) -> str:
    return httpx.get(server.url + "/metrics", timeout=10.0).text


def _one(text: str, name: str, **labels: str) -> float:
    found = _samples(text, name, model="moons", version="1", **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_http_drift_stays_still_on_fresh_moons(moons_server: ServerProcess) -> None:
    with moons_server.client() as client:
        card = client.get("/v1/models/moons").json()["drift"]
        assert {"status", "statistic", "p_value", "window_rows", "window", "min_rows", "since"} <= set(card)
        before = _metrics(moons_server)
        flagged_before = sum(_samples(before, "flowserve_anomaly_rows_total", model="moons", flagged="true"))
        rows_before = sum(_samples(before, "flowserve_anomaly_rows_total", model="moons"))
        count_before = sum(_samples(before, "flowserve_log_prob_count", model="moons"))
        fresh = _moons(WINDOW_ROWS, seed=2024)  # the model was trained on seed 0
        flagged = _score_all(client, fresh)
        r = client.post("/v1/models/moons/log_prob", json={"inputs": _moons(10, seed=7).tolist()})
        assert r.status_code == 200
        after = _metrics(moons_server)
        assert _one(after, "flowserve_anomaly_rows_total", flagged="true") - flagged_before == flagged
        assert _one(after, "flowserve_anomaly_rows_total", flagged="false") + _one(
            after, "flowserve_anomaly_rows_total", flagged="true") - rows_before == WINDOW_ROWS
        assert _one(after, "flowserve_log_prob_count") - count_before == WINDOW_ROWS + 10
        assert _one(after, "flowserve_drift_window_rows") == WINDOW_ROWS
        p_value = _one(after, "flowserve_drift_p_value")
        assert p_value > 0.01, p_value
        card = client.get("/v1/models/moons").json()["drift"]
        assert card["status"] == "ok" and card["window_rows"] == WINDOW_ROWS
        assert card["p_value"] == pytest.approx(p_value) and card["since"] is not None


def test_http_drift_moves_on_shifted_moons(moons_server: ServerProcess) -> None:
    with moons_server.client() as client:
        before = _metrics(moons_server)
        flagged_before = sum(_samples(before, "flowserve_anomaly_rows_total", model="moons", flagged="true"))
        shifted = _moons(WINDOW_ROWS, seed=2025) + 1.5
        flagged = _score_all(client, shifted)
        assert flagged > WINDOW_ROWS // 2  # the rows left the moons: most are flagged
        after = _metrics(moons_server)
        assert _one(after, "flowserve_anomaly_rows_total", flagged="true") - flagged_before == flagged
        p_value = _one(after, "flowserve_drift_p_value")
        assert p_value < 1e-6, p_value
        assert _one(after, "flowserve_drift_ks") > 0.5
        card = client.get("/v1/models/moons").json()["drift"]
        assert card["status"] == "ok" and card["p_value"] == pytest.approx(p_value)


def test_each_app_exposes_only_the_models_it_serves() -> None:
    from service.model.repository import ModelRepository
    from service.serving.metrics import Metrics
    from service.serving.monitoring import observe
    from service.serving.registry import ModelRegistry

    apps = []
    for _ in range(2):
        registry = ModelRegistry(ModelRepository(DEFAULT_MODELS), "cpu", ["moons"], trace=False, cuda_graphs=False)
        registry.plan()
        registry.load_all()
        metrics = Metrics(CollectorRegistry())
        metrics.monitors.watch(registry)
        apps.append((metrics, registry))
    (ma, ra), (mb, rb) = apps
    assert _one(ma.render().decode(), "flowserve_anomaly_rows_total", flagged="true") == 0  # series from the start
    observe(ra.get("moons"), np.zeros(5), np.ones(5, bool))
    assert _one(ma.render().decode(), "flowserve_anomaly_rows_total", flagged="true") == 5
    assert _one(mb.render().decode(), "flowserve_anomaly_rows_total", flagged="true") == 0
    assert _one(ma.render().decode(), "flowserve_log_prob_count") == 5
