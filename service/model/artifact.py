"""The model artifact on disk: ``<repo>/<name>/<version>/model.json`` + ``weights.safetensors``.

Loading never unpickles: the module is rebuilt from the manifest's allow-listed flow spec
(:mod:`service.model.flows`) and its tensors are read with safetensors, checked against the module's own
names, shapes and the manifest's sha256 before they are loaded. Every refusal is an
:class:`ArtifactError` that says which file and what is wrong.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from service.model.calibration import Calibration
from service.model.density import DensityModel
from service.model.flows import FlowSpecError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "ArtifactError",
    "LoadedArtifact",
    "Manifest",
    "check_name",
    "load_artifact",
    "save_artifact",
]

#: The newest manifest format this flowserve writes and reads. Format 2 adds per-feature bounds
#: (``preprocessing.lower`` / ``.upper``), format 3 the decorrelating matrix ``preprocessing.linear``.
#: Every model is written in the oldest format that can express it (no bounds, no ``linear``:
#: format 1), so that an older flowserve keeps reading it, and an older one refuses a newer model by
#: its format (it would otherwise compute the wrong density) instead of misreading it.
FORMAT_VERSION = 3
SUPPORTED_FORMATS = (1, 2, 3)
MANIFEST_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_CALIBRATION = 10_000
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64}


class ArtifactError(Exception):
    """An artifact is missing, malformed or inconsistent; the message names the file and the fault."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = str(path)
        self.reason = message


