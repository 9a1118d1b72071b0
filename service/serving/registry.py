"""The models a server holds: every version of each chosen model, loaded from a repository.

The registry is the one place the API looks models up. Each model name maps to an immutable
:class:`ModelEntry` (its versions, loaded onto the worker's device); replacing a name's entry is a
single dictionary assignment, so an admin reload can build the new entry aside and swap it in
atomically: a request that already looked up the old entry finishes on it.

Loading happens after the server starts listening (:meth:`ModelRegistry.load_all`, run in a
thread), so ``/healthz`` answers at once and ``/readyz`` says 503 until every chosen model is in.
"""

from __future__ import annotations

import itertools
import logging
import threading
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Mapping, NamedTuple

import torch

from service.model.artifact import ArtifactError, LoadedArtifact
from service.model.calibration import Calibration
from service.accel.cuda_graphs import use_cuda_graphs
from service.model.density import DensityModel
from service.accel.threads import one_intra_op_thread
from service.model.repository import ModelRepository
from service.accel.torchscript import try_trace
from service.serving.errors import FAILED_RETRY_S, LOADING_RETRY_S, FlowserveError, NotReady

__all__ = [
    "ModelEntry",
    "ModelKey",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRegistry",
    "ModelState",
    "RegistryError",
    "ServedModel",
    "VersionNotFound",
]

log = logging.getLogger("flowserve.registry")


class RegistryError(FlowserveError):
    """Base of the registry's lookup errors."""


class ModelNotFound(RegistryError, LookupError):
    """No model of that name is served."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(f"no model named {name!r}; served models: {available}")


class VersionNotFound(RegistryError, LookupError):
    """The model is served, but not at that version."""

    def __init__(self, name: str, version: object, available: list[int]) -> None:
        self.name = name
        self.version = version
        self.available = available
        super().__init__(f"model {name!r} has no version {version!r}; versions: {available}")


class ModelNotReady(RegistryError, NotReady):
    """The model is configured but not (yet, or not successfully) loaded; retry after ``retry_after``."""

    def __init__(self, name: str, state: "ModelState", error: str | None = None) -> None:
        self.name = name
        self.state = state
        self.error = error
        why = f"failed to load: {error}" if state is ModelState.FAILED else "is still loading"
        super().__init__(f"model {name!r} {why}",
                         LOADING_RETRY_S if state is ModelState.LOADING else FAILED_RETRY_S)


class ModelState(str, Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class ModelKey(NamedTuple):
    """The worker's queue key of one loaded version; ``generation`` tells reloads apart."""

    name: str
    version: int
    generation: int


@dataclass(frozen=True, eq=False)
class ServedModel:
    """One loaded model version, as the API and the operations see it."""

    artifact: LoadedArtifact
    key: ModelKey

    @property
    def name(self) -> str:
        return self.artifact.name

    @property
    def version(self) -> int:
        return self.artifact.version

    @property
    def model(self) -> DensityModel:
        return self.artifact.model

    @property
    def feature_names(self) -> list[str]:
        return self.artifact.manifest.feature_names

    @property
    def context_names(self) -> list[str]:
        return self.artifact.manifest.context_names

    @property
    def features(self) -> int:
        return self.artifact.manifest.features

    @property
    def context_features(self) -> int:
        return self.artifact.manifest.context_features

    @property
    def calibration(self) -> Calibration | None:
        return self.artifact.calibration

    @property
    def anomaly_alpha(self) -> float:
        return float(self.artifact.manifest.anomaly_alpha)


@dataclass(frozen=True)
class ModelEntry:
    """A model name's state and its loaded versions (ascending); the highest is the default."""

    name: str
    state: ModelState
    versions: Mapping[int, ServedModel] = field(default_factory=lambda: MappingProxyType({}))
    error: str | None = None

    @property
    def latest(self) -> ServedModel:
        return self.versions[max(self.versions)]

    @property
    def version_numbers(self) -> list[int]:
        return sorted(self.versions)


