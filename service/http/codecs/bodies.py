"""Reading request bodies: size limits, content types, and one parser per media type.

A parser turns the raw bytes (and the request, for query parameters) into a :class:`ParsedBody`:
the named fields as JSON-like values, and optionally the main array already as numpy. Only
``application/json`` is registered here; the binary parsers of :mod:`service.http.codecs.binary`
(``application/x-npy`` and ``application/x-npz``: arrays from the body, the other fields from the
query string) plug in with :func:`register_parser`, and every operation then accepts them, because
operations only read :class:`ParsedBody`.

Query parameters carry an operation's scalar fields with binary bodies, and with an empty body
(``POST /sample?n=5&seed=3``, whatever the ``Content-Type``); a JSON body must hold every field
itself, so query parameters beside one are refused (422) rather than silently ignored.

Limits are checked before anything is parsed: a ``Content-Length`` over ``max_body_bytes`` is
refused before a byte is read, and a body streamed without one is counted as it arrives.

Where parsing runs: a parser registered with ``off_loop=True`` (the binary ones) runs in a worker
thread (:func:`asyncio.to_thread`) for bodies of :data:`OFF_LOOP_BYTES` or more, or always where it
says so (``.npz``: a small body may inflate to the whole limit), so the event loop keeps answering
(``/healthz``) meanwhile: numpy's copies, zlib's inflate and CRC release the GIL. JSON bodies of
:data:`OFF_LOOP_BYTES` or more are parsed in a worker thread too, in pieces
(:mod:`service.http.codecs.json_pieces`): orjson holds the GIL for the whole of one ``loads``
call, so one call over a big body would stop the loop for the whole parse (measured: 62 MB, 9.9 s)
however it was run, whereas between pieces the GIL passes to the loop. The rows of ``inputs``,
``latents`` and ``context`` then come as float64 arrays where they are plain rows of numbers (as
a ``.npz`` body's do), and as lists otherwise, so the row checks name what is wrong as before.
Smaller JSON bodies keep one ``orjson.loads`` on the loop. ``/v2``'s inference bodies go the same
way: :func:`loads_json` (pieces from :data:`OFF_LOOP_BYTES`) in :func:`off_loop` (a worker thread
from the same size).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request

from service.http.codecs import json_pieces
from service.http.problems import Problem, field_error

__all__ = ["JSON", "ParsedBody", "Parser", "loads_json", "media_type", "off_loop", "parse_body", "query_fields",
           "read_body", "register_parser"]

T = TypeVar("T")

JSON = "application/json"


@dataclass
class ParsedBody:
    """A request's fields as JSON-like values, and the main array when the body itself was one."""

    fields: dict[str, Any]
    array: np.ndarray | None = None
    media_type: str = JSON
    #: whether field values came as strings (query parameters) and need lax validation
    lax: bool = False
    #: the fields that came from the query string (errors about them say ``["query", name]``)
    query_fields: frozenset[str] = frozenset()


Parser = Callable[[bytes, Request], ParsedBody]


#: the top-level fields whose rows a big JSON body gives as a float64 array (where they are rows of numbers)
ROWS_FIELDS = frozenset({"inputs", "latents", "context"})


def parse_json(body: bytes, request: Request) -> ParsedBody:
    """A JSON object (strict JSON: no NaN, no Infinity, no comments) parsed by orjson.

    Bodies of :data:`OFF_LOOP_BYTES` or more are parsed in pieces (:func:`json_pieces.loads`: the
    same value and the same errors, the rows of :data:`ROWS_FIELDS` as arrays where clean).
    """
    try:
        value = loads_json(body, ROWS_FIELDS)
    except orjson.JSONDecodeError as e:
        raise Problem(400, "malformed-json", f"the body is not valid JSON: {e}",
                      errors=[field_error(("body",), str(e))]) from None
    if not isinstance(value, dict):
        kind = "an array" if isinstance(value, list) else type(value).__name__
        raise Problem(422, "invalid-field", f"the body must be a JSON object, got {kind}",
                      errors=[field_error(("body",), "expected an object")])
    return ParsedBody(value)


#: media type -> parser; add ``application/x-npy`` here (see :func:`register_parser`)
PARSERS: dict[str, Parser] = {JSON: parse_json}
#: media type -> the body size from which its parser runs in a worker thread (0: always)
OFF_LOOP: dict[str, int] = {}
#: bodies this large are parsed off the event loop (by parsers that release the GIL): a thread hop
#: costs ~0.1 ms, while copying and checking 1 MiB of numbers costs about as much, and the loop
#: then never stalls for more than a small body's parse
OFF_LOOP_BYTES = 1 << 20
#: JSON: parsed in pieces in a worker thread from the same size (below it, one orjson call on the
#: loop: ~10 ms at most for 1 MiB, and no thread hop for the usual small bodies)
OFF_LOOP[JSON] = OFF_LOOP_BYTES


