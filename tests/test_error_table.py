"""One status table for the domain errors; a ValueError inside serving is a bug (500), not a 400.

Inputs are validated at the edge (the codecs and parameter models), so no request can make
serving raise a ``ValueError``: to see what the API answers when one is raised anyway (a bug),
the operation's math is replaced in-process (``monkeypatch``) by one that raises it, and the app
of :func:`service.http.create_app` (its operation router answers ``/v1``'s operations, FastAPI
``/v2``) is served by uvicorn in a thread of the test process (:func:`tests.server.served_in_process`:
real HTTP, real models, real worker). ``/v2`` answers the same bug 500 in its own shape. The table's rows are checked by the
class each error is, along its MRO.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from service.http import create_app
from service.http.problems import DOMAIN_ANSWERS, domain_problem
from service.serving import operations
from service.serving.batching import ComputeError, DeadlineExceeded, QueueFull, WontFinish, WorkerStopped
from service.serving.errors import FlowserveError, NoCalibration
from service.model.contract import ContractError
from service.settings import load_settings
from tests.server import served_in_process

X = [[0.1, 0.2], [1.0, -0.5]]


@pytest.fixture(scope="module")
def app_client(model_repo: Path) -> Iterator[httpx.Client]:
    app = create_app(load_settings(model_dir=str(model_repo), device="cpu", log_level="warning"))
    with served_in_process(app) as url, httpx.Client(base_url=url, timeout=30.0) as client:
        yield client


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise ValueError("a bug inside serving, not the client's input")


def test_a_value_error_inside_serving_is_a_logged_500(app_client: httpx.Client, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert app_client.post("/v1/models/moons/log_prob", json={"inputs": X}).status_code == 200
    monkeypatch.setattr(operations, "log_prob", _bug)
    with caplog.at_level(logging.ERROR, logger="flowserve.api"):
        r = app_client.post("/v1/models/moons/log_prob", json={"inputs": X})
    assert r.status_code == 500, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["type"] == "urn:flowserve:problem:internal-error"
    assert "a bug inside serving" not in r.text  # the bug's text stays in the log
    assert any("a bug inside serving" in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info)
    # the input is still the client's to get wrong: validated at the edge, a 400 naming the field
    bad = app_client.post("/v1/models/moons/log_prob", json={"inputs": [[0.1, 0.2, 0.3]]})
    assert bad.status_code == 400 and bad.json()["type"].endswith(":invalid-input")


def test_a_value_error_inside_serving_is_a_500_on_v2(app_client: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [0.1, 0.2, 1.0, -0.5]}]}
    assert app_client.post("/v2/models/moons/infer", json=body).status_code == 200
    monkeypatch.setattr(operations, "inverse", _bug)
    r = app_client.post("/v2/models/moons/infer", json=body)
    assert r.status_code == 500 and r.json() == {"error": "the server failed to answer; this is a bug, please report it"}


def test_no_calibration_is_409_on_both_apis(app_client: httpx.Client) -> None:
    r = app_client.post("/v1/models/nocal/score", json={"inputs": X})
    assert r.status_code == 409 and r.json()["type"].endswith(":no-calibration")
    body = {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP64", "data": [0.1, 0.2, 1.0, -0.5]}],
            "outputs": [{"name": "score"}]}
    v2 = app_client.post("/v2/models/nocal/infer", json=body)
    assert v2.status_code == 409 and "no calibration set" in v2.json()["error"]


class _Settings:
    max_queue_rows = 100
    request_timeout_s = 2.5


@pytest.mark.parametrize("exc, status, slug", [
    (QueueFull(3.2), 503, "queue-full"),
    (WontFinish(10, 5.0, 2.0, 1.0), 413, "wont-finish"),
    (WorkerStopped("stopping"), 503, "draining"),
    (DeadlineExceeded(), 504, "deadline-exceeded"),
    (ComputeError("boom"), 500, "compute-failed"),
    (NoCalibration("no set"), 409, "no-calibration"),
])
def test_the_status_table(exc: Exception, status: int, slug: str) -> None:
    problem = domain_problem(exc, _Settings(), _Settings.request_timeout_s)
    assert problem is not None and (problem.status, problem.slug) == (status, slug)
    if status == 503:
        assert int(problem.headers["Retry-After"]) >= 1


def test_the_table_maps_no_generic_error() -> None:
    assert ValueError not in DOMAIN_ANSWERS and Exception not in DOMAIN_ANSWERS
    assert domain_problem(ValueError("x"), _Settings()) is None
    assert domain_problem(ContractError("x"), _Settings()) is None  # a violated precondition: a bug
    assert issubclass(NoCalibration, FlowserveError)
