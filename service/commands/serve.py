"""``flowserve serve``: run the HTTP service with uvicorn.

Options override the ``FLOWSERVE_*`` environment variables of the same names (see
:mod:`service.settings`); anything not given falls back to the environment, then to the defaults.

Shutdown: on SIGTERM (or Ctrl-C) ``/readyz`` turns 503 at once, idle kept-alive connections are
closed at once (their clients reconnect elsewhere) and every answer from then on carries
``Connection: close``; after ``--drain-delay-s`` (default 0, for load balancers to notice) the
listener closes, requests in flight and everything the worker accepted are answered, and the
process exits 0. A second signal stops waiting.

Connections (service/http/connections.py): a request head must arrive within ``--header-timeout-s``,
its body within ``--body-timeout-s``, idle kept-alive connections close after
``--timeout-keep-alive-s``, and connections past ``--max-connections`` are answered 503 with
``Retry-After``. Overload (service/http/shedding.py): an operation whose estimated wait (event-loop
lag plus the worker's queue over its throughput) exceeds ``--shed-wait-fraction`` of its deadline is
answered 503 with ``Retry-After`` before its body is read. uvicorn runs its httptools protocol
(uvicorn[standard]), extended; h11 is not used.
"""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any, Callable

__all__ = ["add_parser", "run"]

