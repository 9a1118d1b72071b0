"""The service's configuration: one object, read from ``FLOWSERVE_*`` environment variables.

Every variable of the HTTP contract's *Configuration* section is here, plus where to listen and
how much to log. ``flowserve serve`` options override the environment; both are validated when the
server starts, so a bad value stops it with a message that names the variable and what is wrong.

| variable                       | default        | meaning                                                       |
|--------------------------------|----------------|---------------------------------------------------------------|
| ``FLOWSERVE_MODEL_DIR``        | ``models``     | the model repository (one folder per model, one per version)  |
| ``FLOWSERVE_MODELS``           | all            | comma-separated names to load; every version of each is loaded |
| ``FLOWSERVE_DEVICE``           | ``auto``       | ``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` |
| ``FLOWSERVE_HOST``             | ``127.0.0.1``  | interface to listen on (``0.0.0.0`` in the container)          |
| ``FLOWSERVE_PORT``             | ``8000``       | TCP port                                                      |
| ``FLOWSERVE_LOG_LEVEL``        | ``info``       | ``critical`` .. ``debug``, ``trace`` (uvicorn's most verbose level) |
| ``FLOWSERVE_TORCHSCRIPT``      | ``true``       | run each model's passes as TorchScript traces, checked against eager at load (false: eager); ``FLOWSERVE_TRACE`` is its deprecated old name |
| ``FLOWSERVE_CUDA_GRAPHS``      | ``true``       | on CUDA, replay batches of up to 4096 rows from captured CUDA graphs (false: launch each kernel) |
| ``FLOWSERVE_MAX_BATCH_ROWS``   | 8192 / 65536   | most rows in one batched model call (CPU / CUDA default)      |
| ``FLOWSERVE_MAX_WAIT_MS``      | ``0``          | extra wait to grow a batch (Triton's ``max_queue_delay``)      |
| ``FLOWSERVE_MAX_BATCH_MS``     | ``25``         | time slice of a large request: it runs in chunks of about this much compute, taking turns with other requests (round robin); 0: chunks of ``max_batch_rows`` |
| ``FLOWSERVE_MAX_QUEUE_ROWS``   | ``1000000``    | rows waiting in the worker's queues; past it: 503 + Retry-After |
| ``FLOWSERVE_REQUEST_TIMEOUT_S``| ``30``         | each request's deadline; a batch not run by then: 504          |
| ``FLOWSERVE_MAX_ROWS``         | ``1000000``    | most rows in one request (413 above)                          |
| ``FLOWSERVE_MAX_SAMPLES``      | ``1000000``    | largest ``n`` of one sample request (413 above)               |
| ``FLOWSERVE_MAX_BODY_BYTES``   | ``268435456``  | largest request body, 256 MiB (413 above)                     |
| ``FLOWSERVE_DRAIN_DELAY_S``    | ``0``          | on SIGTERM, answer ``/readyz`` 503 this long before closing the listener |
| ``FLOWSERVE_TIMEOUT_KEEP_ALIVE_S`` | ``75``     | an idle kept-alive connection is closed after this long        |
| ``FLOWSERVE_HEADER_TIMEOUT_S`` | ``10``         | a request head not complete this long after the connection opened, or after its first byte: 408 and close |
| ``FLOWSERVE_BODY_TIMEOUT_S``   | ``60``         | a request body not complete this long after its head: 408 and close |
| ``FLOWSERVE_MAX_CONNECTIONS``  | from ``ulimit -n`` | connections held open; later ones get 503 + Retry-After (default: the soft ``RLIMIT_NOFILE``, raised towards the hard limit at start, less 320) |
| ``FLOWSERVE_SHED_WAIT_FRACTION`` | ``0.5``      | answer an operation 503 + Retry-After at once when its estimated wait (loop lag + queue) exceeds this fraction of the deadline; 0: never |
| ``FLOWSERVE_API_KEYS``         | none           | comma-separated bearer keys the model endpoints need (none: open) |
| ``FLOWSERVE_ADMIN_KEY``        | none           | the bearer key of ``/v1/admin`` (none: administration disabled) |

"Trace" was two settings: the log level (uvicorn's name, kept) and TorchScript tracing, now
``torchscript``. ``FLOWSERVE_TRACE`` is still read, with a warning, when ``FLOWSERVE_TORCHSCRIPT``
is not set (:class:`_DeprecatedEnv`).

``max_rows`` and ``max_samples`` may not exceed ``max_queue_rows``: a request larger than the whole
queue could never be accepted, and would be answered 503 forever instead of 413 once.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from service.model.artifact import check_name

__all__ = ["Settings", "SettingsError", "default_batch_rows", "load_settings"]

log = logging.getLogger("flowserve.settings")

MiB = 1 << 20
#: old environment variable -> the field it now sets (read only where the field's own variable is unset)
DEPRECATED_ENV = {"FLOWSERVE_TRACE": "torchscript"}
DEFAULT_CPU_BATCH_ROWS = 8192
DEFAULT_GPU_BATCH_ROWS = 65536
def default_batch_rows(device: Any) -> int:
    """The default ``max_batch_rows`` on ``device``: 8192 rows on the CPU, where a larger batch
    gains nothing, and 65536 on a GPU, which needs large batches to be busy."""
    return DEFAULT_GPU_BATCH_ROWS if getattr(device, "type", str(device)) == "cuda" else DEFAULT_CPU_BATCH_ROWS


DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class SettingsError(ValueError):
    """The configuration is invalid; the message lists every bad variable and why."""


def _split_names(value: Any) -> Any:
    """``"a, b"`` -> ``["a", "b"]``; lists pass through; empty -> ``[]``."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class _DeprecatedEnv(PydanticBaseSettingsSource):
    """Old variable names (:data:`DEPRECATED_ENV`), below the real environment in priority.

    ``FLOWSERVE_TRACE=false`` still turns TorchScript off, and logs a warning naming the new
    variable; where ``FLOWSERVE_TORCHSCRIPT`` is set too, the old one is ignored (with a warning).
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for old, field in DEPRECATED_ENV.items():
            if old not in os.environ:
                continue
            new = "FLOWSERVE_" + field.upper()
            if new in os.environ:
                log.warning("%s is ignored: %s is set (%s is the deprecated name of %s)", old, new, old, new)
                continue
            log.warning("%s is deprecated: set %s instead (read as %s=%s)", old, new, new, os.environ[old])
            values[field] = os.environ[old]
        return values


class Settings(BaseSettings):
    """Everything the server needs to know at start; immutable once built."""

    model_config = SettingsConfigDict(env_prefix="FLOWSERVE_", extra="forbid", frozen=True)

    model_dir: Path = Field(Path("models"), description="The model repository folder.")
    models: Annotated[list[str] | None, NoDecode] = Field(
        None, description="Names of the models to load (every version of each); None loads all."
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N (mps where torch has it).")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0: any free port).")
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    torchscript: bool = Field(True, description="Run the models' passes as checked TorchScript traces (false: eager).")
    cuda_graphs: bool = Field(True, description="On CUDA, replay batches of up to 4096 rows from captured CUDA graphs.")
    max_batch_rows: int | None = Field(
        None, ge=1, description="Most rows in one batched model call (default: 8192 on the CPU, 65536 on CUDA).")
    max_wait_ms: float = Field(0.0, ge=0.0, le=60_000.0, description="Extra wait to grow a batch, ms.")
    max_batch_ms: float = Field(25.0, ge=0.0, le=60_000.0,
                                description="Time slice of a large request's chunks, ms (0: max_batch_rows).")
    max_queue_rows: int = Field(1_000_000, ge=1, description="Bound on rows waiting in the worker's queues.")
    request_timeout_s: float = Field(30.0, gt=0.0, le=3600.0, description="Per-request deadline, seconds.")
    max_rows: int = Field(1_000_000, ge=1, description="Most rows (inputs or latents) in one request.")
    max_samples: int = Field(1_000_000, ge=1, description="Largest n of one sample request.")
    max_body_bytes: int = Field(256 * MiB, ge=1024, description="Largest request body in bytes.")
    drain_delay_s: float = Field(0.0, ge=0.0, le=600.0, description="Readiness-off period before shutdown.")
    # Longer than the idle timeouts of the clients and proxies in front (httpx 5 s, HAProxy's 30 s in
    # deploy/, a cloud load balancer's 60 s): the side that closes an idle connection first must be the
    # one that would reuse it, else a request written as the server closes is reset (uvicorn's 5 s
    # equalled httpx's 5 s expiry: 1 in 8 runs of test_api_overload lost a request that way). nginx's
    # default. Idle connections cost a descriptor each, and the connection cap closes the longest-idle first.
    timeout_keep_alive_s: float = Field(75.0, gt=0.0, le=3600.0, description="Idle kept-alive connections close after this.")
    header_timeout_s: float = Field(10.0, gt=0.0, le=3600.0, description="Time allowed to send a request head.")
    body_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="Time allowed to send a request body after its head.")
    max_connections: int | None = Field(
        None, ge=1, description="Connections held open; excess ones get 503 (default: from RLIMIT_NOFILE).")
    shed_wait_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Shed operations whose estimated wait exceeds this fraction of the deadline.")

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Bearer keys of the model endpoints (service.http.auth).")
    admin_key: SecretStr | None = Field(None, description="Bearer key of /v1/admin; None disables it.")

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments, then ``FLOWSERVE_*``, then the deprecated names (:class:`_DeprecatedEnv`)."""
        return init_settings, env_settings, _DeprecatedEnv(settings_cls), dotenv_settings, file_secret_settings

    @field_validator("models", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split_names(value)

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            return None
        for name in value:
            check_name(name)
        if len(set(value)) != len(value):
            raise ValueError("names a model twice")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        value = value.strip().lower()
        if not DEVICE_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not one of auto, cpu, cuda, cuda:N")
        return value

    @field_validator("model_dir")
    @classmethod
    def _model_dir(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"{str(value)!r} is not a directory (create it or point FLOWSERVE_MODEL_DIR elsewhere)")
        return value

    @model_validator(mode="after")
    def _limits(self) -> "Settings":
        if self.max_rows > self.max_queue_rows:
            raise ValueError(
                f"max_rows ({self.max_rows}) exceeds max_queue_rows ({self.max_queue_rows}): such requests could never be queued"
            )
        if self.max_samples > self.max_queue_rows:
            raise ValueError(
                f"max_samples ({self.max_samples}) exceeds max_queue_rows ({self.max_queue_rows}): such requests could never be queued"
            )
        return self

    def batch_rows_for(self, device: Any) -> int:
        """``max_batch_rows``, or :func:`default_batch_rows` for ``device`` when it is not set."""
        return self.max_batch_rows if self.max_batch_rows is not None else default_batch_rows(device)

    def resolve_device(self) -> Any:
        """The ``torch.device`` to serve on: ``auto`` picks CUDA when available, else the CPU.

        Raises :class:`SettingsError` when the named device does not exist on this machine.
        """
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise SettingsError(f"FLOWSERVE_DEVICE={self.device}: CUDA is not available on this machine")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise SettingsError(
                    f"FLOWSERVE_DEVICE={self.device}: only {torch.cuda.device_count()} CUDA device(s) present"
                )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise SettingsError(f"FLOWSERVE_DEVICE={self.device}: MPS is not available on this machine")
        return device


def load_settings(**overrides: Any) -> Settings:
    """Build :class:`Settings` from the environment with ``overrides`` (e.g. CLI options) on top.

    ``None`` overrides are ignored, so unset CLI options fall back to the environment. Raises
    :class:`SettingsError` with one line per invalid variable.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "settings"
            variable = f"FLOWSERVE_{field.upper()}" if err["loc"] else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{variable}: {msg}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
