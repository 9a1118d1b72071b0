"""The Open Inference Protocol on the wire (service.http.codecs.v2_protocol), in process.

Requests are built as ``tritonclient.http`` sends them (JSON, optionally followed by binary tensor
data and an ``Inference-Header-Content-Length``), parsed with :func:`parse_infer_request`, and
answers encoded with :func:`encode_infer_response` are read back byte by byte.
"""

from __future__ import annotations

import gzip
import zlib
from typing import Any, Callable

import numpy as np
import orjson
import pytest

from service.http.codecs import v2_protocol
from service.http.codecs.bodies import OFF_LOOP_BYTES
from service.http.codecs.v2_protocol import (
    DATATYPES,
    HEADER_LENGTH,
    RequestedOutput,
    V2Error,
    datatype_of,
    decode_content,
    encode_infer_response,
    parse_infer_request,
    split_body,
)

X = np.arange(6, dtype=np.float32).reshape(3, 2) / 4


def error(call: Callable[[], Any]) -> V2Error:
    with pytest.raises(V2Error) as raised:
        call()
    return raised.value


def message(request: dict[str, Any], binary: bytes = b"", header_length: str | None = None) -> str:
    """The 400 message for ``request``; checks the status too."""
    body = orjson.dumps(request)
    length = header_length if header_length is not None else (str(len(body)) if binary else None)
    e = error(lambda: parse_infer_request(body + binary, length))
    assert e.status == 400
    return e.message


def tensor(data: Any, shape: list[int], datatype: str = "FP32", name: str = "inputs", **extra: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data, **extra}


# -- requests ------------------------------------------------------------------------------------
def test_json_tensors_flat_or_nested_in_their_dtype() -> None:
    body = orjson.dumps({"id": "r1", "inputs": [tensor(X.ravel().tolist(), [3, 2]),
                                                tensor([[1, 0], [0, 1], [True, False]], [3, 2], "FP64", "context")]})
    req = parse_infer_request(body)
    assert req.id == "r1" and list(req.inputs) == ["inputs", "context"]
    t = req.inputs["inputs"]
    assert (t.datatype, t.shape, t.array.dtype) == ("FP32", (3, 2), np.float32)
    np.testing.assert_array_equal(t.array, X)
    c = req.inputs["context"]
    assert c.array.dtype == np.float64
    np.testing.assert_array_equal(c.array, [[1, 0], [0, 1], [1, 0]])  # booleans coerced to 1 / 0
    assert req.outputs is None and not req.binary_output and req.timeout_us is None


def test_binary_tensors_follow_the_json_in_order() -> None:
    c = np.array([[0.5], [1.5], [2.5]], dtype=np.float64)
    head = orjson.dumps({"inputs": [
        {"name": "inputs", "shape": [3, 2], "datatype": "FP32", "parameters": {"binary_data_size": X.nbytes}},
        {"name": "context", "shape": [3, 1], "datatype": "FP64", "parameters": {"binary_data_size": c.nbytes}}],
        "outputs": [{"name": "log_prob", "parameters": {"binary_data": True}}, {"name": "z"}],
        "parameters": {"timeout": 2500}})
    req = parse_infer_request(head + X.tobytes() + c.tobytes(), str(len(head)))
    np.testing.assert_array_equal(req.inputs["inputs"].array, X)
    np.testing.assert_array_equal(req.inputs["context"].array, c)
    assert req.outputs == [RequestedOutput("log_prob", True), RequestedOutput("z", False)]
    assert req.timeout_us == 2500


