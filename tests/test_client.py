"""``flowserve_client`` (clients/python): every method of :class:`Client` and :class:`AsyncClient` against a real server
(the session's :mod:`tests.conftest`), typed errors with the server's problem details, the
binary-body path, and the retry policy (the one place with a stand-in transport: a server that
answers 503 on demand, with ``Retry-After``, and a recorder in place of the sleep)."""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from flowserve_client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    NotFound,
    ServiceUnavailable,
    UnprocessableEntity,
    records,
)
from flowserve_client import aio as async_module
from flowserve_client import client as sync_module

from service.serving.inprocess import LocalModel
from tests.server import ServerProcess, free_port
from tests.tolerance import assert_batch_invariant


X = np.array([[0.5, 0.25], [1.0, -0.5], [-0.8, 0.6], [0.0, 0.3], [4.0, 4.0]])
CTX = np.eye(3)[[0, 1, 2, 0, 1]]


@pytest.fixture(scope="module")
def fs(server: ServerProcess) -> Client:
    with Client(server.url) as c:
        yield c


def manifest(repo: Path, name: str, version: int) -> dict[str, Any]:
    return json.loads((repo / name / str(version) / "model.json").read_text())


# -- metadata --------------------------------------------------------------------------------------------
def test_models_and_cards(fs: Client, model_repo: Path) -> None:
    models = {m["name"]: m for m in fs.models()}
    assert set(models) == {"moons", "cond", "nocal"}
    assert models["moons"]["version"] == 2 and models["moons"]["versions"] == [1, 2]
    card = fs.card("moons")
    assert card["version"] == 2 and card["feature_names"] == ["x0", "x1"]
    assert card["sha256"] == manifest(model_repo, "moons", 2)["weights"]["sha256"]
    assert fs.card("moons", version=1)["sha256"] == manifest(model_repo, "moons", 1)["weights"]["sha256"]


# -- operations ------------------------------------------------------------------------------------------
def test_log_prob_rows_records_and_versions(fs: Client, model_repo: Path) -> None:
    lp = fs.log_prob("moons", X)
    assert isinstance(lp, np.ndarray) and lp.shape == (5,) and lp.dtype == np.float64
    np.testing.assert_array_equal(fs.log_prob("moons", X.tolist()), lp)
    by_name = records(X, fs.card("moons")["feature_names"])
    assert by_name[0] == {"x0": 0.5, "x1": 0.25}
    np.testing.assert_array_equal(fs.log_prob("moons", by_name), lp)
    # version selection: the default is the latest; version 1 is another model
    np.testing.assert_array_equal(fs.log_prob("moons", X, version=2), lp)
    v1 = fs.log_prob("moons", X, version=1)
    assert np.abs(v1 - lp).max() > 1e-3
    for version, values in ((1, v1), (2, lp)):
        assert_batch_invariant(values, LocalModel.load(model_repo, "moons", version).log_prob(X), np.float32)


def test_inverse_and_forward(fs: Client) -> None:
    inv = fs.inverse("moons", X)
    assert inv["model"] == "moons" and inv["version"] == 2 and inv["latents"].shape == (5, 2)
    np.testing.assert_allclose(inv["log_prob"], inv["base_log_prob"] + inv["log_det"], rtol=1e-5, atol=1e-5)
    fwd = fs.forward("moons", inv["latents"])
    np.testing.assert_allclose(fwd["outputs"], X, atol=1e-4)
    np.testing.assert_allclose(fwd["log_prob"], inv["log_prob"], rtol=1e-4, atol=1e-4)


def test_sample(fs: Client) -> None:
    a = fs.sample("moons", 50, seed=4)
    assert isinstance(a, np.ndarray) and a.shape == (50, 2)
    full = fs.sample("moons", 50, seed=4, temperature=1.0, return_log_prob=True, return_latents=True)
    np.testing.assert_array_equal(full["samples"], a)
    assert full["seed"] == 4 and full["latents"].shape == (50, 2)
    np.testing.assert_allclose(full["log_prob"], fs.log_prob("moons", a), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fs.forward("moons", full["latents"])["outputs"], a, rtol=1e-6)
    assert np.abs(fs.sample("moons", 50, seed=5) - a).max() > 1e-3


