"""NumPy's binary formats over HTTP: ``.npy`` / ``.npz`` request bodies and answers.

Requests (registered with :func:`service.http.codecs.bodies.register_parser` by :func:`install`):

- ``application/x-npy``: the body is one ``.npy`` file, the operation's main array (``inputs`` of
  ``log_prob`` / ``inverse`` / ``score``, ``latents`` of ``forward``); every other field is a query
  parameter (``?alpha=0.05``), validated leniently from its text.
- ``application/x-npz``: the body is an ``.npz`` archive (``np.savez``, compressed or not) whose
  members are named after the fields: ``inputs`` / ``latents`` and ``context``. This is how a
  conditional model gets its context rows in binary (``.npy`` holds one array only), and how
  ``sample`` gets a binary ``context``. Scalar fields are query parameters here too.

Arrays are read without pickle, ever: the ``.npy`` header is parsed by numpy's own reader, its
dtype checked (object, structured, string, complex and date dtypes are refused with 400), the
declared shape checked against the bytes actually sent, and the data mapped with ``np.frombuffer``
(no copy). ``np.load`` is not used because, for a file object, it allocates the declared shape
before reading: a 100-byte body could ask for terabytes. Real numbers of any width are accepted:
float32 and float64 (the contract's formats), and also float16, integers and booleans, which are
converted to float64 exactly as the same numbers sent as JSON would be. An ``.npz`` may not
expand to more than ``max_body_bytes`` of uncompressed members (zip bombs get 413): members are
inflated here in bounded steps, counting real output, never trusting the zip directory's sizes
(:func:`read_npz`), and off the event loop (:mod:`service.http.codecs.bodies`).

Answers (:func:`encode`): ``.npy`` is the operation's main array in the model's dtype (see
:data:`MAIN_FIELD`); ``.npz`` is the whole answer, one member per field: arrays as they are,
``is_anomaly`` as ``bool``, scalars as 0-d arrays (``model`` a string, ``version`` an ``int64``,
``seed`` a ``uint64``), and nested objects flattened with dots (``threshold.alpha``,
``threshold.log_prob``). Non-finite values stay what they are (binary formats have no JSON
``null``). Both carry the ``Flowserve-Model`` / ``Flowserve-Model-Version`` headers.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
import zlib
from typing import Any, Iterator, Mapping

import numpy as np
from numpy.lib import format as npformat
from starlette.requests import Request
from starlette.responses import Response

from service.http.codecs.bodies import ParsedBody, query_fields, register_parser
from service.http.problems import Problem, field_error
from service.serving.table import TABLE

__all__ = [
    "ACCEPTED_KINDS",
    "NPY",
    "NPZ",
    "BinaryResponse",
    "encode",
    "install",
    "npy_bytes",
    "npz_bytes",
    "parse_npy",
    "parse_npz",
    "read_npy",
]

NPY = "application/x-npy"
NPZ = "application/x-npz"

#: numpy dtype kinds a body may hold: floats, signed and unsigned integers, booleans
ACCEPTED_KINDS = "fiub"
#: the largest ``.npy`` header numpy itself reads without ``allow_pickle`` (numpy's default)
MAX_HEADER_BYTES = 10_000
#: members larger than this need zip64 headers, declared before they are written
ZIP64_LIMIT = (1 << 31) - (1 << 20)
#: dtypes of scalar answer fields in ``.npz`` answers (other integers are int64, floats float64)
SCALAR_DTYPES: dict[str, type] = {"seed": np.uint64, "version": np.int64}
#: the fields an ``.npz`` body may carry (every other field is a query parameter)
ARRAY_FIELDS = ("inputs", "latents", "context")


# -- reading -------------------------------------------------------------------------------------------
def _malformed(what: str, why: str, loc: tuple[str, ...] = ("body",)) -> Problem:
    return Problem(400, "malformed-npy", f"{what} is not a valid .npy file: {why}", errors=[field_error(loc, why)])


def _kind_name(dtype: np.dtype) -> str:
    if dtype.hasobject:
        return "Python objects (pickles are never read)"
    return {"c": "complex numbers", "V": "a structured or void type", "U": "text", "S": "bytes",
            "M": "dates", "m": "time spans"}.get(dtype.kind, f"type {dtype.kind!r}")


def read_npy(data: bytes | memoryview, what: str = "the body", loc: tuple[str, ...] = ("body",)) -> np.ndarray:
    """The array of one ``.npy`` file, without pickle and without trusting its header.

    ``data`` must hold exactly the header and ``prod(shape) * itemsize`` bytes of data. The
    result is a read-only view of ``data`` (copy it before writing).
    """
    fp = io.BytesIO(data)
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp, max_header_size=MAX_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp, max_header_size=MAX_HEADER_BYTES)
        else:
            raise ValueError(f"format version {version[0]}.{version[1]} is not supported "
                             "(use 1.0 or 2.0, as np.save writes)")
    except Exception as e:  # noqa: BLE001 - numpy's reader raises ValueError, SyntaxError, EOFError, ...
        raise _malformed(what, str(e) or type(e).__name__, loc) from None
    if dtype.kind not in ACCEPTED_KINDS or dtype.hasobject:
        raise Problem(400, "invalid-input", f"{what} holds {_kind_name(dtype)} (dtype {dtype.str!r}); send real numbers, "
                      "float32 or float64", errors=[field_error(loc, f"unsupported dtype {dtype.str!r}")])
    count = math.prod(shape)
    expected = count * dtype.itemsize
    offset = fp.tell()
    got = len(data) - offset
    if got != expected:
        raise _malformed(what, f"its header declares shape {shape} of {dtype.str!r} ({expected} bytes of data), "
                         f"but {got} bytes follow the header", loc)
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def _member_name(name: str, key: str | None) -> str:
    return f"the .npz member {name!r}" if key is None else f"{key} (.npz member {name!r})"


#: zip compression methods a member may use: stored and deflate (``np.savez`` / ``np.savez_compressed``).
#: Others (bzip2, lzma) are refused: Python's readers for them cannot bound the output of one step.
MEMBER_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate"}
#: compressed bytes fed to zlib per step, and the most it may inflate them to in one step: memory
#: is bounded by the cap plus one step whatever the archive claims
INFLATE_IN = 1 << 16
INFLATE_OUT = 1 << 20
#: a zip local file header: signature, then fixed fields; name and extra lengths at offsets 26 and 28
_LOCAL_HEADER = struct.Struct("<4s22xHH")
_LOCAL_SIGNATURE = b"PK\x03\x04"


def _bad_member(info: zipfile.ZipInfo, key: str, why: str) -> Problem:
    return Problem(400, "malformed-npy", f"{_member_name(info.filename, None)} cannot be read: {why}",
                   errors=[field_error(("body", key), why)])


def _member_data(body: memoryview, info: zipfile.ZipInfo, key: str) -> memoryview:
    """The compressed bytes of ``info`` (after its local header), within ``body``."""
    start = info.header_offset
    header = bytes(body[start:start + _LOCAL_HEADER.size])
    if len(header) < _LOCAL_HEADER.size:
        raise _bad_member(info, key, "its local header lies outside the archive")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    if signature != _LOCAL_SIGNATURE:
        raise _bad_member(info, key, "its local header is missing")
    begin = start + _LOCAL_HEADER.size + name_len + extra_len
    end = begin + info.compress_size
    if end > len(body):
        raise _bad_member(info, key, f"its {info.compress_size} compressed bytes run past the end of the body")
    return body[begin:end]


def _inflate(data: memoryview, info: zipfile.ZipInfo, key: str, budget: int, max_bytes: int) -> bytearray:
    """The member's bytes, inflated step by step; 413 as soon as they pass ``budget``.

    The directory's sizes are never trusted: ``info.file_size`` is only checked after the fact
    (with the CRC), and a step inflates at most :data:`INFLATE_OUT` bytes, so a member whose
    directory entry says 1 KiB but which inflates to 1 GiB is stopped after ``budget`` + 1 MiB.
    """
    def too_large(got: int) -> Problem:
        return Problem(413, "content-too-large",
                       f"the .npz archive expands to more than {max_bytes} bytes: {_member_name(info.filename, key)} "
                       f"alone expands to more than {got} bytes; this server takes at most {max_bytes} bytes "
                       "(FLOWSERVE_MAX_BODY_BYTES)",
                       errors=[field_error(("body", key), f"expands past the limit of {max_bytes} bytes")])

    if info.compress_type == zipfile.ZIP_STORED:
        if len(data) > budget:
            raise too_large(len(data))
        out = bytearray(data)
    else:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, as zip stores it
        out = bytearray()
        pos = 0
        try:
            while not inflater.eof:
                chunk = inflater.unconsumed_tail
                if not chunk and pos < len(data):
                    chunk = data[pos:pos + INFLATE_IN]
                    pos += len(chunk)
                # with every input byte taken, zlib may still hold output (a long run of one byte
                # inflates from a few bits): an empty chunk flushes it; truncated only if none comes
                step = inflater.decompress(chunk, INFLATE_OUT)
                if not chunk and not step and not inflater.eof:
                    raise _bad_member(info, key, "its deflate stream is truncated")
                out += step
                if len(out) > budget:
                    raise too_large(len(out))
        except zlib.error as e:
            raise _bad_member(info, key, f"its deflate stream is corrupt: {e}") from None
    if len(out) != info.file_size:
        raise _bad_member(info, key, f"the archive's directory says {info.file_size} bytes, but it holds {len(out)}")
    if zlib.crc32(out) != info.CRC:
        raise _bad_member(info, key, "its CRC-32 does not match its bytes")
    return out


def read_npz(body: bytes, max_bytes: int) -> dict[str, np.ndarray]:
    """The members of an ``.npz`` archive by field name; at most ``max_bytes`` inflated, in all.

    Only the member names, offsets and compressed sizes of the zip directory are used; every member
    is inflated here in bounded steps, counting its real output against ``max_bytes`` (413 naming
    the member as soon as the total passes it), so what a zip bomb costs is bounded by the limit
    whatever its directory says. The limit is the body limit: an ``.npz`` admits no more data than
    the same arrays sent uncompressed could (an ``.npy`` body of ``max_bytes``), and it does not
    depend on the model (the body is parsed before its rows are checked).
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as e:
        raise Problem(400, "malformed-npy", f"the body is not a valid .npz archive: {e}",
                      errors=[field_error(("body",), str(e))]) from None
    arrays: dict[str, np.ndarray] = {}
    view = memoryview(body)
    budget = max_bytes
    with archive:
        for info in archive.infolist():
            if info.is_dir():
                continue
            if not info.filename.endswith(".npy"):
                raise Problem(400, "malformed-npy", f"the .npz member {info.filename!r} is not a .npy file",
                              errors=[field_error(("body", info.filename), "expected <field>.npy")])
            key = info.filename[:-4]
            if key in arrays:
                raise Problem(400, "malformed-npy", f"the .npz archive holds {key!r} twice",
                              errors=[field_error(("body", key), "given twice")])
            if info.flag_bits & 0x1:
                raise _bad_member(info, key, "it is encrypted")
            if info.compress_type not in MEMBER_METHODS:
                raise _bad_member(info, key, f"compression method {info.compress_type} is not supported "
                                             "(use np.savez or np.savez_compressed: stored or deflate)")
            data = _inflate(_member_data(view, info, key), info, key, budget, max_bytes)
            budget -= len(data)
            array = read_npy(data, _member_name(info.filename, key), ("body", key))
            array.flags.writeable = False  # as from bytes: the parsed body is read-only
            arrays[key] = array
    return arrays


