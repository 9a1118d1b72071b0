"""The piece parser of big JSON bodies (service.http.codecs.json_pieces), in process, against orjson.

Every body is parsed both ways: :func:`json_pieces.loads` must give ``orjson.loads``'s value (or,
for the rows fields, a float64 array equal to ``np.asarray`` of orjson's rows) and, for a malformed
body, orjson's very error message. :data:`PIECE_BYTES` is lowered to a few bytes so that small
bodies are cut into many pieces, and the tests check that the piece path (not the whole-body
fallback) ran where it should, by calling :func:`loads_in_pieces` itself.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
import pytest

from service.http.codecs import json_pieces
from service.http.codecs.json_pieces import _Fallback, loads, loads_in_pieces

ROWS = frozenset({"inputs", "latents", "context"})


@pytest.fixture(autouse=True)
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_pieces, "PIECE_BYTES", 16)


def same(got: Any, want: Any) -> None:
    """Equal values, where arrays stand for the lists of rows they were made of."""
    if isinstance(got, np.ndarray):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, np.asarray(want, dtype=np.float64))
        assert got.shape == (len(want), len(want[0]))
    elif isinstance(got, dict):
        assert isinstance(want, dict) and list(got) == list(want)
        for key in got:
            same(got[key], want[key])
    elif isinstance(got, list):
        assert isinstance(want, list) and len(got) == len(want)
        for a, b in zip(got, want):
            same(a, b)
    else:
        assert type(got) is type(want) and got == want


rng = np.random.default_rng(7)
ROW_VALUES = rng.standard_normal((40, 3)) * 10.0 ** rng.integers(-30, 30, (40, 3))

VALID = {
    "rows": orjson.dumps({"inputs": ROW_VALUES.tolist()}),
    "rows and context, pretty": json.dumps({"inputs": ROW_VALUES.tolist(), "context": [[1, 0, 0]] * 40},
                                           indent=2).encode(),
    "records": orjson.dumps({"inputs": [{"x0": round(a, 2), "x 1": -b, "é": 1} for a, b in rng.random((40, 2)).tolist()]}),
    "exponents, negatives, ints, spaces": b'{"latents" : [ [ -1e-3 , 2E+5 ] ,\n\t[ 0 , -0.0 ] , [1e5,-7] ,'
                                          b' [ 123456789012345678 , 1.5 ] , [ -2.5e-308 , 3 ] ] , "n": 3}',
    "booleans in rows": b'{"context": [[true, false, 1], [0, 1, 0], [false, true, 0.5], [1, 1, 1], [0, 0, 0]]}',
    "nested context and strings with brackets": b'{"id": "a[b]{c},d", "inputs": [[1, 2], [3, 4], [5, 6], [7, 8], '
                                                 b'[9, 10]], "extra": {"context": [[1, 2], [3, 4], [5, 6], [7, 8]]}, '
                                                 b'"tags": ["[", "]", "{", "}", ",", "::" ]}',
    "empty arrays and rows": b'{"inputs": [[], [], [], [], [], [], [], [], []], "other": [], "more": [[], [1], []]}',
    "a flat list": b'{"context": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 8.5]}',
    "ragged rows": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8, 9], [1, 2], [3, 4], [5, 6]]}',
    "null and strings in rows": b'{"inputs": [[1, 2], [3, null], [5, 6], [7, "8"], [1, 2], [3, 4], [5, 6]]}',
    "rows then records": b'{"inputs": [[1, 2], [3, 4], [5, 6], {"x0": 1, "x1": 2}, [1, 2], [3, 4]]}',
    "a number among rows": b'{"inputs": [[1, 2], [3, 4], 5, [5, 6], [7, 8], [9, 10], [1, 2], [3, 4]]}',
    "widths change between pieces": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8], [1, 2, 3], [4, 5, 6], [7, 8, 9]]}',
    "huge ints": b'{"inputs": [[18446744073709551616, 1], [1, -9223372036854775809], [2, 3], [4, 5], [6, 7]]}',
    "a top-level array": b'[[1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12]]',
    "a v2 body": orjson.dumps({"id": "q", "inputs": [{"name": "x", "shape": [20, 2], "datatype": "FP64",
                                                      "data": list(range(40))}], "outputs": [{"name": "log_prob"}]}),
    "unicode": '{"name": "ünïcödé ✓ [", "inputs": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]}'.encode(),
    "duplicate keys": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8]], "inputs": [[9, 9], [8, 8], [7, 7], [6, 6]]}',
}

MALFORMED = {
    "trailing comma in rows": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10],]}',
    "leading comma": b'{"inputs": [,[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]}',
    "double comma": b'{"inputs": [[1, 2], [3, 4],, [5, 6], [7, 8], [9, 10]]}',
    "comma inside a row": b'{"inputs": [[1, 2], [3, 4], [5,, 6], [7, 8], [9, 10]]}',
    "missing comma between rows": b'{"inputs": [[1, 2], [3, 4] [5, 6], [7, 8], [9, 10]]}',
    "empty row beside a number": b'{"inputs": [[1], [2], [3], []4, [5], [6], [7]]}',
    "NaN": b'{"inputs": [[1, 2], [3, 4], [5, NaN], [7, 8], [9, 10]]}',
    "Infinity by exponent": b'{"inputs": [[1, 2], [3, 4], [5, 1e400], [7, 8], [9, 10]]}',
    "bad numbers": b'{"inputs": [[1, 2], [3, 4], [5, 01], [7, .5], [9, 10.]]}',
    "crossed brackets": b'{"inputs": [[1, 2], [3, 4], [5, 6}, [7, 8], [9, 10]]}',
    "unclosed": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]',
    "an array as a key": b'{[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]: 1}',
    "two values": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8]]} {"a": 1}',
    "odd quotes": b'{"inputs": [[1, 2], [3, 4], [5, 6], [7, 8]], "a: 1}',
    "backslash": b'{"a": "\\q", "inputs": [[1, 2], [3, 4], [5, 6], [7, 8]]}',
    "invalid utf-8": b'{"a": "\xff", "inputs": [[1, 2], [3, 4], [5, 6], [7, 8]]}',
    "too deep": b'{"inputs": ' + b"[" * 1100 + b"]" * 1100 + b"}",
}


@pytest.mark.parametrize("name", VALID)
def test_valid_bodies_parse_to_orjsons_value(name: str) -> None:
    body = VALID[name]
    want = orjson.loads(body)
    same(loads(body, ROWS), want)
    plain = loads(body)  # without rows fields: exactly orjson's value, lists and all
    assert plain == want and type(plain) is type(want)


#: an element of PIECE_BYTES or more is not left whole: its own arrays are cut instead
BIG_ELEMENTS = {"records": 80, "rows then records": 32, "rows and context, pretty": 256}


@pytest.mark.parametrize("name", [n for n in VALID if n != "duplicate keys"])
def test_the_piece_path_ran(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No fallback for these bodies: the value came from the pieces, not from one orjson call."""
    if name in BIG_ELEMENTS:
        monkeypatch.setattr(json_pieces, "PIECE_BYTES", BIG_ELEMENTS[name])
    body = VALID[name]
    same(loads_in_pieces(body, ROWS), orjson.loads(body))


