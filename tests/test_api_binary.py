"""Binary bodies and answers over real HTTP: ``.npy`` / ``.npz`` in, ``.npy`` / ``.npz`` out.

Every operation answers the same numbers whatever the formats (compared with its JSON answer),
for float32 and float64 requests; ``Accept`` is negotiated; every way a binary request can be
wrong gets the same problem+json errors as JSON; the Python client's binary path is used.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
from flowserve_client import Client

from tests.server import ServerProcess, start_server


NPY = "application/x-npy"
NPZ = "application/x-npz"
JSON = "application/json"
PROBLEM = "application/problem+json"
M = "/v1/models/moons"
C = "/v1/models/cond"

# values exact in float32, so float32 and float64 requests describe the same rows
X = np.array([[0.5, 0.25], [1.0, -0.5], [-0.75, 0.625], [0.0, 0.375], [4.0, 4.0]])
CTX = np.eye(3)[[0, 1, 2, 0, 1]]


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)  # allow_pickle only so that the refusal of object arrays can be tested
    return buf.getvalue()


def npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def load_npy(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == NPY
    return np.load(io.BytesIO(r.content), allow_pickle=False)


def load_npz(r: httpx.Response) -> dict[str, np.ndarray]:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == NPZ
    with np.load(io.BytesIO(r.content), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def post_npy(client: httpx.Client, path: str, array: np.ndarray, accept: str = NPY, **params: Any) -> httpx.Response:
    return client.post(path, content=npy(array), params=params, headers={"content-type": NPY, "accept": accept})


def post_npz(client: httpx.Client, path: str, arrays: dict[str, np.ndarray], accept: str = NPZ,
             **params: Any) -> httpx.Response:
    return client.post(path, content=npz(**arrays), params=params, headers={"content-type": NPZ, "accept": accept})


def same(binary: np.ndarray, from_json: Any) -> None:
    """A binary answer holds the numbers of the JSON answer to the same request, in the model's dtype
    (where JSON has ``null``, the binary answer has the non-finite value itself)."""
    values = np.array(from_json, dtype=object)
    missing = np.equal(values, None)
    expected = np.where(missing, np.nan, values).astype(np.float64).astype(binary.dtype)
    assert binary.shape == expected.shape
    assert not np.isfinite(binary[missing]).any()
    np.testing.assert_array_equal(binary[~missing], expected[~missing])


MAIN = {"log_prob": ("inputs", "log_prob", {}), "inverse": ("inputs", "latents", {}),
        "forward": ("latents", "outputs", {}), "score": ("inputs", "log_prob", {"alpha": 0.05})}


# -- every operation, both directions --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", list(MAIN))
def test_npy_in_npy_and_npz_out_equal_json(client: httpx.Client, op: str, dtype: type) -> None:
    field, main, params = MAIN[op]
    expected = client.post(f"{M}/{op}", json={field: X.tolist(), **params}).json()

    answer = load_npy(post_npy(client, f"{M}/{op}", X.astype(dtype), **params))
    assert answer.dtype == np.float32  # the model's dtype, whatever the request's
    same(answer, expected[main])

    r = post_npy(client, f"{M}/{op}", X.astype(dtype), accept=NPZ, **params)
    assert r.headers["flowserve-model"] == "moons" and r.headers["flowserve-model-version"] == "2"
    assert r.headers["vary"] == "Accept"
    everything = load_npz(r)
    assert everything["model"].shape == () and everything["model"].item() == "moons"
    assert everything["version"].dtype == np.int64 and everything["version"].item() == 2
    if op == "score":
        assert set(everything) == {"model", "version", "log_prob", "score", "p_value", "is_anomaly",
                                   "threshold.alpha", "threshold.log_prob"}
        assert everything["is_anomaly"].dtype == np.bool_
        np.testing.assert_array_equal(everything["is_anomaly"], expected["is_anomaly"])
        assert everything["threshold.alpha"].shape == () and everything["threshold.alpha"].item() == 0.05
        assert everything["threshold.log_prob"].item() == pytest.approx(expected["threshold"]["log_prob"], rel=1e-12)
        np.testing.assert_array_equal(everything["p_value"], expected["p_value"])
        for key in ("log_prob", "score"):
            same(everything[key], expected[key])
    else:
        assert set(everything) == set(expected)
        for key, value in expected.items():
            if key not in ("model", "version"):
                same(everything[key], value)


def test_inverse_answer_is_consistent(client: httpx.Client) -> None:
    out = load_npz(post_npy(client, f"{M}/inverse", X, accept=NPZ))
    np.testing.assert_allclose(out["log_prob"], out["base_log_prob"] + out["log_det"], rtol=1e-5, atol=1e-5)
    back = load_npy(post_npy(client, f"{M}/forward", out["latents"]))
    np.testing.assert_allclose(back, X, atol=1e-4)


def test_versioned_paths(client: httpx.Client) -> None:
    r = post_npy(client, f"{M}/versions/1/log_prob", X)
    assert r.headers["flowserve-model-version"] == "1"
    same(load_npy(r), client.post(f"{M}/versions/1/log_prob", json={"inputs": X.tolist()}).json()["log_prob"])


def test_json_bodies_with_binary_answers_and_binary_bodies_with_json_answers(client: httpx.Client) -> None:
    expected = client.post(f"{M}/inverse", json={"inputs": X.tolist()}).json()
    r = client.post(f"{M}/inverse", json={"inputs": X.tolist()}, headers={"accept": NPY})
    same(load_npy(r), expected["latents"])
    r = post_npy(client, f"{M}/inverse", X, accept=JSON)
    assert r.headers["content-type"] == JSON and r.json() == expected


def test_other_real_dtypes_are_converted(client: httpx.Client) -> None:
    rows = np.array([[0, 1], [1, 0], [2, 3]])
    expected = load_npy(post_npy(client, f"{M}/log_prob", rows.astype(np.float64)))
    for dtype in (np.int64, np.int8, np.uint16, np.float16, ">f8", np.bool_):
        array = rows.astype(dtype)
        reference = expected if dtype is not np.bool_ else load_npy(post_npy(client, f"{M}/log_prob",
                                                                             array.astype(np.float64)))
        np.testing.assert_array_equal(load_npy(post_npy(client, f"{M}/log_prob", array)), reference, str(dtype))
    got = load_npy(post_npy(client, f"{M}/log_prob", np.asfortranarray(X)))  # column-major data
    same(got, client.post(f"{M}/log_prob", json={"inputs": X.tolist()}).json()["log_prob"])


def test_non_finite_answers_stay_non_finite(client: httpx.Client) -> None:
    rows = np.array([[1e308, -1e308], [0.5, 0.25]])
    from_json = client.post(f"{M}/log_prob", json={"inputs": rows.tolist()}).json()["log_prob"]
    binary = load_npy(post_npy(client, f"{M}/log_prob", rows))
    assert list(np.isfinite(binary)) == [v is not None for v in from_json]


# -- conditional models: .npz bodies -----------------------------------------------------------------------
@pytest.mark.parametrize("op", list(MAIN))
def test_npz_bodies_with_context(client: httpx.Client, op: str) -> None:
    field, main, params = MAIN[op]
    expected = client.post(f"{C}/{op}", json={field: X.tolist(), "context": CTX.tolist(), **params}).json()
    out = load_npz(post_npz(client, f"{C}/{op}", {field: X.astype(np.float32), "context": CTX.astype(np.int8)},
                            **params))
    same(out[main], expected[main])
    assert out["model"].item() == "cond"
    compressed = client.post(f"{C}/{op}", content=npz(True, **{field: X, "context": CTX}), params=params,
                             headers={"content-type": NPZ, "accept": NPY})
    same(load_npy(compressed), expected[main])


def test_npz_bodies_for_unconditional_models(client: httpx.Client) -> None:
    same(load_npy(post_npz(client, f"{M}/log_prob", {"inputs": X}, accept=NPY)),
         client.post(f"{M}/log_prob", json={"inputs": X.tolist()}).json()["log_prob"])


# -- sample: query parameters --------------------------------------------------------------------------------
def test_sample_from_query_parameters(client: httpx.Client) -> None:
    expected = client.post(f"{M}/sample", json={"n": 40, "seed": 3, "temperature": 0.75, "return_log_prob": True,
                                                "return_latents": True}).json()
    query = {"n": 40, "seed": 3, "temperature": 0.75, "return_log_prob": "true", "return_latents": "true"}
    out = load_npz(client.post(f"{M}/sample", params=query, headers={"accept": NPZ}))  # empty body, no type
    assert set(out) == {"model", "version", "samples", "seed", "log_prob", "latents"}
    assert out["seed"].dtype == np.uint64 and out["seed"].item() == 3
    for key in ("samples", "log_prob", "latents"):
        same(out[key], expected[key])
    r = client.post(f"{M}/sample", params=query, content=b"", headers={"content-type": NPY, "accept": NPY})
    same(load_npy(r), expected["samples"])
    assert r.headers["flowserve-seed"] == "3"
    # JSON answers to a query-only request, and a seed drawn by the server, returned in a header
    assert client.post(f"{M}/sample", params=query).json() == expected
    r = client.post(f"{M}/sample", params={"n": 5}, headers={"accept": NPY})
    seed = int(r.headers["flowserve-seed"])
    same(load_npy(r), client.post(f"{M}/sample", json={"n": 5, "seed": seed}).json()["samples"])


def test_sample_with_npz_context(client: httpx.Client) -> None:
    expected = client.post(f"{C}/sample", json={"n": 6, "seed": 2, "context": [0, 1, 0]}).json()["samples"]
    for context in (np.array([0.0, 1.0, 0.0]), np.array([[0, 1, 0]]), np.repeat([[0, 1, 0]], 6, axis=0)):
        r = post_npz(client, f"{C}/sample", {"context": context}, accept=NPY, n=6, seed=2)
        same(load_npy(r), expected)


# -- Accept negotiation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("accept, media", [
    (None, JSON), ("*/*", JSON), ("application/*", JSON), ("application/json", JSON),
    ("application/x-npy", NPY), ("application/x-npz", NPZ), ("application/x-npz, application/json;q=0.5", NPZ),
    ("application/json;q=0.1, application/x-npy;q=0.9", NPY), ("application/x-npy;q=0, */*;q=0.1", JSON),
    ("text/html, */*;q=0.1", JSON), ("application/x-npy, application/x-npz", NPY),
    ("application/x-npz, */*", NPZ), ("application/*;q=0.2, application/x-npz;q=0.3", NPZ),
    ("APPLICATION/X-NPY", NPY), ("nonsense", JSON),
])
def test_accept_negotiation(client: httpx.Client, accept: str | None, media: str) -> None:
    headers = {"content-type": NPY} | ({"accept": accept} if accept is not None else {})
    r = client.post(f"{M}/log_prob", content=npy(X), headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == media


@pytest.mark.parametrize("accept", ["text/html", "image/*", "application/x-npy;q=0, application/x-npz;q=0, "
                                    "application/json;q=0", "application/problem+json"])
def test_nothing_acceptable_is_406(client: httpx.Client, accept: str) -> None:
    for path, body in ((f"{M}/log_prob", npy(X)), (f"{M}/sample?n=2", b""), (f"{M}/score", b"not even an npy")):
        r = client.post(path, content=body, headers={"content-type": NPY, "accept": accept})
        assert r.status_code == 406 and r.headers["content-type"] == PROBLEM, r.text
        problem = r.json()
        assert problem["type"].endswith("not-acceptable") and "application/x-npz" in problem["detail"]
        assert problem["errors"][0]["loc"] == ["header", "accept"]


# -- every binary error ------------------------------------------------------------------------------------
def _header_only(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip(**members: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buf.getvalue()


NAN_ROWS = X.copy()
NAN_ROWS[1, 0] = np.nan
INF_ROWS = X.copy()
INF_ROWS[3, 1] = -np.inf
NAN_CTX = CTX.copy()
NAN_CTX[0, 1] = np.nan

# (name, path, content type, body, status, text, loc of the first error or None)
ERRORS: list[tuple[str, str, str, bytes, int, str, list | None]] = [
    ("not an npy", f"{M}/log_prob", NPY, b"certainly not", 400, "not a valid .npy file", ["body"]),
    ("empty header", f"{M}/log_prob", NPY, b"\x93NUMPY\x01\x00", 400, "not a valid .npy file", ["body"]),
    ("truncated data", f"{M}/inverse", NPY, npy(X)[:-8], 400, "72 bytes follow the header", ["body"]),
    ("trailing bytes", f"{M}/inverse", NPY, npy(X) + b"\0" * 8, 400, "88 bytes follow the header", ["body"]),
    ("huge declared shape", f"{M}/log_prob", NPY, _header_only((10 ** 12, 2)) + b"\0" * 16, 400,
     "declares shape (1000000000000, 2)", ["body"]),
    ("object array", f"{M}/log_prob", NPY, npy(np.array([[1, "a"]], dtype=object)), 400, "pickles are never read",
     ["body"]),
    ("complex", f"{M}/score", NPY, npy(X.astype(np.complex128)), 400, "complex numbers", ["body"]),
    ("structured", f"{M}/log_prob", NPY, npy(np.zeros(3, dtype=[("x0", "f8"), ("x1", "f8")])), 400,
     "structured", ["body"]),
    ("text", f"{M}/log_prob", NPY, npy(np.array([["1", "2"]])), 400, "text", ["body"]),
    ("dates", f"{M}/log_prob", NPY, npy(np.array([["2024-01-01", "2024-01-02"]], dtype="M8[D]")), 400, "dates",
     ["body"]),
    ("1-D", f"{M}/log_prob", NPY, npy(X[0]), 400, "must be 2-D", ["body", "inputs"]),
    ("3-D", f"{M}/forward", NPY, npy(X[None]), 400, "must be 2-D", ["body", "latents"]),
    ("too many features", f"{M}/log_prob", NPY, npy(np.zeros((4, 3))), 400, "3 values; the model has 2 features",
     ["body", "inputs"]),
    ("NaN", f"{M}/log_prob", NPY, npy(NAN_ROWS), 400, "nan is not finite", ["body", "inputs", 1, 0]),
    ("infinity", f"{M}/score", NPY, npy(INF_ROWS.astype(np.float32)), 400, "-inf is not finite",
     ["body", "inputs", 3, 1]),
    ("no rows", f"{M}/log_prob", NPY, npy(np.zeros((0, 2))), 422, "at least one row", ["body", "inputs"]),
    ("empty body", f"{M}/log_prob", NPY, b"", 422, "inputs is required", ["body", "inputs"]),
    ("npy to a conditional model", f"{C}/log_prob", NPY, npy(X), 400, "send an .npz body", ["body", "context"]),
    ("sample with an npy", f"{M}/sample?n=2", NPY, npy(X), 415, "sample takes no .npy array", None),
    ("npz context refused", f"{M}/log_prob", NPZ, npz(inputs=X, context=CTX), 400, "takes no context",
     ["body", "context"]),
    ("npz without inputs", f"{C}/log_prob", NPZ, npz(context=CTX), 422, "inputs is required", ["body", "inputs"]),
    ("npz unknown member", f"{M}/log_prob", NPZ, npz(inputs=X, inptus=X), 422, "unknown field",
     ["body", "inptus"]),
    ("npz inputs to forward", f"{M}/forward", NPZ, npz(inputs=X), 422, "unknown field", ["body", "inputs"]),
    ("npz context width", f"{C}/inverse", NPZ, npz(inputs=X, context=CTX[:, :2]), 400,
     "2 values; the model has 3 context features", ["body", "context"]),
    ("npz context rows", f"{C}/forward", NPZ, npz(latents=X, context=CTX[:2]), 400, "context has 2 rows; expected 5",
     ["body", "context"]),
    ("npz context NaN", f"{C}/score", NPZ, npz(inputs=X, context=NAN_CTX), 400, "nan is not finite",
     ["body", "context", 0, 1]),
    ("npz object member", f"{C}/log_prob", NPZ, _zip(**{"inputs.npy": npy(X), "context.npy": npy(CTX.astype(object))}),
     400, "pickles are never read", ["body", "context"]),
    ("npz truncated member", f"{C}/log_prob", NPZ, _zip(**{"inputs.npy": npy(X)[:-1], "context.npy": npy(CTX)}),
     400, "inputs (.npz member 'inputs.npy') is not a valid .npy file", ["body", "inputs"]),
    ("not a zip", f"{M}/log_prob", NPZ, npy(X), 400, "not a valid .npz archive", ["body"]),
    ("zip of other files", f"{M}/log_prob", NPZ, _zip(**{"inputs.csv": b"1,2"}), 400, "is not a .npy file",
     ["body", "inputs.csv"]),
    ("unknown query parameter", f"{M}/score?alhpa=0.1", NPY, npy(X), 422, "unknown field", ["query", "alhpa"]),
    ("alpha out of range", f"{M}/score?alpha=2", NPY, npy(X), 422, "less than 1", ["query", "alpha"]),
    ("alpha not a number", f"{M}/score?alpha=low", NPY, npy(X), 422, "valid number", ["query", "alpha"]),
    ("alpha NaN", f"{M}/score?alpha=nan", NPY, npy(X), 422, "finite number", ["query", "alpha"]),
    ("parameter twice", f"{M}/score?alpha=0.1&alpha=0.2", NPY, npy(X), 422, "more than once", ["query", "alpha"]),
    ("array in the query", f"{C}/log_prob?context=1", NPY, npy(X), 422, "cannot be a query parameter",
     ["query", "context"]),
    ("field twice", f"{M}/score?alpha=0.1", NPZ, npz(inputs=X, alpha=np.array(0.2)), 422, "given twice",
     ["query", "alpha"]),
    ("n missing", f"{M}/sample", NPY, b"", 422, "Field required", ["query", "n"]),
    ("n < 1", f"{M}/sample?n=0", NPY, b"", 422, "greater than or equal to 1", ["query", "n"]),
    ("n fractional", f"{M}/sample?n=2.5", JSON, b"", 422, "valid integer", ["query", "n"]),
    ("temperature infinite", f"{M}/sample?n=2&temperature=inf", NPY, b"", 422, "finite number",
     ["query", "temperature"]),
    ("temperature 0", f"{M}/sample?n=2&temperature=0", NPY, b"", 422, "greater than 0", ["query", "temperature"]),
    ("flag not a boolean", f"{M}/sample?n=2&return_log_prob=maybe", NPY, b"", 422, "valid boolean",
     ["query", "return_log_prob"]),
    ("seed negative", f"{M}/sample?n=2&seed=-1", NPY, b"", 422, "greater than or equal to 0", ["query", "seed"]),
    ("JSON with query parameters", f"{M}/sample?seed=1", JSON, b'{"n": 2}', 422, "beside a JSON body",
     ["query", "seed"]),
    ("unknown model", "/v1/models/nope/log_prob", NPY, npy(X), 404, "no model named 'nope'", ["path", "name"]),
    ("other content type", f"{M}/log_prob", "application/octet-stream", npy(X), 415, "application/x-npy", None),
]


@pytest.mark.parametrize("name, path, media, body, status, text, loc", ERRORS, ids=[e[0] for e in ERRORS])
def test_binary_errors(client: httpx.Client, name: str, path: str, media: str, body: bytes, status: int, text: str,
                       loc: list | None) -> None:
    r = client.post(path, content=body, headers={"content-type": media, "accept": NPY})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    problem = r.json()
    assert problem["status"] == status and problem["type"].startswith("urn:flowserve:problem:")
    messages = problem["detail"] + " " + " ".join(e["msg"] for e in problem.get("errors", []))
    assert text in messages, messages
    if loc is not None:
        assert problem["errors"][0]["loc"] == loc


# -- limits -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def limited(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(model_repo, tmp_path_factory.mktemp("binary-limited"), max_body_bytes=4096, max_rows=100,
                        max_samples=100, max_queue_rows=1000, models="moons") as proc:
        yield proc


def test_binary_limits(limited: ServerProcess) -> None:
    with limited.client() as c:
        r = post_npy(c, f"{M}/log_prob", np.zeros((101, 2), dtype=np.float32))
        assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
        assert "at most 100 per request" in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["body", "inputs"]
        assert post_npy(c, f"{M}/log_prob", np.zeros((100, 2), dtype=np.float32)).status_code == 200
        r = post_npy(c, f"{M}/log_prob", np.zeros((300, 2)))  # 4928 bytes
        assert r.status_code == 413 and "at most 4096 bytes" in r.json()["detail"]
        bomb = npz(True, inputs=np.zeros((1000, 2)))  # ~16 kB of zeros in a few hundred bytes
        assert len(bomb) < 4096
        r = c.post(f"{M}/log_prob", content=bomb, headers={"content-type": NPZ})
        assert r.status_code == 413 and "expands to" in r.json()["detail"]
        r = c.post(f"{M}/sample", params={"n": 101}, headers={"accept": NPY})
        assert r.status_code == 413 and r.json()["errors"][0]["loc"] == ["query", "n"]
        assert load_npy(c.post(f"{M}/sample", params={"n": 100}, headers={"accept": NPY})).shape == (100, 2)


# -- the Python client's binary path ------------------------------------------------------------------------
class Recording(httpx.HTTPTransport):
    """A real HTTP transport that remembers the content types it sent and received."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((request.headers.get("content-type", ""), response.headers.get("content-type", "")))
        return response