def _max_body_bytes(request: Request) -> int:
    return int(request.app.state.flowserve.settings.max_body_bytes)


def _array_query_params(query: Mapping[str, Any]) -> None:
    for name in ARRAY_FIELDS:
        if name in query:
            raise Problem(422, "invalid-field", f"{name} cannot be a query parameter: send arrays in the body "
                          "(.npy, .npz or JSON)", errors=[field_error(("query", name), "arrays go in the body")])


def parse_npy(body: bytes, request: Request) -> ParsedBody:
    """An ``.npy`` body: the main array; other fields from the query string."""
    query = query_fields(request)
    _array_query_params(query)
    return ParsedBody(query, array=read_npy(body), lax=True, query_fields=frozenset(query))


def parse_npz(body: bytes, request: Request) -> ParsedBody:
    """An ``.npz`` body: arrays by field name (``inputs`` / ``latents``, ``context``); others from the query."""
    query = query_fields(request)
    _array_query_params(query)
    arrays = read_npz(body, _max_body_bytes(request))
    for key in arrays:
        if key in query:
            raise Problem(422, "invalid-field", f"{key} is given twice: in the .npz body and as a query parameter",
                          errors=[field_error(("query", key), "also in the body")])
    return ParsedBody({**query, **arrays}, lax=True, query_fields=frozenset(query))


