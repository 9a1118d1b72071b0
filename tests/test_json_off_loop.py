"""Big JSON bodies are parsed off the event loop, in pieces, over a real server.

The mechanism, not a speed: while a ~60 MB JSON body is parsed, ``/healthz`` keeps answering (one
``orjson.loads`` of it held the GIL, and so the loop, for seconds: 3.5 s on the 2-core test machine,
so the generous 1 s bound below fails on the old code); a body over the piece threshold gives the
same log_prob as a ``.npy`` body of the same rows, as rows or records; and its errors are the ones
the row checks give for orjson's value of it. The same for ``/v2`` inference bodies: ``/healthz``
answers while one parses, and a big one (``data`` as rows or flat, plain or gzip) gives the answer of
the same rows sent as binary tensor data (whose small JSON part is parsed in one call).
"""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import orjson
import pytest

from service.http.codecs.bodies import OFF_LOOP_BYTES
from service.http.codecs.rows import rows_array
from service.http.problems import domain_problem
from service.serving.errors import InvalidInput
from tests.tolerance import assert_batch_invariant

LOG_PROB = "/v1/models/moons/log_prob"
NAMES = ["x0", "x1"]


def npy(rows: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def post_while_probing(url: str, path: str, body: bytes) -> tuple[httpx.Response, list[float]]:
    """POST ``body`` while another thread asks ``/healthz`` every 20 ms; the answer, and the latencies
    of the probes that overlapped the POST."""
    probes: list[tuple[float, float]] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=60.0) as c:
            while not stop.is_set():
                sent = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                probes.append((sent, time.perf_counter() - sent))
                time.sleep(0.02)

    thread = threading.Thread(target=probe)
    thread.start()
    try:
        time.sleep(0.3)
        start = time.perf_counter()
        with httpx.Client(base_url=url, timeout=300.0) as c:
            r = c.post(path, content=body, headers={"content-type": "application/json"})
        end = time.perf_counter()
    finally:
        stop.set()
        thread.join()
    return r, [lat for sent, lat in probes if sent + lat > start and sent < end]


def test_healthz_answers_while_a_big_json_body_is_parsed(server) -> None:
    rows = np.random.default_rng(0).standard_normal((1_000_000, 3))  # 3 values: 400 after the whole parse
    body = orjson.dumps({"inputs": rows}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert len(body) > 50_000_000
    r, during = post_while_probing(server.url, LOG_PROB, body)
    assert r.status_code == 400 and "each row has 3 values" in r.json()["detail"]
    assert len(during) >= 3, f"{len(during)} probes during the POST"
    assert max(during) < 1.0, f"/healthz waited {max(during):.2f} s during the parse"


@pytest.mark.parametrize("shape", ["rows", "records"])
def test_a_body_parsed_in_pieces_gives_the_npy_bodys_answer(client: httpx.Client, shape: str) -> None:
    rows = np.random.default_rng(1).standard_normal((60_000, 2))
    inputs = rows if shape == "rows" else [{"x0": a, "x1": b} for a, b in rows.tolist()]
    body = orjson.dumps({"inputs": inputs}, option=orjson.OPT_SERIALIZE_NUMPY)
    assert len(body) > 2 * OFF_LOOP_BYTES
    got = client.post(LOG_PROB, content=body, headers={"content-type": "application/json"})
    want = client.post(LOG_PROB, content=npy(rows), headers={"content-type": "application/x-npy"})
    assert got.status_code == want.status_code == 200, got.text
    assert_batch_invariant(np.asarray(got.json()["log_prob"]), np.asarray(want.json()["log_prob"]))


def expected_problem(body: bytes) -> tuple[int, str]:
    """What the row checks say of orjson's value of ``body`` (how a body was parsed before pieces)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        return 400, f"the body is not valid JSON: {e}"
    with pytest.raises(InvalidInput) as raised:
        rows_array(value["inputs"], NAMES, "inputs", max_rows=1_000_000)
    answer = domain_problem(raised.value, None)  # the answer the status table gives the row checks' error
    assert answer is not None
    return answer.status, answer.detail


def big_rows_text(n: int = 40_000) -> list[bytes]:
    return [b"[%r, %r]" % (float(a), float(b)) for a, b in np.random.default_rng(2).standard_normal((n, 2))]


#: one faulty row put among the big body's rows, by the fault's name
FAULTY_ROW = {
    "null": b"[null, 1.0]",
    "string": b'[1.0, "2"]',
    "ragged": b"[1.0, 2.0, 3.0]",
    "NaN": b"[NaN, 1.0]",
    "1e400": b"[1e400, 1.0]",
    "missing comma": b"[1.0, 2.0] [3.0, 4.0]",
}


@pytest.mark.parametrize("fault", [*FAULTY_ROW, "wide", "trailing comma"])
def test_errors_of_big_bodies_are_those_of_small_ones(client: httpx.Client, fault: str) -> None:
    parts = big_rows_text()
    if fault in FAULTY_ROW:
        parts[31_337] = FAULTY_ROW[fault]
    elif fault == "wide":
        parts = [p[:-1] + b", 0.5]" for p in parts]
    body = b'{"inputs": [' + b", ".join(parts) + (b",]}" if fault == "trailing comma" else b"]}")
    assert len(body) > OFF_LOOP_BYTES
    status, detail = expected_problem(body)
    r = client.post(LOG_PROB, content=body, headers={"content-type": "application/json"})
    assert (r.status_code, r.json()["detail"]) == (status, detail)


# -- /v2: the same parse for inference bodies ----------------------------------------------------------
INFER = "/v2/models/moons/infer"


def infer_body(rows: np.ndarray, shape: str) -> bytes:
    data = rows if shape == "rows" else rows.ravel()
    return orjson.dumps({"inputs": [{"name": "x", "shape": list(rows.shape), "datatype": "FP64", "data": data}]},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def test_healthz_answers_while_a_big_v2_body_is_parsed(server) -> None:
    rows = np.random.default_rng(3).standard_normal((1_000_000, 3))  # 3 columns: 400 after the whole parse
    body = infer_body(rows, "rows")
    assert len(body) > 50_000_000
    r, during = post_while_probing(server.url, INFER, body)
    assert r.status_code == 400 and "unexpected shape for input 'x'" in r.json()["error"], r.text
    assert len(during) >= 3, f"{len(during)} probes during the POST"
    assert max(during) < 1.0, f"/healthz waited {max(during):.2f} s during the parse"


@pytest.mark.parametrize("shape", ["rows", "flat", "flat, gzip"])
def test_a_big_v2_body_gives_the_binary_bodys_answer(client: httpx.Client, shape: str) -> None:
    import gzip

    rows = np.random.default_rng(4).standard_normal((60_000, 2))
    body = infer_body(rows, shape.split(",")[0])
    assert len(body) > 2 * OFF_LOOP_BYTES
    headers = {"content-type": "application/json"}
    if "gzip" in shape:
        body, headers["content-encoding"] = gzip.compress(body), "gzip"
    got = client.post(INFER, content=body, headers=headers)
    head = orjson.dumps({"inputs": [{"name": "x", "shape": [60_000, 2], "datatype": "FP64",
                                     "parameters": {"binary_data_size": rows.nbytes}}]})
    want = client.post(INFER, content=head + rows.tobytes(),
                       headers={"content-type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))})
    assert got.status_code == want.status_code == 200, got.text
    (a,), (b,) = got.json()["outputs"], want.json()["outputs"]
    assert a["name"] == b["name"] == "log_prob" and a["shape"] == b["shape"] == [60_000]
    assert_batch_invariant(np.asarray(a["data"]), np.asarray(b["data"]))
