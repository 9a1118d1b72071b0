"""API keys and the admin key over real HTTP: which endpoints need which key, and what a wrong one gets.

Servers: ``keyed`` (two API keys and an admin key), ``api_only`` (API keys, no admin key),
``admin_only`` (an admin key, no API keys) and the session's ``server`` (no keys at all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest
from flowserve_client import Client, Forbidden, Unauthorized

from service.http.auth import Keys
from service.settings import load_settings
from tests.server import ServerProcess, running_servers


PROBLEM = "application/problem+json"
API_KEYS = ("key-one", "key-two-is-longer")
ADMIN_KEY = "the-admin-key"
OPEN = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")
#: health of the Open Inference Protocol: open like /healthz (its model routes need a key like /v1's)
OPEN_V2 = ("/v2", "/v2/health/live", "/v2/health/ready")
X = [[0.5, 0.25], [1.0, -0.5]]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def servers(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("auth")
    configs = {
        "keyed": dict(api_keys=",".join(API_KEYS), admin_key=ADMIN_KEY),
        "api_only": dict(api_keys=API_KEYS[0], models="moons"),
        "admin_only": dict(admin_key=ADMIN_KEY, models="moons"),
    }
    with running_servers({name: (model_repo, cfg) for name, cfg in configs.items()}, tmp) as procs:
        yield procs


@pytest.fixture(scope="module")
def keyed(servers: dict[str, ServerProcess]) -> Iterator[httpx.Client]:
    with servers["keyed"].client() as c:
        yield c


def _requests(openapi: dict) -> list[tuple[str, str]]:
    """(method, path) of every documented route, with the path parameters filled in."""
    out = []
    for path, methods in openapi["paths"].items():
        concrete = path.replace("{name}", "moons").replace("{version}", "1")
        out.extend((method.upper(), concrete) for method in methods)
    return out


# -- what stays open, what needs a key --------------------------------------------------------------------
def test_health_metrics_and_docs_stay_open(keyed: httpx.Client) -> None:
    for path in OPEN:
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/readyz").json()["status"] == "ready"


def test_every_other_route_needs_a_key(keyed: httpx.Client) -> None:
    routes = _requests(keyed.get("/openapi.json").json())
    paths = {path for _, path in routes}
    assert {"/v1/models", "/v1/models/moons/log_prob", "/v1/models/moons/versions/1/sample",
            "/v1/admin/models/moons/reload"} <= paths
    checked = 0
    for method, path in routes:
        if path in OPEN or path in OPEN_V2:
            continue
        r = keyed.request(method, path, json={"inputs": X})
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer"), (method, path)
        if not path.startswith("/v2"):  # the Open Inference Protocol writes its errors its own way
            assert r.headers["content-type"] == PROBLEM and r.json()["type"].endswith("unauthorized")
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("key", API_KEYS)
def test_each_api_key_opens_every_model_endpoint_group(keyed: httpx.Client, key: str) -> None:
    h = bearer(key)
    assert [m["name"] for m in keyed.get("/v1/models", headers=h).json()["models"]] == ["cond", "moons", "nocal"]
    assert keyed.get("/v1/models/moons", headers=h).json()["version"] == 2
    assert keyed.get("/v1/models/moons/versions", headers=h).status_code == 200
    assert keyed.get("/v1/models/moons/versions/1", headers=h).json()["version"] == 1
    for op, body in (("log_prob", {"inputs": X}), ("inverse", {"inputs": X}), ("forward", {"latents": X}),
                     ("score", {"inputs": X}), ("sample", {"n": 2, "seed": 1})):
        assert keyed.post(f"/v1/models/moons/{op}", json=body, headers=h).status_code == 200, op
        assert keyed.post(f"/v1/models/moons/versions/1/{op}", json=body, headers=h).status_code == 200, op


@pytest.mark.parametrize("authorization", [
    "Bearer key-on",                    # a prefix of a key
    "Bearer key-one2",                  # a key with more after it
    "Bearer KEY-ONE",                   # case matters
    "Bearer key-two-is-longe",          # the other key, one character short
    "Bearer " + "k" * 10_000,           # far longer than any key
    f"Bearer {ADMIN_KEY}",              # the admin key does not open the model endpoints
    "Bearer k\xe9y-one".encode("latin-1"),  # not ASCII
    "Bearer key-one key-two-is-longer",  # two keys are not one
])
def test_wrong_keys_are_403(keyed: httpx.Client, authorization: str | bytes) -> None:
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/models/moons/log_prob")):
        r = keyed.request(method, path, json={"inputs": X}, headers={"authorization": authorization})
        assert r.status_code == 403, (path, r.text)
        assert r.headers["content-type"] == PROBLEM
        problem = r.json()
        assert problem["type"].endswith("forbidden") and "not one of this server's API keys" in problem["detail"]
        assert "key-one" not in r.text  # no key is echoed


@pytest.mark.parametrize("authorization, reason", [
    (None, "no Authorization header"),
    ("", "no Authorization header"),
    ("Bearer", "not 'Bearer <key>'"),
    ("key-one", "not 'Bearer <key>'"),
    ("Basic a2V5LW9uZTo=", "not 'Bearer <key>'"),
    ("Token key-one", "not 'Bearer <key>'"),
])
def test_missing_keys_are_401(keyed: httpx.Client, authorization: str | None, reason: str) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    r = keyed.post("/v1/models/moons/score", json={"inputs": X}, headers=headers)
    assert r.status_code == 401 and r.headers["content-type"] == PROBLEM
    assert r.headers["www-authenticate"] == 'Bearer realm="flowserve"'
    assert reason in r.json()["detail"]


def test_scheme_is_case_insensitive_and_spaces_are_trimmed(keyed: httpx.Client) -> None:
    for authorization in ("bearer key-one", "BEARER key-one", "Bearer   key-one"):
        assert keyed.get("/v1/models", headers={"authorization": authorization}).status_code == 200, authorization


def test_the_key_is_checked_before_anything_else(keyed: httpx.Client) -> None:
    # without a key nothing else is told: not whether the model exists, nor what is wrong with the body
    for path, body in (("/v1/models/nope/log_prob", b'{"inputs": [[1, 2]]}'), ("/v1/models/moons/log_prob", b"{bad"),
                       ("/v1/models/moons/versions/9", b"")):
        r = keyed.post(path, content=body) if body else keyed.get(path)
        assert r.status_code == 401, path
        r = keyed.post(path, content=body, headers=bearer("wrong")) if body else keyed.get(path, headers=bearer("x"))
        assert r.status_code == 403, path
    r = keyed.post("/v1/models/nope/log_prob", json={"inputs": X}, headers=bearer(API_KEYS[0]))
    assert r.status_code == 404


# -- administration --------------------------------------------------------------------------------------------
def test_admin_needs_the_admin_key(keyed: httpx.Client) -> None:
    path = "/v1/admin/models/moons/reload"
    r = keyed.post(path)
    assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="flowserve-admin"'
    for token in (*API_KEYS, "the-admin-ke", ADMIN_KEY + "x", ADMIN_KEY.upper()):
        r = keyed.post(path, headers=bearer(token))
        assert r.status_code == 403 and r.headers["content-type"] == PROBLEM, token
        assert "not this server's admin key" in r.json()["detail"]
    r = keyed.post(path, headers=bearer(ADMIN_KEY))
    assert r.status_code == 200 and r.json()["versions"] == [1, 2] and r.json()["action"] == "reloaded"
    for action in ("load", "unload", "reload"):
        assert keyed.post(f"/v1/admin/models/nocal/{action}").status_code == 401
    # the admin routes only take the admin key; the model routes only API keys
    assert keyed.get("/v1/models", headers=bearer(ADMIN_KEY)).status_code == 403


@pytest.mark.parametrize("authorization", [None, f"Bearer {ADMIN_KEY}", f"Bearer {API_KEYS[0]}", "Bearer"])
def test_admin_is_disabled_without_an_admin_key(servers: dict[str, ServerProcess], client: httpx.Client,
                                                authorization: str | None) -> None:
    headers = {} if authorization is None else {"authorization": authorization}
    with servers["api_only"].client() as api_only:
        for c in (api_only, client):  # API keys only, and no keys at all
            for action in ("load", "unload", "reload"):
                r = c.post(f"/v1/admin/models/moons/{action}", headers=headers)
                assert r.status_code == 403 and r.headers["content-type"] == PROBLEM
                problem = r.json()
                assert problem["type"].endswith("admin-disabled") and "FLOWSERVE_ADMIN_KEY" in problem["detail"]
        assert api_only.get("/v1/models", headers=bearer(API_KEYS[0])).status_code == 200
    assert client.get("/v1/models/moons/versions").status_code == 200  # still serving


def test_admin_key_alone_leaves_the_model_endpoints_open(servers: dict[str, ServerProcess]) -> None:
    with servers["admin_only"].client() as c:
        assert c.post("/v1/models/moons/log_prob", json={"inputs": X}).status_code == 200
        assert c.post("/v1/models/moons/log_prob", json={"inputs": X}, headers=bearer("anything")).status_code == 200
        assert c.post("/v1/admin/models/moons/reload").status_code == 401
        assert c.post("/v1/admin/models/moons/reload", headers=bearer("anything")).status_code == 403
        assert c.post("/v1/admin/models/moons/reload", headers=bearer(ADMIN_KEY)).status_code == 200


# -- clients and documentation ------------------------------------------------------------------------------
def test_python_client_sends_its_key(servers: dict[str, ServerProcess]) -> None:
    url = servers["keyed"].url
    with Client(url, api_key=API_KEYS[1]) as fs:
        assert fs.log_prob("moons", X).shape == (2,)
        assert fs.card("moons")["name"] == "moons"
    with Client(url, retries=0) as anonymous, pytest.raises(Unauthorized) as e:
        anonymous.models()
    assert e.value.status == 401
    with Client(url, api_key="nope", retries=0) as wrong, pytest.raises(Forbidden):
        wrong.log_prob("moons", X)


def test_openapi_documents_the_bearer_schemes(keyed: httpx.Client) -> None:
    doc = keyed.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["APIKey"] == {"type": "http", "scheme": "bearer", "description": schemes["APIKey"]["description"]}
    assert schemes["AdminKey"]["scheme"] == "bearer"
    assert doc["paths"]["/v1/models/{name}/log_prob"]["post"]["security"] == [{"APIKey": []}]
    assert doc["paths"]["/v1/admin/models/{name}/reload"]["post"]["security"] == [{"AdminKey": []}]
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_empty_admin_key_means_none(tmp_path: Path) -> None:
    assert Keys.from_settings(load_settings(model_dir=str(tmp_path), admin_key="  ")).admin is None
    keys = Keys.from_settings(load_settings(model_dir=str(tmp_path), api_keys="a,b", admin_key="c"))
    assert len(keys.api) == 2 and keys.admin is not None
    assert all(len(d) == 32 for d in (*keys.api, keys.admin))  # only SHA-256 digests are kept