def test_score(fs: Client, model_repo: Path) -> None:
    out = fs.score("moons", X, alpha=0.05)
    cal = np.sort(manifest(model_repo, "moons", 2)["calibration"])
    expected = (1 + np.searchsorted(cal, out["log_prob"], side="right")) / (cal.size + 1)
    np.testing.assert_array_equal(out["p_value"], expected)
    np.testing.assert_array_equal(out["score"], -out["log_prob"])
    assert out["is_anomaly"].dtype == np.bool_
    np.testing.assert_array_equal(out["is_anomaly"], expected <= 0.05)
    assert out["is_anomaly"][-1] and out["threshold"]["alpha"] == 0.05
    assert fs.score("moons", X)["threshold"]["alpha"] == 0.01  # the model's default


def test_conditional_rows_and_records(fs: Client, model_repo: Path) -> None:
    lp = fs.log_prob("cond", X, context=CTX)
    ctx_records = records(CTX, ["c0", "c1", "c2"])
    np.testing.assert_array_equal(fs.log_prob("cond", records(X, ["x0", "x1"]), context=ctx_records), lp)
    assert_batch_invariant(lp, LocalModel.load(model_repo, "cond").log_prob(X, CTX), np.float32)
    inv = fs.inverse("cond", X, context=CTX)
    np.testing.assert_allclose(fs.forward("cond", inv["latents"], context=CTX)["outputs"], X, atol=1e-4)
    # one context row for every sample: a list of numbers or one record
    a = fs.sample("cond", 20, seed=2, context=[0, 1, 0])
    b = fs.sample("cond", 20, seed=2, context={"c0": 0, "c1": 1, "c2": 0})
    c = fs.sample("cond", 20, seed=2, context=np.repeat([[0.0, 1.0, 0.0]], 20, axis=0))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert fs.score("cond", X, context=CTX)["p_value"].shape == (5,)


# -- errors ------------------------------------------------------------------------------------------------
def test_typed_errors_carry_problem_details(fs: Client) -> None:
    with pytest.raises(NotFound) as e:
        fs.log_prob("nope", X)
    assert e.value.status == 404 and e.value.problem["type"].endswith("model-not-found")
    assert "nope" in e.value.detail and e.value.problem["status"] == 404
    with pytest.raises(NotFound) as e:
        fs.card("moons", version=9)
    assert "9" in e.value.detail

    with pytest.raises(BadRequest) as e:
        fs.log_prob("moons", [{"x0": 1.0, "y": 2.0}])
    locs = [err["loc"] for err in e.value.errors]
    assert ["body", "inputs", 0, "y"] in locs and ["body", "inputs", 0, "x1"] in locs
    assert "'y'" in e.value.detail
    with pytest.raises(BadRequest) as e:
        fs.log_prob("moons", np.zeros((2, 3)))
    assert "2 features" in e.value.detail
    with pytest.raises(BadRequest) as e:
        fs.log_prob("cond", X)
    assert "context" in e.value.detail
    with pytest.raises(UnprocessableEntity) as e:
        fs.sample("moons", 0)
    assert e.value.errors and e.value.errors[0]["loc"][-1] == "n"
    with pytest.raises(UnprocessableEntity):
        fs.score("moons", X, alpha=1.5)
    with pytest.raises(Conflict) as e:
        fs.score("nocal", X)
    assert "calibration" in e.value.detail


# -- binary bodies -------------------------------------------------------------------------------------
def test_large_requests_binary_or_json_fallback(server: ServerProcess, fs: Client) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 2))
    expected = fs.log_prob("moons", x)  # 1200 values: JSON at the default threshold
    buf = io.BytesIO()
    np.save(buf, x)
    takes_npy = httpx.post(server.url + "/v1/models/moons/log_prob", content=buf.getvalue(),
                           headers={"content-type": "application/x-npy"}).status_code != 415
    with Client(server.url, binary_threshold=1000) as small:
        # n > threshold: asks for an .npz answer (and takes JSON from a server that only has JSON)
        np.testing.assert_allclose(small.sample("moons", 1500, seed=3), fs.sample("moons", 1500, seed=3), rtol=1e-6)
        np.testing.assert_allclose(small.log_prob("moons", x), expected, rtol=1e-6)
        inv = small.inverse("moons", x)
        np.testing.assert_allclose(inv["log_prob"], expected, rtol=1e-6)
        # a server without .npy bodies answers 415 once; the client then sends JSON from there on
        assert (small.binary_threshold == 1000) is takes_npy


