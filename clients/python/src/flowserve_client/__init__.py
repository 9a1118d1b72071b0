"""Python client for a flowserve server, on httpx and numpy (no torch, no server code).

```python
from flowserve_client import Client

with Client("http://127.0.0.1:8000") as fs:
    lp = fs.log_prob("moons", [[0.5, 0.25], [3.0, 3.0]])          # numpy array, shape (2,)
    x = fs.sample("moons", n=1000, seed=7)                           # (1000, 2)
    out = fs.score("moons", x, alpha=0.01)                           # dict of numpy arrays
```

`AsyncClient` has the same methods as coroutines. Arrays go as JSON for small requests and as
binary ``.npy`` bodies (``.npz`` with ``context`` for conditional models; answers as ``.npz``) once
a request holds more than ``binary_threshold`` values; a server that does not take binary bodies
(415 / 406) gets JSON instead from then on.
Answers are decoded by their content type, JSON or ``.npz``. Every call is side-effect free on the
server (GETs, and operations that are pure functions of their request), so all are retried on 503
(honouring ``Retry-After``, in seconds or as an HTTP date) and on connection failures, with
exponential backoff. Errors raise a :class:`FlowserveError` subclass carrying the server's problem
details (``status``, ``title``, ``detail``, ``errors``, ``problem``).

Modules: :mod:`.client` (``Client``), :mod:`.aio` (``AsyncClient``), :mod:`.calls` (the operations as
requests), :mod:`.retry` (retry policy), :mod:`.bodies` (JSON / ``.npy`` / ``.npz`` bodies, ``records``),
:mod:`.errors` (typed errors).
"""

from __future__ import annotations

from .aio import AsyncClient
from .bodies import Rows, records
from .client import Client
from .errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    FlowserveError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnprocessableEntity,
    UnsupportedMediaType,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BadRequest",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "FlowserveError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "Rows",
    "ServiceUnavailable",
    "Unauthorized",
    "UnprocessableEntity",
    "UnsupportedMediaType",
    "records",
]
