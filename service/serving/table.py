r"""The operations of the API, each declared once: what every consumer of an operation reads.

One :class:`Operation` per operation in :data:`TABLE`. The v1 routes (and the OpenAPI document
they register, documentation only), the operation router, ``/v2``'s outputs, the ``.npy`` answers
(:data:`service.http.codecs.binary.MAIN_FIELD`) and the in-process runner
(:class:`service.serving.inprocess.LocalModel`) all derive their lists of operations and fields
from here. An operation's math is the function of the same name in
:mod:`service.serving.operations` (:attr:`Operation.compute`); its HTTP scalar fields and
documented bodies are the models :mod:`service.http.schemas` keys by its name (``PARAMS``,
``REQUEST_MODELS``, ``RESPONSE_MODELS``).

The internal -> API renaming happens only in :meth:`Operation.select`: the device worker's passes
give ``z`` / ``x`` (:data:`service.serving.batching.config.OUTPUTS`), which the answer calls
``latents`` (encode), ``outputs`` (``forward``) or ``samples`` (``sample``).

The client distribution (``clients/python``) does not import the service, by design: it keeps its
own method list (one method per row here), checked against this table by the tests.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from service.serving.batching.config import Pass

__all__ = ["BY_NAME", "EXPLAIN", "FORWARD", "INVERSE", "LOG_PROB", "NAMES", "Operation", "SAMPLE", "SCORE", "TABLE"]


@dataclass(frozen=True)
class Operation:
    """One operation of the API.

    Attributes:
        name: its path suffix (``POST /v1/models/{name}/<name>``) and the function in
            :mod:`service.serving.operations` that computes it.
        pass_: the flow's pass it runs (encode :math:`x \\mapsto z`, decode :math:`z \\mapsto x`).
        main_input: the request's field of rows (``inputs`` / ``latents``), ``None`` when it takes
            no rows (``sample``); the one array an ``.npy`` body holds.
        fields: the answer's array fields, ``(API name, internal name)`` in answer order; the
            internal name is the worker's output (``z``, ``x``, ``log_det``...) or the
            operation's own (``score``, ``p_value``...).
        main_answer: the field an ``Accept: application/x-npy`` answer holds.
        summary, description: its OpenAPI summary and description (Markdown).
        needs_calibration: whether it refuses a model without a calibration set (409).
    """

    name: str
    pass_: Pass
    main_input: str | None
    fields: tuple[tuple[str, str], ...]
    main_answer: str
    summary: str
    description: str
    needs_calibration: bool = False

    @property
    def answer_fields(self) -> tuple[str, ...]:
        """The API names of the answer's array fields, in answer order."""
        return tuple(api for api, _ in self.fields)

    @property
    def arrays(self) -> tuple[str, ...]:
        """The request's array fields: the main input (if any) and ``context``."""
        return (self.main_input, "context") if self.main_input else ("context",)

    def select(self, out: Mapping[str, Any]) -> dict[str, Any]:
        """The answer's fields of ``out`` (a pass's or the operation's results), under their API names.

        Fields absent from ``out`` are left out (``sample``'s optional ``log_prob`` / ``latents``).
        """
        return {api: out[internal] for api, internal in self.fields if internal in out}

    @property
    def compute(self) -> Callable[..., Any]:
        """The coroutine function of :mod:`service.serving.operations` that computes it."""
        return getattr(importlib.import_module("service.serving.operations"), self.name)


LOG_PROB = Operation(
    "log_prob", Pass.ENCODE, "inputs", (("log_prob", "log_prob"),), "log_prob",
    "Log-density of rows", "`log p(x)` of each row (natural log, in the data's own units).")
INVERSE = Operation(
    "inverse", Pass.ENCODE, "inputs",
    (("latents", "z"), ("log_det", "log_det"), ("base_log_prob", "base_log_prob"), ("log_prob", "log_prob")),
    "latents", "Map data to latents",
    "`z = f⁻¹(x)` with `log_det`, `base_log_prob` and `log_prob == base_log_prob + log_det`.")
FORWARD = Operation(
    "forward", Pass.DECODE, "latents", (("outputs", "x"), ("log_prob", "log_prob")), "outputs",
    "Map latents to data", "`x = f(z)` and the log-density of each output.")
SAMPLE = Operation(
    "sample", Pass.DECODE, None, (("samples", "x"), ("log_prob", "log_prob"), ("latents", "z")), "samples",
    "Draw samples", "`n` rows from the model; the same `seed` gives the same rows whatever the server is doing.")
SCORE = Operation(
    "score", Pass.ENCODE, "inputs",
    (("log_prob", "log_prob"), ("score", "score"), ("p_value", "p_value"), ("is_anomaly", "is_anomaly")),
    "log_prob", "Anomaly scores",
    "`score = -log_prob` and the conformal p-value of each row against the model's held-out calibration "
    "log-densities; `is_anomaly = p_value <= alpha`.",
    needs_calibration=True)

EXPLAIN = Operation(
    "explain", Pass.ENCODE, "inputs", (("contributions", "contributions"), ("log_prob", "log_prob")),
    "contributions", "Per-feature contributions",
    "Each row's `log p(x)` split over its features. `method: \"chain-rule\"` (`exact: true`) where the flow's "
    "Jacobian is triangular in the feature order (one autoregressive transform with the identity order, e.g. "
    "`maf`/`nsf-ar` with `transforms=1`): contribution `i` is `log p(x_i | x_<i)` and a row sums to `log_prob`. "
    "Otherwise `method: \"occlusion\"` (`exact: false`): `log p(x) - log p(x with feature i set to the "
    "standardisation's centre)`, an approximate attribution whose sum need not equal `log_prob`.")

#: every operation, in documentation order
TABLE: tuple[Operation, ...] = (LOG_PROB, INVERSE, FORWARD, SAMPLE, SCORE, EXPLAIN)
BY_NAME: dict[str, Operation] = {op.name: op for op in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)
