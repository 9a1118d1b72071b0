"""The asyncio client: :class:`AsyncClient`, the same methods as :class:`~flowserve_client.Client` as
coroutines, on ``httpx.AsyncClient``."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from .calls import Call
from .retry import RETRYABLE, Transport, auth_headers

__all__ = ["AsyncClient"]


class AsyncClient(Transport):
    """The same methods as :class:`~flowserve_client.Client`, as coroutines; use with ``async with``
    (or ``await aclose()``). Arguments as for :class:`~flowserve_client.Client`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, timeout: float = 60.0,
                 retries: int = 3, binary_threshold: int | None = 20_000,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(retries, binary_threshold)
        self._http = httpx.AsyncClient(base_url=url, headers=auth_headers(api_key), timeout=timeout,
                                       transport=transport)

    async def _run(self, call: Call) -> Any:
        attempt = 0
        while True:
            try:
                response = await self._http.request(call.method, call.path, json=call.json, content=call.content,
                                                    params=call.params or None, headers=call.headers or None)
            except RETRYABLE:
                delay = self._after_failure(attempt)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                attempt += 1
                continue
            step = self._after(call, response, attempt)
            if step is None:
                return self._finish(call, response)
            call, delay, attempt = step
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
