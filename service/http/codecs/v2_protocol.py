"""The Open Inference Protocol (KServe v2) on the wire: inference requests, tensors and answers.

Pure functions over bytes and numpy, no FastAPI: :mod:`service.http.routes.v2` binds them to models.

Requests (KServe v2 REST, with Triton's *binary tensor data* extension, as ``tritonclient.http`` sends):

- The body starts with a JSON object ``{"id"?, "parameters"?, "inputs": [{"name", "shape",
  "datatype", "parameters"?, "data"?}], "outputs"?: [{"name", "parameters"?}]}``.
- ``data`` is the tensor's elements in row-major order, flat or nested (only the count must match
  the shape, as in Triton). An input may instead say ``parameters.binary_data_size``: its raw
  little-endian bytes then follow the JSON, after those of the binary inputs before it, and the
  HTTP header ``Inference-Header-Content-Length`` gives the length of the JSON part.
- Request ``parameters`` read here: ``binary_data_output`` (every output binary unless it says
  otherwise) and ``timeout`` (microseconds, Triton's queue timeout). Others are ignored, as the
  protocol allows. Shared memory and classification are not supported (400).
- A compressed body (``Content-Encoding: gzip`` or ``deflate``, as tritonclient's
  ``request_compression_algorithm`` sends) is inflated within the body size limit.
- A JSON part of :data:`service.http.codecs.bodies.OFF_LOOP_BYTES` or more is parsed as ``/v1``'s
  big bodies are, in pieces (:func:`service.http.codecs.bodies.loads_json`): each input's ``data``
  (:data:`DATA`), flat or rows, then comes as a float64 array, converted piece by piece, with the
  values of the lists it stands for. (Integers beyond 2**53 sent to an FP32 input are thus rounded
  to float64 before float32, where a small body rounds them once.) The route runs the parse in a
  worker thread for such bodies, so the event loop keeps answering meanwhile.

Answers are ``{"id"?, "model_name", "model_version", "outputs": [{"name", "datatype", "shape",
"data"}]}``, ``data`` flat and row-major, non-finite values written as ``null`` (strict JSON). An
output asked for in binary carries ``parameters.binary_data_size`` instead of ``data``; its bytes
follow the JSON in output order, with ``Inference-Header-Content-Length`` and
``Content-Type: application/octet-stream``. Every error is ``{"error": "..."}`` (:class:`V2Error`).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import orjson
from starlette.responses import Response

from service.http.codecs.bodies import loads_json
from service.http.codecs.json_pieces import EACH
from service.http.responses import dumps

__all__ = [
    "BINARY_EXTENSION",
    "DATA",
    "DATATYPES",
    "HEADER_LENGTH",
    "InferRequest",
    "OUTPUT_DATATYPES",
    "RequestedOutput",
    "Tensor",
    "V2Error",
    "V2ErrorResponse",
    "bad",
    "datatype_of",
    "decode_content",
    "encode_infer_response",
    "parse_infer_request",
]

#: the HTTP header that gives the length of the JSON part of a body with binary tensors
HEADER_LENGTH = "Inference-Header-Content-Length"
#: where an input tensor's JSON elements are in a request: each input's ``data``
DATA = ("inputs", EACH, "data")
#: the name of Triton's extension, listed in the server metadata
BINARY_EXTENSION = "binary_tensor_data"
#: the datatypes flowserve models take and give, and their little-endian numpy dtypes
DATATYPES: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
#: the datatypes of answers: those, and BOOL (``is_anomaly``: one byte per element, 0 or 1)
OUTPUT_DATATYPES: dict[str, np.dtype] = {**DATATYPES, "BOOL": np.dtype("?")}
#: every datatype the protocol defines (others are not datatypes at all)
KNOWN_DATATYPES = frozenset({"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                             "FP16", "FP32", "FP64", "BF16", "BYTES"})
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


class V2Error(Exception):
    """An error answer of the protocol: ``{"error": message}`` with an HTTP status."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> "V2ErrorResponse":
        return V2ErrorResponse({"error": self.message}, status_code=self.status, headers=self.headers)


class V2ErrorResponse(Response):
    """``application/json`` (exactly: KServe's client reads ``error`` only under that type)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def bad(message: str) -> V2Error:
    """A 400: the request does not follow the protocol or does not fit the model."""
    return V2Error(400, message)


@dataclass(frozen=True)
class Tensor:
    """One input tensor: its declared name, datatype and shape, and its elements in that shape."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray


@dataclass(frozen=True)
class RequestedOutput:
    """An output the request asks for, and whether its data goes in binary after the JSON."""

    name: str
    binary: bool


@dataclass
class InferRequest:
    """A parsed inference request.

    ``outputs`` is ``None`` when the request names none (the model's default outputs are then sent,
    binary when ``binary_data_output`` is set); ``timeout_us`` is Triton's ``timeout`` parameter.
    """

    id: str | None
    inputs: dict[str, Tensor]
    outputs: list[RequestedOutput] | None
    binary_output: bool = False
    timeout_us: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


