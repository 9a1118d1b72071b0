"""API keys and the admin key: ``Authorization: Bearer <token>``, compared in constant time.

- ``FLOWSERVE_API_KEYS`` (comma-separated): when set, every model endpoint (``/v1/models...``, and
  whatever other router depends on :func:`require_api_key`) needs one of them. Unset: open.
- ``FLOWSERVE_ADMIN_KEY``: the only key that opens ``/v1/admin/...`` (:func:`require_admin_key`).
  API keys never do. **Unset: administration is disabled** (403 ``admin-disabled``), so that a
  server nobody configured cannot be told to unload its models by whoever reaches its port. The
  admin key does not open the model endpoints either (list it in ``FLOWSERVE_API_KEYS`` as well
  for that). An empty ``FLOWSERVE_ADMIN_KEY`` counts as unset.
- ``/healthz``, ``/readyz``, ``/metrics``, ``/docs`` and ``/openapi.json`` stay open.

Refusals are domain errors (:class:`AuthError`: :class:`Unauthorized`, :class:`Forbidden`,
:class:`AdminDisabled`) whose answers stand in the one status table,
:data:`service.http.problems.DOMAIN_ANSWERS`: no ``Authorization`` header, or not a ``Bearer`` one:
401 with ``WWW-Authenticate: Bearer realm="..."``; a bearer token that is not a key of the
endpoint: 403. Both problem+json on ``/v1``, ``{"error"}`` on ``/v2``.

The comparison: the token's and each key's SHA-256 digests (equal lengths, so nothing leaks
through lengths) are compared with :func:`hmac.compare_digest` against *every* key, without
stopping at a match, so the time taken says nothing about which key, or how much of one, matched.
Tokens are compared as the raw bytes of the header (latin-1, as HTTP carries them), keys as their
UTF-8 bytes.

``Depends(require_api_key)`` / ``Depends(require_admin_key)`` raise them for FastAPI's routes (the
app's handlers answer them, /v2's route class in its own shape); :func:`check_api_key` and
:func:`check_admin_key` raise them for code that is not a dependency (the operation router, which
answers them with the app's handler for their class).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Iterable

from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.serving.errors import FlowserveError
from service.settings import Settings

__all__ = [
    "AdminDisabled",
    "AuthError",
    "Forbidden",
    "Keys",
    "Unauthorized",
    "check_admin_key",
    "check_api_key",
    "install",
    "require_admin_key",
    "require_api_key",
]


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def _matches(token: bytes, digests: Iterable[bytes]) -> bool:
    """Whether ``token`` is one of the keys whose digests are given; constant time in the token."""
    probe = _digest(token)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(probe, digest)  # no early exit: every key is compared
    return found


@dataclass(frozen=True)
class Keys:
    """The configured keys, kept only as SHA-256 digests."""

    api: tuple[bytes, ...] = ()
    admin: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Keys":
        api = tuple(_digest(k.get_secret_value().encode("utf-8")) for k in settings.api_keys
                    if k.get_secret_value())
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key is not None else ""
        return cls(api, _digest(admin_key.strip().encode("utf-8")) if admin_key.strip() else None)


class AuthError(FlowserveError):
    """A request without the key it needs (its answer: :data:`service.http.problems.DOMAIN_ANSWERS`)."""


class Unauthorized(AuthError):
    """No bearer token where the endpoint needs a key (401, ``WWW-Authenticate: Bearer realm``)."""

    def __init__(self, detail: str, realm: str) -> None:
        super().__init__(detail)
        self.realm = realm


class Forbidden(AuthError):
    """A bearer token that is not a key of the endpoint (403)."""


class AdminDisabled(AuthError):
    """Administration is off: the server has no admin key (403 ``admin-disabled``)."""


def _keys(request: Request) -> Keys:
    keys = getattr(request.app.state, "flowserve_keys", None)
    if keys is None:  # an app built without install(): fail closed
        raise Forbidden("this server's keys are not configured")
    return keys


def _bearer(request: Request, realm: str) -> bytes:
    """The bearer token of the request, as raw bytes; 401 when there is none."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        why = "no Authorization header" if not header.strip() else "the Authorization header is not 'Bearer <key>'"
        raise Unauthorized(f"{why}: this endpoint needs a key, sent as 'Authorization: Bearer <key>'", realm)
    return token.encode("latin-1", "replace")


def check_api_key(request: Request) -> None:
    """Pass when the server has no API keys or the request carries one; else :class:`AuthError`."""
    keys = _keys(request)
    if not keys.api:
        return
    if not _matches(_bearer(request, "flowserve"), keys.api):
        raise Forbidden("the key is not one of this server's API keys")


def check_admin_key(request: Request) -> None:
    """Pass when the request carries the admin key; else :class:`AuthError` (403 when none is set)."""
    keys = _keys(request)
    if keys.admin is None:
        raise AdminDisabled("administration is disabled on this server: set FLOWSERVE_ADMIN_KEY to enable /v1/admin")
    if not _matches(_bearer(request, "flowserve-admin"), (keys.admin,)):
        raise Forbidden("the key is not this server's admin key (API keys never open /v1/admin)")


# -- FastAPI dependencies (documented as bearer security schemes in /docs) --------------------------------
_api_scheme = HTTPBearer(auto_error=False, scheme_name="APIKey",
                         description="One of FLOWSERVE_API_KEYS, needed only when the server sets them.")
_admin_scheme = HTTPBearer(auto_error=False, scheme_name="AdminKey",
                           description="FLOWSERVE_ADMIN_KEY; administration is disabled when it is not set.")


async def require_api_key(request: Request,
                          _credentials: HTTPAuthorizationCredentials | None = Depends(_api_scheme)) -> None:
    """Dependency of the model endpoints: :class:`AuthError` (401 / 403) unless the request may use them."""
    check_api_key(request)


async def require_admin_key(request: Request,
                            _credentials: HTTPAuthorizationCredentials | None = Depends(_admin_scheme)) -> None:
    """Dependency of ``/v1/admin``: :class:`AuthError` (401 / 403) unless the request carries the admin key."""
    check_admin_key(request)


def install(app: FastAPI, settings: Settings) -> None:
    """Give ``app`` the keys of ``settings`` (read by the dependencies above)."""
    app.state.flowserve_keys = Keys.from_settings(settings)
