"""The operations of the HTTP API as request descriptions (:class:`Call`), shared by both clients.

A :class:`Call` is one request plus ``parse``, which turns the decoded answer into what the method
returns. :class:`Operations` builds them; a subclass supplies ``_run`` (blocking or a coroutine), so
the sync and async clients have the same methods with the same arguments.

Body choice: a request whose main array holds more than ``binary_threshold`` values goes as a
``.npy`` body (``.npz`` of the rows and ``context`` for conditional models), other fields as query
parameters, and asks for an ``.npz`` answer; every such call carries ``json_fallback``, the same
request as plain JSON, sent instead where the server refuses binary bodies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .bodies import NPY, NPZ, Rows, arrays, as_rows, float_rows, jsonable, npy_bytes, npz_bytes

__all__ = ["Call", "Operations"]


@dataclass
class Call:
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

    def then(self, after: Callable[[Any], Any]) -> "Call":
        """This call with ``after`` applied to what ``parse`` returns."""
        before = self.parse
        self.parse = lambda answer: after(before(answer))
        return self

    def as_json(self) -> "Call":
        """The same request as plain JSON, answered as JSON."""
        assert self.json_fallback is not None
        return replace(self, json=self.json_fallback(), content=None, params={}, headers={}, json_fallback=None)


class Operations:
    """The operations of API.md as :class:`Call` builders; subclasses supply ``_run``."""

    #: requests holding more values than this go as ``.npy`` bodies; ``None``: always JSON
    binary_threshold: int | None

    def _run(self, call: Call) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    @staticmethod
    def _base(name: str, version: int | None) -> str:
        return f"/v1/models/{name}" + (f"/versions/{int(version)}" if version is not None else "")

    def _op(self, name: str, version: int | None, op: str, main_key: str, main: Rows, fields: dict[str, Any],
            array_keys: Sequence[str]) -> Call:
        rows = as_rows(main)
        context = as_rows(fields.pop("context", None))
        fields = {k: v for k, v in fields.items() if v is not None}
        path = f"{self._base(name, version)}/{op}"

        def body() -> dict[str, Any]:
            out = {main_key: jsonable(rows), **fields}
            if context is not None:
                out["context"] = jsonable(context)
            return out

        def parse(answer: Any) -> dict[str, Any]:
            return arrays(answer, array_keys)

        # one array: an .npy body; with context rows: an .npz body of both (records stay JSON)
        binary_context = context is None or (isinstance(context, np.ndarray) and context.ndim == 2)
        if binary_context and isinstance(rows, np.ndarray) and rows.ndim == 2 and self._large(rows.size):
            if context is None:
                content, media = npy_bytes(float_rows(rows)), NPY
            else:
                content, media = npz_bytes({main_key: float_rows(rows), "context": float_rows(context)}), NPZ
            return Call(
                "POST", path, content=content, params=fields,
                headers={"content-type": media, "accept": NPZ}, parse=parse, json_fallback=body,
            )
        return Call("POST", path, json=body(), parse=parse)

    def _large(self, values: int) -> bool:
        return self.binary_threshold is not None and values > self.binary_threshold

    # -- metadata -----------------------------------------------------------------------------------
    def models(self) -> Any:
        """The models the server hosts: a list of dicts (name, version, versions, features, ...)."""
        return self._run(Call("GET", "/v1/models", parse=lambda answer: answer["models"]))

    def card(self, name: str, version: int | None = None) -> Any:
        """The model card of ``name`` (its latest version unless ``version`` is given)."""
        return self._run(Call("GET", self._base(name, version)))

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

    def explain(self, name: str, inputs: Rows, context: Rows | None = None, version: int | None = None) -> Any:
        """Per-feature contributions: dict with ``contributions`` (B, D), ``log_prob``, ``method``, ``exact``."""
        return self._run(self._op(name, version, "explain", "inputs", inputs, {"context": context},
                                  ["contributions", "log_prob"]))

    def sample(self, name: str, n: int, seed: int | None = None, temperature: float | None = None,
               context: Rows | Mapping[str, float] | None = None, return_log_prob: bool = False,
               return_latents: bool = False, version: int | None = None) -> Any:
        """Draw ``n`` rows. Returns the samples array, or a dict with ``samples`` and the extras asked for.

        ``context`` is one row (a list of numbers or one record, used for every sample) or ``n`` rows.
        The answer is asked for as ``.npz`` when ``n`` exceeds ``binary_threshold``.
        """
        body: dict[str, Any] = {"n": int(n)}
        for key, value in (("seed", seed), ("temperature", temperature)):
            if value is not None:
                body[key] = value
        if context is not None:
            body["context"] = jsonable(as_rows(context))
        if return_log_prob:
            body["return_log_prob"] = True
        if return_latents:
            body["return_latents"] = True
        extras = return_log_prob or return_latents

        def parse(answer: Any) -> Any:
            out = arrays(answer, ["samples", "log_prob", "latents"])
            return out if extras else out["samples"]

        call = Call("POST", f"{self._base(name, version)}/sample", json=body, parse=parse)
        if self._large(int(n)):
            call.headers = {"accept": f"{NPZ}, application/json;q=0.5"}
            call.json_fallback = lambda: body
        return self._run(call)


def _score_answer(out: dict[str, Any]) -> dict[str, Any]:
    """``is_anomaly`` as a bool array; a JSON ``null`` threshold (nothing flagged at this alpha) as ``-inf``."""
    out["is_anomaly"] = np.asarray(out["is_anomaly"], dtype=bool)
    threshold = out.get("threshold")
    if isinstance(threshold, dict) and threshold.get("log_prob") is None:
        threshold["log_prob"] = -np.inf  # JSON null: no log-density is flagged at this alpha
    return out