def test_binary_data_output_is_the_default_of_every_output() -> None:
    body = orjson.dumps({"inputs": [tensor([1, 2], [1, 2])], "parameters": {"binary_data_output": True},
                         "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}]})
    req = parse_infer_request(body)
    assert req.binary_output and req.outputs == [RequestedOutput("a", True), RequestedOutput("b", False)]


def test_malformed_requests_are_400_naming_the_fault() -> None:
    one = tensor([1.0, 2.0], [1, 2])
    assert message({"inputs": []}) == "inputs must be a non-empty list of input tensors, got an empty list"
    assert message({"inputs": {"a": 1}}) == "inputs must be a non-empty list of input tensors, got an object"
    assert message({"id": 5, "inputs": [one]}) == "id must be a string, got a number"
    assert message({"inputs": [one, one]}) == "input 'inputs' is given twice"
    assert message({"inputs": ["x"]}) == "inputs[0] must be an object, got a string"
    assert message({"inputs": [{**one, "name": None}]}) == "inputs[0].name must be a string, got null"
    assert message({"inputs": [one], "parameters": {"binary_data_output": "yes"}}) == (
        "parameters.binary_data_output must be a boolean, got a string")
    assert message({"inputs": [one], "parameters": {"timeout": -1}}) == (
        "parameters.timeout must be a whole number of microseconds >= 0, got -1")
    assert message({"inputs": [one], "parameters": []}) == "parameters must be an object, got a list"
    e = error(lambda: parse_infer_request(b"[1, 2]"))
    assert (e.status, e.message) == (400, "the inference request must be a JSON object, got a list")


def test_tensor_declarations_are_checked() -> None:
    assert message({"inputs": [tensor([1, 2], [-1, 2])]}) == (
        "input 'inputs': shape must be a list of whole numbers >= 0, got [-1, 2]")
    assert message({"inputs": [tensor([1, 2], [1, 2], "FLOAT")]}).startswith(
        "input 'inputs': datatype must be one of the protocol's (BF16, BOOL, BYTES, FP16, FP32, FP64, INT16, ")
    assert message({"inputs": [tensor([1, 2], [1, 2], "INT32")]}) == (
        "input 'inputs' has datatype INT32; flowserve models take FP32 or FP64 tensors")
    assert message({"inputs": [{"name": "inputs", "shape": [1, 2], "datatype": "FP32"}]}) == (
        "input 'inputs' has no data: give data, or parameters.binary_data_size and binary data after the JSON")
    assert message({"inputs": [tensor([1, 2], [1, 2], parameters={"shared_memory_region": "r"})]}) == (
        "input 'inputs': shared memory is not supported by this server; send the data in the request")
    assert message({"inputs": [tensor([1, 2], [1, 2])], "outputs": [{"name": "c", "parameters": {
        "classification": 2}}]}) == (
        "output 'c': classification is not supported; these outputs are densities, not classes")
    assert message({"inputs": [tensor([1, 2], [1, 2])], "outputs": [{"name": "a"}, {"name": "a"}]}) == (
        "output 'a' is requested twice")


def test_json_data_must_be_numbers_of_the_declared_count() -> None:
    assert message({"inputs": [tensor([1, "2"], [1, 2])]}) == (
        "input 'inputs': data must be numbers in a list (flat or nested, row-major); data[1] is a string")
    assert message({"inputs": [tensor([[1, 2], [None, 4]], [2, 2])]}) == (
        "input 'inputs': data must be numbers in a list (flat or nested, row-major); data[1][0] is null")
    assert message({"inputs": [tensor([[1, 2], [3]], [3])]}) == (
        "input 'inputs': data must be numbers in a list (flat or nested, row-major); "
        "its nested lists have unequal lengths")
    assert message({"inputs": [tensor([1, 2, 3], [2, 2])]}) == (
        "input 'inputs' has shape [2, 2] (4 values), but its data holds 3 values")
    assert message({"inputs": [tensor([1.0, 1e39], [1, 2])]}) == (
        "input 'inputs': 1e+39 (at index [0, 1]) is beyond the range of FP32; send it as FP64")
    # the same number is fine as FP64
    body = orjson.dumps({"inputs": [tensor([1.0, 1e39], [1, 2], "FP64")]})
    assert parse_infer_request(body).inputs["inputs"].array[0, 1] == 1e39


def test_binary_data_sizes_are_checked_against_shape_and_body() -> None:
    def binary_input(size: int, shape: list[int] = [3, 2], **extra: Any) -> dict[str, Any]:
        return {"inputs": [{"name": "inputs", "shape": shape, "datatype": "FP32",
                            "parameters": {"binary_data_size": size}, **extra}]}

    assert message(binary_input(20), X.tobytes()[:20] + b"\0" * 4) == (
        "input 'inputs': binary_data_size is 20 bytes, but shape [3, 2] of FP32 needs 24")
    assert message(binary_input(24), X.tobytes()[:16]) == (
        "input 'inputs' says binary_data_size 24, but only 16 bytes of binary data are left after the JSON")
    assert message(binary_input(24), X.tobytes() + b"\0" * 8) == (
        "the body has 8 bytes of binary data after the JSON that no input claims (parameters.binary_data_size)")
    assert message(binary_input(24, data=[1] * 6), X.tobytes()) == (
        "input 'inputs' has both data and parameters.binary_data_size; send one")
    assert message(binary_input(-4), b"x") == (
        "input 'inputs': parameters.binary_data_size must be a whole number of bytes, got -4")
    nan = X.copy()
    nan[2, 1] = np.nan
    assert message(binary_input(24), nan.tobytes()) == (
        "input 'inputs' holds 1 non-finite values (the first at index [2, 1]: nan); data must be finite numbers")


def test_the_json_length_header_is_checked() -> None:
    head = orjson.dumps(tensor([1, 2], [1, 2]))
    assert split_body(head + b"tail", str(len(head))) == (head, b"tail")
    assert split_body(head, None) == (head, b"")
    assert error(lambda: split_body(head, "ten")).message == f"{HEADER_LENGTH} must be a number of bytes, got 'ten'"
    assert error(lambda: split_body(head, "0")).message == f"{HEADER_LENGTH} is 0, but the body has {len(head)} bytes"
    # binary data sent without the header: the JSON parser fails, and the message says what is missing
    body = orjson.dumps({"inputs": [{"name": "inputs", "shape": [3, 2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 24}}]}) + X.tobytes()
    e = error(lambda: parse_infer_request(body))
    assert e.message.startswith("the inference request is not valid JSON: ")
    assert e.message.endswith(f"(a body with binary tensors after the JSON needs {HEADER_LENGTH})")


# -- compressed bodies ---------------------------------------------------------------------------
def test_gzip_and_deflate_bodies_are_inflated_within_the_limit() -> None:
    raw = orjson.dumps({"inputs": [tensor(X.ravel().tolist(), [3, 2])]})
    assert decode_content(raw, None, 100) == raw and decode_content(raw, "identity", 10) == raw
    assert decode_content(gzip.compress(raw), "gzip", len(raw)) == raw
    assert decode_content(gzip.compress(raw), " X-GZIP ", len(raw)) == raw
    assert decode_content(zlib.compress(raw), "deflate", len(raw)) == raw
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_content(raw_deflate.compress(raw) + raw_deflate.flush(), "deflate", len(raw)) == raw
    big = error(lambda: decode_content(gzip.compress(b" " * 10_000), "gzip", 9_999))
    assert big.status == 413 and big.message.startswith("the body is too large once inflated: more than 9999 bytes")
    cut = error(lambda: decode_content(gzip.compress(raw)[:-12], "gzip", len(raw)))
    assert (cut.status, cut.message) == (400, "the gzip body is truncated")
    junk = error(lambda: decode_content(b"not gzip at all", "gzip", 100))
    assert junk.status == 400 and junk.message.startswith("the body is not valid gzip data: ")
    br = error(lambda: decode_content(raw, "br", 100))
    assert (br.status, br.message) == (415, "Content-Encoding 'br' is not supported; send gzip, deflate or none")


# -- answers -------------------------------------------------------------------------------------
def test_json_answers_are_flat_row_major_with_null_for_non_finite() -> None:
    log_prob = np.array([-1.5, -np.inf, 0.25], dtype=np.float32)
    body, headers = encode_infer_response("moons", 3, "r1", [(RequestedOutput("log_prob", False), log_prob),
                                                             (RequestedOutput("z", False), X.astype(np.float64))])
    assert headers == {"Content-Type": "application/json"}
    answer = orjson.loads(body)
    assert answer == {"id": "r1", "model_name": "moons", "model_version": "3", "outputs": [
        {"name": "log_prob", "datatype": "FP32", "shape": [3], "data": [-1.5, None, 0.25]},
        {"name": "z", "datatype": "FP64", "shape": [3, 2], "data": X.astype(np.float64).ravel().tolist()}]}
    no_id, _ = encode_infer_response("m", "1", None, [(RequestedOutput("a", False), log_prob[:1])])
    assert "id" not in orjson.loads(no_id)


def test_binary_answers_put_the_bytes_after_the_json_in_output_order() -> None:
    z = np.asfortranarray(X)  # not C-ordered: its bytes must still be row-major
    log_prob = np.array([-1.0, -2.0, -3.0], dtype=np.float32)
    body, headers = encode_infer_response("m", 1, None, [(RequestedOutput("z", True), z),
                                                         (RequestedOutput("log_prob", False), log_prob),
                                                         (RequestedOutput("lp", True), log_prob.astype(np.float64))])
    assert headers["Content-Type"] == "application/octet-stream"
    n = int(headers[HEADER_LENGTH])
    answer = orjson.loads(body[:n])
    described = {o["name"]: o for o in answer["outputs"]}
    assert described["z"]["parameters"] == {"binary_data_size": 24} and "data" not in described["z"]
    assert described["log_prob"]["data"] == [-1.0, -2.0, -3.0]
    assert described["lp"]["datatype"] == "FP64" and described["lp"]["parameters"] == {"binary_data_size": 24}
    np.testing.assert_array_equal(np.frombuffer(body[n:n + 24], "<f4").reshape(3, 2), X)
    np.testing.assert_array_equal(np.frombuffer(body[n + 24:], "<f8"), [-1.0, -2.0, -3.0])
    assert len(body) == n + 48


def test_datatype_names_and_error_answers() -> None:
    assert datatype_of(np.float32) == "FP32" and datatype_of("<f8") == "FP64"
    with pytest.raises(ValueError, match="no protocol datatype for float16"):
        datatype_of(np.float16)
    response = V2Error(503, "the model is not ready", {"Retry-After": "2"}).response()
    assert response.status_code == 503 and orjson.loads(response.body) == {"error": "the model is not ready"}
    assert response.headers["content-type"] == "application/json" and response.headers["retry-after"] == "2"


# -- big bodies: parsed in pieces ------------------------------------------------------------------
def big_request(shape: str, datatype: str, fault: str | None = None) -> tuple[bytes, np.ndarray]:
    """A request over :data:`OFF_LOOP_BYTES`: input ``x`` of 40,000 x 2 values, ``data`` flat or rows."""
    rows = np.random.default_rng(9).standard_normal((40_000, 2)) * 10.0 ** np.random.default_rng(9).integers(-5, 5, (40_000, 2))
    data: Any = rows.tolist() if shape == "rows" else rows.ravel().tolist()
    if fault == "null":
        data[31_337] = [1.0, None] if shape == "rows" else None
    elif fault == "ragged":
        data[31_337] = [1.0, 2.0, 3.0] if shape == "rows" else [1.0]
    elif fault == "wide for FP32":
        data[31_337] = [1.0, 1e39] if shape == "rows" else 1e39
    body = orjson.dumps({"id": "big", "inputs": [tensor(data, [40_000, 2], datatype, "x"),
                                                  tensor([[1.0, 0.0]] * 40_000, [40_000, 2], datatype, "context")],
                         "outputs": [{"name": "log_prob"}]})
    assert len(body) > OFF_LOOP_BYTES
    return body, rows


@pytest.mark.parametrize("shape", ["rows", "flat"])
@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_a_big_body_parses_to_the_small_paths_tensors(shape: str, datatype: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    body, rows = big_request(shape, datatype)
    kinds: list[type] = []
    real = v2_protocol._json_data
    monkeypatch.setattr(v2_protocol, "_json_data", lambda name, data, *a: kinds.append(type(data)) or real(name, data, *a))
    got = parse_infer_request(body)
    assert kinds == [np.ndarray, np.ndarray]  # both data arrays came from the pieces as numbers
    monkeypatch.setattr(v2_protocol, "_json_data", real)
    monkeypatch.setattr(v2_protocol, "loads_json", lambda head, *a, **k: orjson.loads(head))  # the small path
    want = parse_infer_request(body)
    for name in ("x", "context"):
        a, b = got.inputs[name], want.inputs[name]
        assert (a.shape, a.datatype, a.array.dtype) == (b.shape, b.datatype, b.array.dtype) == ((40_000, 2), datatype,
                                                                                                DATATYPES[datatype])
        np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_array_equal(got.inputs["x"].array, rows.astype(DATATYPES[datatype]))
    assert got.id == want.id == "big" and got.outputs == want.outputs


@pytest.mark.parametrize("shape", ["rows", "flat"])
@pytest.mark.parametrize("fault", ["null", "ragged", "wide for FP32"])
def test_a_big_bodys_errors_are_the_small_paths(shape: str, fault: str, monkeypatch: pytest.MonkeyPatch) -> None:
    body, _ = big_request(shape, "FP32", fault)
    got = error(lambda: parse_infer_request(body))
    monkeypatch.setattr(v2_protocol, "loads_json", lambda head, *a, **k: orjson.loads(head))
    want = error(lambda: parse_infer_request(body))
    assert (got.status, got.message) == (want.status, want.message) and got.status == 400