def test_backslashes_fall_back_to_one_call() -> None:
    body = b'{"a": "\\"[", "inputs": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]}'
    with pytest.raises(_Fallback):
        loads_in_pieces(body, ROWS)
    assert loads(body, ROWS) == orjson.loads(body)


def test_duplicate_keys_fall_back_to_one_call() -> None:
    """orjson keeps the last of two equal keys, so the first array's placeholder is gone: parsed whole."""
    with pytest.raises(_Fallback):
        loads_in_pieces(VALID["duplicate keys"], ROWS)


def test_clean_rows_come_as_arrays_and_the_rest_as_lists(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_pieces, "PIECE_BYTES", 256)
    got = loads(VALID["rows and context, pretty"], ROWS)
    assert isinstance(got["inputs"], np.ndarray) and got["inputs"].shape == (40, 3)
    np.testing.assert_array_equal(got["inputs"], ROW_VALUES)  # orjson round-trips float64 exactly
    assert isinstance(got["context"], np.ndarray)
    for name in ("records", "ragged rows", "null and strings in rows", "rows then records", "a number among rows",
                 "widths change between pieces", "a flat list", "booleans in rows"):
        monkeypatch.setattr(json_pieces, "PIECE_BYTES", BIG_ELEMENTS.get(name, 16))
        value = loads_in_pieces(VALID[name], ROWS)  # cut into pieces, but kept as lists for the row checks
        field = "context" if "context" in value else "inputs"
        assert isinstance(value[field], list), name
    monkeypatch.setattr(json_pieces, "PIECE_BYTES", 16)
    nested = loads(VALID["nested context and strings with brackets"], ROWS)
    assert isinstance(nested["inputs"], np.ndarray) and isinstance(nested["extra"]["context"], list)


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_bodies_give_orjsons_error(name: str) -> None:
    body = MALFORMED[name]
    with pytest.raises(orjson.JSONDecodeError) as want:
        orjson.loads(body)
    with pytest.raises(orjson.JSONDecodeError) as got:
        loads(body, ROWS)
    assert str(got.value) == str(want.value)
    assert got.value.pos == want.value.pos