def test_client_uses_binary_bodies_and_answers(server: ServerProcess) -> None:
    rng = np.random.default_rng(1)
    x, ctx = rng.normal(size=(300, 2)), np.eye(3)[rng.integers(0, 3, 300)]
    transport = Recording()
    with Client(server.url) as plain, Client(server.url, binary_threshold=100, transport=transport) as fast:
        np.testing.assert_allclose(fast.log_prob("moons", x), plain.log_prob("moons", x), rtol=1e-6)
        np.testing.assert_allclose(fast.log_prob("cond", x, context=ctx), plain.log_prob("cond", x, context=ctx),
                                   rtol=1e-6)
        a, b = fast.inverse("cond", x, context=ctx), plain.inverse("cond", x, context=ctx)
        np.testing.assert_allclose(a["latents"], b["latents"], rtol=1e-6)
        assert a["model"] == "cond" and a["version"] == 1
        a, b = fast.score("moons", x, alpha=0.05), plain.score("moons", x, alpha=0.05)
        np.testing.assert_array_equal(a["p_value"], b["p_value"])
        np.testing.assert_array_equal(a["is_anomaly"], b["is_anomaly"])
        assert a["threshold"]["alpha"] == 0.05
        assert a["threshold"]["log_prob"] == pytest.approx(b["threshold"]["log_prob"])
        np.testing.assert_allclose(fast.forward("cond", x, context=ctx)["outputs"],
                                   plain.forward("cond", x, context=ctx)["outputs"], rtol=1e-6)
        s = fast.sample("moons", 500, seed=4, return_log_prob=True)
        np.testing.assert_allclose(s["samples"], plain.sample("moons", 500, seed=4), rtol=1e-6)  # float32 exactly
        assert s["seed"] == 4
        assert fast.binary_threshold == 100  # never fell back to JSON
    assert transport.seen[:5] == [(NPY, NPZ), (NPZ, NPZ), (NPZ, NPZ), (NPY, NPZ), (NPZ, NPZ)]
    assert transport.seen[5] == (JSON, NPZ)  # sample: a JSON body, an .npz answer
