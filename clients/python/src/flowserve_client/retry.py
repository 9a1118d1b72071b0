"""When to send a request again, shared by both clients.

Every call the client makes is side-effect free on the server (GETs, and operations that are pure
functions of their request), so a 503 and a connection failure are retried: up to ``attempts`` tries,
waiting the server's ``Retry-After`` (delay-seconds or an HTTP date, RFC 9110 §10.2.3) where it gave
one, else ``backoff · 2**attempt`` scaled by a uniform jitter in [0.5, 1), never more than
``max_delay``. A 415 / 406 to a binary request means the server takes no binary bodies: the same
request is sent as JSON at once, and every later one too.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import httpx

from .bodies import decode
from .calls import Call, Operations
from .errors import raise_for

__all__ = ["RETRYABLE", "Retry", "Transport", "auth_headers", "retry_after"]


@dataclass
class Retry:
    """Retry policy: up to ``attempts`` tries, exponential backoff with jitter, ``Retry-After`` honoured."""

    attempts: int = 4
    backoff: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Seconds to wait before try ``attempt + 1``: the server's ``Retry-After`` where it gave one."""
        if response is not None:
            after = retry_after(response.headers.get("retry-after"))
            if after is not None:
                return min(self.max_delay, after)
        return min(self.max_delay, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds or an HTTP date (RFC 9110 §10.2.3); ``None`` if absent/invalid."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


#: failures where the request cannot have been computed twice to any effect (every call is side-effect free)
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
             httpx.WriteError, httpx.PoolTimeout)
#: answers that mean "not a binary request": send the JSON fallback instead
_NOT_BINARY = (406, 415)


def auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer <key>`` where a key is given."""
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


class Transport(Operations):
    """What both clients share: construction and the retry / fallback decisions."""

    def __init__(self, retries: int, binary_threshold: int | None) -> None:
        self._retry = Retry(attempts=retries + 1)
        self.binary_threshold = binary_threshold

    def _after(self, call: Call, response: httpx.Response, attempt: int) -> tuple[Call, float, int] | None:
        """After ``response`` to try ``attempt`` of ``call``: ``(call to send, delay, its attempt)``, or
        ``None`` when ``response`` is the answer (success or error)."""
        if response.status_code in _NOT_BINARY and call.json_fallback is not None:
            self.binary_threshold = None  # this server takes no binary bodies: JSON from now on
            return call.as_json(), 0.0, attempt
        if response.status_code == 503 and attempt + 1 < self._retry.attempts:
            return call, self._retry.delay(attempt, response), attempt + 1
        return None

    def _after_failure(self, attempt: int) -> float | None:
        """Delay before trying again after a connection failure on ``attempt``; ``None``: give up."""
        return self._retry.delay(attempt, None) if attempt + 1 < self._retry.attempts else None

    @staticmethod
    def _finish(call: Call, response: httpx.Response) -> object:
        raise_for(response)
        return call.parse(decode(response))
