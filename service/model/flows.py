r"""The allow-list of flow architectures, built from zuko.

A manifest names its flow as ``{"name": "nsf", "library": "zuko", "class": "NSF", "kwargs": {...}}``.
Only the names below can be built; each maps to one zuko class plus the fixed arguments that make
it that architecture. ``kwargs`` may hold only JSON scalars from :data:`ALLOWED_KWARGS`, so a
manifest can never name a callable, a module path or anything else to import.

Every flow maps data to latents, ``z = T(x)``, with the standard normal base of zuko:

.. math:: \log p(x) = \log \mathcal{N}(T(x); 0, I) + \log |\det J_T(x)|

| name      | zuko class | what it is                                                           |
|-----------|------------|----------------------------------------------------------------------|
| ``nsf``   | ``NSF``    | rational-quadratic spline coupling (Durkan et al., 2019), ``passes=2``|
| ``nsf-ar``| ``NSF``    | the same splines, fully autoregressive (inverse takes D passes)       |
| ``maf``   | ``MAF``    | affine masked autoregressive flow (Papamakarios et al., 2017)         |
| ``realnvp``| ``RealNVP``| affine coupling (Dinh et al., 2016)                                  |
| ``nice``  | ``NICE``   | additive, volume-preserving coupling (Dinh et al., 2014)              |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import zuko
from torch import nn
from zuko.transforms import AdditiveTransform

__all__ = ["ARCHITECTURES", "ALLOWED_KWARGS", "Architecture", "FlowSpecError", "build_flow", "flow_spec"]


class FlowSpecError(ValueError):
    """A flow specification names something outside the allow-list or with bad arguments."""


@dataclass(frozen=True)
class Architecture:
    """One allow-listed architecture: a zuko class and the fixed arguments that define it."""

    name: str
    zuko_class: str
    constructor: Callable[..., nn.Module]
    fixed: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


ARCHITECTURES: dict[str, Architecture] = {
    "nsf": Architecture(
        "nsf", "NSF", zuko.flows.NSF, fixed={"passes": 2},
        defaults={"transforms": 4, "bins": 8, "hidden_features": [64, 64]},
        description="rational-quadratic spline coupling flow",
    ),
    "nsf-ar": Architecture(
        "nsf-ar", "NSF", zuko.flows.NSF, fixed={},
        defaults={"transforms": 3, "bins": 8, "hidden_features": [64, 64]},
        description="rational-quadratic spline autoregressive flow",
    ),
    "maf": Architecture(
        "maf", "MAF", zuko.flows.MAF, fixed={},
        defaults={"transforms": 5, "hidden_features": [64, 64]},
        description="affine masked autoregressive flow",
    ),
    "realnvp": Architecture(
        "realnvp", "RealNVP", zuko.flows.RealNVP, fixed={},
        defaults={"transforms": 6, "hidden_features": [64, 64]},
        description="affine coupling flow",
    ),
    "nice": Architecture(
        "nice", "NICE", zuko.flows.NICE, fixed={"univariate": AdditiveTransform, "shapes": [()]},
        defaults={"transforms": 6, "hidden_features": [64, 64]},
        description="additive (volume-preserving) coupling flow",
    ),
}

#: Keyword arguments a manifest may set, with the JSON types each accepts.
ALLOWED_KWARGS: dict[str, tuple[type, ...]] = {
    "features": (int,),
    "context": (int,),
    "transforms": (int,),
    "bins": (int,),
    "hidden_features": (list,),
    "randperm": (bool,),
}


def flow_spec(name: str, features: int, context: int = 0, **options: Any) -> dict[str, Any]:
    """The manifest entry for architecture ``name`` with ``options`` over its defaults."""
    if name not in ARCHITECTURES:
        raise FlowSpecError(f"unknown flow {name!r}; choose one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    kwargs = {**arch.defaults, **{k: v for k, v in options.items() if v is not None}}
    if name in ("realnvp", "nice", "maf") and "bins" in kwargs:
        kwargs.pop("bins")
    kwargs.update(features=int(features), context=int(context))
    spec = {"name": name, "library": "zuko", "class": arch.zuko_class, "kwargs": kwargs}
    _check(spec)
    return spec


def _check(spec: dict[str, Any]) -> Architecture:
    """Validate a flow spec against the allow-list; return its architecture."""
    if not isinstance(spec, dict):
        raise FlowSpecError("flow must be an object")
    name = spec.get("name")
    if name not in ARCHITECTURES:
        raise FlowSpecError(f"flow.name {name!r} is not an allowed architecture {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[name]
    if spec.get("library") != "zuko" or spec.get("class") != arch.zuko_class:
        raise FlowSpecError(
            f"flow {name!r} must be library 'zuko', class {arch.zuko_class!r}; "
            f"got library {spec.get('library')!r}, class {spec.get('class')!r}"
        )
    kwargs = spec.get("kwargs")
    if not isinstance(kwargs, dict):
        raise FlowSpecError("flow.kwargs must be an object")
    for key, value in kwargs.items():
        if key not in ALLOWED_KWARGS:
            raise FlowSpecError(f"flow.kwargs.{key} is not an allowed argument {sorted(ALLOWED_KWARGS)}")
        if not isinstance(value, ALLOWED_KWARGS[key]) or (isinstance(value, bool) and bool not in ALLOWED_KWARGS[key]):
            raise FlowSpecError(f"flow.kwargs.{key} has type {type(value).__name__}")
    if key_missing := [k for k in ("features", "context") if k not in kwargs]:
        raise FlowSpecError(f"flow.kwargs lacks {key_missing}")
    if kwargs["features"] < 1 or kwargs["context"] < 0:
        raise FlowSpecError("flow.kwargs.features must be >= 1 and context >= 0")
    if name in ("realnvp", "nice") and kwargs["features"] < 2:
        raise FlowSpecError(f"flow {name!r} is a coupling flow and needs at least 2 features")
    hidden = kwargs.get("hidden_features", [])
    if not all(isinstance(h, int) and not isinstance(h, bool) and 0 < h <= 65536 for h in hidden):
        raise FlowSpecError("flow.kwargs.hidden_features must be a list of positive integers")
    return arch


def build_flow(spec: dict[str, Any]) -> nn.Module:
    """Build the zuko flow that an allow-listed spec describes (weights uninitialised: load them after)."""
    arch = _check(spec)
    return arch.constructor(**spec["kwargs"], **arch.fixed)
