"""Reading request bodies (service.http.codecs.bodies), in process: content types, limits, JSON, query fields.

Each check builds a real Starlette :class:`Request` from an ASGI scope and a ``receive`` that
hands over the body in the chunks given (or reports the client gone), and awaits
:func:`parse_body` / :func:`read_body` on it - the code path of every operation, without a server.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Awaitable, Callable

import pytest
from starlette.requests import Request

from service.http.codecs import bodies
from service.http.codecs.bodies import JSON, ParsedBody, media_type, parse_body, query_fields, read_body, register_parser
from service.http.problems import Problem

LIMIT = 1 << 16


class Body:
    """A client's request: headers, query string and the body's chunks; counts what was read."""

    def __init__(self, chunks: bytes | list[bytes] = b"", headers: dict[str, str] | None = None, query: str = "",
                 disconnect_after: int | None = None) -> None:
        self.chunks = [chunks] if isinstance(chunks, bytes) else list(chunks)
        self.headers = headers or {}
        self.query = query
        self.disconnect_after = disconnect_after
        self.received = 0

    def request(self) -> Request:
        scope = {"type": "http", "method": "POST", "path": "/v1/models/m/log_prob", "query_string": self.query.encode(),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in self.headers.items()]}
        return Request(scope, self._receive)

    async def _receive(self) -> dict[str, Any]:
        if self.disconnect_after is not None and self.received >= self.disconnect_after:
            return {"type": "http.disconnect"}
        i = self.received
        self.received += 1
        if i >= len(self.chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": self.chunks[i], "more_body": i < len(self.chunks) - 1}


def json_body(raw: bytes, query: str = "", content_type: str = JSON) -> Body:
    return Body(raw, {"content-type": content_type, "content-length": str(len(raw))}, query)


def parse(body: Body, limit: int = LIMIT) -> ParsedBody:
    return asyncio.run(parse_body(body.request(), limit))


def problem(make: Callable[[], Awaitable[Any]]) -> Problem:
    async def main() -> None:
        await make()

    with pytest.raises(Problem) as raised:
        asyncio.run(main())
    return raised.value


# -- content types -------------------------------------------------------------------------------
def test_media_type_drops_parameters_and_case_and_defaults_to_json() -> None:
    assert media_type(Body(headers={"content-type": "Application/JSON; charset=utf-8"}).request()) == JSON
    assert media_type(Body(headers={"content-type": "application/x-npy"}).request()) == "application/x-npy"
    assert media_type(Body().request()) == JSON


def test_an_unsupported_content_type_is_415_with_accept_post() -> None:
    body = json_body(b"x0,x1\n1,2\n", content_type="text/csv")
    p = problem(lambda: parse_body(body.request(), LIMIT))
    assert (p.status, p.slug) == (415, "unsupported-media-type")
    assert p.detail.startswith("Content-Type 'text/csv' is not supported here; send one of [")
    assert JSON in p.headers["Accept-Post"].split(", ")
    assert p.headers["Accept-Post"].split(", ") == sorted(bodies.PARSERS)
    assert body.received == 0  # refused before a byte of the body was read


# -- JSON ----------------------------------------------------------------------------------------
def test_a_json_object_becomes_its_fields() -> None:
    parsed = parse(json_body(b'{"inputs": [[0.5, 1]], "alpha": 0.05}', content_type="application/json; charset=utf-8"))
    assert parsed.fields == {"inputs": [[0.5, 1]], "alpha": 0.05}
    assert parsed.array is None and parsed.media_type == JSON
    assert not parsed.lax and parsed.query_fields == frozenset()
    # no Content-Type at all: JSON
    assert parse(Body(b'{"n": 3}', {"content-length": "8"})).fields == {"n": 3}


@pytest.mark.parametrize("raw", [b'{"inputs": [[1, 2]', b'{"inputs": [[NaN, 1]]}', b'{"a": Infinity}',
                                 b"{'a': 1}", b'{"a": 1} // comment', b"\xff\xfe"])
def test_invalid_json_is_400_malformed_json(raw: bytes) -> None:
    p = problem(lambda: parse_body(json_body(raw).request(), LIMIT))
    assert (p.status, p.slug) == (400, "malformed-json")
    assert p.detail.startswith("the body is not valid JSON: ")
    assert p.errors is not None and p.errors[0]["loc"] == ["body"]


@pytest.mark.parametrize(("raw", "kind"), [(b"[[1, 2]]", "an array"), (b"3", "int"), (b'"text"', "str"),
                                           (b"null", "NoneType")])
def test_json_that_is_not_an_object_is_422(raw: bytes, kind: str) -> None:
    p = problem(lambda: parse_body(json_body(raw).request(), LIMIT))
    assert (p.status, p.slug) == (422, "invalid-field")
    assert p.detail == f"the body must be a JSON object, got {kind}"


def test_query_parameters_beside_a_json_body_are_refused() -> None:
    p = problem(lambda: parse_body(json_body(b'{"inputs": [[1, 2]]}', query="alpha=0.1").request(), LIMIT))
    assert (p.status, p.slug) == (422, "invalid-field")
    assert p.detail.startswith("query parameter 'alpha' beside a JSON body: put every field in the JSON body")
    assert p.errors is not None and p.errors[0]["loc"] == ["query", "alpha"]


# -- empty bodies and query fields ---------------------------------------------------------------
def test_an_empty_body_takes_every_field_from_the_query_as_text() -> None:
    for headers in ({}, {"content-type": JSON, "content-length": "0"}):
        parsed = parse(Body(b"", headers, query="n=5&seed=3"))
        assert parsed.fields == {"n": "5", "seed": "3"}
        assert parsed.lax and parsed.query_fields == frozenset({"n", "seed"})
        assert parsed.media_type == JSON


def test_a_query_parameter_given_twice_is_422() -> None:
    assert query_fields(Body(query="a=1&b=x%20y").request()) == {"a": "1", "b": "x y"}
    p = problem(lambda: parse_body(Body(query="n=5&n=6").request(), LIMIT))
    assert (p.status, p.detail) == (422, "query parameter 'n' is given more than once")
    assert p.errors == [{"loc": ["query", "n"], "msg": "given more than once"}]


# -- size limits ---------------------------------------------------------------------------------
def test_a_declared_length_over_the_limit_is_413_before_reading() -> None:
    body = Body(b"{}", {"content-type": JSON, "content-length": "101"})
    p = problem(lambda: read_body(body.request(), 100))
    assert (p.status, p.slug) == (413, "content-too-large")
    assert p.detail == ("the body is too large: Content-Length is 101 bytes; this server takes at most 100 bytes "
                        "(FLOWSERVE_MAX_BODY_BYTES)")
    assert body.received == 0


def test_a_streamed_body_is_counted_as_it_arrives() -> None:
    chunks = [b"x" * 40] * 5  # 200 bytes, no Content-Length
    body = Body(chunks, {"content-type": JSON})
    p = problem(lambda: read_body(body.request(), 100))
    assert (p.status, p.detail) == (413, "the body is too large: more than 100 bytes were sent; this server takes "
                                         "at most 100 bytes (FLOWSERVE_MAX_BODY_BYTES)")
    assert body.received == 3  # stopped at the chunk that passed the limit
    exact = Body([b"a" * 50, b"b" * 50], {"content-type": JSON})
    assert asyncio.run(read_body(exact.request(), 100)) == b"a" * 50 + b"b" * 50


def test_a_bad_content_length_and_a_client_that_went_away_are_400() -> None:
    p = problem(lambda: read_body(Body(b"{}", {"content-length": "lots"}).request(), 100))
    assert (p.status, p.detail) == (400, "Content-Length 'lots' is not a number")
    gone = Body([b'{"inputs": ', b"[[1, 2]]}"], {"content-type": JSON}, disconnect_after=1)
    q = problem(lambda: parse_body(gone.request(), LIMIT))
    assert (q.status, q.detail) == (400, "the client went away before sending the whole body")


# -- registered parsers --------------------------------------------------------------------------
@pytest.fixture
def csv_parser() -> Any:
    """A text/csv parser registered for one test (recording the thread it ran on), then removed."""
    threads: list[threading.Thread] = []

    def parse_csv(raw: bytes, request: Request) -> ParsedBody:
        threads.append(threading.current_thread())
        rows = [[float(v) for v in line.split(",")] for line in raw.decode().splitlines()]
        return ParsedBody({"inputs": rows}, lax=True)

    yield parse_csv, threads
    bodies.PARSERS.pop("text/csv", None)
    bodies.OFF_LOOP.pop("text/csv", None)


def test_a_registered_parser_is_used_for_its_media_type(csv_parser: Any) -> None:
    parser, threads = csv_parser
    register_parser("Text/CSV", parser)
    assert bodies.PARSERS["text/csv"] is parser and "text/csv" not in bodies.OFF_LOOP
    parsed = parse(json_body(b"1,2\n3,4", content_type="text/csv; header=absent"))
    assert parsed.fields == {"inputs": [[1.0, 2.0], [3.0, 4.0]]}
    assert parsed.media_type == "text/csv" and parsed.lax
    assert threads == [threading.main_thread()]  # small body, no off_loop: parsed on the loop


def test_off_loop_parsers_run_in_a_worker_thread_from_their_threshold(csv_parser: Any) -> None:
    parser, threads = csv_parser
    register_parser("text/csv", parser, off_loop=True)
    assert bodies.OFF_LOOP["text/csv"] == bodies.OFF_LOOP_BYTES
    parse(json_body(b"1,2", content_type="text/csv"))
    assert threads[-1] is threading.main_thread()  # below the threshold: on the loop
    line = b"1.000000,2.000000\n"
    big = line * (bodies.OFF_LOOP_BYTES // len(line) + 1)
    assert len(parse(json_body(big, content_type="text/csv"), limit=len(big)).fields["inputs"]) == big.count(b"\n")
    assert threads[-1] is not threading.main_thread()
    register_parser("text/csv", parser, always_off_loop=True)
    assert bodies.OFF_LOOP["text/csv"] == 0
    parse(json_body(b"1,2", content_type="text/csv"))
    assert threads[-1] is not threading.main_thread()
    register_parser("text/csv", parser)  # registered again without: back on the loop
    assert "text/csv" not in bodies.OFF_LOOP
