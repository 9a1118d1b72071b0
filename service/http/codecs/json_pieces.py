"""Parsing a large JSON body in pieces, so that the GIL is free between them.

orjson holds the GIL for the whole of one ``loads`` call (it builds Python objects as it goes), so
parsing a 100 MB body in a worker thread still stops the event loop for the whole parse. Here the
big arrays of a body are cut into pieces of about :data:`PIECE_BYTES` at their own commas and each
piece is parsed with its own ``orjson.loads``: between two calls the worker runs Python bytecode,
where the interpreter hands the GIL to a thread that has waited for its switch interval (5 ms), so
the loop waits at most one piece's parse (a few ms) rather than the whole body's.

The mechanism, over the body's bytes as a numpy array (whole-array passes, no Python loop per byte):

1. Strings: with no backslash in the body (else: step 6), a string is exactly the text from one
   ``"`` to the next, so a position is inside a string iff an odd number of quotes precede it.
2. Containers: the brackets and braces outside strings; their running sum (``+1`` opens, ``-1``
   closes) is the depth, and within one depth level opens and closes alternate, so a stable sort by
   level pairs each open with its close (both kinds checked).
3. Big arrays: an array spanning :data:`PIECE_BYTES` or more that holds no other container that
   large (rows ``[[..], ..]``, records ``[{..}, ..]``, or a flat list of numbers; the innermost big
   ones, so a ``/v2`` tensor's ``data`` rather than the ``inputs`` list around it).
4. Pieces: about every :data:`PIECE_BYTES` the next comma at the array's own depth, outside strings,
   cuts it; each piece ``p`` is parsed as ``[p]``; the lists, joined, are the array.
5. The rest: the body with each big array replaced by a placeholder string (``"\\u0000<i>"``,
   which cannot occur in a body without backslashes: raw control characters are invalid JSON) is
   parsed with one ``orjson.loads``, and every placeholder, found exactly once as a value, is
   replaced by its array.
6. Anything else - a backslash, odd quotes, unbalanced or crossed brackets, a depth over
   :data:`MAX_DEPTH`, an empty piece (a leading or trailing comma), any parse error in a piece or
   the rest, a placeholder used as a key - falls back to one ``orjson.loads(body)``, which gives
   exactly today's value or today's error (with its message and position).

Since the body is the rest with each placeholder replaced by ``[`` + the pieces joined by commas +
``]``, and each of those parsed alone, the value equals ``orjson.loads(body)`` (kept by the tests
against orjson itself).

Rows straight to numpy: the big arrays at the places named in ``rows_fields`` (top-level field
names such as ``inputs``, ``latents``, ``context``, or paths such as ``("inputs", EACH, "data")``,
where :data:`EACH` stands for every element of a list) that are lists of equally long lists of JSON
numbers come back as a float64 ``(rows, width)`` array, converted piece by piece
(:func:`_rows_piece`): Python floats then exist for one piece at a time, no list per row is built,
and the conversion is not left to the event loop. With ``flat=True`` (``/v2``'s tensor ``data``,
flat or nested), a flat list of numbers there comes back as a float64 1-D array the same way
(:func:`_numbers_piece`). The values are those of ``np.asarray(lists, dtype=float64)``. Any other
content (records, ``true`` / ``false``, ``null``, strings, ragged rows, rows mixed with numbers)
keeps the lists, so the checks of :func:`service.http.codecs.rows.rows_array` name the row and
column at fault exactly as they do for a small body; for a clean array they give the same answer
and the same errors (row count, width) as for its lists. The fields of a ``.npz`` body are arrays too, so callers already take both.
"""

from __future__ import annotations

from typing import Any, Iterable, Union

import numpy as np
import orjson

__all__ = ["EACH", "MAX_DEPTH", "PIECE_BYTES", "Path", "loads", "loads_in_pieces"]


class _Each:
    """In a :data:`Path`: every element of a list."""

    def __repr__(self) -> str:
        return "EACH"


#: in a :data:`Path`, matches every index of a list
EACH = _Each()
#: a place in a JSON value: object keys (and :data:`EACH` for the elements of a list), from the root
Path = tuple[Union[str, _Each], ...]