# -- retries -----------------------------------------------------------------------------------------------
class Flaky:
    """A stand-in server: answers 503 (with the given ``Retry-After`` values) before one good answer."""

    def __init__(self, retry_after: list[str | None], final: httpx.Response | None = None) -> None:
        self.retry_after = list(retry_after)
        self.final = final or httpx.Response(200, json={"model": "m", "version": 1, "log_prob": [-1.5]})
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.retry_after:
            after = self.retry_after.pop(0)
            headers = {"retry-after": after} if after is not None else {}
            return httpx.Response(503, headers=headers, json={"type": "urn:flowserve:problem:queue-full",
                                                              "title": "Service Unavailable", "status": 503,
                                                              "detail": "queue full"})
        return self.final


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The delays the client waits, recorded instead of slept."""
    waited: list[float] = []

    async def fake_async_sleep(seconds: float) -> None:
        waited.append(seconds)

    monkeypatch.setattr(sync_module.time, "sleep", waited.append)
    monkeypatch.setattr(async_module.asyncio, "sleep", fake_async_sleep)
    return waited


def test_retry_honours_retry_after(sleeps: list[float]) -> None:
    in_a_while = email.utils.formatdate(time.time() + 30, usegmt=True)
    flaky = Flaky(["2", in_a_while, None])
    with Client("http://flowserve.test", transport=httpx.MockTransport(flaky), retries=3) as c:
        np.testing.assert_array_equal(c.log_prob("m", [[0.0, 1.0]]), [-1.5])
    assert len(flaky.requests) == 4
    assert sleeps[0] == 2.0
    assert sleeps[1] == 10.0  # an HTTP date 30 s ahead, capped at the policy's max_delay
    assert 0.4 <= sleeps[2] <= 0.8  # no Retry-After: exponential backoff with jitter (0.2 * 2**2)


def test_retries_end_with_service_unavailable_and_errors_are_not_retried(sleeps: list[float]) -> None:
    flaky = Flaky(["1"] * 10)
    with Client("http://flowserve.test", transport=httpx.MockTransport(flaky), retries=2) as c:
        with pytest.raises(ServiceUnavailable) as e:
            c.models()
    assert len(flaky.requests) == 3 and sleeps == [1.0, 1.0]
    assert e.value.detail == "queue full" and e.value.problem["type"].endswith("queue-full")

    bad = Flaky([], final=httpx.Response(400, json={"title": "Bad Request", "status": 400, "detail": "no"}))
    with Client("http://flowserve.test", transport=httpx.MockTransport(bad)) as c:
        with pytest.raises(BadRequest):
            c.log_prob("m", [[0.0]])
    assert len(bad.requests) == 1


def test_connection_failures_are_retried(sleeps: list[float]) -> None:
    with Client(f"http://127.0.0.1:{free_port()}", retries=2) as c:  # nothing listens there
        with pytest.raises(httpx.ConnectError):
            c.models()
    assert len(sleeps) == 2 and 0.1 <= sleeps[0] <= 0.2 and 0.2 <= sleeps[1] <= 0.4


def test_async_retry_honours_retry_after(sleeps: list[float]) -> None:
    flaky = Flaky(["3"])

    async def go() -> np.ndarray:
        async with AsyncClient("http://flowserve.test", transport=httpx.MockTransport(flaky)) as c:
            return await c.log_prob("m", [[0.0, 1.0]])

    np.testing.assert_array_equal(asyncio.run(go()), [-1.5])
    assert sleeps == [3.0] and len(flaky.requests) == 2


# -- AsyncClient parity ------------------------------------------------------------------------------------
def test_async_client_gives_the_same_answers(server: ServerProcess, fs: Client) -> None:
    async def go() -> dict[str, Any]:
        async with AsyncClient(server.url) as c:
            results = await asyncio.gather(
                c.models(), c.card("moons", version=1), c.log_prob("moons", X, version=1),
                c.inverse("moons", X), c.sample("moons", 30, seed=8, return_log_prob=True),
                c.score("moons", X, alpha=0.05), c.log_prob("cond", X, context=CTX),
            )
            latents = results[3]["latents"]
            fwd = await c.forward("moons", latents)
            try:
                await c.log_prob("nope", X)
            except NotFound as e:
                missing = e
            return {"results": results, "forward": fwd, "missing": missing}

    out = asyncio.run(go())
    models, card, lp1, inv, sample, score, cond = out["results"]
    # the card's drift block is live state (the log-densities scored meanwhile move it): the rest is the model's
    live = ("drift",)
    again = fs.card("moons", version=1)
    assert models == fs.models()
    assert {k: v for k, v in card.items() if k not in live} == {k: v for k, v in again.items() if k not in live}
    assert set(card) == set(again)
    np.testing.assert_array_equal(lp1, fs.log_prob("moons", X, version=1))
    np.testing.assert_allclose(inv["latents"], fs.inverse("moons", X)["latents"], rtol=1e-6)
    np.testing.assert_array_equal(sample["samples"], fs.sample("moons", 30, seed=8))
    np.testing.assert_array_equal(score["p_value"], fs.score("moons", X, alpha=0.05)["p_value"])
    np.testing.assert_array_equal(cond, fs.log_prob("cond", X, context=CTX))
    np.testing.assert_allclose(out["forward"]["outputs"], X, atol=1e-4)
    assert out["missing"].status == 404 and "nope" in out["missing"].detail


# -- the documentation's examples -------------------------------------------------------------------------
DOCS = Path(__file__).resolve().parents[1] / "docs" / "client.md"
DOCS_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def default_like_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Models named and shaped as the default ones (same data, a few seconds of training)."""
    import torch

    from service.training.default_models import DEFAULT_MODELS
    from service.training.run import train_and_save
    from service.training.fit import TrainConfig

    torch.set_num_threads(1)
    repo = tmp_path_factory.mktemp("default-like")
    config = TrainConfig(flow="nsf", transforms=2, hidden_features=[16, 16], epochs=2, batch_size=256, seed=0)
    for name, spec in DEFAULT_MODELS.items():
        train_and_save(spec.data(), name, repo, config, dequantize_data=spec.dequantize, alpha=spec.alpha)
    return repo


