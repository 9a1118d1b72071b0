"""The HTTP ceiling: a no-op FastAPI app that parses the same body and answers the same shape.

``POST /v1/models/{name}/log_prob`` reads ``{"inputs": rows}`` the way flowserve's API does
(``service/http/codecs/bodies.py`` and ``rows.py``: the raw body streamed within a byte limit, ``orjson.loads``,
one ``np.asarray`` over the rows, a float64 array, shape and ``np.isfinite`` checks) and answers
``{"model", "version", "log_prob": [...]}`` the way ``service/http/responses.py`` does (orjson with
``OPT_SERIALIZE_NUMPY``, float32 values), without any model, registry, metrics or batching. It is
served by uvicorn with flowserve's own uvicorn settings, so the difference between the two is what
flowserve adds: its lookups and metrics, the hand-off to the worker, the model itself.

It copies the approach rather than importing flowserve's functions, so that a slowdown in those
shows up as a lower ratio instead of a lower ceiling.
"""

from __future__ import annotations

import argparse
import gc

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI(title="flowserve HTTP ceiling")
MAX_BODY_BYTES = 256 << 20  # flowserve's default FLOWSERVE_MAX_BODY_BYTES


def _problem(status: int, detail: str) -> Response:
    body = {"type": "about:blank", "title": "invalid input", "status": status, "detail": detail}
    return Response(orjson.dumps(body), status_code=status, media_type="application/problem+json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@app.post("/v1/models/{name}/log_prob")
async def log_prob(name: str, request: Request) -> Response:
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > MAX_BODY_BYTES:
            return _problem(413, "body too large")
        chunks.append(chunk)
    try:
        body = orjson.loads(b"".join(chunks))
        value = body["inputs"]
        rows = np.asarray(value)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        return _problem(400, str(e))
    if not isinstance(value, list) or rows.ndim != 2 or rows.dtype.kind not in "fiub":
        return _problem(400, "inputs must be a list of rows")
    rows = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(rows).all():
        return _problem(400, "inputs must be finite")
    out = np.zeros(rows.shape[0], dtype=np.float32)
    return Response(orjson.dumps({"model": name, "version": 1, "log_prob": out},
                                 option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--log-level", default="info", help="as FLOWSERVE_LOG_LEVEL (default: info, as flowserve)")
    args = parser.parse_args()
    import uvicorn

    # the uvicorn.Config of service/commands/serve.py: one process, loop and http "auto" (uvloop and
    # httptools when installed), access log on at level info, no Server header;
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                            server_header=False)
    server = uvicorn.Server(config)
    # and the garbage-collector tuning of service/commands/serve.py (_tune_gc)
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    server.run()


if __name__ == "__main__":
    main()