#: about how many bytes one ``orjson.loads`` call parses: ~5-15 ms for numbers (orjson builds
#: 10-20 MB of floats a second into Python objects), so ``/healthz`` waits at most that long; the
#: ~100 calls per 25 MB cost nothing measurable
PIECE_BYTES = 256 << 10
#: nesting deeper than this is left to orjson (its own limit is 1024; a piece is shallower than the
#: whole body, so a piece could otherwise accept what the whole body's parse refuses)
MAX_DEPTH = 512
#: the body is scanned in blocks of this size, so the temporary masks stay small
_SCAN_BLOCK = 8 << 20

_QUOTE, _COMMA, _BACKSLASH = ord('"'), ord(","), ord("\\")
_OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT = (ord(c) for c in "[]{}")
_BRACKET = np.zeros(256, dtype=bool)
_BRACKET[[_OPEN_ARRAY, _CLOSE_ARRAY, _OPEN_OBJECT, _CLOSE_OBJECT]] = True
_PLACEHOLDER_MARK = "\x00"


class _Fallback(Exception):
    """The body is not one the piece parser handles; parse it whole."""


def loads(body: bytes, rows_fields: Iterable[str | Path] = (), flat: bool = False) -> Any:
    """``orjson.loads(body)``, parsed in pieces where the body has big arrays (see the module doc).

    ``rows_fields``: top-level field names or :data:`Path` s whose big arrays of numbers come back as
    float64 arrays (rows; with ``flat``, flat lists of numbers too). Raises
    ``orjson.JSONDecodeError`` exactly as ``orjson.loads(body)`` does.
    """
    try:
        return loads_in_pieces(body, _paths(rows_fields), flat)
    except _Fallback:
        return orjson.loads(body)


def _paths(fields: Iterable[str | Path]) -> frozenset[Path]:
    return frozenset((f,) if isinstance(f, str) else tuple(f) for f in fields)


def loads_in_pieces(body: bytes, rows_fields: frozenset[str] | frozenset[Path] = frozenset(),
                    flat: bool = False) -> Any:
    """The piece parser itself; raises :class:`_Fallback` where :func:`loads` parses the body whole."""
    rows_paths = _paths(rows_fields)
    if body.find(b"\\") >= 0:
        raise _Fallback("backslash")
    data = np.frombuffer(body, dtype=np.uint8)
    quotes, brackets = _scan(data)
    if len(quotes) % 2:
        raise _Fallback("odd quotes")
    if len(brackets):
        brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]
    if not len(brackets):
        raise _Fallback("no containers")
    kinds = data[brackets]
    delta = np.where((kinds == _OPEN_ARRAY) | (kinds == _OPEN_OBJECT), 1, -1).astype(np.int32)
    depth = np.cumsum(delta, dtype=np.int32)  # the depth after each bracket
    if depth.min() < 0 or depth[-1] != 0 or depth.max() > MAX_DEPTH:
        raise _Fallback("unbalanced")
    level = np.where(delta > 0, depth, depth + 1)
    order = np.argsort(level, kind="stable")
    opens, closes = order[0::2], order[1::2]
    if not ((delta[opens] > 0).all() and (delta[closes] < 0).all()
            and (kinds[closes].astype(np.int32) - kinds[opens] == 2).all()):  # '[' + 2 == ']', '{' + 2 == '}'
        raise _Fallback("crossed brackets")
    chosen = _big_arrays(brackets[opens], brackets[closes], kinds[opens] == _OPEN_ARRAY, level[opens])
    if not chosen:
        raise _Fallback("no big array")
    return _assemble(body, data, chosen, quotes, brackets, depth, rows_paths, flat)