@pytest.fixture(scope="module")
def default_like_server(default_like_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    from tests.server import start_server

    with start_server(default_like_repo, tmp_path_factory.mktemp("default-like-server")) as proc:
        yield proc


def test_docs_examples_run(default_like_server: ServerProcess, default_like_repo: Path, tmp_path: Path,
                           monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import re
    import shlex

    from service.cli import main

    text = DOCS.read_text().replace(DOCS_URL, default_like_server.url)
    python = re.findall(r"```python\n(.*?)```", text, re.S)
    shell = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S)
             for line in block.splitlines() if line.startswith("flowserve ")]
    assert len(python) >= 4 and len(shell) >= 8
    for block in python:
        exec(compile(block, str(DOCS), "exec"), {"__name__": "docs_example"})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWSERVE_MODEL_DIR", str(default_like_repo))
    for line in shell:  # the CLI's own code, in this process
        assert main(shlex.split(line, comments=True)[1:]) == 0, line
    assert np.load(tmp_path / "threes.npy").shape == (16, 64)
    assert np.load(tmp_path / "scores.npy")["is_anomaly"].shape == (1000,)
    assert "Traceback" not in capsys.readouterr().err


def test_client_readme_example_runs(default_like_server: ServerProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """clients/python/README.md's example, as a user runs it against `make run` (here: default-like models)."""
    import re

    readme = Path(__file__).resolve().parents[1] / "clients" / "python" / "README.md"
    (block,) = re.findall(r"```python\n(.*?)```", readme.read_text().replace(DOCS_URL, default_like_server.url), re.S)
    exec(compile(block, str(readme), "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "['digits', 'digits-cond', 'moons']"
    assert lines[-1].startswith("404 ") and "no-such-model" in lines[-1]
