"""The OpenAPI document is true to the server (issue 9, item 8).

Two real servers on the default models (``models/``: moons, digits, digits-cond), one open and one
with ``FLOWSERVE_API_KEYS`` and ``FLOWSERVE_ADMIN_KEY``. Each named correction is checked in the
document *and* against the server's answers; then schemathesis (its ``st run`` CLI, as a
subprocess) generates requests from each server's own document and checks every answer against it.

The schemathesis checks run, and why the others are left out:

- run: ``not_a_server_error``, ``status_code_conformance``, ``content_type_conformance``,
  ``response_headers_conformance``, ``response_schema_conformance``, ``negative_data_rejection``
  (data outside the schema gets a 4xx), ``missing_required_header`` and ``ignored_auth`` (a
  documented key really is required), ``unsupported_method``, ``allow_header_conformance``;
- left out: ``positive_data_acceptance``: data valid for the schema is refused when its rows do not
  have the named model's number of features, or carry context for an unconditional model; the one
  document serves every model, so it cannot state either. ``use_after_free``,
  ``ensure_resource_availability`` and ``object_level_authorization`` are about resources created
  and deleted through the API, and per-object owners; flowserve has neither.

Bounds: the examples and fuzzing phases, at most :data:`MAX_EXAMPLES` generated cases per operation
(31 operations with explain: about 150 cases a server, 300 in all), each request within 30 s, the whole run
within :data:`RUN_TIMEOUT_S`. The hypothesis database is off, reports go to a temporary folder.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from service.http.routes.operations import PARAMS
from service.model.artifact import NAME_PATTERN
from service.serving.table import TABLE
from tests.server import ROOT, ServerProcess, running_servers

#: every operation of the table is routed twice (latest and one version)
OPERATION_ROUTES = 2 * len(TABLE)
#: the document's operations: the operation routes and 19 others (models, health, metrics, admin, /v2)
DOCUMENTED_OPERATIONS = OPERATION_ROUTES + 19

DEFAULT_MODELS = ROOT / "models"
API_KEY = "contract-api-key"
ADMIN_KEY = "contract-admin-key"
MAX_EXAMPLES = 4
RUN_TIMEOUT_S = 240
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "negative_data_rejection",
          "missing_required_header", "ignored_auth", "unsupported_method", "allow_header_conformance"]
METHODS = ("get", "post", "put", "patch", "delete")

pytestmark = pytest.mark.skipif(not (DEFAULT_MODELS / "moons").is_dir(), reason="the default models are not built")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    configs = {"open": (DEFAULT_MODELS, {}),
               "keyed": (DEFAULT_MODELS, {"api_keys": API_KEY, "admin_key": ADMIN_KEY})}
    with running_servers(configs, tmp_path_factory.mktemp("contract")) as procs:
        yield procs


@pytest.fixture(scope="module")
def docs(servers: dict[str, ServerProcess]) -> dict[str, dict[str, Any]]:
    return {name: httpx.get(proc.url + "/openapi.json", timeout=30).json() for name, proc in servers.items()}


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def concrete(path: str, operation: dict[str, Any]) -> str:
    """``path`` with each path parameter replaced by its documented example."""
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            path = path.replace("{" + parameter["name"] + "}", str(parameter["example"]))
    return path


# -- each correction, in the document and on the wire ------------------------------------------------------
def test_keys_documented_exactly_where_they_apply(servers: dict[str, ServerProcess], docs: dict[str, Any]) -> None:
    """Open server: no 401/403 and no scheme on model routes; admin documents only its 403. Keyed
    server: every /v1/models and /v2/models route documents the APIKey scheme, 401 (with
    WWW-Authenticate) and 403, and answers them; admin routes the AdminKey scheme."""
    keyed_routes = 0
    for name, doc in docs.items():
        url = servers[name].url
        for path, method, operation in operations(doc):
            responses = operation["responses"]
            keyed_path = path.startswith(("/v1/models", "/v2/models"))
            admin = path.startswith("/v1/admin")
            with httpx.Client(base_url=url, timeout=60) as client:
                answer = client.request(method.upper(), concrete(path, operation))
            if name == "open" and not admin:
                assert "security" not in operation and not {"401", "403"} & set(responses), (method, path)
                assert answer.status_code not in (401, 403), (method, path, answer.text)
            elif name == "open":
                assert "security" not in operation and "401" not in responses and "403" in responses
                assert answer.status_code == 403 and "admin-disabled" in answer.text
            elif keyed_path or admin:
                keyed_routes += 1
                assert operation["security"] == [{"AdminKey" if admin else "APIKey": []}], (method, path)
                assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
                assert "403" in responses
                assert answer.status_code == 401, (method, path, answer.text)
                assert answer.headers["www-authenticate"].startswith("Bearer")
                with httpx.Client(base_url=url, timeout=60) as client:
                    wrong = client.request(method.upper(), concrete(path, operation),
                                           headers={"Authorization": "Bearer not-a-key"})
                assert wrong.status_code == 403, (method, path, wrong.text)
            else:  # health, metrics, /v2 server routes stay open
                assert "security" not in operation and not {"401", "403"} & set(responses), (method, path)
                assert answer.status_code not in (401, 403), (method, path)
    # 4 model routes, each operation latest and versioned, 3 admin, 4 v2 metadata/ready, 2 v2 infer
    assert keyed_routes == 4 + OPERATION_ROUTES + 3 + 4 + 2
    assert set(docs["keyed"]["components"]["securitySchemes"]) == {"APIKey", "AdminKey"}
    assert "securitySchemes" not in docs["open"]["components"]


def test_rows_have_min_items_and_the_server_refuses_empty_ones(servers: dict[str, ServerProcess],
                                                               docs: dict[str, Any]) -> None:
    schemas = docs["open"]["components"]["schemas"]
    for model, field in (("LogProbRequest", "inputs"), ("InverseRequest", "inputs"), ("ScoreRequest", "inputs"),
                         ("ForwardRequest", "latents")):
        for variant in schemas[model]["properties"][field]["anyOf"]:
            assert variant["minItems"] == 1, (model, variant)
            row = variant["items"]
            assert row.get("minItems") == 1 or row.get("minProperties") == 1, (model, row)
    assert schemas["V2InferRequest"]["properties"]["inputs"]["minItems"] == 1
    with servers["open"].client() as client:
        for op, field in (("log_prob", "inputs"), ("inverse", "inputs"), ("score", "inputs"), ("forward", "latents")):
            empty = client.post(f"/v1/models/moons/{op}", json={field: []})
            assert empty.status_code == 422 and empty.json()["errors"][0]["loc"] == ["body", field], empty.text
            empty_row = client.post(f"/v1/models/moons/{op}", json={field: [[]]})
            assert empty_row.status_code == 400, empty_row.text
        no_inputs = client.post("/v2/models/moons/infer", json={"inputs": []})
        assert no_inputs.status_code == 400 and "non-empty" in no_inputs.json()["error"]


def test_query_parameters_only_where_accepted(servers: dict[str, ServerProcess], docs: dict[str, Any]) -> None:
    """Only sample and score take query parameters (their scalar fields, with a binary or empty
    body); no other operation documents any, and the server refuses one there."""
    documented: dict[str, set[str]] = {}
    for path, method, operation in operations(docs["open"]):
        names = {p["name"] for p in operation.get("parameters", []) if p["in"] == "query"}
        if names:
            documented[f"{method} {path}"] = names
    expected = {}
    for op in ("sample", "score"):
        fields = set(PARAMS[op].model_fields)
        expected[f"post /v1/models/{{name}}/{op}"] = fields
        expected[f"post /v1/models/{{name}}/versions/{{version}}/{op}"] = fields
    assert documented == expected
    with servers["open"].client() as client:
        assert client.post("/v1/models/moons/sample?n=2&seed=1").status_code == 200
        assert client.post("/v1/models/moons/score?alpha=0.5", content=b"").status_code == 422  # inputs missing
        refused = client.post("/v1/models/moons/log_prob?alpha=0.5", json={"inputs": [[0.0, 1.0]]})
        assert refused.status_code == 422 and refused.json()["errors"][0]["loc"] == ["query", "alpha"]


def test_admin_name_pattern(servers: dict[str, ServerProcess], docs: dict[str, Any]) -> None:
    for path, _, operation in operations(docs["keyed"]):
        if path.startswith("/v1/admin/"):
            (name,) = [p for p in operation["parameters"] if p["name"] == "name"]
            assert name["schema"]["pattern"] == NAME_PATTERN.pattern
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with servers["keyed"].client(headers=admin) as client:
        for bad in ("-dash-first", "x" * 65, "a..b", "sp ace"):
            assert not NAME_PATTERN.fullmatch(bad) or ".." in bad
            answer = client.post(f"/v1/admin/models/{bad}/load")
            assert answer.status_code == 400 and answer.json()["errors"][0]["loc"] == ["path", "name"], answer.text
        assert client.post("/v1/admin/models/not-in-the-repository/load").status_code == 404


def test_v2_infer_body_required(servers: dict[str, ServerProcess], docs: dict[str, Any]) -> None:
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        body = docs["open"]["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/V2InferRequest"}
    with servers["open"].client() as client:
        empty = client.post("/v2/models/moons/infer")
        assert empty.status_code == 400 and "error" in empty.json()
        ok = client.post("/v2/models/moons/infer", json=docs["open"]["components"]["schemas"]["V2InferRequest"]
                         ["examples"][0])
        assert ok.status_code == 200 and ok.json()["model_name"] == "moons", ok.text


def test_path_examples_name_a_loaded_model_and_every_body_example_runs(servers: dict[str, ServerProcess],
                                                                       docs: dict[str, Any]) -> None:
    """``{name}`` and ``{version}`` are prefilled with a model the server holds; every named body
    example runs (200) against the model its summary names."""
    with servers["open"].client() as client:
        held = {m["name"]: m["versions"] for m in client.get("/v1/models").json()["models"]}
        ran = 0
        for path, method, operation in operations(docs["open"]):
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] == "name":
                    assert parameter["example"] in held
                if parameter["in"] == "path" and parameter["name"] == "version":
                    assert int(parameter["example"]) in held[next(p["example"] for p in operation["parameters"]
                                                                   if p["name"] == "name")]
            if not path.startswith("/v1/models/"):
                continue
            examples = operation.get("requestBody", {}).get("content", {}).get("application/json", {}).get("examples")
            for example in (examples or {}).values():
                model = example["summary"].split(":")[0]
                url = concrete(path, operation).replace(f"/models/{operation['parameters'][0]['example']}/",
                                                        f"/models/{model}/")
                answer = client.post(url, json=example["value"])
                assert answer.status_code == 200, (url, example, answer.text)
                ran += 1
    assert ran >= 20


# -- schemathesis ---------------------------------------------------------------------------------------
def run_schemathesis(server: ServerProcess, tmp_path: Path, *headers: str) -> str:
    command = [sys.executable, "-m", "schemathesis.cli", "run", server.url + "/openapi.json",
               "--checks", ",".join(CHECKS), "--phases", "examples,fuzzing", "--max-examples", str(MAX_EXAMPLES),
               "--generation-database", "none", "--request-timeout", "30", "--workers", "1", "--no-color",
               "--report", "junit", "--report-dir", str(tmp_path / "report")]
    for header in headers:
        command += ["--header", header]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-8000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) >= 100, output[-3000:]
    assert f"{DOCUMENTED_OPERATIONS} selected / {DOCUMENTED_OPERATIONS} total" in output, output[:2000]
    return output


def test_schemathesis_open_server(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    run_schemathesis(servers["open"], tmp_path)


def test_schemathesis_keyed_server(servers: dict[str, ServerProcess], tmp_path: Path) -> None:
    """With the API key on every request: the model routes answer; admin routes (not this key)
    answer the 403 they document; ``ignored_auth`` checks that leaving the key out is refused."""
    run_schemathesis(servers["keyed"], tmp_path, f"Authorization: Bearer {API_KEY}")
