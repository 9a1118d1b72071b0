"""Loading, unloading and reloading models while the server runs (what ``/v1/admin`` does).

Every change builds a complete new :class:`~service.serving.registry.ModelEntry` aside (every version of
the model, loaded and verified from the repository) and swaps it in with one assignment
(:meth:`ModelRegistry.replace`), or drops the name (:meth:`ModelRegistry.remove`). A request holds
the :class:`~service.serving.registry.ServedModel` it looked up, so requests in flight finish on the
version they started with; each new load gets a new worker key (its ``generation``), so old and
new versions never share a batch. A new entry that fails to load is never swapped in: the old one
keeps serving and the failure is reported. Changes run one at a time (a lock), off the event loop.

- :meth:`ModelAdmin.load`: serve a model of the repository that is not served (not chosen at start,
  or unloaded); a model already served is left as it is.
- :meth:`ModelAdmin.reload`: serve exactly the versions the repository holds now (a new version
  written with :func:`~service.model.artifact.save_artifact` starts answering unversioned requests). A
  model not served yet is loaded.
- :meth:`ModelAdmin.unload`: stop serving it; afterwards its paths answer 404.

Models still in their first load (state ``loading``) are refused with :class:`StillLoading`.
After a change that dropped versions, :func:`~service.accel.memory.release_freed_memory` hands what they
held back to the OS (the allocator keeps it otherwise: see :mod:`service.accel.memory`), so a server
reloaded again and again stays the same size. This module knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from service.model.artifact import check_name
from service.accel.memory import release_freed_memory
from service.serving.errors import FlowserveError, NotReady
from service.serving.registry import ModelEntry, ModelRegistry, ModelState

__all__ = ["AdminError", "AdminResult", "InvalidName", "LoadFailed", "ModelAdmin", "NotInRepository", "StillLoading"]

log = logging.getLogger("flowserve.admin")


class AdminError(FlowserveError):
    """Base of the refusals of :class:`ModelAdmin` (each has its row in the HTTP layer's status table)."""


class InvalidName(AdminError, ValueError):
    """Not a model name (path tricks, bad characters)."""


class NotInRepository(AdminError, LookupError):
    """The repository holds no model of that name (no version folder with a manifest)."""

    def __init__(self, name: str, available: list[str]) -> None:
        self.name = name
        self.available = available
        super().__init__(f"the model repository has no model named {name!r}; it has {available}")


class LoadFailed(AdminError):
    """The repository's versions of the model did not load; nothing was swapped in."""

    def __init__(self, name: str, error: str | None, serving: list[int]) -> None:
        self.name = name
        self.error = error
        self.serving = serving
        still = f"; still serving versions {serving}" if serving else ""
        super().__init__(f"model {name!r} failed to load: {error}{still}")


class StillLoading(AdminError, NotReady):
    """The model is in its first load at server start; try again once it is ready (``retry_after``)."""


@dataclass(frozen=True)
class AdminResult:
    """What a change did: the model's entry now (``None`` once unloaded) and whether anything changed."""

    name: str
    entry: ModelEntry | None
    changed: bool
    previous_versions: list[int]


class ModelAdmin:
    """Runs load / reload / unload on ``registry`` (blocking calls: run them in a thread)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self._lock = threading.Lock()

    # -- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _check(name: str) -> None:
        try:
            check_name(name)
        except ValueError as e:
            raise InvalidName(str(e)) from None

    def _current(self, name: str) -> ModelEntry | None:
        entry = next((e for e in self.registry.entries() if e.name == name), None)
        if entry is not None and entry.state is ModelState.LOADING:
            raise StillLoading(f"model {name!r} is still loading; try again once /readyz answers 200")
        return entry

    def _in_repository(self, name: str) -> None:
        if not self.registry.repository.versions(name):
            raise NotInRepository(name, self.registry.repository.names())

    def _swap_in(self, name: str, current: ModelEntry | None) -> AdminResult:
        """Build a new entry from the repository and swap it in, unless it failed to load."""
        previous = current.version_numbers if current is not None else []
        entry = self.registry.build_entry(name)
        if entry.state is not ModelState.READY:
            if current is not None and current.state is ModelState.FAILED:
                self.registry.replace(entry)  # it had failed already: keep the newest reason
            serving = previous if current is not None and current.state is ModelState.READY else []
            raise LoadFailed(name, entry.error, serving)
        self.registry.replace(entry)
        log.info("model %s now serves versions %s (was %s)", name, entry.version_numbers, previous)
        return AdminResult(name, entry, True, previous)

    # -- the three changes -----------------------------------------------------------------------
    def load(self, name: str) -> AdminResult:
        """Serve ``name`` from the repository; a model already served is left unchanged."""
        self._check(name)
        with self._lock:
            current = self._current(name)
            if current is not None and current.state is ModelState.READY:
                return AdminResult(name, current, False, current.version_numbers)
            self._in_repository(name)
            return self._swap_in(name, current)

    def reload(self, name: str) -> AdminResult:
        """Serve the versions the repository holds now, swapped in atomically; the old stay on failure."""
        self._check(name)
        with self._lock:
            try:
                return self._reload(name)
            finally:  # the old versions (or a failed new one) are freed now, unless a request holds them
                release_freed_memory()

    def _reload(self, name: str) -> AdminResult:
        current = self._current(name)
        self._in_repository(name)
        return self._swap_in(name, current)

    def unload(self, name: str) -> AdminResult:
        """Stop serving ``name`` (requests in flight finish); a model not served is left as it is."""
        self._check(name)
        with self._lock:
            result = self._unload(name)
            if result.changed:
                release_freed_memory()
            return result

    def _unload(self, name: str) -> AdminResult:
        current = self._current(name)
        if current is None:
            self._in_repository(name)
            return AdminResult(name, None, False, [])
        self.registry.remove(name)
        log.info("model %s unloaded (versions %s)", name, current.version_numbers)
        return AdminResult(name, None, True, current.version_numbers)
