"""``/v1/admin``: load, unload and reload while serving, over real HTTP on a repository the test writes to.

- ``admin``: serves ``moons`` and ``nocal`` of its own copy of the test repository (``cond`` is there,
  not loaded); reloads happen under a continuous load of requests from a thread pool.
- ``slow``: batches wait up to 4 s to fill, so requests stay queued (in flight) while a reload or an
  unload happens; they must still be answered, by the version they started on.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest

from service.model.artifact import load_artifact, save_artifact
from tests.server import ServerProcess, running_servers


ADMIN_KEY = "admin-key-for-tests"
AUTH = {"authorization": f"Bearer {ADMIN_KEY}"}
PROBLEM = "application/problem+json"
X = [[0.5, 0.25], [1.0, -0.5], [-0.75, 0.625]]
M = "/v1/models/moons"


def copy_version(repo: Path, name: str, version: int) -> Path:
    """Write the next version of ``name``: the weights and manifest of ``version`` again (``save_artifact``)."""
    artifact = load_artifact(repo / name / str(version))
    fields = artifact.manifest.model_dump(exclude={"format_version", "version", "created_at", "weights"})
    fields["description"] = f"copy of version {version}"
    return save_artifact(repo, fields, artifact.model)


def break_weights(version_dir: Path) -> None:
    weights = version_dir / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\xff\xff\xff\xff"
    weights.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def repos(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("admin-repos")
    return {name: Path(shutil.copytree(model_repo, root / name)) for name in ("admin", "slow")}


@pytest.fixture(scope="module")
def servers(repos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("admin")
    configs = {
        "admin": dict(admin_key=ADMIN_KEY, models="moons,nocal"),
        "slow": dict(admin_key=ADMIN_KEY, models="moons,cond", max_wait_ms=4000, max_batch_rows=100_000),
    }
    with running_servers({name: (repos[name], cfg) for name, cfg in configs.items()}, tmp) as procs:
        yield procs


@pytest.fixture(scope="module")
def admin(servers: dict[str, ServerProcess]) -> Iterator[httpx.Client]:
    with servers["admin"].client() as c:
        yield c


def change(c: httpx.Client, name: str, action: str, status: int = 200) -> dict[str, Any]:
    r = c.post(f"/v1/admin/models/{name}/{action}", headers=AUTH)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == (PROBLEM if status >= 400 else "application/json")
    return r.json()


def served(c: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c.get("/v1/models").json()["models"]}


# -- load and unload --------------------------------------------------------------------------------------
def test_load_and_unload(admin: httpx.Client) -> None:
    assert set(served(admin)) == {"moons", "nocal"}
    assert admin.post("/v1/models/cond/log_prob", json={"inputs": X}).status_code == 404

    entry = change(admin, "cond", "load")
    assert entry["action"] == "loaded" and entry["previous_versions"] == []
    assert {k: entry[k] for k in ("name", "version", "versions", "features", "context_features", "flow", "ready",
                                  "state")} == {"name": "cond", "version": 1, "versions": [1], "features": 2,
                                                "context_features": 3, "flow": "maf", "ready": True, "state": "ready"}
    assert served(admin)["cond"] == {k: v for k, v in entry.items() if k not in ("action", "previous_versions")}
    r = admin.post("/v1/models/cond/log_prob", json={"inputs": X, "context": np.eye(3).tolist()})
    assert r.status_code == 200 and len(r.json()["log_prob"]) == 3
    assert admin.get("/readyz").json()["models"] == {"cond": "ready", "moons": "ready", "nocal": "ready"}
    assert change(admin, "cond", "load")["action"] == "unchanged"

    entry = change(admin, "cond", "unload")
    assert entry["action"] == "unloaded" and entry["state"] == "unloaded" and entry["previous_versions"] == [1]
    assert entry["versions"] == [] and entry["ready"] is False
    r = admin.post("/v1/models/cond/log_prob", json={"inputs": X, "context": np.eye(3).tolist()})
    assert r.status_code == 404 and r.headers["content-type"] == PROBLEM
    assert "cond" not in served(admin) and admin.get("/v1/models/cond").status_code == 404
    assert admin.get("/readyz").status_code == 200 and "cond" not in admin.get("/readyz").json()["models"]
    assert change(admin, "cond", "unload")["action"] == "unchanged"
    # an unloaded model loads again
    assert change(admin, "nocal", "unload")["action"] == "unloaded"
    assert change(admin, "nocal", "load")["versions"] == [1]
    assert admin.post("/v1/models/nocal/log_prob", json={"inputs": X}).status_code == 200


@pytest.mark.parametrize("name, status, text", [
    ("nothere", 404, "the model repository has no model named 'nothere'"),
    ("..x", 400, "invalid model name"),
    ("a..b", 400, "invalid model name"),
    (".hidden", 400, "invalid model name"),
    ("-dash", 400, "invalid model name"),
    ("sp%20ace", 400, "invalid model name 'sp ace'"),
    ("..%5Cetc", 400, "invalid model name"),
    ("x" * 65, 400, "invalid model name"),
])
def test_names_are_checked(admin: httpx.Client, name: str, status: int, text: str) -> None:
    for action in ("load", "unload", "reload"):
        problem = change(admin, name, action, status)
        assert text in problem["detail"]
        assert problem["errors"][0]["loc"] == ["path", "name"]


def test_admin_routes_are_post_only(admin: httpx.Client) -> None:
    r = admin.get("/v1/admin/models/moons/reload", headers=AUTH)
    assert r.status_code == 405 and r.headers["content-type"] == PROBLEM


# -- reload under load ----------------------------------------------------------------------------------
class Load:
    """Threads that send requests back to back until stopped, recording every answer."""

    def __init__(self, url: str, threads: int) -> None:
        self.url = url
        self.threads = threads
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, int, int | None, str]] = []  # (sent at, status, version, text)
        self.pool = ThreadPoolExecutor(threads)
        self.futures = [self.pool.submit(self._run, i) for i in range(threads)]

    def _requests(self, i: int) -> list[Callable[[httpx.Client], httpx.Response]]:
        return [
            lambda c: c.post(f"{M}/log_prob", json={"inputs": X}),
            lambda c: c.post(f"{M}/score", json={"inputs": X, "alpha": 0.05}),
            lambda c: c.post(f"{M}/sample", json={"n": 4, "seed": i}),
            lambda c: c.post(f"{M}/inverse", json={"inputs": X}),
        ]

    def _run(self, i: int) -> None:
        requests = self._requests(i)
        with httpx.Client(base_url=self.url, timeout=60.0) as c:
            k = 0
            while not self.stop.is_set():
                sent = time.monotonic()
                r = requests[(i + k) % len(requests)](c)
                version = r.json().get("version") if r.status_code == 200 else None
                with self.lock:
                    self.answers.append((sent, r.status_code, version, r.text[:300]))
                k += 1

    def wait_for(self, count: int, after: float = 0.0, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if sum(1 for a in self.answers if a[0] >= after) >= count:
                    return
            time.sleep(0.01)
        raise AssertionError(f"fewer than {count} answers in {timeout} s")

    def finish(self) -> list[tuple[float, int, int | None, str]]:
        self.stop.set()
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        return list(self.answers)


def test_reload_under_concurrent_load(servers: dict[str, ServerProcess], repos: dict[str, Path],
                                      admin: httpx.Client) -> None:
    load = Load(servers["admin"].url, threads=6)
    try:
        load.wait_for(40)  # requests flow to version 2
        copy_version(repos["admin"], "moons", 1)  # version 3: version 1's weights
        entry = change(admin, "moons", "reload")
        reloaded = time.monotonic()
        assert entry["action"] == "reloaded" and entry["version"] == 3
        assert entry["versions"] == [1, 2, 3] and entry["previous_versions"] == [1, 2]
        load.wait_for(40, after=reloaded)
    finally:
        answers = load.finish()

    failures = [a for a in answers if a[1] != 200]
    assert not failures, failures[:5]
    assert {version for _, _, version, _ in answers} == {2, 3}
    late = [version for sent, _, version, _ in answers if sent >= reloaded]
    assert len(late) >= 40 and set(late) == {3}  # every request sent after the reload answered: the new version
    # version 3 is version 1's weights: the same densities as version 1, others than version 2's
    lp = {v: admin.post(f"{M}/versions/{v}/log_prob", json={"inputs": X}).json()["log_prob"] for v in (1, 2, 3)}
    assert admin.post(f"{M}/log_prob", json={"inputs": X}).json()["log_prob"] == lp[3] == lp[1] != lp[2]


def test_broken_versions_are_refused_and_the_old_ones_keep_serving(admin: httpx.Client, repos: dict[str, Path]) -> None:
    repo = repos["admin"]
    before = change(admin, "moons", "reload")["versions"]
    broken = copy_version(repo, "moons", 2)
    break_weights(broken)
    problem = change(admin, "moons", "reload", 409)
    assert problem["type"].endswith("load-failed") and "does not match the manifest" in problem["detail"]
    assert f"moons/{broken.name}/weights.safetensors" in problem["detail"]  # which file of which version
    assert problem["serving"] == before
    assert admin.post(f"{M}/log_prob", json={"inputs": X}).json()["version"] == before[-1]
    assert served(admin)["moons"]["versions"] == before and admin.get("/readyz").status_code == 200
    assert change(admin, "moons", "load")["action"] == "unchanged"  # load leaves a served model alone

    shutil.rmtree(broken)  # the operator removes the broken version: the next reload works
    assert change(admin, "moons", "reload")["versions"] == before

    # a model that never loaded is refused too, and does not become part of readiness
    (repo / "wreck").mkdir()
    shutil.copytree(repo / "nocal" / "1", repo / "wreck" / "1")
    problem = change(admin, "wreck", "load", 409)
    assert "manifest says name 'nocal'" in problem["detail"] and problem["serving"] == []
    assert "wreck" not in served(admin) and admin.get("/readyz").status_code == 200
    assert change(admin, "wreck", "unload")["action"] == "unchanged"


# -- requests in flight -------------------------------------------------------------------------------------
def _queued_rows(server: ServerProcess) -> float:
    return server.metric("flowserve_queue_rows")


def test_requests_in_flight_finish_on_the_version_they_started_on(servers: dict[str, ServerProcess],
                                                                   repos: dict[str, Path]) -> None:
    server = servers["slow"]
    calls = {
        "moons log_prob": (f"{M}/log_prob", {"inputs": X}),
        "moons sample": (f"{M}/sample", {"n": 4, "seed": 1}),
        "cond log_prob": ("/v1/models/cond/log_prob", {"inputs": X, "context": np.eye(3).tolist()}),
    }
    with ThreadPoolExecutor(len(calls)) as pool, server.client() as c:
        futures = {k: pool.submit(httpx.post, server.url + path, json=body, timeout=60.0)
                   for k, (path, body) in calls.items()}
        end = time.monotonic() + 30
        while _queued_rows(server) < 10 and time.monotonic() < end:  # all three are queued, waiting for more rows
            time.sleep(0.02)
        assert _queued_rows(server) == 10

        copy_version(repos["slow"], "moons", 1)
        assert change(c, "moons", "reload")["version"] == 3
        assert change(c, "cond", "unload")["action"] == "unloaded"
        # new requests see the change at once
        assert {m["name"]: m["version"] for m in c.get("/v1/models").json()["models"]} == {"moons": 3}
        assert c.post("/v1/models/cond/log_prob", json={"inputs": X}).status_code == 404

        answers = {k: f.result() for k, f in futures.items()}
    for key, r in answers.items():
        assert r.status_code == 200, (key, r.text)
    assert answers["moons log_prob"].json()["version"] == 2 and len(answers["moons log_prob"].json()["log_prob"]) == 3
    assert answers["moons sample"].json()["version"] == 2 and len(answers["moons sample"].json()["samples"]) == 4
    assert answers["cond log_prob"].json()["model"] == "cond" and answers["cond log_prob"].json()["version"] == 1