def install() -> None:
    """Make every operation accept ``.npy`` and ``.npz`` bodies."""
    register_parser(NPY, parse_npy, off_loop=True)
    register_parser(NPZ, parse_npz, always_off_loop=True)  # a small body may inflate to the whole limit


# -- writing -------------------------------------------------------------------------------------------
def _header(array: np.ndarray) -> bytes:
    """The ``.npy`` header of a C-contiguous ``array`` (format 1.0, as ``np.save`` writes)."""
    header = io.BytesIO()
    info = npformat.header_data_from_array_1_0(array)
    try:
        npformat.write_array_header_1_0(header, info)
    except ValueError:  # a header over 64 KiB (absurdly many dimensions): format 2.0
        header = io.BytesIO()
        npformat.write_array_header_2_0(header, info)
    return header.getvalue()


def _data(array: np.ndarray) -> bytes | memoryview:
    """The bytes of a C-contiguous ``array``, without copying them where numpy allows."""
    if array.ndim == 0 or array.dtype.hasobject:
        return array.tobytes()
    return memoryview(array.reshape(-1).view(np.uint8))


def _c_order(array: np.ndarray) -> np.ndarray:
    """``array`` itself when C-contiguous, else a C-ordered copy (0-d arrays stay 0-d)."""
    return array if array.flags.c_contiguous else array.copy(order="C")


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a ``.npy`` file (header, then its bytes in C order): one copy of the data."""
    array = _c_order(np.asarray(array))
    return b"".join((_header(array), _data(array)))


def _flatten(fields: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, np.ndarray]]:
    for key, value in fields.items():
        name = prefix + key
        if isinstance(value, Mapping):
            yield from _flatten(value, name + ".")
        elif isinstance(value, np.ndarray):
            yield name, value
        elif isinstance(value, bool):
            yield name, np.asarray(value, dtype=np.bool_)
        elif isinstance(value, int):
            yield name, np.asarray(value, dtype=SCALAR_DTYPES.get(name, np.int64))
        elif isinstance(value, float):
            yield name, np.asarray(value, dtype=np.float64)
        elif isinstance(value, str):
            yield name, np.asarray(value)
        elif value is None:
            continue
        else:
            yield name, np.asarray(value)


def npz_bytes(fields: Mapping[str, Any]) -> bytes:
    """``fields`` as an uncompressed ``.npz`` (nested objects flattened with dots; ``None`` left out)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in _flatten(fields):
            array = _c_order(array)
            with archive.open(name + ".npy", "w", force_zip64=array.nbytes > ZIP64_LIMIT) as member:
                member.write(_header(array))
                member.write(_data(array))
    return buf.getvalue()


class BinaryResponse(Response):
    """Bytes already encoded as ``.npy`` or ``.npz``."""

    def __init__(self, content: bytes, media_type: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(content, media_type=media_type, headers=dict(headers or {}))


#: operation -> the field an ``application/x-npy`` answer holds (from :data:`service.serving.table.TABLE`)
MAIN_FIELD = {op.name: op.main_answer for op in TABLE}


def encode(payload: Mapping[str, Any], media: str, main: str, headers: Mapping[str, str] | None = None) -> Response:
    """The binary answer of ``payload``: its ``main`` field as ``.npy``, or all of it as ``.npz``."""
    if media == NPY:
        return BinaryResponse(npy_bytes(np.asarray(payload[main])), NPY, headers)
    if media == NPZ:
        return BinaryResponse(npz_bytes(payload), NPZ, headers)
    raise ValueError(f"not a binary media type: {media}")
