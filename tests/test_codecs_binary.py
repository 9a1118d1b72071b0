"""NumPy's binary formats (service.http.codecs.binary), in process: .npy / .npz reading, limits, writing.

Bodies are made by numpy itself (``np.save``, ``np.savez``, ``np.savez_compressed``) or by
:mod:`zipfile`, then altered byte by byte where a test needs a lying or broken archive (a zip
directory that understates a member's size, a wrong CRC). Answers written by :func:`npy_bytes` /
:func:`npz_bytes` are read back with ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import asyncio
import io
import re
import struct
import zipfile
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
from numpy.lib import format as npformat
from starlette.requests import Request

from service.http.codecs import binary
from service.http.codecs.binary import (
    INFLATE_OUT,
    MAX_HEADER_BYTES,
    NPY,
    NPZ,
    encode,
    npy_bytes,
    npz_bytes,
    read_npy,
    read_npz,
)
from service.http.codecs.bodies import parse_body
from service.http.problems import Problem

RNG = np.random.default_rng(10)
X = RNG.normal(size=(6, 3))


def problem(call: Callable[[], Any]) -> Problem:
    with pytest.raises(Problem) as raised:
        call()
    return raised.value


def saved(array: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, **kw)
    return buf.getvalue()


def archive(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def patch_directory(body: bytes, offset: int, fmt: str, value: int) -> bytes:
    """``body`` with one field of its (single) central directory entry replaced."""
    at = body.index(b"PK\x01\x02") + offset
    return body[:at] + struct.pack(fmt, value) + body[at + struct.calcsize(fmt):]


# -- .npy reading --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["<f4", "<f8", ">f8", "<f2", "<i2", "<u8", "|b1"])
def test_read_npy_gives_numpys_array_for_every_real_dtype(dtype: str) -> None:
    array = (X * 10).astype(dtype)
    got = read_npy(saved(array))
    assert got.dtype == np.dtype(dtype) and got.shape == (6, 3)
    np.testing.assert_array_equal(got, array)
    assert not got.flags.writeable  # a view of the body's bytes


def test_read_npy_reads_fortran_order_and_format_2() -> None:
    fortran = np.asfortranarray(X)
    np.testing.assert_array_equal(read_npy(saved(fortran)), X)
    buf = io.BytesIO()
    npformat.write_array(buf, X.astype(np.float32), version=(2, 0))
    np.testing.assert_array_equal(read_npy(buf.getvalue()), X.astype(np.float32))


@pytest.mark.parametrize(("array", "words"), [
    (np.array([[1, "a"]], dtype=object), "holds Python objects (pickles are never read) (dtype '|O')"),
    (X.astype(np.complex128), "holds complex numbers (dtype '<c16')"),
    (np.array(["ab"]), "holds text (dtype '<U2')"),
    (np.array([b"ab"]), "holds bytes (dtype '|S2')"),
    (np.zeros(2, "M8[D]"), "holds dates (dtype '<M8[D]')"),
    (np.zeros(2, "m8[s]"), "holds time spans (dtype '<m8[s]')"),
    (np.zeros(2, [("a", "<f4")]), "holds a structured or void type (dtype '|V4')"),
])
def test_read_npy_refuses_what_is_not_real_numbers(array: np.ndarray, words: str) -> None:
    p = problem(lambda: read_npy(saved(array, allow_pickle=True)))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail == f"the body {words}; send real numbers, float32 or float64"
    assert p.errors is not None and p.errors[0]["loc"] == ["body"]


def test_read_npy_checks_the_declared_shape_against_the_bytes_sent() -> None:
    body = saved(np.zeros(1000))
    header = len(body) - 8000
    short = problem(lambda: read_npy(body[: header + 80]))
    assert (short.status, short.slug) == (400, "malformed-npy")
    assert short.detail == ("the body is not a valid .npy file: its header declares shape (1000,) of '<f8' "
                            "(8000 bytes of data), but 80 bytes follow the header")
    long = problem(lambda: read_npy(body + b"\0" * 8))
    assert long.detail.endswith("(8000 bytes of data), but 8008 bytes follow the header")


def test_read_npy_refuses_bad_magic_unknown_versions_and_huge_headers() -> None:
    magic = problem(lambda: read_npy(b"x0,x1\n1,2\n"))
    assert (magic.status, magic.slug) == (400, "malformed-npy")
    assert magic.detail.startswith("the body is not a valid .npy file: ")
    v3 = bytearray(saved(X))
    v3[6:8] = b"\x03\x00"
    assert "format version 3.0 is not supported (use 1.0 or 2.0, as np.save writes)" in problem(
        lambda: read_npy(bytes(v3))).detail
    padding = MAX_HEADER_BYTES * 2
    text = ("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }".ljust(padding) + "\n").encode()
    huge = b"\x93NUMPY\x02\x00" + struct.pack("<I", len(text)) + text + b"\0" * 8
    p = problem(lambda: read_npy(huge))
    assert (p.status, p.slug) == (400, "malformed-npy")
    assert str(len(text)) in p.detail  # numpy's reader names the header length it will not parse


def test_read_npy_names_the_member_it_reads() -> None:
    p = problem(lambda: read_npy(b"nope", "context (.npz member 'context.npy')", ("body", "context")))
    assert p.detail.startswith("context (.npz member 'context.npy') is not a valid .npy file: ")
    assert p.errors is not None and p.errors[0]["loc"] == ["body", "context"]


# -- .npz reading --------------------------------------------------------------------------------
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_read_npz_reads_members_by_field_name(save: Callable[..., None]) -> None:
    buf = io.BytesIO()
    context = RNG.normal(size=(6, 2)).astype(np.float32)
    save(buf, inputs=X, context=context)
    got = read_npz(buf.getvalue(), 1 << 20)
    assert sorted(got) == ["context", "inputs"]
    np.testing.assert_array_equal(got["inputs"], X)
    np.testing.assert_array_equal(got["context"], context)
    assert got["context"].dtype == np.float32 and not got["inputs"].flags.writeable


def test_read_npz_refuses_what_is_not_an_archive_of_npy_members() -> None:
    junk = problem(lambda: read_npz(b"PK not a zip", 1 << 20))
    assert (junk.status, junk.slug) == (400, "malformed-npy")
    assert junk.detail.startswith("the body is not a valid .npz archive: ")
    csv = problem(lambda: read_npz(archive({"inputs.csv": b"1,2"}), 1 << 20))
    assert csv.detail == "the .npz member 'inputs.csv' is not a .npy file"
    buf = io.BytesIO()
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(buf, "w") as z:
        z.writestr("inputs.npy", saved(X))
        z.writestr("inputs.npy", saved(X))
    dup = problem(lambda: read_npz(buf.getvalue(), 1 << 20))
    assert dup.detail == "the .npz archive holds 'inputs' twice"
    member = problem(lambda: read_npz(archive({"inputs.npy": b"not npy"}), 1 << 20))
    assert member.detail.startswith("inputs (.npz member 'inputs.npy') is not a valid .npy file: ")
    assert member.errors is not None and member.errors[0]["loc"] == ["body", "inputs"]


def test_read_npz_refuses_other_compression_methods_and_encryption() -> None:
    bz = problem(lambda: read_npz(archive({"inputs.npy": saved(X)}, zipfile.ZIP_BZIP2), 1 << 20))
    assert (bz.status, bz.slug) == (400, "malformed-npy")
    assert bz.detail == ("the .npz member 'inputs.npy' cannot be read: compression method 12 is not supported "
                         "(use np.savez or np.savez_compressed: stored or deflate)")
    encrypted = patch_directory(archive({"inputs.npy": saved(X)}), 8, "<H", 0x1)
    assert problem(lambda: read_npz(encrypted, 1 << 20)).detail.endswith("cannot be read: it is encrypted")


def test_a_zip_bomb_is_stopped_within_one_step_of_the_limit() -> None:
    member = saved(np.zeros(1 << 20))  # 8 MiB of zeros, deflated to a few KiB
    body = archive({"inputs.npy": member})
    assert len(body) < 64 << 10
    limit = 1 << 20
    p = problem(lambda: read_npz(body, limit))
    assert (p.status, p.slug) == (413, "content-too-large")
    m = re.fullmatch(r"the \.npz archive expands to more than 1048576 bytes: inputs \(\.npz member 'inputs\.npy'\) "
                     r"alone expands to more than (\d+) bytes; this server takes at most 1048576 bytes "
                     r"\(FLOWSERVE_MAX_BODY_BYTES\)", p.detail)
    assert m, p.detail
    assert limit < int(m.group(1)) <= limit + INFLATE_OUT  # inflated in bounded steps, not all at once
    assert read_npz(body, len(member))["inputs"].shape == (1 << 20,)  # within the limit it is read


def test_a_directory_that_understates_a_member_is_not_trusted() -> None:
    member = saved(np.zeros(1 << 18))  # 2 MiB of data
    lying = patch_directory(archive({"inputs.npy": member}), 24, "<I", 100)  # uncompressed size: 100 bytes
    assert zipfile.ZipFile(io.BytesIO(lying)).getinfo("inputs.npy").file_size == 100
    assert problem(lambda: read_npz(lying, 1 << 20)).status == 413  # counted as inflated, so still stopped
    p = problem(lambda: read_npz(lying, 8 << 20))
    assert (p.status, p.slug) == (400, "malformed-npy")
    assert p.detail == (f"the .npz member 'inputs.npy' cannot be read: the archive's directory says 100 bytes, "
                        f"but it holds {len(member)}")


def test_a_wrong_crc_or_a_member_past_the_end_is_400() -> None:
    body = archive({"inputs.npy": saved(X)})
    crc = zipfile.ZipFile(io.BytesIO(body)).getinfo("inputs.npy").CRC
    bad_crc = patch_directory(body, 16, "<I", crc ^ 1)
    assert problem(lambda: read_npz(bad_crc, 1 << 20)).detail.endswith("its CRC-32 does not match its bytes")
    past = patch_directory(body, 20, "<I", len(body) * 2)  # compressed size beyond the body
    assert problem(lambda: read_npz(past, 1 << 20)).detail.endswith(
        f"its {len(body) * 2} compressed bytes run past the end of the body")


def test_a_deflate_stream_cut_short_is_400_and_a_long_run_of_zeros_is_not() -> None:
    body = archive({"inputs.npy": saved(RNG.normal(size=1000))})
    size = zipfile.ZipFile(io.BytesIO(body)).getinfo("inputs.npy").compress_size
    cut = patch_directory(body, 20, "<I", size // 2)  # the directory hands over half the stream
    assert problem(lambda: read_npz(cut, 1 << 20)).detail == (
        "the .npz member 'inputs.npy' cannot be read: its deflate stream is truncated")
    # every input byte is taken long before the output of 8 MiB of zeros is out: not a truncation
    buf = io.BytesIO()
    np.savez_compressed(buf, inputs=np.zeros(1 << 20))
    np.testing.assert_array_equal(read_npz(buf.getvalue(), 16 << 20)["inputs"], np.zeros(1 << 20))


def test_the_limit_counts_every_member_together() -> None:
    a, b = saved(np.zeros(60_000)), saved(np.ones(60_000))  # 480 KB of data each
    body = archive({"inputs.npy": a, "context.npy": b}, zipfile.ZIP_STORED)
    p = problem(lambda: read_npz(body, 800_000))
    assert p.status == 413
    assert "context (.npz member 'context.npy') alone expands to more than" in p.detail
    assert sorted(read_npz(body, len(a) + len(b))) == ["context", "inputs"]


# -- writing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("array", [X, X.astype(np.float32), X[:, ::2], np.asfortranarray(X), np.float64(2.5),
                                   np.array([True, False]), np.zeros((0, 3), np.float32)])
def test_npy_bytes_is_what_np_load_reads(array: Any) -> None:
    body = npy_bytes(array)
    back = np.load(io.BytesIO(body), allow_pickle=False)
    want = np.asarray(array)
    assert back.dtype == want.dtype and back.shape == want.shape
    np.testing.assert_array_equal(back, want)
    np.testing.assert_array_equal(read_npy(body), want)


def test_npz_bytes_flattens_fields_with_typed_scalars() -> None:
    log_prob = X[:, 0].astype(np.float32)
    payload = {"model": "moons", "version": 3, "seed": 2**64 - 5, "log_prob": log_prob,
               "is_anomaly": np.array([True, False, True, False, False, True]), "calibrated": True,
               "threshold": {"alpha": 0.05, "log_prob": -3.5}, "skipped": None}
    with np.load(io.BytesIO(npz_bytes(payload)), allow_pickle=False) as z:
        assert sorted(z.files) == ["calibrated", "is_anomaly", "log_prob", "model", "seed", "threshold.alpha",
                                   "threshold.log_prob", "version"]
        assert z["model"].dtype.kind == "U" and str(z["model"]) == "moons"
        assert z["version"].dtype == np.int64 and int(z["version"]) == 3
        assert z["seed"].dtype == np.uint64 and int(z["seed"]) == 2**64 - 5
        assert z["calibrated"].dtype == np.bool_ and bool(z["calibrated"])
        assert z["threshold.alpha"].dtype == np.float64 and float(z["threshold.alpha"]) == 0.05
        np.testing.assert_array_equal(z["log_prob"], log_prob)
        assert z["log_prob"].dtype == np.float32
        np.testing.assert_array_equal(z["is_anomaly"], payload["is_anomaly"])


def test_encode_answers_the_main_field_as_npy_or_everything_as_npz() -> None:
    payload = {"model": "m", "log_prob": X[:, 0]}
    npy = encode(payload, NPY, "log_prob", {"Flowserve-Model": "m"})
    assert npy.body == npy_bytes(X[:, 0]) and npy.media_type == NPY
    assert npy.headers["flowserve-model"] == "m" and npy.headers["content-type"] == NPY
    npz = encode(payload, NPZ, "log_prob")
    assert npz.body == npz_bytes(payload) and npz.headers["content-type"] == NPZ
    with pytest.raises(ValueError, match="not a binary media type: application/json"):
        encode(payload, "application/json", "log_prob")


# -- as request bodies ---------------------------------------------------------------------------
def binary_request(body: bytes, media: str, query: str = "", max_body_bytes: int = 1 << 20) -> Request:
    """A request to a server whose body limit is ``max_body_bytes`` (the .npz parser reads it off the app)."""
    app = SimpleNamespace(state=SimpleNamespace(flowserve=SimpleNamespace(
        settings=SimpleNamespace(max_body_bytes=max_body_bytes))))
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": query.encode(), "app": app,
             "headers": [(b"content-type", media.encode()), (b"content-length", str(len(body)).encode())]}
    return Request(scope, receive)


def parse(request: Request) -> Any:
    binary.install()
    return asyncio.run(parse_body(request, 1 << 20))


def test_an_npy_body_is_the_main_array_and_the_query_its_fields() -> None:
    parsed = parse(binary_request(saved(X), NPY, "alpha=0.05"))
    np.testing.assert_array_equal(parsed.array, X)
    assert parsed.fields == {"alpha": "0.05"} and parsed.lax
    assert parsed.query_fields == frozenset({"alpha"}) and parsed.media_type == NPY


def test_an_npz_body_gives_its_arrays_as_fields_within_the_servers_limit() -> None:
    buf = io.BytesIO()
    np.savez(buf, inputs=X, context=X[:, :2])
    parsed = parse(binary_request(buf.getvalue(), NPZ, "alpha=0.1"))
    assert sorted(parsed.fields) == ["alpha", "context", "inputs"] and parsed.array is None
    np.testing.assert_array_equal(parsed.fields["context"], X[:, :2])
    assert parsed.query_fields == frozenset({"alpha"}) and parsed.media_type == NPZ
    small = problem(lambda: parse(binary_request(buf.getvalue(), NPZ, max_body_bytes=100)))
    assert small.status == 413 and "at most 100 bytes" in small.detail


def test_arrays_in_the_query_or_given_twice_are_422() -> None:
    p = problem(lambda: parse(binary_request(saved(X), NPY, "inputs=1")))
    assert (p.status, p.detail) == (422, "inputs cannot be a query parameter: send arrays in the body (.npy, .npz or JSON)")
    buf = io.BytesIO()
    np.savez(buf, inputs=X, n=np.int64(3))
    q = problem(lambda: parse(binary_request(buf.getvalue(), NPZ, "n=3")))
    assert (q.status, q.detail) == (422, "n is given twice: in the .npz body and as a query parameter")
    assert q.errors == [{"loc": ["query", "n"], "msg": "also in the body"}]