def datatype_of(dtype: np.dtype | str) -> str:
    """``FP32`` for float32, ``FP64`` for float64, ``BOOL`` for bool."""
    kind = np.dtype(dtype)
    for name, dt in OUTPUT_DATATYPES.items():
        if kind == dt or kind == dt.newbyteorder("="):
            return name
    raise ValueError(f"no protocol datatype for {kind}")


# -- bodies -------------------------------------------------------------------------------------------
def decode_content(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    """Inflate a ``gzip`` or ``deflate`` body (at most ``max_bytes`` once inflated); others are 415."""
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise V2Error(415, f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    # 32 + MAX_WBITS reads both the gzip and the zlib header; raw deflate is tried after
    attempts = (zlib.MAX_WBITS | 32,) if coding != "deflate" else (zlib.MAX_WBITS | 32, -zlib.MAX_WBITS)
    for wbits in attempts:
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, max_bytes + 1)
        except zlib.error as e:
            error = e
            continue
        if len(out) > max_bytes:
            raise V2Error(413, f"the body is too large once inflated: more than {max_bytes} bytes; this server "
                          f"takes at most {max_bytes} bytes (FLOWSERVE_MAX_BODY_BYTES)")
        if not inflater.eof:
            raise bad(f"the {coding} body is truncated")
        return out
    raise bad(f"the body is not valid {coding} data: {error}")


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a body, by ``Inference-Header-Content-Length``."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise bad(f"{HEADER_LENGTH} must be a number of bytes, got {header_length!r}") from None
    if not 0 < n <= len(body):
        raise bad(f"{HEADER_LENGTH} is {n}, but the body has {len(body)} bytes")
    return body[:n], body[n:]


# -- requests -----------------------------------------------------------------------------------------
def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list"}.get(type(value), "a number")


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad(f"{what} must be an object, got {_json_type(value)}")
    return value


def _no_shared_memory(parameters: Mapping[str, Any], what: str) -> None:
    if any(k in parameters for k in _SHARED_MEMORY):
        raise bad(f"{what}: shared memory is not supported by this server; send the data in the request")


def parse_infer_request(body: bytes, header_length: str | None = None) -> InferRequest:
    """Parse an inference request body (see the module docstring); :class:`V2Error` 400 on any fault."""
    head, binary = split_body(body, header_length)
    try:
        value = loads_json(head, [DATA], flat=True)
    except orjson.JSONDecodeError as e:
        binary_inputs = header_length is None and b'"binary_data_size"' in head
        hint = f" (a body with binary tensors after the JSON needs {HEADER_LENGTH})" if binary_inputs else ""
        raise bad(f"the inference request is not valid JSON: {e}{hint}") from None
    if not isinstance(value, dict):
        raise bad(f"the inference request must be a JSON object, got {_json_type(value)}")
    request_id = value.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad(f"id must be a string, got {_json_type(request_id)}")
    parameters = _object(value.get("parameters"), "parameters")
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise bad(f"parameters.binary_data_output must be a boolean, got {_json_type(binary_output)}")
    timeout = parameters.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0):
        raise bad(f"parameters.timeout must be a whole number of microseconds >= 0, got {timeout!r}")
    inputs = _inputs(value.get("inputs"), binary)
    outputs = _outputs(value["outputs"], binary_output) if value.get("outputs") is not None else None
    return InferRequest(request_id, inputs, outputs, binary_output, timeout or None, parameters)


def _inputs(value: Any, binary: bytes) -> dict[str, Tensor]:
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else _json_type(value)
        raise bad(f"inputs must be a non-empty list of input tensors, got {got}")
    tensors: dict[str, Tensor] = {}
    offset = 0
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"inputs[{i}] must be an object, got {_json_type(item)}")
        name = item.get("name")
        if not isinstance(name, str):
            raise bad(f"inputs[{i}].name must be a string, got {_json_type(name)}")
        if name in tensors:
            raise bad(f"input {name!r} is given twice")
        tensor, offset = _tensor(name, item, binary, offset)
        tensors[name] = tensor
    if offset != len(binary):
        raise bad(f"the body has {len(binary) - offset} bytes of binary data after the JSON that no input claims "
                  "(parameters.binary_data_size)")
    return tensors


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise bad(f"input {name!r}: shape must be a list of whole numbers >= 0, got {value!r}"[:300])
    return tuple(value)