def loads_json(body: bytes, rows_fields: Iterable[str | json_pieces.Path] = (), flat: bool = False) -> Any:
    """``orjson.loads(body)``; for bodies of :data:`OFF_LOOP_BYTES` or more, in pieces
    (:func:`json_pieces.loads`: the same value and the same errors, the big arrays of numbers at
    ``rows_fields`` as float64 arrays where clean, flat ones too with ``flat``). Call it off the
    event loop for such bodies (:func:`off_loop`): between pieces the GIL passes to the loop."""
    return json_pieces.loads(body, rows_fields, flat) if len(body) >= OFF_LOOP_BYTES else orjson.loads(body)


async def off_loop(parse: Callable[[bytes], T], body: bytes, threshold: int | None = OFF_LOOP_BYTES) -> T:
    """``parse(body)`` in a worker thread for a body of ``threshold`` bytes or more (0: always;
    ``None``: never), else right here on the event loop."""
    if threshold is not None and len(body) >= threshold:
        return await asyncio.to_thread(parse, body)  # numpy / zlib / pieces only: no torch threads
    return parse(body)


def register_parser(media: str, parser: Parser, *, off_loop: bool = False, always_off_loop: bool = False) -> None:
    """Make every operation accept bodies of ``media`` (e.g. ``application/x-npy``).

    ``off_loop``: parse bodies of :data:`OFF_LOOP_BYTES` or more in a worker thread (for parsers
    that spend their time in code that releases the GIL); ``always_off_loop``: every body.
    """
    media = media.lower()
    PARSERS[media] = parser
    OFF_LOOP.pop(media, None)
    if off_loop or always_off_loop:
        OFF_LOOP[media] = 0 if always_off_loop else OFF_LOOP_BYTES


def media_type(request: Request) -> str:
    """The request's media type without parameters, lower case; JSON when the header is absent."""
    raw = request.headers.get("content-type")
    if not raw:
        return JSON
    return raw.split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed ``max_bytes``."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise Problem(400, "invalid-input", f"Content-Length {length!r} is not a number") from None
        if declared > max_bytes:
            raise _too_large(max_bytes, f"Content-Length is {declared} bytes")
    chunks: list[bytes] = []
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise _too_large(max_bytes, f"more than {max_bytes} bytes were sent")
            chunks.append(chunk)
    except ClientDisconnect:
        raise Problem(400, "invalid-input", "the client went away before sending the whole body") from None
    return b"".join(chunks)


def _too_large(max_bytes: int, why: str) -> Problem:
    return Problem(413, "content-too-large", f"the body is too large: {why}; this server takes at most "
                   f"{max_bytes} bytes (FLOWSERVE_MAX_BODY_BYTES)")


def query_fields(request: Request) -> dict[str, str]:
    """The query parameters as fields (text values); a parameter given twice is refused (422)."""
    params = request.query_params
    fields: dict[str, str] = {}
    for key, value in params.multi_items():
        if key in fields:
            raise Problem(422, "invalid-field", f"query parameter {key!r} is given more than once",
                          errors=[field_error(("query", key), "given more than once")])
        fields[key] = value
    return fields


def _no_query(request: Request) -> None:
    for key in request.query_params:
        raise Problem(422, "invalid-field", f"query parameter {key!r} beside a JSON body: put every field in the "
                      "JSON body (query parameters are read with .npy / .npz bodies or an empty body)",
                      errors=[field_error(("query", key), "not read with a JSON body; move it into the body")])


async def parse_body(request: Request, max_bytes: int) -> ParsedBody:
    """Check the content type, read the body within the limit, and parse it.

    An empty body means "every field is a query parameter" (e.g. ``sample``'s ``n`` and ``seed``).
    """
    media = media_type(request)
    parser = PARSERS.get(media)
    if parser is None:
        raise Problem(415, "unsupported-media-type",
                      f"Content-Type {media!r} is not supported here; send one of {sorted(PARSERS)} "
                      "(e.g. curl -H 'Content-Type: application/json')",
                      headers={"Accept-Post": ", ".join(sorted(PARSERS))})
    body = await read_body(request, max_bytes)
    if not body:
        query = query_fields(request)
        return ParsedBody(dict(query), media_type=media, lax=True, query_fields=frozenset(query))
    if media == JSON:
        _no_query(request)
    parsed = await off_loop(lambda raw: parser(raw, request), body, OFF_LOOP.get(media))
    parsed.media_type = media
    return parsed
