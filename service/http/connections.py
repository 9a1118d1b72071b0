"""The server's HTTP connections: read timeouts, a connection cap and closing on drain.

uvicorn's own HTTP protocol (:class:`uvicorn.protocols.http.httptools_impl.HttpToolsProtocol`)
closes a connection only ``timeout_keep_alive`` seconds after a response. A connection that never
sends a request, or sends its head one byte at a time (slowloris), or stops halfway through its
body, is kept forever, and each holds a file descriptor: a thousand of them exhaust a 1024-file
limit and ``accept`` fails for everyone. :func:`protocol_class` builds a subclass that adds:

* **head timeout** (``header_timeout_s``): a request head must be complete within that many
  seconds of the connection opening, or of the first byte of the next request on a kept-alive
  connection. The clock is not reset by each byte, so trickling does not extend it. A connection
  that sent nothing is closed; one that sent part of a head is answered 408 and closed.
* **body timeout** (``body_timeout_s``): the body must be complete within that many seconds of the
  head; else 408 (when no answer has started) and close. The handler then sees a disconnect.
* **head size** (:data:`MAX_HEAD_BYTES`): a head larger than 64 KiB is answered 431 and closed
  (httptools, unlike h11, sets no bound of its own).
* **connection cap** (``max_connections``): a connection accepted while ``max_connections`` others
  are open first makes room by closing the connection that has been idle longest (nothing of a
  request received since it opened or since its last answer: a silent or kept-alive one), as
  nginx reuses its keep-alive connections when it runs short; a working client is thus served
  while idle ones hold the slots. Only when none is idle (every other connection is reading a
  head or body or being answered) is the new connection *excess*: its request is answered 503 ``too-many-connections`` with ``Retry-After``
  and ``Connection: close``, without running the app, and it is closed. Established connections are
  never refused (uvicorn's ``limit_concurrency``, by contrast, refuses every request on every
  connection, old ones included, once the count of connections or tasks reaches the limit, with a
  plain-text 503 and no ``Retry-After``). Past ``max_connections + OVERFLOW_CONNECTIONS`` a new
  connection is closed at once, so the descriptors in use stay bounded by the cap plus
  :data:`OVERFLOW_CONNECTIONS` whatever clients do; :func:`default_max_connections` derives the cap
  from the process's ``RLIMIT_NOFILE``.
* **drain** (:meth:`GuardedHttpToolsProtocol.begin_drain`, on SIGTERM): an idle keep-alive
  connection (no request being read or answered) is closed at once, so its client reconnects
  elsewhere before it writes its next request there; every request being read or answered, and
  every request that starts afterwards, is answered with ``Connection: close``.

Each timer is one ``loop.call_later`` armed and cancelled per request; nothing polls.
Only the httptools protocol (what ``uvicorn[standard]`` uses) is extended: ``flowserve serve`` pins
``http`` to this class.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.http.problems import PROBLEM_JSON, Problem

__all__ = ["ConnectionLimits", "DrainSignal", "GuardedHttpToolsProtocol", "default_max_connections", "raise_open_file_limit",
           "protocol_class"]

#: largest request head (request line and headers), bytes; 431 above
MAX_HEAD_BYTES = 64 * 1024
#: descriptors left to the process itself (model files, libraries, the worker, logs) by the default cap
RESERVED_FDS = 256
#: connections past the cap that are still answered 503 rather than closed at once
OVERFLOW_CONNECTIONS = 64
#: ``Retry-After`` of a refused connection, seconds
CONNECTION_RETRY_S = 1.0


#: the soft RLIMIT_NOFILE the server asks for at start (never above the hard limit)
WANTED_OPEN_FILES = 65536


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``min(hard, wanted)`` and return the soft limit now.

    The common soft default of 1024 is a shell convention, not a bound a server should keep: the
    hard limit is what the administrator set. nginx (``worker_rlimit_nofile``) and systemd services
    raise it the same way. Without this, 1,000 clients of a server under 1024 files would be held
    to a cap of 704 connections, evicting each other's idle kept-alive connections.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # not permitted here: keep the soft limit and derive the cap from it
            pass
    return int(soft)


def default_max_connections(reserved: int = RESERVED_FDS, overflow: int = OVERFLOW_CONNECTIONS) -> int:
    """The connection cap that keeps the process inside its soft ``RLIMIT_NOFILE``:
    ``soft - reserved - overflow`` (at least 16). With the common 1024 limit: 704."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(16, int(soft) - reserved - overflow)


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds :class:`GuardedHttpToolsProtocol` enforces (seconds; ``max_connections`` open)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    max_head_bytes: int = MAX_HEAD_BYTES


class DrainSignal:
    """Shared by the server and its connections: set once SIGTERM began the drain; also holds
    the server's idle connections, oldest first (insertion order of a dict)."""

    def __init__(self) -> None:
        self.draining = False
        self.idle: dict[Any, None] = {}

    def evict_oldest_idle(self, keep: Any) -> bool:
        """Close the connection idle longest (not ``keep``); whether there was one."""
        for connection in self.idle:
            if connection is not keep:
                del self.idle[connection]
                connection.transport.close()
                return True
        return False