def test_big_bodies_are_cut_into_pieces_of_about_piece_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_pieces, "PIECE_BYTES", 4096)
    rows = np.random.default_rng(1).standard_normal((20_000, 2))
    body = orjson.dumps({"inputs": rows, "n": 1}, option=orjson.OPT_SERIALIZE_NUMPY)
    calls: list[int] = []
    real = json_pieces._rows_piece
    monkeypatch.setattr(json_pieces, "_rows_piece", lambda piece: calls.append(len(piece)) or real(piece))
    got = loads_in_pieces(body, ROWS)
    np.testing.assert_array_equal(got["inputs"], rows)
    assert got["n"] == 1
    assert len(calls) >= len(body) // 4096 - 1
    assert max(calls) < 4096 + 100  # a piece ends at the first comma after PIECE_BYTES


V2_DATA = ("inputs", json_pieces.EACH, "data")


def v2_body(x: Any, context: Any) -> bytes:
    return orjson.dumps({"id": "q", "inputs": [{"name": "x", "shape": [20, 2], "datatype": "FP64", "data": x},
                                               {"name": "context", "shape": [20, 1], "datatype": "FP64",
                                                "data": context}],
                         "outputs": [{"name": "log_prob"}], "data": list(range(60))})


def test_arrays_at_a_path_with_each_come_as_numbers_flat_or_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """/v2's tensor data: at ("inputs", EACH, "data"), rows as (n, w) and, with flat, flat lists as (n,)."""
    monkeypatch.setattr(json_pieces, "PIECE_BYTES", 128)  # more than a row, less than a data array
    x = ROW_VALUES[:20, :2]
    body = v2_body(x.tolist(), x[:, 0].tolist())
    want = orjson.loads(body)
    got = loads_in_pieces(body, frozenset({V2_DATA}), flat=True)
    assert isinstance(got["inputs"][0]["data"], np.ndarray) and got["inputs"][0]["data"].shape == (20, 2)
    np.testing.assert_array_equal(got["inputs"][0]["data"], x)
    assert isinstance(got["inputs"][1]["data"], np.ndarray) and got["inputs"][1]["data"].shape == (20,)
    np.testing.assert_array_equal(got["inputs"][1]["data"], x[:, 0])
    assert got["data"] == want["data"] and type(got["data"]) is list  # not at the path: kept as orjson's value
    assert {k: got[k] for k in ("id", "outputs")} == {k: want[k] for k in ("id", "outputs")}
    without_flat = loads_in_pieces(body, frozenset({V2_DATA}))  # flat lists are left as lists
    assert isinstance(without_flat["inputs"][0]["data"], np.ndarray)
    assert without_flat["inputs"][1]["data"] == want["inputs"][1]["data"]
    same(loads(body, ["inputs"], flat=True), want)  # "inputs" names the list of tensors: no rows there


@pytest.mark.parametrize("data", [b"[1, 2], [3, 4], 5, 6, 7, 8, 9, 10, 11, 12",  # rows then numbers
                                  b"1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, [12, 13]",  # numbers then a row
                                  b"1, 2, 3, 4, 5, true, 7, 8, 9, 10, 11, 12",  # a boolean
                                  b"1, 2, 3, 4, 5, null, 7, 8, 9, 10, 11, 12"])
def test_mixed_or_non_numbers_stay_lists(data: bytes) -> None:
    body = b'{"inputs": [{"name": "x", "data": [' + data + b']}]}'
    got = loads_in_pieces(body, frozenset({V2_DATA}), flat=True)
    assert got == orjson.loads(body) and isinstance(got["inputs"][0]["data"], list)


def test_malformed_flat_data_gives_orjsons_error() -> None:
    for body in (b'{"inputs": [{"data": [1, 2, 3, 4, 5, 6, 7, 8,, 9, 10]}]}',
                 b'{"inputs": [{"data": [1, 2, 3, 4, 5, 6, 7, 8, 1e400, 10]}]}',
                 b'{"inputs": [{"data": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10,]}]}'):
        with pytest.raises(orjson.JSONDecodeError) as want:
            orjson.loads(body)
        with pytest.raises(orjson.JSONDecodeError) as got:
            loads(body, [V2_DATA], flat=True)
        assert (str(got.value), got.value.pos) == (str(want.value), want.value.pos)
