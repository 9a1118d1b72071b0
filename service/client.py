"""Python client for a flowserve server, on httpx.

```python
from service.client import Client

with Client("http://127.0.0.1:8000") as fs:
    lp = fs.log_prob("moons", [[0.5, 0.25], [3.0, 3.0]])          # numpy array, shape (2,)
    x = fs.sample("moons", n=1000, seed=7)                           # (1000, 2)
    out = fs.score("moons", x, alpha=0.01)                           # dict of numpy arrays
```

`AsyncClient` has the same methods as coroutines. Arrays go as JSON for small requests and as
binary ``.npy`` bodies (``.npz`` with ``context`` for conditional models; answers as ``.npz``) once
a request holds more than ``binary_threshold`` values; a server that does not take binary bodies
(415 / 406) gets JSON instead from then on.
Answers are decoded by their content type, JSON or ``.npz``. Every call is side-effect free on the
server (GETs, and operations that are pure functions of their request), so all are retried on 503
(honouring ``Retry-After``, in seconds or as an HTTP date) and on connection failures, with
exponential backoff. Errors raise a :class:`FlowserveError` subclass carrying the server's problem
details (``status``, ``title``, ``detail``, ``errors``, ``problem``).
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Union

import httpx
import numpy as np

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "FlowserveError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "ServiceUnavailable",
    "Unauthorized",
    "UnprocessableEntity",
    "UnsupportedMediaType",
    "records",
]

Rows = Union[np.ndarray, Sequence[Sequence[float]], Sequence[Mapping[str, float]]]


# -- errors ------------------------------------------------------------------------------------------
class FlowserveError(Exception):
    """An error answer from the server, with its RFC 9457 problem details."""

    status: int = 0

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        self.title = str(problem.get("title", ""))
        self.detail = str(problem.get("detail", problem.get("error", "")))
        self.errors: list[dict[str, Any]] = list(problem.get("errors", []) or [])
        super().__init__(f"{status} {self.title}: {self.detail}".strip())


class BadRequest(FlowserveError):
    """400: malformed body, NaN, wrong number of features, ragged rows, unknown names."""


class Unauthorized(FlowserveError):
    """401: an API key is required."""


class Forbidden(FlowserveError):
    """403: the API key is wrong."""


class NotFound(FlowserveError):
    """404: unknown model or version."""


class Conflict(FlowserveError):
    """409: the operation does not fit the model (e.g. ``score`` on a model without a calibration set)."""


class PayloadTooLarge(FlowserveError):
    """413: body, rows or samples over the server's limits."""


class UnsupportedMediaType(FlowserveError):
    """415: content type the server does not take."""


class UnprocessableEntity(FlowserveError):
    """422: well-formed but invalid fields."""


class ServiceUnavailable(FlowserveError):
    """503: queue full or not ready (raised once retries are spent)."""


class DeadlineExceeded(FlowserveError):
    """504: the request's deadline passed before its batch ran."""