def _problem_bytes(status: int, slug: str, detail: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 problem+json response, for answers written
    straight to the transport (no ASGI app runs for them)."""
    body = orjson.dumps(Problem(status, slug, detail).body())
    lines = [STATUS_LINE[status], b"content-type: " + PROBLEM_JSON.encode() + b"\r\n",
             b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n"]
    for name, value in (headers or {}).items():
        lines.append(name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n")
    return b"".join(lines) + b"\r\n" + body


_REFUSED = Problem.unavailable(
    "too-many-connections", "the server holds as many connections as it allows; retry later or elsewhere",
    CONNECTION_RETRY_S, headers={"Connection": "close"},
)


async def _refuse_connection(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app of an excess connection: 503 + Retry-After, ``Connection: close``."""
    await _REFUSED.response(scope.get("path"))(scope, receive, send)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the timeouts, cap and drain of the module docstring.

    Use :func:`protocol_class` to bind :attr:`limits` and :attr:`drain`.
    """

    limits: ConnectionLimits = ConnectionLimits()
    drain: DrainSignal = DrainSignal()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: Any = None  # the head or body deadline, whichever is running
        self._head_open = True  # between requests or reading a head
        self._head_bytes = 0  # bytes received of the current head (0: nothing of a next request yet)
        self._excess = False

    # -- connection life -------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        open_now = len(self.connections)  # includes this one
        limits = self.limits
        if open_now > limits.max_connections and self.drain.evict_oldest_idle(self):
            open_now -= 1  # room made: the evicted one is closing
        self.drain.idle[self] = None
        if open_now > limits.max_connections + OVERFLOW_CONNECTIONS:
            transport.abort()  # its descriptor is freed at once; nothing was read, nothing is lost
            return
        if open_now > limits.max_connections:
            self._excess = True
            self.app = _refuse_connection
        self._arm(limits.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.drain.idle.pop(self, None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_open:
            if self._head_bytes == 0:  # the first bytes of a next request
                self.drain.idle.pop(self, None)
                if self._timer is None:
                    self._arm(self.limits.header_timeout_s, self._head_timed_out)
            # only the head's own bytes count: a client may write the head and a large body at once
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > self.limits.max_head_bytes:
                self._answer_and_close(431, "header-too-large",
                                       f"the request head exceeds {self.limits.max_head_bytes} bytes")
                return
        super().data_received(data)

    # -- parser callbacks ------------------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_open = False
        self._head_bytes = 0
        super().on_headers_complete()
        if self.drain.draining or self._excess:
            self.cycle.keep_alive = False
        self._arm(self.limits.body_timeout_s, self._body_timed_out)

    def on_message_complete(self) -> None:
        self._disarm()
        self._head_open = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline and self._head_bytes == 0 and not self._excess:
            self.drain.idle[self] = None  # kept alive, waiting for its next request

    # -- timers ----------------------------------------------------------------------------------
    def _arm(self, seconds: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        busy = self.cycle is not None and not self.cycle.response_complete  # a pipelined head is late
        if self._head_bytes == 0 or busy:  # nothing of a request arrived: close quietly
            self.transport.close()
        else:
            self._answer_and_close(408, "request-timeout",
                                   f"the request head was not complete within {self.limits.header_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self._answer_and_close(408, "request-timeout",
                                   f"the request body was not complete within {self.limits.body_timeout_s:g} s")
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, slug: str, detail: str) -> None:
        """Write a problem answer straight to the socket and close it.

        Written only where nothing else can answer on this connection: between requests (no
        cycle, or its answer complete) or in a request whose handler has not started answering,
        which is then told the client disconnected (its later sends are dropped, as uvicorn drops
        them after a disconnect). Otherwise the connection is just closed.
        """
        self._disarm()
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            self.transport.write(_problem_bytes(status, slug, detail))
        elif not cycle.response_started:
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(_problem_bytes(status, slug, detail))
        self.transport.close()

    # -- drain -----------------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """SIGTERM: close this connection now when it is idle, else answer its requests with
        ``Connection: close`` (call on the event loop)."""
        if self.transport is None or self.transport.is_closing():
            return
        cycle = self.cycle
        idle = (cycle is None or cycle.response_complete) and not self.pipeline and self._head_bytes == 0
        if idle:
            self._disarm()
            self.transport.close()
            return
        if cycle is not None:
            cycle.keep_alive = False
        for queued, _ in self.pipeline:
            queued.keep_alive = False


def protocol_class(limits: ConnectionLimits, drain: DrainSignal) -> type[GuardedHttpToolsProtocol]:
    """A :class:`GuardedHttpToolsProtocol` subclass bound to ``limits`` and ``drain``, for
    ``uvicorn.Config(http=...)``."""
    return type("FlowserveHttpProtocol", (GuardedHttpToolsProtocol,), {"limits": limits, "drain": drain})