def _scan(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of every ``"`` and of every bracket or brace (inside strings too)."""
    quotes, brackets = [], []
    for start in range(0, len(data), _SCAN_BLOCK):
        block = data[start:start + _SCAN_BLOCK]
        quotes.append(np.flatnonzero(block == _QUOTE) + start)
        brackets.append(np.flatnonzero(_BRACKET[block]) + start)
    return np.concatenate(quotes), np.concatenate(brackets)


def _big_arrays(start: np.ndarray, end: np.ndarray, is_array: np.ndarray,
                level: np.ndarray) -> list[tuple[int, int, int]]:
    """``(open, close, level)`` of the arrays spanning ``PIECE_BYTES`` that hold no container that large."""
    big = np.flatnonzero(end - start >= PIECE_BYTES)
    big = big[np.argsort(start[big], kind="stable")]
    out = []
    for k, i in enumerate(big):
        holds_big = k + 1 < len(big) and start[big[k + 1]] < end[i]  # containers nest or are disjoint
        if is_array[i] and not holds_big:
            out.append((int(start[i]), int(end[i]), int(level[i])))
    return out


def _next_comma(data: np.ndarray, at: int, end: int, level: int, quotes: np.ndarray,
                brackets: np.ndarray, depth: np.ndarray) -> int | None:
    """The first comma in ``[at, end)`` outside strings at depth ``level``, or None."""
    width = 4096
    while at < end:
        stop = min(at + width, end)
        commas = np.flatnonzero(data[at:stop] == _COMMA) + at
        if len(commas):
            outside = np.searchsorted(quotes, commas) % 2 == 0
            before = np.searchsorted(brackets, commas) - 1  # the last bracket before each comma
            ok = outside & (depth[np.maximum(before, 0)] == level) & (before >= 0)
            hits = commas[ok]
            if len(hits):
                return int(hits[0])
        at, width = stop, width * 2
    return None


def _pieces(data: np.ndarray, start: int, end: int, level: int, quotes: np.ndarray, brackets: np.ndarray,
            depth: np.ndarray) -> list[tuple[int, int]]:
    """The ``[from, to)`` byte ranges of the array ``start..end``'s pieces, cut at its own commas."""
    out, begin = [], start + 1
    while begin + PIECE_BYTES < end:
        comma = _next_comma(data, begin + PIECE_BYTES, end, level, quotes, brackets, depth)
        if comma is None:
            break
        out.append((begin, comma))
        begin = comma + 1
    out.append((begin, end))
    return out


def _assemble(body: bytes, data: np.ndarray, chosen: list[tuple[int, int, int]], quotes: np.ndarray,
              brackets: np.ndarray, depth: np.ndarray, rows_paths: frozenset[Path], flat: bool) -> Any:
    parts, at = [], 0
    for i, (start, end, _) in enumerate(chosen):
        parts += [body[at:start], b'"\\u0000%d"' % i]
        at = end + 1
    parts.append(body[at:])
    try:
        rest = orjson.loads(b"".join(parts))
    except orjson.JSONDecodeError:
        raise _Fallback("the rest is not JSON") from None
    slots = _placeholders(rest, len(chosen))
    root: list[Any] = [rest]
    for i, (start, end, level) in enumerate(chosen):
        parent, key, path = slots[i] if slots[i] is not None else (root, 0, ())
        as_numbers = any(_matches(path, pattern) for pattern in rows_paths)
        ranges = _pieces(data, start, end, level, quotes, brackets, depth)
        parent[key] = _parse_array(body, ranges, as_numbers, flat)
    return root[0]


def _matches(path: tuple[Any, ...], pattern: Path) -> bool:
    """Whether ``path`` (keys and list indices) is the place ``pattern`` names."""
    return len(path) == len(pattern) and all(
        isinstance(key, int) if want is EACH else (isinstance(key, str) and key == want)
        for key, want in zip(path, pattern))


def _placeholders(rest: Any, count: int) -> list[tuple[Any, Any, tuple[Any, ...]] | None]:
    """Where each placeholder sits: ``(container, key, path from the root)``, or None for the whole body;
    each once, never a key."""
    slots: list[tuple[Any, Any, tuple[Any, ...]] | None] = [None] * count
    found = [False] * count

    def index(value: Any) -> int | None:
        if isinstance(value, str) and value.startswith(_PLACEHOLDER_MARK):
            i = int(value[1:]) if value[1:].isdigit() else count
            if i >= count or found[i]:
                raise _Fallback("a placeholder twice")
            found[i] = True
            return i
        return None

    if index(rest) is not None:  # the whole body is one big array
        if count != 1:
            raise _Fallback("placeholders beside the whole body")
        return slots
    stack: list[tuple[Any, tuple[Any, ...]]] = [(rest, ())]
    while stack:
        value, path = stack.pop()
        items: Iterable[tuple[Any, Any]]
        if isinstance(value, dict):
            if any(k.startswith(_PLACEHOLDER_MARK) for k in value):
                raise _Fallback("a placeholder as a key")
            items = value.items()
        elif isinstance(value, list):
            items = enumerate(value)
        else:
            continue
        for key, item in items:
            i = index(item)
            if i is not None:
                slots[i] = (value, key, (*path, key))
            elif isinstance(item, (dict, list)):
                stack.append((item, (*path, key)))
    if not all(found):
        raise _Fallback("a placeholder lost")
    return slots


def _parse_array(body: bytes, ranges: list[tuple[int, int]], as_numbers: bool, flat: bool) -> Any:
    """The array made of the pieces in ``ranges``: a list, or (``as_numbers``, where clean) a float64
    array: rows ``(rows, width)``, or with ``flat`` also a flat list of numbers ``(n,)``."""
    if as_numbers:
        arrays: list[np.ndarray] = []
        for begin, end in ranges:
            piece = body[begin:end]
            arr = _rows_piece(piece)
            if arr is None and flat:
                arr = _numbers_piece(piece)
            if arr is None or (arrays and arr.shape[1:] != arrays[0].shape[1:]):
                break
            arrays.append(arr)
        else:
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        del arrays  # not rows of numbers: the lists, so the row checks can name what is wrong
    out: list[Any] = []
    for begin, end in ranges:
        out += _piece(body, begin, end, len(ranges))
    return out


def _piece(body: bytes, begin: int, end: int, count: int) -> list[Any]:
    try:
        values = orjson.loads(b"[" + body[begin:end] + b"]")
    except orjson.JSONDecodeError:
        raise _Fallback("a piece is not JSON") from None
    if not values and count > 1:
        raise _Fallback("an empty piece")  # a leading or trailing comma: invalid in the whole body
    return values


_NUMBER_BYTES = b"0123456789+-.eE, \t\n\r"
_ROW_BYTES = _NUMBER_BYTES + b"[]"
_BRACKETS_TO_SPACES = bytes.maketrans(b"[]", b"  ")


def _rows_piece(piece: bytes) -> np.ndarray | None:
    """A piece of rows of numbers (``[1, 2.5], [3, -4e-3]``) as a float64 ``(rows, width)`` array, else None.

    No list per row is built: the brackets become spaces and orjson parses one flat list of numbers
    (floats are not tracked by the garbage collector, whereas a list per row made the collector
    walk every row already parsed, for up to 0.5 s at a time, holding the GIL). The flat parse
    equals the piece's rows when the piece is exactly ``[n, .., n], .., [n, .., n]`` with ``w``
    numbers per row, which these checks establish: only number, comma, bracket and whitespace bytes;
    ``[`` and ``]`` alternate (no nesting); ``w - 1`` commas in every row and one between rows
    (``rows * w - 1`` in all); every digit inside a row (no number outside one); and the flat list
    valid JSON (numbers and commas alternate) with ``rows * w`` numbers, which leaves room for no
    empty row and no comma at a row's edge. Anything else (``true``, ``null``, a string, a record,
    ragged rows) answers None and the caller keeps the lists.
    """
    if not piece or piece.translate(None, _ROW_BYTES):
        return None
    b = np.frombuffer(piece, dtype=np.uint8)
    is_open, is_close = b == _OPEN_ARRAY, b == _CLOSE_ARRAY
    opens, closes = np.flatnonzero(is_open), np.flatnonzero(is_close)
    rows = len(opens)
    if not rows or len(closes) != rows or not ((opens < closes).all() and (closes[:-1] < opens[1:]).all()):
        return None
    is_comma = b == _COMMA
    commas = np.cumsum(is_comma, dtype=np.int64)  # commas up to each byte
    per_row = commas[closes] - commas[opens]
    width = int(per_row[0]) + 1
    if (per_row != width - 1).any() or int(commas[-1]) != rows * width - 1:
        return None
    in_row = np.cumsum(is_open.view(np.int8) - is_close.view(np.int8), dtype=np.int8)  # 1 inside a row, else 0
    if ((b >= ord("0")) & (b <= ord("9")) & (in_row == 0)).any():
        return None
    try:
        flat = orjson.loads(b"[" + piece.translate(_BRACKETS_TO_SPACES) + b"]")
    except orjson.JSONDecodeError:
        return None
    if len(flat) != rows * width:
        return None
    return np.array(flat, dtype=np.float64).reshape(rows, width)


def _numbers_piece(piece: bytes) -> np.ndarray | None:
    """A piece of a flat list of numbers (``1, 2.5, -3e-3``) as a float64 ``(n,)`` array, else None.

    Only number, comma and whitespace bytes, and valid JSON as a list (numbers and commas alternate,
    so no empty element); anything else answers None and the caller keeps the lists.
    """
    if not piece or piece.translate(None, _NUMBER_BYTES):
        return None
    try:
        flat = orjson.loads(b"[" + piece + b"]")
    except orjson.JSONDecodeError:
        return None
    return np.array(flat, dtype=np.float64) if flat else None
