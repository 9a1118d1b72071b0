"""Bad input gets a clear problem+json 4xx naming what is wrong; nothing a client sends makes a 500."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote

import httpx
import pytest

from tests.server import ServerProcess, start_server


PROBLEM = "application/problem+json"
M = "/v1/models/moons"
C = "/v1/models/cond"

# (name, path, raw body or JSON value, status, text the problem must contain, loc of the first error or None)
CASES: list[tuple[str, str, Any, int, str, list | None]] = [
    ("malformed json", f"{M}/log_prob", b"{bad", 400, "not valid JSON", ["body"]),
    ("NaN literal", f"{M}/log_prob", b'{"inputs": [[NaN, 1]]}', 400, "not valid JSON", ["body"]),
    ("infinite number", f"{M}/log_prob", b'{"inputs": [[1e400, 1]]}', 400, "infinity", ["body"]),
    ("deep nesting", f"{M}/log_prob", b"[" * 2000 + b"]" * 2000, 400, "not valid JSON", ["body"]),
    ("body is an array", f"{M}/log_prob", [[1, 2]], 422, "must be a JSON object", ["body"]),
    ("missing inputs", f"{M}/log_prob", {}, 422, "inputs is required", ["body", "inputs"]),
    ("inputs not a list", f"{M}/log_prob", {"inputs": "abc"}, 422, "list of rows", ["body", "inputs"]),
    ("no rows", f"{M}/log_prob", {"inputs": []}, 422, "at least one row", ["body", "inputs"]),
    ("null value", f"{M}/log_prob", {"inputs": [[0.5, 0.1], [0.5, None]]}, 400, "null is not a number",
     ["body", "inputs", 1, 1]),
    ("ragged rows", f"{M}/log_prob", {"inputs": [[1, 2], [1]]}, 400, "row has 1 values", ["body", "inputs", 1]),
    ("too many features", f"{M}/log_prob", {"inputs": [[1, 2, 3], [4, 5, 6]]}, 400,
     "3 values; the model has 2 features ['x0', 'x1']", ["body", "inputs"]),
    ("too few features", f"{M}/score", {"inputs": [[1], [2]]}, 400, "1 values; the model has 2 features",
     ["body", "inputs"]),
    ("string value", f"{M}/log_prob", {"inputs": [[1, 2], [1, "a"]]}, 422, "expected a number, got string 'a'",
     ["body", "inputs", 1, 1]),
    ("object in a row", f"{M}/inverse", {"inputs": [[1, {"a": 1}]]}, 422, "expected a number, got an object",
     ["body", "inputs", 0, 1]),
    ("rows nested too deep", f"{M}/log_prob", {"inputs": [[[1, 2]]]}, 400, "row has 1 values",
     ["body", "inputs", 0]),
    ("flat list", f"{M}/log_prob", {"inputs": [1, 2]}, 400, "flat list of numbers", ["body", "inputs"]),
    ("unknown feature name", f"{M}/log_prob", {"inputs": [{"x0": 1, "x1": 2, "x2": 3}]}, 400,
     "unknown feature name 'x2'", ["body", "inputs", 0, "x2"]),
    ("missing feature name", f"{M}/log_prob", {"inputs": [{"x0": 1, "x1": 2}, {"x0": 1}]}, 400,
     "missing feature 'x1'", ["body", "inputs", 1, "x1"]),
    ("rows mixed with records", f"{M}/log_prob", {"inputs": [{"x0": 1, "x1": 2}, [1, 2]]}, 422,
     "expected an object keyed by feature name", ["body", "inputs", 1]),
    ("null in a record", f"{M}/log_prob", {"inputs": [{"x0": 1, "x1": None}]}, 400, "null is not a number",
     ["body", "inputs", 0, "x1"]),
    ("context refused", f"{M}/log_prob", {"inputs": [[1, 2]], "context": [[1]]}, 400, "takes no context",
     ["body", "context"]),
    ("context required", f"{C}/log_prob", {"inputs": [[1, 2]]}, 400, "context with 3 values ['c0', 'c1', 'c2']",
     ["body", "context"]),
    ("context width", f"{C}/inverse", {"inputs": [[1, 2]], "context": [[1, 0]]}, 400,
     "2 values; the model has 3 context features", ["body", "context"]),
    ("context rows", f"{C}/log_prob", {"inputs": [[1, 2], [3, 4]], "context": [[1, 0, 0]]}, 400,
     "context has 1 rows; expected 2", ["body", "context"]),
    ("context unknown name", f"{C}/score", {"inputs": [[1, 2]], "context": [{"c0": 1, "c1": 0, "c9": 0}]}, 400,
     "unknown feature name 'c9'", ["body", "context", 0, "c9"]),
    ("context NaN", f"{C}/forward", {"latents": [[1, 2]], "context": [[1, None, 0]]}, 400, "null is not a number",
     ["body", "context", 0, 1]),
    ("sample context rows", f"{C}/sample", {"n": 2, "context": [[1, 0, 0]] * 3}, 400, "expected 1 or 2",
     ["body", "context"]),
    ("sample context missing", f"{C}/sample", {"n": 2}, 400, "is conditional", ["body", "context"]),
    ("n < 1", f"{M}/sample", {"n": 0}, 422, "greater than or equal to 1", ["body", "n"]),
    ("n missing", f"{M}/sample", {"seed": 1}, 422, "Field required", ["body", "n"]),
    ("n a string", f"{M}/sample", {"n": "5"}, 422, "valid integer", ["body", "n"]),
    ("n fractional", f"{M}/sample", {"n": 2.5}, 422, "valid integer", ["body", "n"]),
    ("n a boolean", f"{M}/sample", {"n": True}, 422, "valid integer", ["body", "n"]),
    ("temperature 0", f"{M}/sample", {"n": 2, "temperature": 0}, 422, "greater than 0", ["body", "temperature"]),
    ("temperature < 0", f"{M}/sample", {"n": 2, "temperature": -1.5}, 422, "greater than 0", ["body", "temperature"]),
    ("negative seed", f"{M}/sample", {"n": 2, "seed": -1}, 422, "greater than or equal to 0", ["body", "seed"]),
    ("flag not a boolean", f"{M}/sample", {"n": 2, "return_log_prob": "yes"}, 422, "valid boolean",
     ["body", "return_log_prob"]),
    ("alpha 0", f"{M}/score", {"inputs": [[1, 2]], "alpha": 0}, 422, "greater than 0", ["body", "alpha"]),
    ("alpha 1", f"{M}/score", {"inputs": [[1, 2]], "alpha": 1}, 422, "less than 1", ["body", "alpha"]),
    ("alpha a string", f"{M}/score", {"inputs": [[1, 2]], "alpha": "low"}, 422, "valid number", ["body", "alpha"]),
    ("unknown field", f"{M}/log_prob", {"inputs": [[1, 2]], "inptus": 1}, 422, "unknown field",
     ["body", "inptus"]),
    ("inputs to forward", f"{M}/forward", {"inputs": [[1, 2]]}, 422, "unknown field", ["body", "inputs"]),
    ("no calibration", "/v1/models/nocal/score", {"inputs": [[1, 2]]}, 409, "no calibration set", None),
    ("unknown model", "/v1/models/nope/log_prob", {"inputs": [[1, 2]]}, 404, "no model named 'nope'",
     ["path", "name"]),
    ("unknown version", f"{M}/versions/9/log_prob", {"inputs": [[1, 2]]}, 404, "no version '9'",
     ["path", "version"]),
    ("non-integer version", f"{M}/versions/latest/sample", {"n": 1}, 404, "no version 'latest'",
     ["path", "version"]),
    ("path tricks", "/v1/models/..%2F..%2Fetc/log_prob", {"inputs": [[1, 2]]}, 404, "no route", None),
    ("dots in a name", "/v1/models/..%5Cetc/log_prob", {"inputs": [[1, 2]]}, 404, "no model named", ["path", "name"]),
]


@pytest.mark.parametrize("name, path, body, status, text, loc", CASES, ids=[c[0] for c in CASES])
def test_bad_input(client: httpx.Client, name: str, path: str, body: Any, status: int, text: str,
                   loc: list | None) -> None:
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == status and problem["type"].startswith("urn:flowserve:problem:")
    assert problem["title"] and unquote(problem["instance"]) == unquote(r.request.url.raw_path.decode())
    messages = problem["detail"] + " " + " ".join(e["msg"] for e in problem.get("errors", []))
    assert text in messages, messages
    if loc is not None:
        assert problem["errors"][0]["loc"] == loc


def test_many_bad_rows_are_listed_up_to_a_limit(client: httpx.Client) -> None:
    rows = [[0.1, None]] * 50
    problem = client.post(f"{M}/log_prob", json={"inputs": rows}).json()
    assert problem["status"] == 400 and len(problem["errors"]) == 20
    assert "50 problems in inputs; the first 20 are listed" in problem["detail"]
    assert [e["loc"][2] for e in problem["errors"]] == list(range(20))


def test_extreme_but_finite_inputs_answer(client: httpx.Client) -> None:
    for op, body in (("log_prob", {"inputs": [[1e308, -1e308]]}), ("inverse", {"inputs": [[1e308, 1e-308]]}),
                     ("forward", {"latents": [[1e308, -1e308]]}), ("score", {"inputs": [[-1e308, 1e308]]}),
                     ("sample", {"n": 2, "temperature": 1e300})):
        r = client.post(f"{M}/{op}", json=body)
        assert r.status_code == 200, (op, r.text)


@pytest.mark.parametrize("method, path, status, text", [
    ("GET", f"{M}/log_prob", 405, "use POST"),
    ("PUT", "/v1/models", 405, "GET"),
    ("GET", "/v1/nothing", 404, "no route GET /v1/nothing"),
    ("GET", "/v1/models/nope", 404, "no model named 'nope'"),
    ("GET", "/v1/models/nope/versions", 404, "no model named 'nope'"),
    ("GET", f"{M}/versions/3", 404, "no version '3'"),
])
def test_framework_errors_are_problems(client: httpx.Client, method: str, path: str, status: int, text: str) -> None:
    r = client.request(method, path)
    assert r.status_code == status
    assert r.headers["content-type"] == PROBLEM
    assert text in r.json()["detail"]
    if status == 405:
        assert "allow" in r.headers


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_unsupported_media_type(client: httpx.Client, content_type: str) -> None:
    r = client.post(f"{M}/log_prob", content=b'{"inputs": [[1, 2]]}', headers={"content-type": content_type})
    assert r.status_code == 415 and r.headers["content-type"] == PROBLEM
    assert content_type in r.json()["detail"] and "application/json" in r.json()["detail"]


def test_json_with_charset_and_without_content_type(client: httpx.Client) -> None:
    body = b'{"inputs": [[0.5, 0.25]]}'
    r = client.post(f"{M}/log_prob", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    r = client.post(f"{M}/log_prob", content=body)  # httpx sends no Content-Type for raw bytes
    assert r.status_code == 200


# -- configured limits -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(model_repo, tmp_path_factory.mktemp("limited"), max_body_bytes=4096, max_rows=100,
                        max_samples=100, max_queue_rows=1000) as proc:
        yield proc


def test_body_over_the_limit_by_content_length(limited: ServerProcess) -> None:
    with limited.client() as c:
        r = c.post(f"{M}/log_prob", json={"inputs": [[0.123456789, 0.123456789]] * 200})
    assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
    assert "at most 4096 bytes" in r.json()["detail"]


def test_streamed_body_over_the_limit(limited: ServerProcess) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        yield b'{"inputs": ['
        for _ in range(400):
            yield b"[0.123456789, 0.123456789],"
        yield b"[0, 0]]}"

    with limited.client() as c:
        r = c.post(f"{M}/log_prob", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "more than 4096 bytes" in r.json()["detail"]


def test_rows_and_samples_over_the_limit(limited: ServerProcess) -> None:
    with limited.client() as c:
        r = c.post(f"{M}/log_prob", json={"inputs": [[0, 0]] * 101})
        assert r.status_code == 413 and "at most 100" in r.json()["detail"]
        assert r.json()["errors"][0]["loc"] == ["body", "inputs"]
        r = c.post(f"{M}/forward", json={"latents": [[0, 0]] * 101})
        assert r.status_code == 413
        r = c.post(f"{M}/sample", json={"n": 101})
        assert r.status_code == 413 and "at most 100 samples" in r.json()["detail"]
        assert r.json()["errors"][0]["loc"] == ["body", "n"]
        r = c.post(f"{M}/sample", json={"n": 100, "seed": 0})
        assert r.status_code == 200 and len(r.json()["samples"]) == 100
        r = c.post(f"{M}/log_prob", json={"inputs": [[0, 0]] * 100})
        assert r.status_code == 200
