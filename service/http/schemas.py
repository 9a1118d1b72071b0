"""Request and answer schemas of the v1 JSON API.

Two roles:

- The ``*Params`` models (:mod:`service.serving.parameters`, where their rules are written once)
  validate an operation's scalar fields (``n``, ``seed``, ``alpha``...) strictly; unknown fields are
  refused. They are tiny, so pydantic is cheap here. The request models below derive from them.
- The ``*Request`` / ``*Response`` models describe whole bodies for the OpenAPI document and
  ``/docs``. The arrays (``inputs``, ``latents``, ``context``) are **not** validated through them:
  the hot path converts rows with numpy (:mod:`service.http.codecs.rows`), which is orders of magnitude
  faster than a pydantic model per number, and answers are written by orjson.

Examples work against the default models: ``moons`` (2 features ``x``, ``y``), ``digits``
(64 features, 8×8 images with values 0..16, dequantized: densities of ``x + u`` in (0, 17)) and ``digits-cond`` (the same with a 10-way one-hot
``context`` naming the digit).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from service.serving.parameters import (PARAMS, EncodeParams, ExplainParams, ForwardParams, SampleParams,
                                        ScoreParams)

__all__ = [
    "EncodeParams",
    "PARAMS",
    "RESPONSE_MODELS",
    "ForwardParams",
    "ForwardRequest",
    "ForwardResponse",
    "HealthResponse",
    "InverseResponse",
    "LogProbRequest",
    "LogProbResponse",
    "ModelCard",
    "ModelList",
    "ModelSummary",
    "ModelVersions",
    "Problem",
    "ReadyResponse",
    "SampleParams",
    "SampleRequest",
    "SampleResponse",
    "ExplainParams",
    "ExplainRequest",
    "ExplainResponse",
    "ScoreParams",
    "ScoreRequest",
    "ScoreResponse",
    "REQUEST_MODELS",
    "V2Error",
    "V2InferRequest",
    "V2InferResponse",
]

Number = float
# minItems / minProperties 1: the server refuses an empty list of rows (422), and an empty row or
# record (400: it has fewer values than any model's features), so the document says so.
Row = Annotated[list[Number], Field(min_length=1)]
Record = Annotated[dict[str, Number], Field(min_length=1)]
Rows = Annotated[list[Row], Field(min_length=1)] | Annotated[list[Record], Field(min_length=1)]
NullableRow = list[float | None]

ROWS_DOC = (
    "Rows of numbers, one list per row, in the model's feature order (`[[x11, x12], [x21, x22]]`), "
    "or records keyed by feature name (`[{\"x\": 0.0, \"y\": 1.0}]`, every name required, no extras). "
    "Numbers must be finite; `true`/`false` count as 1/0."
)
CONTEXT_DOC = (
    "Context rows (one per input row), as lists in the model's context order or records keyed by context "
    "name. Required for conditional models, refused for others."
)
NONFINITE_DOC = " Non-finite results (e.g. the log-density of a point outside the support) are written as `null`."

#: the first image of scikit-learn's digits (a zero) at its cells' centres k + 0.5, for examples: the
#: digits models are densities of dequantized pixels x + u, bounded to (0, 17), so an integer pixel 0
#: lies on a bound, where the density is zero (log_prob null)
DIGIT_ZERO = [k + 0.5 for k in (
    0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
    0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0)]
ONE_HOT_ZERO = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]


# -- whole request bodies (for the docs) --------------------------------------------------------------
class LogProbRequest(EncodeParams):
    """Rows of data, and context rows for conditional models."""

    inputs: Rows = Field(..., description=ROWS_DOC)
    context: Rows | None = Field(None, description=CONTEXT_DOC)

    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": [[0.0, 1.0], [1.0, -0.5]]}]})


class InverseRequest(LogProbRequest):
    """Rows of data to map to latents, ``z = f⁻¹(x)``."""


class ExplainRequest(ExplainParams):
    """Rows of data whose log-density to split over their features."""

    inputs: Rows = Field(..., description=ROWS_DOC)
    context: Rows | None = Field(None, description=CONTEXT_DOC)


class ScoreRequest(ScoreParams):
    """Rows of data to score against the model's calibration set."""

    inputs: Rows = Field(..., description=ROWS_DOC)
    context: Rows | None = Field(None, description=CONTEXT_DOC)

    model_config = ConfigDict(json_schema_extra={"examples": [{"inputs": [[1.0, -0.5], [3.0, 3.0]], "alpha": 0.01}]})


