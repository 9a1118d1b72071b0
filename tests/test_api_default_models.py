"""The committed default models (``models/``: moons, digits, digits-cond) served the way ``make run`` does."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

from service.http.schemas import DIGIT_ZERO
from tests.server import ROOT, ServerProcess


DEFAULTS = ("digits", "digits-cond", "moons")


@pytest.fixture(scope="module")
def defaults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # `make run` is `flowserve serve --model-dir models --host ... --port ...`
    proc = ServerProcess(ROOT / "models", tmp_path_factory.mktemp("defaults") / "server.log").wait_ready()
    try:
        yield proc
    finally:
        proc.terminate()


def _model_of(example: str) -> str:
    return "digits-cond" if example.startswith("digits-cond") else "digits" if example.startswith("digits") else "moons"


def test_default_models_are_served(defaults: ServerProcess) -> None:
    with defaults.client() as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert set(DEFAULTS) <= set(models)
        assert all(models[n]["ready"] for n in DEFAULTS)
        assert (models["moons"]["features"], models["moons"]["context_features"]) == (2, 0)
        assert (models["digits"]["features"], models["digits"]["context_features"]) == (64, 0)
        assert (models["digits-cond"]["features"], models["digits-cond"]["context_features"]) == (64, 10)
        for name in DEFAULTS:
            card = c.get(f"/v1/models/{name}").json()
            assert card["calibration"]["size"] > 0 and card["exactness"] and card["training"]
            assert len(card["feature_names"]) == card["features"]


def test_every_docs_example_works_on_the_default_models(defaults: ServerProcess) -> None:
    with defaults.client() as c:
        doc = c.get("/openapi.json").json()
        ran = 0
        for op in ("log_prob", "inverse", "forward", "sample", "score"):
            examples = doc["paths"][f"/v1/models/{{name}}/{op}"]["post"]["requestBody"]["content"]["application/json"]
            for name, example in examples["examples"].items():
                r = c.post(f"/v1/models/{_model_of(name)}/{op}", json=example["value"])
                assert r.status_code == 200, (op, name, r.text)
                assert r.json()["model"] == _model_of(name)
                ran += 1
        assert ran >= 15


def test_default_models_make_sense(defaults: ServerProcess) -> None:
    with defaults.client() as c:
        score = c.post("/v1/models/moons/score", json={"inputs": [[0.0, 1.0], [1.0, -0.5], [3.0, 3.0]]}).json()
        assert score["is_anomaly"] == [False, False, True]
        # pixels at their dequantization cells' centres k + 0.5 (an integer 0 lies on the bound 0: density zero)
        inv = c.post("/v1/models/digits/inverse", json={"inputs": [[0.5] * 64, [k + 0.5 for k in range(0, 16)] * 4]}).json()
        np.testing.assert_allclose(inv["log_prob"], np.add(inv["base_log_prob"], inv["log_det"]), rtol=1e-5, atol=1e-4)
        on_bound = c.post("/v1/models/digits/log_prob", json={"inputs": [[0] * 64]}).json()
        assert on_bound["log_prob"] == [None]
        seven = [0] * 10
        seven[7] = 1
        sample = c.post("/v1/models/digits-cond/sample", json={"n": 3, "seed": 0, "context": seven,
                                                              "return_log_prob": True}).json()
        assert np.array(sample["samples"]).shape == (3, 64) and len(sample["log_prob"]) == 3
        # the first image of load_digits (a zero) is likelier under its own label than under any other
        labels = np.eye(10).tolist()
        lp = c.post("/v1/models/digits-cond/log_prob",
                    json={"inputs": [DIGIT_ZERO] * 10, "context": labels}).json()["log_prob"]
        assert all(v is not None for v in lp) and int(np.argmax(lp)) == 0