def _tensor(name: str, item: dict[str, Any], binary: bytes, offset: int) -> tuple[Tensor, int]:
    shape = _shape(name, item.get("shape"))
    datatype = item.get("datatype")
    if not isinstance(datatype, str) or datatype not in KNOWN_DATATYPES:
        raise bad(f"input {name!r}: datatype must be one of the protocol's ({', '.join(sorted(KNOWN_DATATYPES))}), "
                  f"got {datatype!r}"[:300])
    if datatype not in DATATYPES:
        raise bad(f"input {name!r} has datatype {datatype}; flowserve models take {' or '.join(DATATYPES)} tensors")
    dtype = DATATYPES[datatype]
    parameters = _object(item.get("parameters"), f"input {name!r}: parameters")
    _no_shared_memory(parameters, f"input {name!r}")
    count = math.prod(shape)
    size = parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"input {name!r}: parameters.binary_data_size must be a whole number of bytes, got {size!r}")
        if "data" in item:
            raise bad(f"input {name!r} has both data and parameters.binary_data_size; send one")
        if offset + size > len(binary):
            raise bad(f"input {name!r} says binary_data_size {size}, but only {len(binary) - offset} bytes of "
                      "binary data are left after the JSON")
        if size != count * dtype.itemsize:
            raise bad(f"input {name!r}: binary_data_size is {size} bytes, but shape {list(shape)} of {datatype} "
                      f"needs {count * dtype.itemsize}")
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += size
    else:
        if "data" not in item:
            raise bad(f"input {name!r} has no data: give data, or parameters.binary_data_size and binary data "
                      "after the JSON")
        array = _json_data(name, item["data"], dtype, shape, count)
    _finite(name, array)
    return Tensor(name, datatype, shape, array), offset


def _json_data(name: str, data: Any, dtype: np.dtype, shape: tuple[int, ...], count: int) -> np.ndarray:
    """``data`` (numbers, flat or nested, row-major) as an array of ``shape`` and ``dtype``.

    JSON ``true`` / ``false`` count as 1 / 0 (the protocol lets a server coerce elements); strings
    and ``null`` are refused. A big body's clean ``data`` comes already as a float64 array.
    """
    if not isinstance(data, (list, np.ndarray)):
        data = [data]
    try:
        values = np.asarray(data)
    except (ValueError, TypeError, OverflowError):
        values = None
    if values is None or values.dtype.kind not in "biuf":
        problem = _first_non_number(data)
        if problem is not None:
            raise bad(f"input {name!r}: data must be numbers in a list (flat or nested, row-major); {problem}")
        try:  # every leaf is a number: integers beyond 64 bits, or lists of unequal lengths
            values = np.asarray(data, dtype=np.float64)
        except (ValueError, TypeError, OverflowError):
            raise bad(f"input {name!r}: data must be numbers in a list (flat or nested, row-major); "
                      "its nested lists have unequal lengths") from None
    if values.size != count:
        raise bad(f"input {name!r} has shape {list(shape)} ({count} values), but its data holds {values.size} values")
    with np.errstate(over="ignore"):
        array = values.astype(dtype).reshape(shape)
    if values.dtype.kind in "iuf" and not np.isfinite(array).all() and np.isfinite(values).all():
        first = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
        raise bad(f"input {name!r}: {values.reshape(shape)[first]} (at index {list(first)}) is beyond the range of "
                  f"{datatype_of(dtype)}; send it as FP64")
    return array


def _first_non_number(data: list[Any]) -> str | None:
    """Where the first element that is not a number is, or ``None`` when every leaf is a number."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in reversed(list(enumerate(value))))
        elif not isinstance(value, (int, float)):
            return f"data{where} is {_json_type(value)}"
    return None


def _finite(name: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad_count = int(finite.size - np.count_nonzero(finite))
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise bad(f"input {name!r} holds {bad_count} non-finite values (the first at index {list(first)}: "
                  f"{array[first]}); data must be finite numbers")


def _outputs(value: Any, binary_default: bool) -> list[RequestedOutput]:
    if not isinstance(value, list):
        raise bad(f"outputs must be a list of requested outputs, got {_json_type(value)}")
    outputs: list[RequestedOutput] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise bad(f"outputs[{i}] must be an object, got {_json_type(item)}")
        name = item.get("name")
        if not isinstance(name, str):
            raise bad(f"outputs[{i}].name must be a string, got {_json_type(name)}")
        if any(o.name == name for o in outputs):
            raise bad(f"output {name!r} is requested twice")
        parameters = _object(item.get("parameters"), f"output {name!r}: parameters")
        _no_shared_memory(parameters, f"output {name!r}")
        if parameters.get("classification"):
            raise bad(f"output {name!r}: classification is not supported; these outputs are densities, not classes")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad(f"output {name!r}: parameters.binary_data must be a boolean, got {_json_type(binary)}")
        outputs.append(RequestedOutput(name, binary))
    return outputs


# -- answers ------------------------------------------------------------------------------------------
def encode_infer_response(model_name: str, model_version: int | str, request_id: str | None,
                          outputs: Sequence[tuple[RequestedOutput, np.ndarray]]) -> tuple[bytes, dict[str, str]]:
    """The body and headers of an inference answer: JSON, then the binary outputs' bytes in order."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for requested, array in outputs:
        array = np.asarray(array)
        datatype = datatype_of(array.dtype)
        tensor: dict[str, Any] = {"name": requested.name, "datatype": datatype, "shape": list(array.shape)}
        if requested.binary:
            raw = np.ascontiguousarray(array, dtype=OUTPUT_DATATYPES[datatype]).tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            tensor["data"] = np.ascontiguousarray(array).ravel()
        described.append(tensor)
    answer: dict[str, Any] = {}
    if request_id is not None:
        answer["id"] = request_id
    answer.update(model_name=model_name, model_version=str(model_version), outputs=described)
    head = dumps(answer)
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
