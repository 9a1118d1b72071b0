"""The Open Inference Protocol (``/v2``) through the unmodified ``tritonclient.http`` client.

Against the real test server: server and model metadata, health, inference with JSON and binary
tensors (Triton's binary tensor data extension) in FP32 and FP64, a conditional model, request
compression, Triton's ``timeout``, and every error as ``{"error": ...}``. Answers are compared with
``/v1``'s for the same rows.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.server import ServerProcess, start_server


X = np.array([[0.5, 0.25], [1.0, -0.5], [-0.8, 0.6], [0.0, 0.3], [2.0, 0.1]])
CTX = np.eye(3)[[0, 1, 2, 0, 1]]
JSON = "application/json"


@pytest.fixture(scope="module")
def tc(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}", network_timeout=60.0)
    try:
        yield c
    finally:
        c.close()


def tensor(name: str, array: np.ndarray, binary: bool = False, datatype: str | None = None) -> triton.InferInput:
    dtype = datatype or {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64"}[array.dtype]
    t = triton.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def wanted(*names: str, binary: bool = False) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(n, binary_data=binary) for n in names]


def v1(client: httpx.Client, path: str, x: np.ndarray, context: np.ndarray | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": x.tolist()}
    if context is not None:
        body["context"] = context.tolist()
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def same(got: np.ndarray, expected: list, rtol: float = 1e-6, atol: float = 0.0) -> None:
    np.testing.assert_allclose(got, np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


# -- server and model metadata, health -----------------------------------------------------------------
def test_server_metadata_and_health(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    meta = tc.get_server_metadata()
    assert meta["name"] == "flowserve" and meta["version"] == client.get("/openapi.json").json()["info"]["version"]
    assert meta["extensions"] == ["binary_tensor_data"]
    assert tc.is_server_live() and tc.is_server_ready()
    # KServe's InferenceRESTClient reads these bodies
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata(tc: triton.InferenceServerClient) -> None:
    plain = [{"name": "log_prob", "datatype": "FP32", "shape": [-1]},
             {"name": "latents", "datatype": "FP32", "shape": [-1, 2]},
             {"name": "log_det", "datatype": "FP32", "shape": [-1]}]
    # models with a calibration set also give the score operation's fields
    outputs = plain + [{"name": "score", "datatype": "FP32", "shape": [-1]},
                       {"name": "p_value", "datatype": "FP64", "shape": [-1]},
                       {"name": "is_anomaly", "datatype": "BOOL", "shape": [-1]},
                       {"name": "threshold", "datatype": "FP64", "shape": [1]}]
    assert tc.get_model_metadata("moons") == {
        "name": "moons", "versions": ["1", "2"], "platform": "flowserve-zuko",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}], "outputs": outputs}
    assert tc.get_model_metadata("moons", model_version="1")["versions"] == ["1"]
    cond = tc.get_model_metadata("cond")
    assert cond["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 2]},
                              {"name": "context", "datatype": "FP32", "shape": [-1, 3]}]
    assert cond["outputs"] == outputs and cond["versions"] == ["1"]
    assert tc.get_model_metadata("nocal")["outputs"] == plain


def test_model_ready(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    assert tc.is_model_ready("moons") and tc.is_model_ready("moons", model_version="1")
    assert tc.is_model_ready("cond") and tc.is_model_ready("moons", "2")
    assert not tc.is_model_ready("nope") and not tc.is_model_ready("moons", model_version="7")
    assert client.get("/v2/models/moons/ready").json() == {"name": "moons", "ready": True}
    r = client.get("/v2/models/nope/ready")
    assert r.status_code == 404 and "no model named 'nope'" in r.json()["error"]


# -- inference, compared with /v1 ----------------------------------------------------------------------
def test_log_prob_as_json_equals_v1(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    x = X.astype(np.float32)
    result = tc.infer("moons", [tensor("x", x)], outputs=wanted("log_prob"), request_id="req-7")
    answer = result.get_response()
    assert answer["id"] == "req-7" and answer["model_name"] == "moons" and answer["model_version"] == "2"
    assert [o["name"] for o in answer["outputs"]] == ["log_prob"]
    assert answer["outputs"][0]["datatype"] == "FP32" and answer["outputs"][0]["shape"] == [5]
    log_prob = result.as_numpy("log_prob")
    assert log_prob.dtype == np.float32 and log_prob.shape == (5,)
    same(log_prob, v1(client, "/v1/models/moons/log_prob", x)["log_prob"])
    assert result.as_numpy("latents") is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("binary_in, binary_out", [(False, False), (True, True), (True, False), (False, True)])
def test_latents_and_log_det_equal_v1(tc: triton.InferenceServerClient, client: httpx.Client, dtype: type,
                                      binary_in: bool, binary_out: bool) -> None:
    x = X.astype(dtype)
    result = tc.infer("moons", [tensor("x", x, binary_in)], outputs=wanted("latents", "log_det", "log_prob",
                                                                          binary=binary_out))
    expected = v1(client, "/v1/models/moons/inverse", x)
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["latents", "log_det", "log_prob"]
    assert all(("parameters" in o) == binary_out and ("data" in o) != binary_out for o in outputs)
    latents = result.as_numpy("latents")
    assert latents.shape == (5, 2) and latents.dtype == np.float32
    same(latents, expected["latents"], atol=1e-6)
    same(result.as_numpy("log_det"), expected["log_det"], atol=1e-6)
    same(result.as_numpy("log_prob"), expected["log_prob"])


SCORE_OUTPUTS = ("log_prob", "score", "p_value", "is_anomaly", "threshold")


def v1_score(client: httpx.Client, x: np.ndarray, context: np.ndarray | None = None, model: str = "moons",
             alpha: float | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": x.tolist()}
    if context is not None:
        body["context"] = context.tolist()
    if alpha is not None:
        body["alpha"] = alpha
    r = client.post(f"/v1/models/{model}/score", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def assert_score_equals_v1(result: triton.InferResult, expected: dict[str, Any]) -> None:
    same(result.as_numpy("log_prob"), expected["log_prob"])
    same(result.as_numpy("score"), expected["score"])
    p_value = result.as_numpy("p_value")
    assert p_value.dtype == np.float64
    np.testing.assert_array_equal(p_value, np.asarray(expected["p_value"]))  # a ratio of counts: exact
    is_anomaly = result.as_numpy("is_anomaly")
    assert is_anomaly.dtype == np.bool_
    np.testing.assert_array_equal(is_anomaly, np.asarray(expected["is_anomaly"]))
    threshold = result.as_numpy("threshold")
    assert threshold.shape == (1,) and threshold.dtype == np.float64
    same(threshold, [expected["threshold"]["log_prob"]])


@pytest.mark.parametrize("binary", [False, True])
def test_score_outputs_equal_v1_score(tc: triton.InferenceServerClient, client: httpx.Client, binary: bool) -> None:
    # one odd row far from the moons, so that at least one row is flagged
    x = np.vstack([X, [[6.0, 6.0]]]).astype(np.float32)
    result = tc.infer("moons", [tensor("x", x, binary)], outputs=wanted(*SCORE_OUTPUTS, binary=binary))
    outputs = result.get_response()["outputs"]
    assert [o["name"] for o in outputs] == list(SCORE_OUTPUTS)
    assert [o["datatype"] for o in outputs] == ["FP32", "FP32", "FP64", "BOOL", "FP64"]
    expected = v1_score(client, x)
    assert any(expected["is_anomaly"]) and not all(expected["is_anomaly"])
    assert_score_equals_v1(result, expected)


def test_score_outputs_at_the_requested_alpha(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    x = np.vstack([X, [[6.0, 6.0]]])
    default = tc.infer("moons", [tensor("x", x)], outputs=wanted("threshold"))
    result = tc.infer("moons", [tensor("x", x)], outputs=wanted(*SCORE_OUTPUTS), parameters={"alpha": 0.5})
    expected = v1_score(client, x, alpha=0.5)
    assert expected["threshold"]["alpha"] == 0.5
    assert_score_equals_v1(result, expected)
    assert result.as_numpy("threshold")[0] > default.as_numpy("threshold")[0]  # a larger alpha flags more
    same(default.as_numpy("threshold"), [v1_score(client, x)["threshold"]["log_prob"]])


def test_score_outputs_with_latents_and_context(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    x = np.random.default_rng(3).normal(size=(5, 2)).astype(np.float32)
    result = tc.infer("cond", [tensor("x", x, True), tensor("context", CTX.astype(np.float32), True)],
                      outputs=wanted("latents", "p_value", "is_anomaly", binary=True))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["latents", "p_value", "is_anomaly"]
    expected = v1_score(client, x, CTX, model="cond")
    np.testing.assert_array_equal(result.as_numpy("p_value"), np.asarray(expected["p_value"]))
    np.testing.assert_array_equal(result.as_numpy("is_anomaly"), np.asarray(expected["is_anomaly"]))
    same(result.as_numpy("latents"), v1(client, "/v1/models/cond/inverse", x, CTX)["latents"], atol=1e-6)


def test_score_outputs_refused(tc: triton.InferenceServerClient) -> None:
    x = tensor("x", X)
    refused(lambda: tc.infer("nocal", [x], outputs=wanted("score")), 409, "has no calibration set")
    refused(lambda: tc.infer("nocal", [x], outputs=wanted("log_prob", "is_anomaly")), 409,
            "output 'is_anomaly': model 'nocal' version 1 has no calibration set")
    for alpha in (0, 1, 1.5, "high", True):
        refused(lambda: tc.infer("moons", [x], outputs=wanted("score"), parameters={"alpha": alpha}), 400,
                "parameters.alpha: Input should be")


def test_no_outputs_named_gives_log_prob_in_binary(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    # tritonclient then sets parameters.binary_data_output: every output comes back binary
    result = tc.infer("moons", [tensor("x", X, binary=True)])
    (output,) = result.get_response()["outputs"]
    assert output["name"] == "log_prob" and output["parameters"] == {"binary_data_size": 5 * 4}
    same(result.as_numpy("log_prob"), v1(client, "/v1/models/moons/log_prob", X)["log_prob"])


def test_versioned_infer_equals_v1(tc: triton.InferenceServerClient, client: httpx.Client) -> None:
    result = tc.infer("moons", [tensor("x", X)], model_version="1", outputs=wanted("log_prob", "latents"))
    assert result.get_response()["model_version"] == "1"
    expected = v1(client, "/v1/models/moons/versions/1/inverse", X)
    same(result.as_numpy("log_prob"), expected["log_prob"])
    same(result.as_numpy("latents"), expected["latents"], atol=1e-6)
    latest = tc.infer("moons", [tensor("x", X)]).as_numpy("log_prob")
    assert not np.allclose(latest, result.as_numpy("log_prob"))  # two different trained versions


@pytest.mark.parametrize("binary", [False, True])
def test_conditional_model_with_context(tc: triton.InferenceServerClient, client: httpx.Client,
                                        binary: bool) -> None:
    inputs = [tensor("x", X.astype(np.float32), binary), tensor("context", CTX.astype(np.float32), binary)]
    result = tc.infer("cond", inputs, outputs=wanted("log_prob", "latents", "log_det", binary=binary))
    expected = v1(client, "/v1/models/cond/inverse", X.astype(np.float32), CTX)
    same(result.as_numpy("log_prob"), expected["log_prob"])
    same(result.as_numpy("latents"), expected["latents"], atol=1e-6)
    same(result.as_numpy("log_det"), expected["log_det"], atol=1e-6)


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests(tc: triton.InferenceServerClient, client: httpx.Client, algorithm: str) -> None:
    result = tc.infer("moons", [tensor("x", X, binary=True)], outputs=wanted("log_prob"),
                      request_compression_algorithm=algorithm)
    same(result.as_numpy("log_prob"), v1(client, "/v1/models/moons/log_prob", X)["log_prob"])


def test_json_data_may_be_nested(client: httpx.Client) -> None:
    body = {"id": "n", "inputs": [{"name": "x", "shape": [5, 2], "datatype": "FP64", "data": X.tolist()}],
            "outputs": [{"name": "log_prob"}]}
    r = client.post("/v2/models/moons/infer", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == JSON
    answer = r.json()
    assert answer["id"] == "n" and answer["outputs"][0]["shape"] == [5]
    same(np.array(answer["outputs"][0]["data"]), v1(client, "/v1/models/moons/log_prob", X)["log_prob"])


def test_infer_is_counted_in_the_metrics(tc: triton.InferenceServerClient, server: ServerProcess) -> None:
    before = server.metric("flowserve_requests_total", operation="v2_infer", model="moons", status="200")
    tc.infer("moons", [tensor("x", X)])
    after = server.metric("flowserve_requests_total", operation="v2_infer", model="moons", status="200")
    assert after == before + 1


# -- errors: {"error": ...} with the protocol's statuses -------------------------------------------------
def refused(call: Any, status: int, text: str) -> None:
    with pytest.raises(InferenceServerException) as caught:
        call()
    assert caught.value.status() == str(status), str(caught.value)
    assert text in caught.value.message(), caught.value.message()


def test_errors_through_tritonclient(tc: triton.InferenceServerClient) -> None:
    x = tensor("x", X)
    refused(lambda: tc.infer("nope", [x]), 404, "no model named 'nope'")
    refused(lambda: tc.get_model_metadata("nope"), 404, "no model named 'nope'")
    refused(lambda: tc.infer("moons", [x], model_version="9"), 404, "no version '9'")
    refused(lambda: tc.get_model_metadata("moons", model_version="x"), 404, "no version 'x'")
    refused(lambda: tc.infer("moons", [tensor("x", np.zeros((5, 3)))]), 400,
            "unexpected shape for input 'x' for model 'moons': expected [-1, 2], got [5, 3]")
    refused(lambda: tc.infer("moons", [tensor("x", np.zeros(2))]), 400, "send one row as [1, 2]")
    refused(lambda: tc.infer("moons", [tensor("x", X.astype(np.int32), datatype="INT32")]), 400,
            "input 'x' has datatype INT32; flowserve models take FP32 or FP64")
    refused(lambda: tc.infer("moons", [x], outputs=wanted("log_prob", "samples")), 400,
            "unexpected inference output 'samples' for model 'moons'")
    refused(lambda: tc.infer("moons", [x, tensor("context", CTX)]), 400,
            "unexpected inference input 'context' for model 'moons'")
    refused(lambda: tc.infer("cond", [x]), 400, "model 'cond' needs input 'context'")
    refused(lambda: tc.infer("cond", [x, tensor("context", CTX[:2])]), 400,
            "input 'context' has 2 rows, but input 'x' has 5")
    refused(lambda: tc.infer("moons", [tensor("x", np.zeros((0, 2)))]), 400, "input 'x' has no rows")
    nan = X.copy()
    nan[3, 1] = np.nan
    refused(lambda: tc.infer("moons", [tensor("x", nan, binary=True)]), 400,
            "input 'x' holds 1 non-finite values (the first at index [3, 1]")
    refused(lambda: tc.infer("moons", [x], outputs=[triton.InferRequestedOutput("log_prob", class_count=2)]), 400,
            "classification is not supported")


def test_deadline_from_the_timeout_parameter(tc: triton.InferenceServerClient) -> None:
    # Triton's timeout is in microseconds: 1 us has passed before the rows can reach the worker
    refused(lambda: tc.infer("moons", [tensor("x", X)], timeout=1), 504, "deadline passed")


def post(client: httpx.Client, body: bytes, headers: dict[str, str] | None = None,
         path: str = "/v2/models/moons/infer") -> httpx.Response:
    return client.post(path, content=body, headers=headers or {})


def binary_request(x: np.ndarray, extra: bytes = b"", size: int | None = None) -> tuple[bytes, dict[str, str]]:
    raw = x.astype(np.float32).tobytes()
    head = orjson.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw) if size is None else size}}]})
    return head + raw + extra, {"Inference-Header-Content-Length": str(len(head))}


def request_json(data: Any, shape: list[int] | None = None, **extra: Any) -> bytes:
    return orjson.dumps({"inputs": [{"name": "x", "shape": shape or [5, 2], "datatype": "FP64", "data": data}],
                         **extra})


@pytest.mark.parametrize("body, headers, status, text", [
    (b"{bad", None, 400, "not valid JSON"),
    (b"[1, 2]", None, 400, "must be a JSON object, got a list"),
    (b"{}", None, 400, "inputs must be a non-empty list"),
    (request_json(X.ravel().tolist()[:7]), None, 400, "has shape [5, 2] (10 values), but its data holds 7 values"),
    (request_json([[0.5, "a"]] * 5), None, 400, "data[0][1] is a string"),
    (request_json([[0.5, None]] * 5), None, 400, "data[0][1] is null"),
    (request_json([[0.5, 1.0]] * 4 + [[1.0]]), None, 400, "nested lists have unequal lengths"),
    (request_json(X.tolist(), outputs=[{"name": "log_prob"}, {"name": "log_prob"}]), None, 400, "requested twice"),
    (request_json(X.tolist(), parameters={"binary_data_output": "yes"}), None, 400, "binary_data_output"),
    (request_json(X.tolist(), shape=[5, -2]), None, 400, "shape must be a list of whole numbers"),
    (request_json(X.tolist(), id=5), None, 400, "id must be a string"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP99", "data": [1, 2]}]}), None, 400,
     "datatype must be one of"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32"}]}), None, 400, "has no data"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                               "parameters": {"shared_memory_region": "r"}}]}), None, 400, "shared memory"),
    (*binary_request(X, extra=b"\0" * 8), 400, "8 bytes of binary data after the JSON that no input claims"),
    (*binary_request(X, size=16), 400, "binary_data_size is 16 bytes, but shape [5, 2] of FP32 needs 40"),
    (binary_request(X)[0], {"Inference-Header-Content-Length": "100000"}, 400, "the body has"),
    (binary_request(X)[0], None, 400, "binary tensors after the JSON needs Inference-Header-Content-Length"),
    (orjson.dumps({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1e300, 0]}]}), None, 400,
     "1e+300 (at index [0, 0]) is beyond the range of FP32"),
    (b'{"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP64", "data": [1e400, 0]}]}', None, 400, ""),
    (request_json(X.tolist()), {"Content-Encoding": "br"}, 415, "Content-Encoding 'br' is not supported"),
    (b"\x1f\x8b\x08garbage", {"Content-Encoding": "gzip"}, 400, "not valid gzip data"),
    (gzip.compress(request_json(X.tolist()))[:-12], {"Content-Encoding": "gzip"}, 400, "truncated"),
])
def test_bad_requests(client: httpx.Client, body: bytes, headers: dict[str, str] | None, status: int,
                      text: str) -> None:
    r = post(client, body, headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == JSON
    assert list(r.json()) == ["error"] and text in r.json()["error"], r.json()


def test_framework_errors_keep_the_protocol_shape(client: httpx.Client) -> None:
    r = client.get("/v2/models/moons/infer")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "use POST" in r.json()["error"]
    r = client.post("/v2")
    assert r.status_code == 405 and r.headers["allow"] == "GET" and r.headers["content-type"] == JSON
    r = client.get("/v2/models/moons/config")
    assert r.status_code == 404 and r.headers["content-type"] == JSON and "no route" in r.json()["error"]
    r = client.get("/v2/repository/index")
    assert r.status_code == 404 and list(r.json()) == ["error"]
    # /v1 keeps problem+json
    assert client.get("/v1/nothing").headers["content-type"] == "application/problem+json"


def test_openapi_documents_the_v2_routes(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/v2/models/{name}/infer" in paths and "/v2/health/ready" in paths
    assert not any("{path}" in p for p in paths)


# -- configured limits and API keys -------------------------------------------------------------------


def key() -> dict[str, str]:
    """A fresh header dict each call: tritonclient adds its own headers to the dict it is given."""
    return {"Authorization": "Bearer key-2"}


@pytest.fixture(scope="module")
def configured(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(model_repo, tmp_path_factory.mktemp("v2-configured"), max_body_bytes=2048, max_rows=4,
                        max_samples=4, max_queue_rows=100, api_keys="key-1,key-2") as proc:
        yield proc


@pytest.fixture(scope="module")
def tc_configured(configured: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=f"127.0.0.1:{configured.port}", network_timeout=60.0)
    try:
        yield c
    finally:
        c.close()


def test_limits(configured: ServerProcess, tc_configured: triton.InferenceServerClient) -> None:
    tc = tc_configured
    refused(lambda: tc.infer("moons", [tensor("x", X)], headers=key()), 413, "at most 4 per request")
    assert tc.infer("moons", [tensor("x", X[:4])], headers=key()).as_numpy("log_prob").shape == (4,)
    refused(lambda: tc.infer("moons", [tensor("x", np.zeros((400, 2)), binary=True)], headers=key()), 413,
            "at most 2048 bytes")
    big = zlib.compress(request_json(np.zeros((400, 2)).tolist(), shape=[400, 2]))
    assert len(big) < 2048
    with configured.client() as c:
        r = post(c, big, {"Content-Encoding": "deflate", **key()})
    assert r.status_code == 413 and "once inflated" in r.json()["error"]


def test_api_keys_guard_the_model_endpoints(configured: ServerProcess,
                                           tc_configured: triton.InferenceServerClient) -> None:
    tc = tc_configured
    # health and server metadata stay open, as /healthz and /readyz
    assert tc.is_server_live() and tc.is_server_ready() and tc.get_server_metadata()["name"] == "flowserve"
    refused(lambda: tc.infer("moons", [tensor("x", X[:2])]), 401, "needs a key")
    refused(lambda: tc.get_model_metadata("moons", headers={"Authorization": "Bearer nope"}), 403,
            "not one of this server's API keys")
    assert not tc.is_model_ready("moons")
    assert tc.is_model_ready("moons", headers=key())
    assert tc.get_model_metadata("moons", headers=key())["name"] == "moons"
    assert tc.infer("moons", [tensor("x", X[:2])], headers=key()).as_numpy("log_prob").shape == (2,)
    with configured.client() as c:
        r = c.post("/v2/models/moons/infer", content=request_json(X[:2].tolist(), shape=[2, 2]))
    assert r.status_code == 401 and r.headers["content-type"] == JSON and list(r.json()) == ["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
