"""The blocking client: :class:`Client`, on ``httpx.Client`` (one connection pool, kept alive)."""

from __future__ import annotations

import time
from typing import Any

import httpx

from .calls import Call
from .retry import RETRYABLE, Transport, auth_headers

__all__ = ["Client"]


class Client(Transport):
    """Blocking client; use it as a context manager (or call :meth:`close`).

    Arguments:
        url: the server, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer <key>`` where the server needs one.
        timeout: seconds for each HTTP request.
        retries: further tries after a 503 or a connection failure.
        binary_threshold: requests holding more values than this go as ``.npy``; ``None``: JSON only.
        transport: an httpx transport (tests, proxies, Unix sockets).
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, binary_threshold: int | None = 20_000,
                 transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(retries, binary_threshold)
        self._http = httpx.Client(base_url=url, headers=auth_headers(api_key), timeout=timeout, transport=transport)

    def _run(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                response = self._http.request(call.method, call.path, json=call.json, content=call.content,
                                              params=call.params or None, headers=call.headers or None)
            except RETRYABLE:
                delay = self._after_failure(attempt)
                if delay is None:
                    raise
                time.sleep(delay)
                attempt += 1
                continue
            step = self._after(call, response, attempt)
            if step is None:
                return self._finish(call, response)
            call, delay, attempt = step
            time.sleep(delay)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
