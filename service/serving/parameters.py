"""The operations' scalar parameters (``n``, ``seed``, ``temperature``, ``alpha``): each rule written once.

Plain pydantic models, no HTTP: :mod:`service.serving.validation` checks input against them at
the edge (the v1 routes, /v2's ``parameters.alpha``, the in-process runner and the CLI), and the
v1 request schemas (:mod:`service.http.schemas`) derive from them, so the OpenAPI document states
the same bounds. Unknown fields are refused. The rules: ``alpha`` in (0, 1), finite; a sample has
``n >= 1`` rows, a seed in ``[0, 2**64 - 1]`` and a finite ``temperature > 0``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MAX_SEED", "PARAMS", "EncodeParams", "ExplainParams", "ForwardParams", "SampleParams", "ScoreParams"]

#: Largest seed a request may give (torch generators take 64-bit seeds).
MAX_SEED = (1 << 64) - 1


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EncodeParams(_Params):
    """``log_prob`` and ``inverse`` take only arrays."""


class ForwardParams(_Params):
    """``forward`` takes only arrays."""


class ExplainParams(_Params):
    """``explain`` takes only arrays."""


class ScoreParams(_Params):
    alpha: float | None = Field(
        None, gt=0.0, lt=1.0, allow_inf_nan=False,
        description="Significance level in (0, 1): a row is an anomaly when its p-value <= alpha. "
                    "Default: the model's `anomaly_alpha` (0.01 unless its manifest says otherwise).",
        examples=[0.01],
    )


class SampleParams(_Params):
    n: int = Field(..., ge=1, description="How many samples to draw (at most the server's max_samples).",
                   examples=[5])
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED,
        description="Seed of the request's own noise generator: the same seed, model, n, temperature and context "
                    "give the same samples whatever else the server is doing. Drawn at random (and returned) "
                    "when absent.",
        examples=[3],
    )
    temperature: float = Field(1.0, gt=0.0, allow_inf_nan=False,
                               description="Scale of the base noise, > 0 and finite (1 samples the model).",
                               examples=[1.0])
    return_log_prob: bool = Field(False, description="Also answer the log-density of each sample.")
    return_latents: bool = Field(False, description="Also answer the latents each sample was decoded from.")


#: operation -> the model of its scalar fields
PARAMS: dict[str, type[_Params]] = {"log_prob": EncodeParams, "inverse": EncodeParams, "forward": ForwardParams,
                                    "sample": SampleParams, "score": ScoreParams, "explain": ExplainParams}
