"""N flowserve replicas behind HAProxy on loopback: the scale-out topology, runnable on one machine.

```
clients ──► HAProxy 127.0.0.1:FRONT ──(leastconn, health check GET /readyz every 250 ms)──┬─► flowserve 127.0.0.1:P1
            retries a request whose connection failed or came back empty,                 ├─► flowserve 127.0.0.1:P2
            on another replica (every operation is a pure function of its request)        └─► flowserve 127.0.0.1:P3
```

Each replica is ``flowserve serve`` (one process, one device worker, ``OMP_NUM_THREADS=1`` unless
told otherwise) over one shared, read-only model repository. HAProxy (Debian's ``haproxy``) takes
a replica out of rotation when ``/readyz`` stops answering 200: at once on SIGTERM (the server
answers 503 for ``drain_delay_s`` before it closes its listener, and finishes what it accepted),
or within one check interval after a crash. A request sent to a replica that died under it is
retried by HAProxy on another (``retry-on conn-failure empty-response``, ``option redispatch``);
the project's client retries 503 and connection failures on top.

Commands (``python -m deploy.local.cluster --help``):

- ``up``: start the cluster and keep it until Ctrl-C (``make cluster``);
- ``bench``: one-row ``log_prob`` requests/s through the balancer for 1, 2, ... replicas, with wrk;
- ``rollout``: roll the repository's newest version of a model to every replica, one at a time
  (``POST /v1/admin/models/{name}/reload``, an atomic swap), waiting for each to serve it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import httpx

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

__all__ = ["Cluster", "Replica", "haproxy_config", "rolling_reload", "free_port", "main"]


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def haproxy_config(front_port: int, servers: Sequence[tuple[str, int]], check_interval_ms: int = 250,
                   stats_port: int | None = None) -> str:
    """The HAProxy configuration of the local cluster: one frontend on loopback, one backend of
    ``servers`` (name, port), checked with ``GET /readyz`` (200 = in rotation).

    ``fall 1``: one failed check takes a replica out (a draining replica answers 503 at once);
    ``timeout check 2s``: a replica slow to answer under load is not mistaken for a dead one;
    ``rise 2``: two good checks put it back. ``retry-on conn-failure empty-response`` with
    ``option redispatch 1`` resends a request whose connection was refused or reset to another
    replica, up to ``retries 3`` times; it is safe because every operation is side-effect free.
    """
    lines = [
        "global",
        "    maxconn 4096",
        "    nbthread 1",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 65s",
        "    timeout server 65s",
        "    timeout http-keep-alive 30s",
        "    timeout check 2s",
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response",
        "",
        "frontend flowserve",
        f"    bind {LOOPBACK}:{front_port}",
        "    default_backend replicas",
        "",
        "backend replicas",
        "    balance leastconn",
        "    option httpchk GET /readyz",
        "    http-check expect status 200",
        f"    default-server inter {check_interval_ms}ms fastinter {check_interval_ms}ms downinter {check_interval_ms}ms fall 1 rise 2",
    ]
    lines += [f"    server {name} {LOOPBACK}:{port} check" for name, port in servers]
    if stats_port is not None:
        lines += ["", "frontend stats", f"    bind {LOOPBACK}:{stats_port}", "    stats enable",
                  "    stats uri /stats", "    stats refresh 1s"]
    return "\n".join(lines) + "\n"


@dataclass
class Replica:
    """One ``flowserve serve`` process on a fixed loopback port (kept across restarts)."""

    name: str
    port: int
    model_dir: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> "Replica":
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
        env.update({"FLOWSERVE_MODEL_DIR": str(self.model_dir), "FLOWSERVE_HOST": LOOPBACK,
                    "FLOWSERVE_PORT": str(self.port), "FLOWSERVE_DEVICE": "cpu", "FLOWSERVE_LOG_LEVEL": "warning",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        self.starts += 1
        log = open(self.log_dir / f"{self.name}-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=ROOT, env=env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def wait_ready(self, timeout: float = 120.0) -> "Replica":
        """Poll ``/readyz`` until it answers 200 (the process exiting first is an error)."""
        end = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as http:
            while time.monotonic() < end:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"replica {self.name} exited:\n{self.log()}")
                try:
                    if http.get("/readyz").status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError(f"replica {self.name} not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        path = self.log_dir / f"{self.name}-{self.starts}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash, with requests in flight lost on this replica's connections."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(30)

    def terminate(self, timeout: float = 90.0) -> int:
        """SIGTERM and wait: /readyz turns 503, the listener closes after the drain delay, requests
        in flight finish, the process exits (0 on a clean drain)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return int(self.proc.returncode)