class ForwardRequest(ForwardParams):
    """Latent rows to map to data, ``x = f(z)``."""

    latents: Rows = Field(..., description="Latent rows, one list of D numbers per row (standard-normal base).")
    context: Rows | None = Field(None, description=CONTEXT_DOC)

    model_config = ConfigDict(json_schema_extra={"examples": [{"latents": [[0.0, 0.0], [1.0, -1.0]]}]})


class SampleRequest(SampleParams):
    """How many samples, from which seed, at which temperature (and context for conditional models)."""

    context: Rows | Row | Record | None = Field(
        None, description="Context for conditional models: one row (used for every sample) or n rows; "
                          "lists or records keyed by context name.",
    )

    model_config = ConfigDict(json_schema_extra={"examples": [{"n": 5, "seed": 3, "return_log_prob": True}]})


#: operation -> the model that documents its request body
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "log_prob": LogProbRequest,
    "inverse": InverseRequest,
    "forward": ForwardRequest,
    "sample": SampleRequest,
    "score": ScoreRequest,
    "explain": ExplainRequest,
}


def request_examples(operation: str) -> dict[str, dict[str, Any]]:
    """Named examples of an operation's body for the default models (``moons``, ``digits-cond``)."""
    moons_rows = [[0.0, 1.0], [1.0, -0.5]]
    moons_records = [{"x": 0.0, "y": 1.0}, {"x": 1.0, "y": -0.5}]
    if operation in ("log_prob", "inverse", "explain"):
        return {
            "moons": {"summary": "moons: two rows", "value": {"inputs": moons_rows}},
            "moons-records": {"summary": "moons: rows as records", "value": {"inputs": moons_records}},
            "digits": {"summary": "digits: one 8x8 image", "value": {"inputs": [DIGIT_ZERO]}},
            "digits-cond": {"summary": "digits-cond: an image and its label",
                            "value": {"inputs": [DIGIT_ZERO], "context": [ONE_HOT_ZERO]}},
        }
    if operation == "score":
        return {
            "moons": {"summary": "moons: a typical and an odd row", "value": {"inputs": [[1.0, -0.5], [3.0, 3.0]]}},
            "moons-records-alpha": {"summary": "moons: records, at alpha 0.05",
                                    "value": {"inputs": moons_records, "alpha": 0.05}},
            "digits-cond": {"summary": "digits-cond: an image scored as a zero",
                            "value": {"inputs": [DIGIT_ZERO], "context": [ONE_HOT_ZERO]}},
        }
    if operation == "forward":
        return {
            "moons": {"summary": "moons: two latent rows", "value": {"latents": [[0.0, 0.0], [1.0, -1.0]]}},
            "digits-cond": {"summary": "digits-cond: the zero latent, as a 3",
                            "value": {"latents": [[0.0] * 64], "context": [[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]]}},
        }
    if operation == "sample":
        return {
            "moons": {"summary": "moons: 5 seeded samples with log-densities",
                      "value": {"n": 5, "seed": 3, "return_log_prob": True}},
            "moons-cold": {"summary": "moons: colder samples with their latents",
                           "value": {"n": 3, "seed": 1, "temperature": 0.5, "return_latents": True}},
            "digits-cond": {"summary": "digits-cond: 2 sevens (one context row for all)",
                            "value": {"n": 2, "seed": 7, "context": [[0, 0, 0, 0, 0, 0, 0, 1, 0, 0]]}},
        }
    raise KeyError(operation)


# -- answers ------------------------------------------------------------------------------------------
class _Answer(BaseModel):
    model: str = Field(..., description="The model's name.", examples=["moons"])
    version: int = Field(..., description="The model version that answered.", examples=[1])


class LogProbResponse(_Answer):
    log_prob: list[float | None] = Field(
        ..., description="Natural-log density of each row, in the data's own units." + NONFINITE_DOC,
        examples=[[-1.23, -2.05]])


class InverseResponse(_Answer):
    latents: list[NullableRow] = Field(..., description="z = f⁻¹(x), one row per input row." + NONFINITE_DOC)
    log_det: list[float | None] = Field(..., description="log |det ∂z/∂x| of each row.")
    base_log_prob: list[float | None] = Field(..., description="log p_Z(z) under the base distribution.")
    log_prob: list[float | None] = Field(..., description="log p(x) = base_log_prob + log_det.")


class ForwardResponse(_Answer):
    outputs: list[NullableRow] = Field(..., description="x = f(z), one row per latent row." + NONFINITE_DOC)
    log_prob: list[float | None] = Field(..., description="log p(x) of each output under the model.")