class ModelRegistry:
    """Which models this server holds, and their loaded versions.

    Arguments:
        repository: where the models live.
        device: where to load them (the device worker's device).
        names: the models to load; ``None`` loads every model in the repository.
        trace: run each model's passes as checked traced graphs (:mod:`service.accel.torchscript`); a model
            whose trace fails or differs from eager stays eager.
        cuda_graphs: on a CUDA device, replay small batches from captured CUDA graphs
            (:mod:`service.accel.cuda_graphs`); ignored on other devices.
    """

    def __init__(self, repository: ModelRepository, device: torch.device | str = "cpu",
                 names: list[str] | None = None, trace: bool = True, cuda_graphs: bool = True) -> None:
        self.repository = repository
        self.device = torch.device(device)
        self.trace = trace
        self.cuda_graphs = cuda_graphs
        self._requested = names
        self._entries: dict[str, ModelEntry] = {}
        self._generation = itertools.count(1)
        self._lock = threading.Lock()  # serialises writers; readers never take it

    # -- planning and loading --------------------------------------------------------------------
    def plan(self) -> list[str]:
        """Check that the chosen models exist and mark each as loading; return their names.

        Raises :class:`ArtifactError` naming the first chosen model the repository lacks.
        """
        available = self.repository.names()
        if self._requested is None:
            names = available
        else:
            missing = [n for n in self._requested if n not in available]
            if missing:
                raise ArtifactError(self.repository.root, f"no model {missing} in the repository (it has {available})")
            names = list(self._requested)
        with self._lock:
            for name in names:
                self._entries.setdefault(name, ModelEntry(name, ModelState.LOADING))
        return names

    def load_version(self, name: str, version: int) -> ServedModel:
        """Load and verify one version onto this registry's device (no swap).

        Runs on one torch intra-op thread (:mod:`service.accel.threads`: loading runs in a helper thread,
        which must not keep an OpenMP pool of its own).
        """
        with one_intra_op_thread():
            artifact = self.repository.load(name, version, device=self.device)
            if self.trace:
                try_trace(artifact.model, f"model {name} version {artifact.version}")
            if self.cuda_graphs:
                use_cuda_graphs(artifact.model)  # on CUDA only: small batches replay captured graphs
        return ServedModel(artifact, ModelKey(name, artifact.version, next(self._generation)))

    def build_entry(self, name: str) -> ModelEntry:
        """Load every version of ``name`` into a new entry (failures become a FAILED entry)."""
        try:
            versions = self.repository.versions(name)
            if not versions:
                raise ArtifactError(self.repository.root / name, "no versions")
            served = {v: self.load_version(name, v) for v in versions}
        except (ArtifactError, OSError, RuntimeError, ValueError) as e:
            log.error("model %s failed to load: %s", name, e)
            return ModelEntry(name, ModelState.FAILED, error=str(e))
        log.info("model %s loaded: versions %s on %s", name, versions, self.device)
        return ModelEntry(name, ModelState.READY, MappingProxyType(served))

    def load_all(self) -> None:
        """Load every planned model (blocking: run it in a thread)."""
        for name in list(self._entries):
            if self._entries[name].state is ModelState.LOADING:
                self.replace(self.build_entry(name))

    def replace(self, entry: ModelEntry) -> None:
        """Swap in ``entry`` for its name atomically (readers see the old or the new, never a mix)."""
        with self._lock:
            entries = dict(self._entries)
            entries[entry.name] = entry
            self._entries = entries

    def remove(self, name: str) -> None:
        """Stop serving ``name`` (requests that already hold its versions finish on them)."""
        with self._lock:
            entries = dict(self._entries)
            entries.pop(name, None)
            self._entries = entries

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """True when every chosen model is loaded."""
        return all(e.state is ModelState.READY for e in self._entries.values())

    def entries(self) -> list[ModelEntry]:
        """Every model this server was told to hold, by name."""
        entries = self._entries
        return [entries[n] for n in sorted(entries)]

    def entry(self, name: str) -> ModelEntry:
        entries = self._entries
        if name not in entries:
            raise ModelNotFound(name, sorted(entries))
        return entries[name]

    def get(self, name: str, version: int | str | None = None) -> ServedModel:
        """The served model ``name`` at ``version`` (the highest when ``None``).

        ``version`` may be the path's string; anything but a loaded integer version is
        :class:`VersionNotFound`.
        """
        entry = self.entry(name)
        if entry.state is not ModelState.READY:
            raise ModelNotReady(name, entry.state, entry.error)
        if version is None:
            return entry.latest
        number = _as_version(version)
        if number is None or number not in entry.versions:
            raise VersionNotFound(name, version, entry.version_numbers)
        return entry.versions[number]


def _as_version(version: int | str) -> int | None:
    if isinstance(version, int) and not isinstance(version, bool):
        return version
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10:
        return int(version)
    return None