class Cluster:
    """``replicas`` flowserve processes behind one HAProxy, all on loopback.

    ``settings`` are ``FLOWSERVE_*`` settings of every replica (``{"models": "moons"}`` becomes
    ``FLOWSERVE_MODELS=moons``); ``drain_delay_s`` defaults to one second, four check intervals, so
    HAProxy has taken a stopping replica out before its listener closes.
    """

    def __init__(self, model_dir: Path, replicas: int = 3, workdir: Path | None = None,
                 front_port: int | None = None, haproxy: str = "haproxy", check_interval_ms: int = 250,
                 threads: int = 1, **settings: Any) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="flowserve-cluster-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.haproxy = shutil.which(haproxy) or haproxy
        self.front_port = front_port or free_port()
        self.check_interval_ms = check_interval_ms
        settings.setdefault("drain_delay_s", max(1.0, 4 * check_interval_ms / 1000))
        env = {f"FLOWSERVE_{k.upper()}": str(v) for k, v in settings.items()}
        env["OMP_NUM_THREADS"] = str(threads)
        self.replicas = [Replica(f"r{i + 1}", free_port(), Path(model_dir).resolve(), self.workdir, dict(env))
                         for i in range(replicas)]
        self.balancer: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.front_port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "haproxy.cfg"

    def start(self, timeout: float = 180.0) -> "Cluster":
        """Start every replica, wait for all to be ready, then start HAProxy and wait until it
        routes to every one of them (a request to each through the balancer is not needed: the
        check state is read from HAProxy's own view, via ``/readyz`` through the frontend)."""
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            replica.wait_ready(timeout)
        self.config_path.write_text(haproxy_config(self.front_port, [(r.name, r.port) for r in self.replicas],
                                                   self.check_interval_ms))
        check = subprocess.run([self.haproxy, "-c", "-q", "-f", str(self.config_path)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy refused its configuration: {check.stderr or check.stdout}")
        log = open(self.workdir / "haproxy.log", "wb")
        self.balancer = subprocess.Popen([self.haproxy, "-db", "-f", str(self.config_path)],
                                         stdout=log, stderr=subprocess.STDOUT)
        log.close()
        end = time.monotonic() + 30
        with httpx.Client(base_url=self.url, timeout=2.0) as http:
            while time.monotonic() < end:
                if self.balancer.poll() is not None:
                    raise RuntimeError("haproxy exited: " + (self.workdir / "haproxy.log").read_text(errors="replace"))
                try:
                    if http.get("/readyz").status_code == 200:
                        # servers start "up" and are checked at once; two intervals settle every check
                        time.sleep(2 * self.check_interval_ms / 1000)
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise RuntimeError("haproxy did not answer /readyz within 30 s")

    def stop(self) -> None:
        """SIGTERM every replica and the balancer (each waited for)."""
        for replica in self.replicas:
            replica.terminate()
        if self.balancer is not None and self.balancer.poll() is None:
            self.balancer.terminate()
            try:
                self.balancer.wait(10)
            except subprocess.TimeoutExpired:
                self.balancer.kill()
                self.balancer.wait(10)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Cluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rolling_restart(self, timeout: float = 120.0) -> list[dict[str, float]]:
        """Restart the replicas one at a time: SIGTERM (drain), wait for its exit, start it again
        on the same port, wait for ``/readyz``, wait for HAProxy to route to it again (``rise``
        checks), then the next. Returns, per replica, the drain and restart seconds and its exit code."""
        steps = []
        for replica in self.replicas:
            t0 = time.monotonic()
            code = replica.terminate(timeout)
            t1 = time.monotonic()
            replica.start().wait_ready(timeout)
            time.sleep(3 * self.check_interval_ms / 1000)  # rise 2 at one interval each, plus one of margin
            steps.append({"replica": float(self.replicas.index(replica) + 1), "drain_s": t1 - t0,
                          "restart_s": time.monotonic() - t1, "exit_code": float(code)})
        return steps


def served_version(url: str, model: str, timeout: float = 5.0) -> int | None:
    """The version a replica answers unversioned requests for ``model`` with (``GET /v1/models``)."""
    from flowserve_client import Client

    with Client(url, timeout=timeout, retries=2) as client:
        for entry in client.models():
            if entry.get("name") == model:
                return int(entry["version"])
    return None


def rolling_reload(urls: Sequence[str], model: str, admin_key: str, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Roll a model to the repository's newest version on every replica, one at a time.

    For each replica: ``POST /v1/admin/models/{model}/reload`` (the replica rescans the shared
    repository, loads and verifies the new version aside and swaps it in with one assignment;
    requests in flight finish on the version they started with), then poll ``GET /v1/models``
    until it serves the newest version. A reload that fails leaves that replica on its old
    version and stops the rollout there (raised), so a bad artifact never reaches the fleet.
    """
    steps = []
    with httpx.Client(timeout=timeout, headers={"authorization": f"Bearer {admin_key}"}) as http:
        for url in urls:
            t0 = time.monotonic()
            answer = http.post(f"{url}/v1/admin/models/{model}/reload")
            if answer.status_code != 200:
                raise RuntimeError(f"reload of {model} on {url} answered {answer.status_code}: {answer.text}")
            body = answer.json()
            target = int(body["version"]) if body.get("version") is not None else None
            end = time.monotonic() + timeout
            while served_version(url, model) != target:
                if time.monotonic() > end:
                    raise RuntimeError(f"{url} did not serve {model} version {target} within {timeout} s")
                time.sleep(0.05)
            steps.append({"url": url, "version": target, "seconds": time.monotonic() - t0, "answer": body})
    return steps


# -- the command line --------------------------------------------------------------------------------
WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"inputs": [[0.5, 0.25]]}'
"""


def _wrk(url: str, path: str, seconds: float, concurrency: int, workdir: Path) -> dict[str, float]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench needs wrk (Debian: apt-get install wrk)")
    script = workdir / "log_prob.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run([wrk, "-t", "1", "-c", str(concurrency), "-d", f"{seconds:g}s", "--latency",
                          "-s", str(script), url + path], capture_output=True, text=True, check=True).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    seconds_taken = float(total.group(2)) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[total.group(3)]  # type: ignore[union-attr]
    ok = int(total.group(1)) - (int(non2xx.group(1)) if non2xx else 0)  # type: ignore[union-attr]
    rps = ok / seconds_taken  # answered 200 per second: errors are not throughput
    errors = re.search(r"Socket errors:.*", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    return {"requests_per_s": rps, "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
            "socket_errors": 1.0 if errors else 0.0,
            "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan")}


def _bench(args: argparse.Namespace) -> int:
    counts = [int(n) for n in args.replicas.split(",")]
    model = args.models.split(",")[0]
    rows = []
    for n in counts:
        with Cluster(Path(args.model_dir), replicas=n, threads=args.threads, models=args.models) as cluster:
            path = f"/v1/models/{model}/log_prob"
            _wrk(cluster.url, path, 2, args.concurrency, cluster.workdir)  # warm-up
            direct = _wrk(cluster.replicas[0].url, path, args.seconds, args.concurrency, cluster.workdir) if n == 1 else None
            result = _wrk(cluster.url, path, args.seconds, args.concurrency, cluster.workdir)
            row = {"replicas": n, **result}
            if direct is not None:
                row["direct_requests_per_s"] = direct["requests_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(json.dumps({"cpus": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}))
    return 0


def _up(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {"models": args.models} if args.models else {}
    if os.environ.get("FLOWSERVE_ADMIN_KEY"):  # replicas get no FLOWSERVE_* variable but those given
        settings["admin_key"] = os.environ["FLOWSERVE_ADMIN_KEY"]
    with Cluster(Path(args.model_dir), replicas=int(args.replicas), front_port=args.port, threads=args.threads,
                 **settings) as cluster:
        print(f"flowserve cluster: {cluster.url} -> " + ", ".join(r.url for r in cluster.replicas), flush=True)
        print(f"haproxy configuration: {cluster.config_path}; Ctrl-C stops everything", flush=True)
        try:
            while all(r.alive() for r in cluster.replicas):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


def _rollout(args: argparse.Namespace) -> int:
    key = os.environ.get("FLOWSERVE_ADMIN_KEY")
    if not key:
        raise SystemExit("rollout: set FLOWSERVE_ADMIN_KEY to the replicas' admin key")
    for step in rolling_reload(args.urls.split(","), args.model, key, args.timeout):
        print(json.dumps({k: step[k] for k in ("url", "version", "seconds")}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.local.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start N replicas behind HAProxy and keep them until Ctrl-C")
    up.add_argument("--replicas", type=int, default=3)
    up.add_argument("--port", type=int, default=8080, help="the balancer's loopback port (default 8080)")
    up.set_defaults(run=_up)
    bench = sub.add_parser("bench", help="one-row log_prob requests/s through the balancer for 1, 2, ... replicas")
    bench.add_argument("--replicas", default="1,2,3", help="comma-separated replica counts (default 1,2,3)")
    bench.add_argument("--seconds", type=float, default=10.0)
    bench.add_argument("--concurrency", type=int, default=32)
    bench.set_defaults(run=_bench)
    for p in (up, bench):
        p.add_argument("--model-dir", default=str(ROOT / "models"))
        p.add_argument("--models", default="moons", help="FLOWSERVE_MODELS of every replica (default moons)")
        p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every replica (default 1)")
    roll = sub.add_parser("rollout", help="reload a model on each replica in turn (FLOWSERVE_ADMIN_KEY)")
    roll.add_argument("--model", required=True)
    roll.add_argument("--urls", required=True, help="comma-separated replica URLs (not the balancer)")
    roll.add_argument("--timeout", type=float, default=60.0)
    roll.set_defaults(run=_rollout)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
