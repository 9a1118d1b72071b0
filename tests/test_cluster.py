"""Replicas behind a real balancer (HAProxy from Debian) on loopback: a replica killed under load, a
rolling restart and a fleet-wide model rollout, with the project's client retrying as users' do.

Each test runs a bounded load (a few client threads for seconds, one-row ``log_prob``) through
the balancer of :class:`deploy.local.cluster.Cluster` and counts requests sent, answered and lost
(a lost request is one whose call raised after the client's retries). The counts are printed
(``pytest -s``) and must show 0 lost. Timings are reported, not asserted, beyond generous bounds.
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from flowserve_client import Client, NotFound

from deploy.local.cluster import Cluster, rolling_reload, served_version


pytestmark = [
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="haproxy is not installed (Debian package haproxy; make test installs it as root)"),
    pytest.mark.timeout(600),
]

ADMIN_KEY = "cluster-admin-key"
POINT = [[0.5, 0.25]]
#: answers of one float32 model to the same row, batched with any neighbours: equal to sqrt(eps)
RTOL = float(np.sqrt(np.finfo(np.float32).eps))


@dataclass
class Load:
    """Client threads sending one-row ``log_prob`` through the balancer until stopped."""

    url: str
    threads: int = 3
    #: seconds each thread waits between requests: steady traffic that leaves the 2 cores room to restart replicas
    pause_s: float = 0.01
    answers: list[tuple[float, float, float]] = field(default_factory=list)  # (start, end, log_prob)
    lost: list[tuple[float, str]] = field(default_factory=list)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        with Client(self.url, timeout=30.0, retries=6) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                with self._lock:
                    self.sent += 1
                try:
                    value = float(client.log_prob("moons", POINT)[0])
                except Exception as e:  # counted: a lost request is what this test looks for
                    with self._lock:
                        self.lost.append((start, repr(e)))
                    continue
                with self._lock:
                    self.answers.append((start, time.monotonic(), value))
                self._stop.wait(self.pause_s)

    def __enter__(self) -> "Load":
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)

    def report(self, what: str) -> str:
        line = f"{what}: sent {self.sent}, answered {len(self.answers)}, lost {len(self.lost)}"
        print(line)
        return line

    def answered_between(self, t0: float, t1: float) -> int:
        return sum(1 for start, _, _ in self.answers if t0 <= start < t1)


@pytest.fixture(scope="module")
def cluster_repo(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding only version 1 of the test ``moons`` (version 2 is rolled out later)."""
    root = tmp_path_factory.mktemp("cluster-models")
    shutil.copytree(model_repo / "moons" / "1", root / "moons" / "1")
    return root


@pytest.fixture(scope="module")
def cluster(cluster_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(cluster_repo, replicas=3, workdir=tmp_path_factory.mktemp("cluster"), models="moons",
                 admin_key=ADMIN_KEY) as c:
        yield c


def _all_in_rotation(cluster: Cluster) -> None:
    for replica in cluster.replicas:
        if not replica.alive():
            replica.start()
    for replica in cluster.replicas:
        replica.wait_ready()
    time.sleep(3 * cluster.check_interval_ms / 1000)


def test_replica_killed_under_load_loses_no_request(cluster: Cluster) -> None:
    _all_in_rotation(cluster)
    victim = cluster.replicas[1]
    served_before = _requests_answered(victim.url)
    with Load(cluster.url) as load:
        time.sleep(5.0)
        served_at_kill = _requests_answered(victim.url)
        killed_at = time.monotonic()
        victim.kill()  # SIGKILL: connections in flight to it are reset
        time.sleep(7.0)
    load.report("replica killed (SIGKILL) under load")
    assert load.sent > 0 and not load.lost, load.lost[:5]
    assert len(load.answers) == load.sent
    assert _requests_answered(victim.url) is None  # it is really gone
    assert served_before is not None and served_at_kill is not None
    assert served_at_kill > served_before, "the killed replica was not taking traffic"
    assert load.answered_between(killed_at, killed_at + 7.0) > 0, "nothing was answered after the kill"
    victim.start().wait_ready()


def test_rolling_restart_fails_no_request(cluster: Cluster) -> None:
    _all_in_rotation(cluster)
    with Load(cluster.url) as load:
        time.sleep(2.0)
        steps = cluster.rolling_restart()
        time.sleep(2.0)
    load.report("rolling restart (SIGTERM, drain, start, ready; each replica in turn)")
    for step in steps:
        print(f"  replica {int(step['replica'])}: drained in {step['drain_s']:.2f} s, "
              f"back in rotation after {step['restart_s']:.2f} s, exit code {int(step['exit_code'])}")
    assert [int(step["exit_code"]) for step in steps] == [0, 0, 0]  # every replica drained cleanly
    assert load.sent > 0 and not load.lost, load.lost[:5]
    assert len(load.answers) == load.sent
    assert all(r.starts >= 2 for r in cluster.replicas)


def test_fleet_rollout_of_a_new_version(cluster: Cluster, cluster_repo: Path, model_repo: Path) -> None:
    _all_in_rotation(cluster)
    assert {served_version(r.url, "moons") for r in cluster.replicas} == {1}
    with Client(cluster.url) as client:
        v1 = float(client.log_prob("moons", POINT)[0])
    with Client(cluster.replicas[0].url) as client, pytest.raises(NotFound):
        client.log_prob("moons", POINT, version=2)  # not in the repository yet
    with Load(cluster.url) as load:
        time.sleep(2.0)
        # the new version lands in the shared repository (a copy, then a rename: never half-written)
        staging = cluster_repo / "moons" / ".2.tmp"
        shutil.copytree(model_repo / "moons" / "2", staging)
        staging.rename(cluster_repo / "moons" / "2")
        started = time.monotonic()
        steps = rolling_reload([r.url for r in cluster.replicas], "moons", ADMIN_KEY)
        finished = time.monotonic()
        time.sleep(2.0)
    load.report("fleet rollout of moons version 2 (admin reload, one replica at a time)")
    print(f"  all 3 replicas on version 2 {finished - started:.2f} s after the rollout began; per replica: "
          + ", ".join(f"{s['seconds']:.2f} s" for s in steps))
    assert load.sent > 0 and not load.lost, load.lost[:5]
    assert len(load.answers) == load.sent
    assert [s["version"] for s in steps] == [2, 2, 2]
    assert {served_version(r.url, "moons") for r in cluster.replicas} == {2}
    assert finished - started < 120.0  # a generous bound; the figure is printed above
    with Client(cluster.url) as client:
        v2_expected = float(client.log_prob("moons", POINT, version=2)[0])
    assert not np.isclose(v1, v2_expected, rtol=100 * RTOL), "the two versions must answer differently"
    is_v1 = np.array([np.isclose(v, v1, rtol=RTOL) for _, _, v in load.answers])
    is_v2 = np.array([np.isclose(v, v2_expected, rtol=RTOL) for _, _, v in load.answers])
    assert np.all(is_v1 | is_v2), "an answer matched neither version"
    after = np.array([start > finished for start, _, _ in load.answers])
    assert after.any() and is_v2[after].all(), "a request sent after the rollout was answered by version 1"
    assert is_v1[~after].any()  # and version 1 did serve before it


def _requests_answered(url: str) -> float | None:
    """The replica's ``flowserve_requests_total`` sum, or ``None`` when it does not answer."""
    import httpx

    from tests.server import metric_value

    try:
        return metric_value(httpx.get(url + "/metrics", timeout=5.0).text, "flowserve_requests_total")
    except httpx.TransportError:
        return None