class SampleResponse(_Answer):
    samples: list[NullableRow] = Field(..., description="n rows drawn from the model.")
    seed: int = Field(..., description="The seed used (the request's, or the one drawn for it).")
    log_prob: list[float | None] | None = Field(
        None, description="log p(x) of each sample (untempered), when return_log_prob was true.")
    latents: list[NullableRow] | None = Field(
        None, description="The latents each sample was decoded from, when return_latents was true.")


class Threshold(BaseModel):
    alpha: float = Field(..., description="The significance level used.")
    log_prob: float | None = Field(
        ..., description="Rows with log_prob below this are flagged at alpha (null: -inf, no row can be flagged).")


class ScoreResponse(_Answer):
    log_prob: list[float | None] = Field(..., description="log p(x) of each row." + NONFINITE_DOC)
    score: list[float | None] = Field(..., description="-log p(x): higher is more anomalous.")
    p_value: list[float] = Field(
        ..., description="Conformal p-value (1 + #{i: L_i <= log_prob}) / (m + 1) against the m calibration "
                         "log-densities L_i.")
    is_anomaly: list[bool] = Field(..., description="p_value <= alpha.")
    threshold: Threshold


class ExplainResponse(_Answer):
    contributions: list[NullableRow] = Field(
        ..., description="Per-feature contribution of each row, (B, D) in feature order (null: NaN, e.g. a bounded "
                         "feature outside its interval).")
    log_prob: list[float | None] = Field(..., description="log p(x) of each row." + NONFINITE_DOC)
    method: str = Field(..., description="`chain-rule` (exact: log p(x_i | x_<i)) or `occlusion` (approximate).",
                        examples=["occlusion"])
    exact: bool = Field(..., description="Whether each row's contributions sum to its log_prob by construction.")
    feature_names: list[str] = Field(..., description="The features, in the order of the contributions.")


#: operation -> the model that documents its answer
RESPONSE_MODELS: dict[str, type[BaseModel]] = {"log_prob": LogProbResponse, "inverse": InverseResponse,
                                               "forward": ForwardResponse, "sample": SampleResponse,
                                               "score": ScoreResponse, "explain": ExplainResponse}


class ProblemError(BaseModel):
    loc: list[str | int] = Field(..., description="Where: e.g. [\"body\", \"inputs\", 3, 1] is row 3, column 1.",
                                 examples=[["body", "inputs", 3, 1]])
    msg: str = Field(..., examples=["null is not a number: data must be finite numbers"])


class Problem(BaseModel):
    """An error answer, ``application/problem+json`` (RFC 9457)."""

    type: str = Field(..., description="urn:flowserve:problem:<kind>", examples=["urn:flowserve:problem:invalid-input"])
    title: str = Field(..., examples=["Bad Request"])
    status: int = Field(..., examples=[400])
    detail: str = Field(..., examples=["inputs row 3 column 1: null is not a number: data must be finite numbers"])
    instance: str | None = Field(None, description="The request path.", examples=["/v1/models/moons/log_prob"])
    errors: list[ProblemError] | None = Field(None, description="For invalid input: each offending field, row or column.")


# -- health and models ----------------------------------------------------------------------------------
class HealthResponse(BaseModel):
    status: str = Field("ok", examples=["ok"])


class ReadyResponse(BaseModel):
    status: str = Field("ready", examples=["ready"])
    models: dict[str, str] = Field(..., description="Each configured model's state: loading, ready or failed.",
                                   examples=[{"moons": "ready"}])


class ModelSummary(BaseModel):
    name: str = Field(..., examples=["moons"])
    version: int | None = Field(..., description="The default (highest) version; null until loaded.", examples=[1])
    versions: list[int] = Field(..., description="Every loaded version, ascending.", examples=[[1]])
    features: int | None = Field(..., description="Number of features D.", examples=[2])
    context_features: int | None = Field(..., description="Number of context features C (0: unconditional).",
                                         examples=[0])
    flow: str | None = Field(..., description="The flow architecture (nsf, nsf-ar, maf, realnvp, nice).",
                             examples=["nsf"])
    device: str = Field(..., description="Where the model runs.", examples=["cpu"])
    ready: bool = Field(..., description="Whether the model is loaded and answering.")
    state: str = Field(..., description="loading, ready or failed.", examples=["ready"])
    error: str | None = Field(None, description="Why loading failed, when it did.")


class ModelList(BaseModel):
    models: list[ModelSummary]


