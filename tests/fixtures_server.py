"""Fixtures of the HTTP tests (register with ``pytest_plugins = ["tests.fixtures_server"]``).

``model_repo``: the tiny repository of :func:`tests.server.build_repository` (session-scoped);
``server`` / ``client``: a server with default settings over it, and an httpx client to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.server import ServerProcess, build_repository, start_server


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``moons`` (versions 1, 2), ``cond`` and ``nocal``."""
    return build_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The main test server over :func:`model_repo`, with default settings."""
    proc = start_server(model_repo, tmp_path_factory.mktemp("server"))
    try:
        yield proc
    finally:
        proc.terminate()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
