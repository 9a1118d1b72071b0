"""Zip bombs in ``.npz`` bodies: 413 naming the member and the limit, with the server's memory bounded.

The archives are real zip files written here byte by byte (local headers, a deflate stream, the
central directory), so that the directory can say what a client chooses: the true inflated size
(1.1 GiB: refused as it passes the limit) or a lie (1 KiB, for the same 1.1 GiB stream: before the
fix, Python's ``zipfile`` inflated it whole in one step, ~2.9 GB of RSS). The server runs with an
8 MiB body limit; its peak resident memory (``VmHWM`` of ``/proc/<pid>/status``) may not grow by
more than a generous 256 MiB, far below the 1.1 GiB a bomb inflates to.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from service.http.codecs.binary import read_npz
from service.http.problems import Problem
from tests.server import ServerProcess, start_server


NPZ = "application/x-npz"
LIMIT = 8 << 20
BOMB_BYTES = (1 << 30) + (100 << 20)  #: what the bomb member inflates to: 1.1 GiB of zeros
MAX_PEAK_GROWTH_MIB = 256


def _status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def _deflate_zeros(n: int) -> tuple[bytes, int]:
    """A raw deflate stream of ``n`` zero bytes (after an ``.npy`` header) and its CRC-32."""
    header = b"\x93NUMPY\x01\x00" + b"{'descr': '<f8', 'fortran_order': False, 'shape': (%d, 2), }" % (n // 16)
    header = header.ljust(127) + b"\n"
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out, crc = [comp.compress(header)], zlib.crc32(header)
    block = bytes(1 << 24)
    left = n - len(header)
    while left > 0:
        piece = block[:min(left, len(block))]
        out.append(comp.compress(piece))
        crc = zlib.crc32(piece, crc)
        left -= len(piece)
    out.append(comp.flush())
    return b"".join(out), crc


def zip_archive(members: list[tuple[str, bytes, int, int, int]]) -> bytes:
    """A zip of ``(name, data, declared inflated size, crc, method)`` members, directory as declared."""
    body, central = io.BytesIO(), io.BytesIO()
    for name, data, size, crc, method in members:
        raw = name.encode()
        offset = body.tell()
        body.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, 0, method, 0, 0, crc, len(data), size, len(raw), 0))
        body.write(raw + data)
        central.write(struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, 0, method, 0, 0, crc, len(data), size,
                                  len(raw), 0, 0, 0, 0, 0, offset) + raw)
    start, directory = body.tell(), central.getvalue()
    body.write(directory)
    body.write(struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), start, 0))
    return body.getvalue()


@pytest.fixture(scope="module")
def bomb_stream() -> tuple[bytes, int]:
    return _deflate_zeros(BOMB_BYTES)


@pytest.fixture(scope="module")
def small_limit_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(model_repo, tmp_path_factory.mktemp("limits"), max_body_bytes=LIMIT, models="moons") as proc:
        yield proc


def test_stored_and_deflated_members_read_as_np_savez_writes_them() -> None:
    x = np.arange(12.0).reshape(6, 2)
    for save in (np.savez, np.savez_compressed):
        buf = io.BytesIO()
        save(buf, inputs=x, context=x[:, :1])
        arrays = read_npz(buf.getvalue(), 1 << 20)
        np.testing.assert_array_equal(arrays["inputs"], x)
        np.testing.assert_array_equal(arrays["context"], x[:, :1])
        assert not arrays["inputs"].flags.writeable


@pytest.mark.parametrize("declared", ["true", "lying"])
def test_a_bomb_is_refused_in_bounded_memory_in_process(bomb_stream: tuple[bytes, int], declared: str) -> None:
    data, crc = bomb_stream
    size = BOMB_BYTES if declared == "true" else 1024
    body = zip_archive([("inputs.npy", data, size, crc, zipfile_deflated())])
    with pytest.raises(Problem) as info:
        read_npz(body, LIMIT)
    assert info.value.status == 413
    assert "'inputs.npy'" in info.value.detail and str(LIMIT) in info.value.detail


def test_a_directory_that_lies_about_a_small_member_is_a_400() -> None:
    x = np.arange(6.0).reshape(3, 2)
    buf = io.BytesIO()
    np.save(buf, x)
    raw = buf.getvalue()
    comp = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = comp.compress(raw) + comp.flush()
    body = zip_archive([("inputs.npy", data, len(raw) - 8, zlib.crc32(raw), zipfile_deflated())])
    with pytest.raises(Problem) as info:
        read_npz(body, LIMIT)
    assert info.value.status == 400 and f"holds {len(raw)}" in info.value.detail


def zipfile_deflated() -> int:
    import zipfile

    return zipfile.ZIP_DEFLATED


@pytest.mark.parametrize("declared", ["true", "lying"])
def test_a_bomb_gets_413_with_bounded_server_memory_and_healthz_answers(
        small_limit_server: ServerProcess, bomb_stream: tuple[bytes, int], declared: str) -> None:
    data, crc = bomb_stream
    size = BOMB_BYTES if declared == "true" else 1024
    body = zip_archive([("inputs.npy", data, size, crc, zipfile_deflated())])
    assert len(body) < 2 << 20  # a ~1 MiB body
    pid = small_limit_server.proc.pid
    peak_before = _status_kib(pid, "VmHWM") / 1024
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        with small_limit_server.client() as c:
            answer["r"] = c.post("/v1/models/moons/log_prob", content=body, headers={"content-type": NPZ})

    sender = threading.Thread(target=send)
    sender.start()
    health = []
    with small_limit_server.client(timeout=30.0) as c:
        while sender.is_alive() or not health:
            t = time.monotonic()
            status = c.get("/healthz").status_code
            health.append((status, time.monotonic() - t))
            time.sleep(0.01)
    sender.join()
    r = answer["r"]
    assert r.status_code == 413, r.text
    assert r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert "'inputs.npy'" in problem["detail"] and str(LIMIT) in problem["detail"]
    assert problem["errors"][0]["loc"] == ["body", "inputs"]
    assert all(status == 200 for status, _ in health)
    peak_after = _status_kib(pid, "VmHWM") / 1024
    assert peak_after - peak_before < MAX_PEAK_GROWTH_MIB, (peak_before, peak_after)
    with small_limit_server.client() as c:  # and it still serves
        assert c.post("/v1/models/moons/log_prob", json={"inputs": [[0.5, 0.25]]}).status_code == 200