class CalibrationSummary(BaseModel):
    size: int = Field(..., description="Number m of held-out log-densities.")
    quantiles: dict[str, float] = Field(..., description="Quantiles of the calibration log-densities.")
    histogram: dict[str, list[float]] | None = Field(
        None, description="The calibration log-densities in equal-width bins: `edges` (bins + 1 values) and "
        "`counts` (bins values, summing to `size`; the last bin includes its right edge).")


class ModelCard(ModelSummary):
    feature_names: list[str] = Field(..., examples=[["x", "y"]])
    context_names: list[str] = Field(..., examples=[[]])
    description: str = ""
    dtype: str = Field(..., examples=["float32"])
    flow_config: dict[str, Any] = Field(..., description="The allow-listed flow specification.")
    base: dict[str, Any] = Field(..., description="The base distribution.")
    preprocessing: dict[str, Any] = Field(..., description="The per-feature standardisation folded into the flow.")
    training: dict[str, Any] = Field(..., description="rows, epochs, seconds, val_nll, val_nll_per_dim, ...")
    calibration: CalibrationSummary | None
    anomaly_alpha: float = Field(..., description="Default alpha of /score.")
    exactness: dict[str, Any] = Field(..., description="Checks and their figures (round trip, log-det, integral).")
    notes: list[str] = []
    sha256: str = Field(..., description="sha256 of the weights file.")
    created_at: str


class VersionSummary(BaseModel):
    version: int
    created_at: str
    sha256: str
    flow: str
    dtype: str
    description: str = ""
    training: dict[str, Any] = {}


class ModelVersions(BaseModel):
    name: str = Field(..., examples=["moons"])
    latest: int = Field(..., examples=[1])
    versions: list[VersionSummary]


# -- the Open Inference Protocol (/v2), for the docs ------------------------------------------------------
class V2Error(BaseModel):
    """Every /v2 error: the protocol's shape, never problem+json."""

    error: str = Field(..., examples=["unexpected inference input 'y' for model 'moons'; its inputs are ['x']"])


class V2InputTensor(BaseModel):
    name: str = Field(..., description="`x` (the rows), or `context` for conditional models.", examples=["x"])
    shape: list[Annotated[int, Field(ge=0)]] = Field(..., description="`[B, D]` (`[B, C]` for `context`).",
                                                     examples=[[2, 2]])
    datatype: str = Field(..., description="`FP32` or `FP64` (other protocol datatypes are refused with 400).",
                          examples=["FP32"])
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_size`: the tensor's bytes follow the JSON (binary tensor data extension).")
    data: list[Any] | None = Field(None, description="The elements in row-major order, flat or nested.",
                                   examples=[[0.0, 1.0, 1.0, -0.5]])


class V2RequestedOutput(BaseModel):
    name: str = Field(..., description="`log_prob`, `latents` or `log_det`; for a model with a calibration set also "
                                       "`score`, `p_value`, `is_anomaly` or `threshold`.", examples=["log_prob"])
    parameters: dict[str, Any] | None = Field(None, description="`binary_data`: send this output in binary.")


class V2InferRequest(BaseModel):
    """A KServe v2 inference request (the JSON part, when binary tensors follow it)."""

    id: str | None = Field(None, description="Echoed in the answer.")
    parameters: dict[str, Any] | None = Field(
        None, description="`binary_data_output` (bool), `timeout` (microseconds) and `alpha` (the score outputs' "
                          "significance level, in (0, 1)) are read; others are ignored.")
    inputs: list[V2InputTensor] = Field(..., min_length=1, description="The input tensors.")
    outputs: list[V2RequestedOutput] | None = Field(None, description="The outputs to answer (default `log_prob`).")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [0.0, 1.0, 1.0, -0.5]}],
         "outputs": [{"name": "log_prob"}, {"name": "latents"}]}]})


class V2OutputTensor(BaseModel):
    name: str = Field(..., examples=["log_prob"])
    datatype: str = Field(..., description="The model's dtype (`FP32` or `FP64`); `p_value` and `threshold` are "
                                           "`FP64`, `is_anomaly` `BOOL`.", examples=["FP32"])
    shape: list[int] = Field(..., examples=[[2]])
    parameters: dict[str, Any] | None = Field(None, description="`binary_data_size` for a binary output.")
    data: list[float | bool | None] | None = Field(None, description="Flat, row-major; non-finite values as `null`.")


class V2InferResponse(BaseModel):
    id: str | None = None
    model_name: str = Field(..., examples=["moons"])
    model_version: str = Field(..., examples=["1"])
    outputs: list[V2OutputTensor]
