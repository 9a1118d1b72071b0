"""Connections and overload: idle connections against a 1024-file limit, and 1,000 concurrent clients.

``python -m bench.connections [--old-tree DIR] [--connections 1000] [--seconds 10]``

Starts ``flowserve serve`` (models ``moons`` of ``models/``, loopback, soft ``RLIMIT_NOFILE`` 1024
as many hosts have) and measures:

1. **idle**: 1,000 connections opened and left silent; then a working client sends one-row
   ``log_prob`` requests (5 s timeout each) for up to 20 s: how many are answered 200, how many 503,
   how many time out, and when the first 200 came; and how long until the server closed the idle
   connections (polled up to 30 s).
2. **load**: ``--connections`` closed-loop clients (raw HTTP/1.1 keep-alive on asyncio) send one-row
   ``log_prob`` for ``--seconds``; a client answered 503 waits its ``Retry-After`` (as a
   well-behaved client does) before the next request. Reported: requests, the 503 share, p50/p99 of
   the 200 answers and of all answers, transport errors.

With ``--old-tree DIR`` (a ``git worktree`` of an older commit) the same runs against that tree's
server, with this environment's Python (``PYTHONPATH=DIR``), for a before/after. Loads are bounded in
count and time and stay on 127.0.0.1. The client raises its own descriptor limit to the hard limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BODY = b'{"inputs": [[0.5, 0.2]]}'
PATH = "/v1/models/moons/log_prob"
SERVER_NOFILE = 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_files() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (SERVER_NOFILE, hard))


class Server:
    def __init__(self, tree: Path, log: Path, **settings: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
        env.update({"FLOWSERVE_MODEL_DIR": str(ROOT / "models"), "FLOWSERVE_MODELS": "moons",
                    "FLOWSERVE_HOST": "127.0.0.1", "FLOWSERVE_PORT": str(self.port), "FLOWSERVE_DEVICE": "cpu",
                    "FLOWSERVE_LOG_LEVEL": "warning", "PYTHONPATH": str(tree)})
        env.update({f"FLOWSERVE_{k.upper()}": v for k, v in settings.items()})
        self._log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "serve"], cwd=tree, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_limit_files)
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _request(port: int) -> bytes:
    return (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY


# -- 1. idle connections --------------------------------------------------------------------------
def idle_run(server: Server, count: int) -> dict:
    socks: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        except OSError:
            refused += 1
    opened = time.monotonic()
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed_at: dict[int, float] = {}

    def poll(timeout: float) -> None:
        for key, _ in sel.select(timeout):
            s = key.fileobj
            try:
                data = s.recv(65536)  # type: ignore[union-attr]
            except (ConnectionResetError, BlockingIOError):
                data = b""
            if not data:
                closed_at[id(s)] = time.monotonic() - opened
                sel.unregister(s)

    # the working client, while the idle connections are open
    outcome = {"200": 0, "503": 0, "other": 0, "timeout_or_error": 0}
    first_200 = None
    end = time.monotonic() + 20
    while time.monotonic() < end and outcome["200"] < 5:
        t0 = time.monotonic()
        try:
            r = httpx.post(server.url + PATH, content=BODY, headers={"content-type": "application/json"}, timeout=5)
            key = str(r.status_code) if r.status_code in (200, 503) else "other"
            outcome[key] += 1
            if r.status_code == 200 and first_200 is None:
                first_200 = t0 - opened
        except httpx.TransportError:
            outcome["timeout_or_error"] += 1
        poll(0)
        time.sleep(0.5)
    deadline = opened + 30
    while len(closed_at) < len(socks) and time.monotonic() < deadline:
        poll(0.2)
    times = sorted(closed_at.values())
    for s in socks:
        s.close()
    return {
        "idle_opened": len(socks), "idle_connect_failed": refused, "client": outcome,
        "client_first_200_s": None if first_200 is None else round(first_200, 2),
        "idle_closed_by_server": len(times), "idle_still_open_after_30s": len(socks) - len(times),
        "idle_closed_median_s": round(times[len(times) // 2], 2) if times else None,
        "idle_closed_last_s": round(times[-1], 2) if times else None,
    }


# -- 2. concurrent load ---------------------------------------------------------------------------
async def _client(port: int, stop_at: float, out: dict) -> None:
    request = _request(port)
    writer = None
    while time.perf_counter() < stop_at:
        if writer is None:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
            except (OSError, asyncio.TimeoutError):
                out["errors"] += 1
                await asyncio.sleep(0.5)
                continue
        t0 = time.perf_counter()
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
            status = int(head[9:12])
            length, retry, close = 0, 0.0, False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"retry-after":
                    retry = float(value)
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if length:
                await asyncio.wait_for(reader.readexactly(length), 60)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError):
            out["errors"] += 1
            writer.close()
            writer = None
            continue
        elapsed = time.perf_counter() - t0
        out["all"].append(elapsed)
        out["status"][status] = out["status"].get(status, 0) + 1
        out["by_status"].setdefault(status, []).append(elapsed)
        if status == 200:
            out["ok"].append(elapsed)
        if close:
            writer.close()
            writer = None
        if status == 503 and retry:
            await asyncio.sleep(min(retry, max(0.0, stop_at - time.perf_counter())))


async def _load(port: int, connections: int, seconds: float) -> dict:
    out: dict = {"all": [], "ok": [], "status": {}, "errors": 0, "by_status": {}}
    stop_at = time.perf_counter() + seconds
    await asyncio.gather(*(_client(port, stop_at, out) for _ in range(connections)))
    return out


def load_run(server: Server, connections: int, seconds: float) -> dict:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    started = time.perf_counter()
    out = runner(_load(server.port, connections, seconds))
    wall = time.perf_counter() - started

    def pct(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    total = len(out["all"])
    return {
        "connections": connections, "seconds": round(wall, 1), "answers": total,
        "answers_per_s": round(total / wall, 1), "status": {str(k): v for k, v in sorted(out["status"].items())},
        "share_503": round(out["status"].get(503, 0) / total, 3) if total else None,
        "p50_ms_200": pct(out["ok"], 50), "p99_ms_200": pct(out["ok"], 99),
        "p50_ms_all": pct(out["all"], 50), "p99_ms_all": pct(out["all"], 99), "max_ms_all": pct(out["all"], 100),
        "transport_errors": out["errors"], "by_status_p99_ms": {
            str(k): pct(v, 99) for k, v in sorted(out["by_status"].items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old-tree", type=Path, default=None, help="also run the server of this tree (a git worktree)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--skip-idle", action="store_true")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a FLOWSERVE_ setting for both servers, e.g. --set request_timeout_s=2")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trees = [("new", ROOT)] + ([("old", args.old_tree.resolve())] if args.old_tree else [])
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    settings = dict(item.split("=", 1) for item in args.set)
    results = {}
    for name, tree in trees:
        result: dict = {"tree": str(tree), "settings": settings}
        if not args.skip_idle:
            server = Server(tree, log_dir / f"bench-connections-{name}-idle.log", **settings)
            try:
                result["idle"] = idle_run(server, args.idle)
            finally:
                server.stop()
        if not args.skip_load:
            server = Server(tree, log_dir / f"bench-connections-{name}-load.log", **settings)
            try:
                result["load"] = load_run(server, args.connections, args.seconds)
            finally:
                server.stop()
        results[name] = result
        print(json.dumps({name: result}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