#: CLI option -> Settings field (type for argparse)
OPTIONS: dict[str, tuple[type, str]] = {
    "model_dir": (str, "the model repository (FLOWSERVE_MODEL_DIR, default: models)"),
    "models": (str, "comma-separated models to load (FLOWSERVE_MODELS, default: all)"),
    "host": (str, "interface to listen on (FLOWSERVE_HOST, default: 127.0.0.1)"),
    "port": (int, "TCP port (FLOWSERVE_PORT, default: 8000)"),
    "device": (str, "auto | cpu | cuda | cuda:N (FLOWSERVE_DEVICE, default: auto)"),
    "log_level": (str, "critical | error | warning | info | debug | trace (FLOWSERVE_LOG_LEVEL, default: info)"),
    "torchscript": (str, "true | false: run the models' passes as TorchScript traces checked against eager (FLOWSERVE_TORCHSCRIPT, default: true)"),
    "cuda_graphs": (str, "true | false: on CUDA, replay small batches from captured CUDA graphs (default: true)"),
    "max_batch_rows": (int, "most rows in one batched model call (default: 8192 on the CPU, 65536 on CUDA)"),
    "max_wait_ms": (float, "extra wait to grow a batch, ms (default: 0)"),
    "max_batch_ms": (float, "time slice of a large request's chunks, ms; 0: chunks of max_batch_rows (default: 25)"),
    "max_queue_rows": (int, "rows waiting in the queues before 503 (default: 1000000)"),
    "request_timeout_s": (float, "per-request deadline, s; 504 past it (default: 30)"),
    "max_rows": (int, "most rows per request; 413 above (default: 1000000)"),
    "max_samples": (int, "largest n per sample request; 413 above (default: 1000000)"),
    "max_body_bytes": (int, "largest request body, bytes; 413 above (default: 268435456)"),
    "drain_delay_s": (float, "on SIGTERM, answer /readyz 503 this long before closing the listener (default: 0)"),
    "timeout_keep_alive_s": (float, "close idle kept-alive connections after this long, s (default: 75)"),
    "header_timeout_s": (float, "a request head must be complete this long after the connection or its first byte, s; else 408 (default: 10)"),
    "body_timeout_s": (float, "a request body must be complete this long after its head, s; else 408 (default: 60)"),
    "max_connections": (int, "connections held open; excess ones are answered 503 (default: ulimit -n, raised towards the hard limit at start, less 320)"),
    "shed_wait_fraction": (float, "503 an operation at once when its estimated wait exceeds this fraction of the deadline; 0: never (default: 0.5)"),
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve the models of a repository over HTTP",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for field, (kind, text) in OPTIONS.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None, help=text)
    # the old name of --torchscript (trace is also a --log-level): still read, with a warning
    parser.add_argument("--trace", dest="deprecated_trace", type=str, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(run=run)
    return parser


def _make_server(config: Any, on_signal: Callable[[], None], drain_delay_s: float, drain: Any = None) -> Any:
    import asyncio

    import uvicorn

    class GracefulServer(uvicorn.Server):
        """uvicorn's server, with readiness turned off first and an optional delay before closing.

        With ``drain`` (a :class:`~service.http.connections.DrainSignal`) the first signal also sets
        it and, on the event loop (never inside the signal handler, which may interrupt the loop
        anywhere), closes every idle connection and marks the others ``Connection: close``.
        """

        _draining = False
        _loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets: Any = None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def _close_idle_connections(self) -> None:
            for connection in list(self.server_state.connections):
                begin = getattr(connection, "begin_drain", None)
                if begin is not None:
                    begin()

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._draining:  # a second signal: stop waiting (SIGINT forces, as in uvicorn)
                self.should_exit = True
                if sig == signal.SIGINT:
                    self.force_exit = True
                return
            self._draining = True
            on_signal()
            if drain is not None:
                drain.draining = True
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._close_idle_connections)
            if drain_delay_s > 0:
                timer = threading.Timer(drain_delay_s, self._exit)
                timer.daemon = True
                timer.start()
            else:
                self._exit()

        def _exit(self) -> None:
            self.should_exit = True

    return GracefulServer(config)


def run(args: argparse.Namespace) -> int:
    from service.settings import SettingsError, load_settings

    options = {field: getattr(args, field, None) for field in OPTIONS}
    old = getattr(args, "deprecated_trace", None)
    if old is not None:
        print("flowserve serve: --trace is deprecated, use --torchscript" +
              (" (--trace ignored: --torchscript is given)" if options["torchscript"] is not None else ""), file=sys.stderr)
        if options["torchscript"] is None:
            options["torchscript"] = old
    try:
        settings = load_settings(**options)
    except SettingsError as e:
        print(f"flowserve serve: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from service.http import create_app
    from service.http.connections import (ConnectionLimits, DrainSignal, default_max_connections, protocol_class,
                                   raise_open_file_limit)
    from service.http.shedding import LoadShedding

    level = "DEBUG" if settings.log_level == "trace" else settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings.resolve_device()  # a missing CUDA device is a configuration error, said before starting
        app = create_app(settings)
    except SettingsError as e:
        print(f"flowserve serve: {e}", file=sys.stderr)
        return 2
    state = app.state.flowserve
    # the app answers the operation POSTs with its operation router (service/http/router.py), ahead of
    # FastAPI's middleware, routing and dependency solving; the rest is FastAPI's. In front of the app,
    # load shedding (service/http/shedding.py) refuses operations the deadline cannot wait for.
    served = LoadShedding(app, state, settings.shed_wait_fraction)
    # uvicorn's httptools protocol with read timeouts, a connection cap and drain (service/http/connections.py);
    # its own limit_concurrency is not used (it refuses established connections too, without Retry-After).
    raise_open_file_limit()  # towards the hard limit, before the default cap is derived from it
    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections or default_max_connections(),
    )
    drain = DrainSignal()
    config = uvicorn.Config(
        served, host=settings.host, port=settings.port, log_level=settings.log_level, lifespan="on",
        timeout_graceful_shutdown=int(settings.request_timeout_s + 10), server_header=False,
        http=protocol_class(limits, drain), timeout_keep_alive=settings.timeout_keep_alive_s,  # type: ignore[arg-type]
    )
    server = _make_server(config, state.begin_drain, settings.drain_delay_s, drain)
    _tune_gc()
    server.run()
    return 0 if server.started else 1


def _tune_gc() -> None:
    """Keep Python's cyclic garbage collector off the request path.

    Every request allocates container objects that live as long as its batch (tens of ms under
    load), so they survive the young collections and are promoted until a full collection runs,
    and a full collection walks every object of the process: torch, zuko, FastAPI, pydantic, the
    models. Freezing what is alive at start-up (``gc.freeze``: never scanned again) and collecting
    the young generation every 10,000 allocations instead of 700 took the p99 of one-row
    ``log_prob`` at concurrency 64 from 165 ms to 40-60 ms and the event loop's CPU per request
    from about 490 to 350 µs (``python -m bench.profile``; bench/FINDINGS.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def main(argv: list[str] | None = None) -> int:
    """``python -m service.commands.serve [options]``: the subcommand alone."""
    parser = argparse.ArgumentParser(prog="flowserve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