_ERRORS: dict[int, type[FlowserveError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: PayloadTooLarge,
    415: UnsupportedMediaType, 422: UnprocessableEntity, 503: ServiceUnavailable, 504: DeadlineExceeded,
}


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            problem = {"detail": str(problem)}
    except ValueError:
        problem = {"title": response.reason_phrase, "detail": response.text[:500]}
    raise _ERRORS.get(response.status_code, FlowserveError)(response.status_code, problem)


# -- request building (shared by both clients) ----------------------------------------------------------
@dataclass
class _Call:
    """One request; ``parse`` turns the decoded answer (a dict) into what the method returns.

    ``json_fallback`` builds the body of the same request as plain JSON (only when needed), sent
    instead when the server refuses a binary body or a binary answer.
    """

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    parse: Callable[[Any], Any] = lambda answer: answer
    json_fallback: Callable[[], Any] | None = None

    def then(self, after: Callable[[Any], Any]) -> "_Call":
        """This call with ``after`` applied to what ``parse`` returns."""
        before = self.parse
        self.parse = lambda answer: after(before(answer))
        return self

    def as_json(self) -> "_Call":
        """The same request as plain JSON, answered as JSON."""
        assert self.json_fallback is not None
        return replace(self, json=self.json_fallback(), content=None, params={}, headers={}, json_fallback=None)


NPZ = "application/x-npz"
NPY = "application/x-npy"


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # float arrays only: nothing is pickled
    return buf.getvalue()


def _float_rows(rows: np.ndarray) -> np.ndarray:
    dtype = rows.dtype if rows.dtype in (np.float32, np.float64) else np.float64
    return np.ascontiguousarray(rows, dtype=dtype)


def _unflatten(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``.npz`` members by name, with dotted names (``threshold.alpha``) nested back into objects
    whose 0-d members become Python scalars, as the JSON answer has them."""
    out: dict[str, Any] = {}
    for key, value in arrays.items():
        head, dot, rest = key.partition(".")
        if not dot:
            out[key] = value
            continue
        inner = out.setdefault(head, {})
        if isinstance(inner, dict):
            inner[rest] = value.item() if value.ndim == 0 else value
    return out


def _decode(response: httpx.Response) -> Any:
    """The answer by its content type: ``.npz`` as a dict of arrays, ``.npy`` as one array, else JSON."""
    media = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == NPZ:
        with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
            return _unflatten({k: npz[k] for k in npz.files})
    if media == NPY:
        return np.load(io.BytesIO(response.content), allow_pickle=False)
    return response.json()


def _as_rows(rows: Rows | None) -> Any:
    """Numeric rows as a float array; records (dicts) are kept as they are for the JSON body."""
    if rows is None:
        return None
    if isinstance(rows, np.ndarray):
        return rows
    if isinstance(rows, Mapping):  # one record (e.g. the one context row of a sample request)
        return dict(rows)
    rows = list(rows)
    if rows and isinstance(rows[0], Mapping):
        return [dict(r) for r in rows]
    return np.asarray(rows, dtype=np.float64)


def _jsonable(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _arrays(answer: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The listed fields as float64 arrays (a JSON ``null``, a non-finite value, becomes NaN);
    other array fields of a binary answer (0-d ones, e.g. ``seed``) as Python scalars."""
    out = {k: (v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else v) for k, v in answer.items()}
    for key in keys:
        if out.get(key) is not None:
            out[key] = np.asarray(out[key], dtype=np.float64)
    return out


def records(rows: np.ndarray, names: Sequence[str]) -> list[dict[str, float]]:
    """Rows ``(B, D)`` as records keyed by ``names`` (e.g. ``card(name)["feature_names"]``)."""
    arr = np.asarray(rows, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ValueError(f"rows of shape {arr.shape} do not fit {len(names)} names")
    return [dict(zip(names, row)) for row in arr.tolist()]


class _Operations:
    """The operations of API.md as :class:`_Call` builders; subclasses supply ``_run``."""

    #: requests holding more values than this go as ``.npy`` bodies; ``None``: always JSON
    binary_threshold: int | None

    def _run(self, call: _Call) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _base(name: str, version: int | None) -> str:
        return f"/v1/models/{name}" + (f"/versions/{int(version)}" if version is not None else "")

    def _op(self, name: str, version: int | None, op: str, main_key: str, main: Rows, fields: dict[str, Any],
            array_keys: Sequence[str]) -> _Call:
        rows = _as_rows(main)
        context = _as_rows(fields.pop("context", None))
        fields = {k: v for k, v in fields.items() if v is not None}
        path = f"{self._base(name, version)}/{op}"

        def body() -> dict[str, Any]:
            out = {main_key: _jsonable(rows), **fields}
            if context is not None:
                out["context"] = _jsonable(context)
            return out

        def parse(answer: Any) -> dict[str, Any]:
            return _arrays(answer, array_keys)

        # one array: an .npy body; with context rows: an .npz body of both (records stay JSON)
        binary_context = context is None or (isinstance(context, np.ndarray) and context.ndim == 2)
        if binary_context and isinstance(rows, np.ndarray) and rows.ndim == 2 and self._large(rows.size):
            if context is None:
                content, media = _npy_bytes(_float_rows(rows)), NPY
            else:
                content, media = _npz_bytes({main_key: _float_rows(rows), "context": _float_rows(context)}), NPZ
            return _Call(
                "POST", path, content=content, params=fields,
                headers={"content-type": media, "accept": NPZ}, parse=parse, json_fallback=body,
            )
        return _Call("POST", path, json=body(), parse=parse)

    def _large(self, values: int) -> bool:
        return self.binary_threshold is not None and values > self.binary_threshold

    # -- metadata -----------------------------------------------------------------------------------
    def models(self) -> Any:
        """The models the server hosts: a list of dicts (name, version, versions, features, ...)."""
        return self._run(_Call("GET", "/v1/models", parse=lambda answer: answer["models"]))

    def card(self, name: str, version: int | None = None) -> Any:
        """The model card of ``name`` (its latest version unless ``version`` is given)."""
        return self._run(_Call("GET", self._base(name, version)))

    # -- operations ---------------------------------------------------------------------------------
    def log_prob(self, name: str, inputs: Rows, context: Rows | None = None, version: int | None = None) -> Any:
        """``log p(x)`` of each row, as a float64 array (NaN where the server answered null)."""
        call = self._op(name, version, "log_prob", "inputs", inputs, {"context": context}, ["log_prob"])
        return self._run(call.then(lambda out: out["log_prob"]))

    def inverse(self, name: str, inputs: Rows, context: Rows | None = None, version: int | None = None) -> Any:
        """``x → z``: dict with ``latents``, ``log_det``, ``base_log_prob``, ``log_prob`` arrays."""
        return self._run(self._op(name, version, "inverse", "inputs", inputs, {"context": context},
                                  ["latents", "log_det", "base_log_prob", "log_prob"]))

    def forward(self, name: str, latents: Rows, context: Rows | None = None, version: int | None = None) -> Any:
        """``z → x``: dict with ``outputs`` and ``log_prob`` arrays."""
        return self._run(self._op(name, version, "forward", "latents", latents, {"context": context},
                                  ["outputs", "log_prob"]))

    def score(self, name: str, inputs: Rows, context: Rows | None = None, alpha: float | None = None,
              version: int | None = None) -> Any:
        """Anomaly scores: dict with ``log_prob``, ``score``, ``p_value``, ``is_anomaly``, ``threshold``."""
        call = self._op(name, version, "score", "inputs", inputs, {"context": context, "alpha": alpha},
                        ["log_prob", "score", "p_value"])
        return self._run(call.then(_score_answer))

    def sample(self, name: str, n: int, seed: int | None = None, temperature: float | None = None,
               context: Rows | None = None, return_log_prob: bool = False, return_latents: bool = False,
               version: int | None = None) -> Any:
        """Draw ``n`` rows. Returns the samples array, or a dict with ``samples`` and the extras asked for.

        ``context`` is one row (a list of numbers or one record, used for every sample) or ``n`` rows.
        The answer is asked for as ``.npz`` when ``n`` exceeds ``binary_threshold``.
        """
        body: dict[str, Any] = {"n": int(n)}
        for key, value in (("seed", seed), ("temperature", temperature)):
            if value is not None:
                body[key] = value
        if context is not None:
            ctx = _as_rows(context)
            body["context"] = _jsonable(ctx)
        if return_log_prob:
            body["return_log_prob"] = True
        if return_latents:
            body["return_latents"] = True
        extras = return_log_prob or return_latents

        def parse(answer: Any) -> Any:
            out = _arrays(answer, ["samples", "log_prob", "latents"])
            return out if extras else out["samples"]

        call = _Call("POST", f"{self._base(name, version)}/sample", json=body, parse=parse)
        if self._large(int(n)):
            call.headers = {"accept": f"{NPZ}, application/json;q=0.5"}
            call.json_fallback = lambda: body
        return self._run(call)


def _score_answer(out: dict[str, Any]) -> dict[str, Any]:
    out["is_anomaly"] = np.asarray(out["is_anomaly"], dtype=bool)
    threshold = out.get("threshold")
    if isinstance(threshold, dict) and threshold.get("log_prob") is None:
        threshold["log_prob"] = -np.inf  # JSON null: no log-density is flagged at this alpha
    return out


@dataclass
class _Retry:
    """Retry policy: up to ``attempts`` tries, exponential backoff with jitter, ``Retry-After`` honoured."""

    attempts: int = 4
    backoff: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before try ``attempt + 1``: the server's ``Retry-After`` where it gave one."""
        if response is not None:
            after = _retry_after(response.headers.get("retry-after"))
            if after is not None:
                return min(self.max_delay, after)
        return min(self.max_delay, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds or an HTTP date (RFC 9110 §10.2.3); ``None`` if absent/invalid."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: failures where the request cannot have been computed twice to any effect (every call is side-effect free)
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
              httpx.WriteError, httpx.PoolTimeout)
#: answers that mean "not a binary request": send the JSON fallback instead
_NOT_BINARY = (406, 415)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class _Transport(_Operations):
    """What both clients share: construction and the retry / fallback decisions."""

    def __init__(self, retries: int, binary_threshold: int | None) -> None:
        self._retry = _Retry(attempts=retries + 1)
        self.binary_threshold = binary_threshold

    def _after(self, call: _Call, response: httpx.Response, attempt: int) -> tuple[_Call, float, int] | None:
        """After ``response`` to try ``attempt`` of ``call``: ``(call to send, delay, its attempt)``, or
        ``None`` when ``response`` is the answer (success or error)."""
        if response.status_code in _NOT_BINARY and call.json_fallback is not None:
            self.binary_threshold = None  # this server takes no binary bodies: JSON from now on
            return call.as_json(), 0.0, attempt
        if response.status_code == 503 and attempt + 1 < self._retry.attempts:
            return call, self._retry.delay(attempt, response), attempt + 1
        return None

    def _after_failure(self, attempt: int) -> float | None:
        """Delay before trying again after a connection failure on ``attempt``; ``None``: give up."""
        return self._retry.delay(attempt, None) if attempt + 1 < self._retry.attempts else None

    @staticmethod
    def _finish(call: _Call, response: httpx.Response) -> Any:
        _raise_for(response)
        return call.parse(_decode(response))


class Client(_Transport):
    """Blocking client; use it as a context manager (or call :meth:`close`).

    Arguments:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>`` where the server needs one.
        timeout: seconds for each HTTP request.
        retries: further tries after a 503 or a connection failure.
        binary_threshold: requests holding more values than this go as ``.npy``; ``None``: JSON only.
        transport: an httpx transport (tests, proxies, Unix sockets).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, binary_threshold: int | None = 20_000,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(retries, binary_threshold)
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def _run(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.json, content=call.content,
                                              params=call.params or None, headers=call.headers or None)
            except _RETRYABLE:
                delay = self._after_failure(attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                attempt += 1
                continue
            step = self._after(call, response, attempt)
            if step is None:
                return self._finish(call, response)
            call, delay, attempt = step
            time.sleep(delay)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Transport):
    """The same methods as :class:`Client`, as coroutines; use with ``async with`` (or ``await aclose()``)."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, binary_threshold: int | None = 20_000,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(retries, binary_threshold)
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def _run(self, call: _Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.json, content=call.content,
                                                    params=call.params or None, headers=call.headers or None)
            except _RETRYABLE:
                delay = self._after_failure(attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1
                continue
            step = self._after(call, response, attempt)
            if step is None:
                return self._finish(call, response)
            call, delay, attempt = step
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