def check_name(name: str) -> str:
    """Accept a model name only if it is a plain folder name: letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise ValueError(
            f"invalid model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preprocessing(_Strict):
    r"""Per-feature standardisation ``(x - shift) / scale``, folded into the density.

    ``lower`` / ``upper`` (format 2, optional): per-feature bounds, ``null`` for an unbounded
    feature. A bounded feature lies in the open interval ``(lower, upper)``; it is mapped to
    ``log(x - lower) - log(upper - x)`` before ``shift`` and ``scale`` (which then standardise that
    logit), with the exact log-Jacobian folded in (:mod:`service.model.density`).

    ``linear`` (format 3, optional): a lower-triangular ``D x D`` matrix :math:`A` (rows, zeros
    above the diagonal, positive diagonal) applied after the standardisation, ``u = A (x - shift) / scale``,
    its log-determinant :math:`\sum_j \log A_{jj}` folded in; the robust Gaussian start of small-data
    training records it (:mod:`service.training.fit`).
    """

    shift: list[float]
    scale: list[float]
    dequantized: bool = False
    lower: list[float | None] | None = None
    upper: list[float | None] | None = None
    linear: list[list[float]] | None = None

    @model_validator(mode="after")
    def _linear(self) -> "Preprocessing":
        if self.linear is None:
            return self
        d = len(self.shift)
        if len(self.linear) != d or any(len(row) != d for row in self.linear):
            raise ValueError(f"linear must be a {d} x {d} matrix (a list of {d} rows of {d} numbers)")
        for i, row in enumerate(self.linear):
            if not all(math.isfinite(v) for v in row):
                raise ValueError(f"linear row {i} holds a value that is not finite")
            if any(v != 0 for v in row[i + 1 :]):
                raise ValueError(f"linear must be lower-triangular: row {i} has a nonzero value above the diagonal")
            if not row[i] > 0:
                raise ValueError(f"linear must have a positive diagonal: entry ({i}, {i}) is {row[i]}")
        return self

    @field_validator("scale")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        if not all(s > 0 for s in v):
            raise ValueError("every scale must be > 0")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> "Preprocessing":
        if (self.lower is None) != (self.upper is None):
            raise ValueError("lower and upper bounds must be given together")
        if self.lower is None or self.upper is None:
            return self
        if len(self.lower) != len(self.shift) or len(self.upper) != len(self.shift):
            raise ValueError(f"lower and upper must each have {len(self.shift)} values (null where unbounded)")
        for j, (lo, hi) in enumerate(zip(self.lower, self.upper)):
            if (lo is None) != (hi is None):
                raise ValueError(f"feature {j} has only one bound; give both or neither (null)")
            if lo is not None and hi is not None:
                if not (math.isfinite(lo) and math.isfinite(hi)):
                    raise ValueError(f"feature {j}: bounds must be finite numbers, got [{lo}, {hi}]")
                if not lo < hi:
                    raise ValueError(f"feature {j}: the lower bound {lo} must be below the upper bound {hi}")
        return self

    @property
    def bounded(self) -> bool:
        """Whether any feature has bounds."""
        return self.lower is not None and any(v is not None for v in self.lower)


class WeightsInfo(_Strict):
    file: Literal["weights.safetensors"] = WEIGHTS_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    """Everything needed to rebuild and to explain a model (the model card's source)."""

    format_version: int
    name: str
    version: int = Field(ge=1)
    created_at: str
    description: str = ""
    flow: dict[str, Any]
    dtype: Literal["float32", "float64"] = "float32"
    feature_names: list[str]
    context_names: list[str] = []
    preprocessing: Preprocessing
    base: dict[str, Any] = {"distribution": "DiagNormal", "loc": 0.0, "scale": 1.0}
    training: dict[str, Any] = {}
    calibration: list[float] = Field(default_factory=list, max_length=MAX_CALIBRATION)
    anomaly_alpha: float = Field(default=0.01, gt=0.0, lt=1.0)
    exactness: dict[str, Any] = {}
    notes: list[str] = []
    weights: WeightsInfo

    @field_validator("format_version")
    @classmethod
    def _format(cls, v: int) -> int:
        if v not in SUPPORTED_FORMATS:
            raise ValueError(
                f"format_version {v} is not supported (this flowserve reads {', '.join(map(str, SUPPORTED_FORMATS))})"
            )
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        kwargs = self.flow.get("kwargs")
        if not isinstance(kwargs, dict):
            raise ValueError("flow.kwargs must be an object")
        d, c = kwargs.get("features"), kwargs.get("context", 0)
        if d != len(self.feature_names):
            raise ValueError(f"flow has {d} features but feature_names has {len(self.feature_names)}")
        if c != len(self.context_names):
            raise ValueError(f"flow has {c} context features but context_names has {len(self.context_names)}")
        if len(set(self.feature_names)) != len(self.feature_names):
            raise ValueError("feature_names must be unique")
        if len(self.preprocessing.shift) != d or len(self.preprocessing.scale) != d:
            raise ValueError(f"preprocessing.shift and .scale must each have {d} values")
        if self.preprocessing.lower is not None and self.format_version < 2:
            raise ValueError("preprocessing.lower/upper (bounds) need format_version 2")
        if self.preprocessing.linear is not None and self.format_version < 3:
            raise ValueError("preprocessing.linear needs format_version 3")
        return self

    @property
    def features(self) -> int:
        return len(self.feature_names)

    @property
    def context_features(self) -> int:
        return len(self.context_names)


class LoadedArtifact:
    """A verified model read from disk: its manifest, its module (eval mode) and its calibration."""

    def __init__(self, path: Path, manifest: Manifest, model: DensityModel) -> None:
        self.path = path
        self.manifest = manifest
        self.model = model
        self.calibration = Calibration.from_values(manifest.calibration) if manifest.calibration else None

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> int:
        return self.manifest.version


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_model(manifest: Manifest) -> DensityModel:
    """The (untrained) module a manifest describes, in its dtype."""
    dtype = DTYPES[manifest.dtype]
    p = manifest.preprocessing
    shift = torch.tensor(p.shift, dtype=torch.float64)
    scale = torch.tensor(p.scale, dtype=torch.float64)
    linear = None if p.linear is None else torch.tensor(p.linear, dtype=torch.float64)
    if p.lower is None or p.upper is None:
        return DensityModel(manifest.flow, shift, scale, dtype=dtype, linear=linear)
    nan = float("nan")
    lower = torch.tensor([nan if v is None else v for v in p.lower], dtype=torch.float64)
    upper = torch.tensor([nan if v is None else v for v in p.upper], dtype=torch.float64)
    return DensityModel(manifest.flow, shift, scale, dtype=dtype, lower=lower, upper=upper, linear=linear)


def read_manifest(version_dir: Path) -> Manifest:
    """Parse and validate ``model.json`` in ``version_dir``."""
    path = version_dir / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(path, "missing manifest")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(path, f"manifest is not valid JSON: {e}") from None
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(root)'}: {err['msg']}" for err in e.errors())
        raise ArtifactError(path, f"bad manifest: {problems}") from None
    if version_dir.name != str(manifest.version):
        raise ArtifactError(path, f"manifest says version {manifest.version} but lies in folder {version_dir.name!r}")
    if version_dir.parent.name != manifest.name:
        raise ArtifactError(path, f"manifest says name {manifest.name!r} but lies in folder {version_dir.parent.name!r}")
    return manifest


def load_artifact(version_dir: Path | str, device: torch.device | str = "cpu") -> LoadedArtifact:
    """Load and verify one model version; refuse anything that does not match its manifest."""
    version_dir = Path(version_dir)
    manifest = read_manifest(version_dir)
    try:
        model = build_model(manifest)
    except (FlowSpecError, ValueError, TypeError) as e:
        raise ArtifactError(version_dir / MANIFEST_FILE, f"bad flow: {e}") from None

    weights = version_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ArtifactError(weights, "missing weights file")
    digest = _sha256(weights)
    if digest != manifest.weights.sha256:
        raise ArtifactError(weights, f"sha256 {digest} does not match the manifest's {manifest.weights.sha256}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(weights, f"not a readable safetensors file: {e}") from None

    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ArtifactError(weights, f"tensor names do not fit the flow: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, ref in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(ref.shape):
            raise ArtifactError(weights, f"tensor {key!r} has shape {tuple(got.shape)}, the flow needs {tuple(ref.shape)}")
        if got.dtype != ref.dtype:
            raise ArtifactError(weights, f"tensor {key!r} has dtype {got.dtype}, the manifest says {ref.dtype}")
    model.load_state_dict(tensors, strict=True)
    model.eval().requires_grad_(False)
    return LoadedArtifact(version_dir, manifest, model.to(device))


def save_artifact(root: Path | str, manifest_fields: dict[str, Any], model: DensityModel) -> Path:
    """Write the next version of ``manifest_fields['name']`` under ``root``; return its folder.

    The version folder is written under a temporary name and renamed into place, so a reader never
    sees a half-written version.
    """
    name = check_name(manifest_fields["name"])
    model_dir = Path(root) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    existing = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    version = max(existing, default=0) + 1

    tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    preprocessing = manifest_fields.get("preprocessing") or {}
    bounded = any(v is not None for v in (preprocessing.get("lower") or []))
    linear = preprocessing.get("linear") is not None
    fields = {
        "format_version": 3 if linear else 2 if bounded else 1,  # the oldest format that can express it
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **manifest_fields,
        "version": version,
        "weights": {"file": WEIGHTS_FILE, "sha256": _sha256(tmp / WEIGHTS_FILE)},
    }
    manifest = Manifest.model_validate(fields)
    record = manifest.model_dump()
    if manifest.preprocessing.lower is None:  # a format-1 manifest exactly as before bounds existed
        for key in ("lower", "upper"):
            record["preprocessing"].pop(key)
    if manifest.preprocessing.linear is None:  # nor a linear key before format 3
        record["preprocessing"].pop("linear")
    (tmp / MANIFEST_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    final = model_dir / str(version)
    os.rename(tmp, final)
    return final
