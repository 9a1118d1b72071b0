"""Bounded features: the logit preprocessing keeps samples inside the box, and the density stays exact.

A bounded feature lies in an open interval (a, b); the model maps it by y = log(x - a) - log(b - x)
with the Jacobian folded into log_det (service/model/density.py). These tests check the math
(log-det against float64 autograd through the logit, the integral over the box), the behaviour at
and outside the bounds (log_prob -inf, no latent, neighbours unaffected), the manifest (format 2,
old format-1 manifests unchanged), training (refusal of rows outside the bounds, ``--bounds``) and
the HTTP answer for rows outside (a real server: 200 with null, score flags them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch

from service.model.artifact import ArtifactError, load_artifact, read_manifest
from service.model.density import DensityModel
from service.model.flows import flow_spec
from service.training.data import DataError, Dataset, check_bounds, parse_bounds, unbound_rows
from service.training.exactness import integral, log_det_errors
from service.training.fit import TrainConfig
from service.training.run import train_and_save
from tests.server import ServerProcess, start_server

MODELS = Path(__file__).resolve().parents[1] / "models"
NAN = float("nan")


def _random_model(d: int, lower: list[float], upper: list[float], dtype: torch.dtype, seed: int = 0) -> DensityModel:
    """An NSF with random (not identity) weights, so the flow part is far from trivial."""
    torch.manual_seed(seed)
    model = DensityModel(flow_spec("nsf", d, 0, transforms=2, hidden_features=[16, 16], bins=6),
                         torch.linspace(-1.0, 1.0, d), torch.linspace(0.5, 2.0, d), dtype=dtype,
                         lower=torch.tensor(lower), upper=torch.tensor(upper))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval().requires_grad_(False)


def _bounded_rows(n: int, seed: int) -> np.ndarray:
    """Feature 0 in (0, 10), skewed towards 0 (10 * Beta(1.5, 4)); feature 1 unbounded, correlated."""
    rng = np.random.default_rng(seed)
    a = 10.0 * rng.beta(1.5, 4.0, size=n)
    return np.stack([a, 0.3 * a + rng.normal(size=n)], axis=1)


# -- the math --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_log_det_matches_float64_autograd_through_the_logit(dtype: torch.dtype) -> None:
    model = _random_model(3, [0.0, NAN, -2.0], [17.0, NAN, 3.0], dtype)
    rng = np.random.default_rng(1)
    x = np.stack([rng.uniform(1e-3, 17 - 1e-3, 16), rng.normal(size=16), rng.uniform(-1.999, 2.999, 16)], axis=1)
    errors = log_det_errors(model, torch.as_tensor(x, dtype=dtype))
    scale = max(1.0, errors["max_abs_log_det"])
    assert errors["float64_max_abs_error"] <= 1e-10 * scale, errors
    assert errors["max_abs_error"] <= (1e-10 if dtype == torch.float64 else 1e-4) * scale, errors
    # the logit's own Jacobian is part of it: the same flow without bounds has another log_det
    plain = DensityModel(model.flow_spec, model.shift, model.scale, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    y = torch.as_tensor(unbound_rows(x, np.array([0.0, NAN, -2.0]), np.array([17.0, NAN, 3.0])), dtype=dtype)
    with torch.no_grad():
        expected = plain.encode(y).log_det.double() + torch.as_tensor(
            np.log(17.0) - np.log(x[:, 0]) - np.log(17.0 - x[:, 0]) + np.log(5.0) - np.log(x[:, 2] + 2) - np.log(3 - x[:, 2]))
        got = model.encode(torch.as_tensor(x, dtype=dtype)).log_det.double()
    # y enters the flow rounded differently (numpy float64 logit, cast) in float32: the log-det tolerance
    rel = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=rel * max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("d,lower,upper", [(1, [2.0], [5.0]), (2, [0.0, -1.0], [1.0, 4.0]), (2, [0.0, NAN], [3.0, NAN])])
def test_a_bounded_model_integrates_to_one_over_its_box(d: int, lower: list[float], upper: list[float]) -> None:
    model = _random_model(d, lower, upper, torch.float64, seed=d)
    total = integral(model)
    assert abs(total - 1.0) < 0.01, total
    # and the grid the integral used lies inside the box, where the density lives
    u = torch.linspace(-7.0, 7.0, 11, dtype=torch.float64)[:, None].expand(11, d)
    grid = model.from_standardised(u)
    for j in range(d):
        if not math.isnan(lower[j]):
            assert bool(((grid[:, j] > lower[j]) & (grid[:, j] < upper[j])).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samples_stay_strictly_inside_even_at_high_temperature(dtype: torch.dtype) -> None:
    model = _random_model(2, [0.0, 16.0], [17.0, 17.0], dtype)
    for temperature in (1.0, 4.0, 30.0):
        s = model.sample(4000, seed=3, temperature=temperature)
        assert bool(torch.isfinite(s.x).all()) and bool(torch.isfinite(s.log_prob).all())
        assert bool(((s.x[:, 0] > 0) & (s.x[:, 0] < 17)).all()), temperature
        assert bool(((s.x[:, 1] > 16) & (s.x[:, 1] < 17)).all()), temperature
    # decode's log_prob is encode's at the decoded rows (in float64, where nothing rounds onto a bound)
    if dtype == torch.float64:
        s = model.sample(500, seed=4)
        torch.testing.assert_close(model.encode(s.x).log_prob, s.log_prob, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(model.encode(s.x).z, s.z, rtol=1e-8, atol=1e-8)


def test_rows_on_or_outside_the_bounds_have_zero_density_and_no_latent() -> None:
    model = _random_model(2, [0.0, NAN], [17.0, NAN], torch.float32)
    inside = [[3.0, 0.2], [16.5, -1.0]]
    outside = [[0.0, 0.0], [17.0, 0.0], [-1.0, 0.0], [20.0, 1.0], [math.inf, 0.0], [-math.inf, 0.0]]
    rows = torch.tensor(inside[:1] + outside + inside[1:])
    e = model.encode(rows)
    out = slice(1, 1 + len(outside))
    assert bool((e.log_prob[out] == -math.inf).all())
    assert bool(torch.isnan(e.z[out]).all() and torch.isnan(e.log_det[out]).all() and torch.isnan(e.base_log_prob[out]).all())
    # the rows inside are answered as in a batch of the same size with no row outside: bit for bit
    other = model.encode(torch.tensor(inside[:1] + [[5.0, 0.0]] * len(outside) + inside[1:]))
    torch.testing.assert_close(e.log_prob[[0, -1]], other.log_prob[[0, -1]], rtol=0, atol=0)
    torch.testing.assert_close(e.z[[0, -1]], other.z[[0, -1]], rtol=0, atol=0)
    # an unbounded feature far out is still a finite density; a NaN stays NaN (not -inf)
    assert bool(torch.isfinite(model.encode(torch.tensor([[3.0, 1e3]])).log_prob).all())
    assert bool(torch.isnan(model.encode(torch.tensor([[NAN, 0.0]])).log_prob).all())


def test_bounds_are_checked_when_the_module_is_built() -> None:
    spec = flow_spec("nsf", 2, 0, transforms=1, hidden_features=[8], bins=4)
    for lower, upper, match in [([0.0, 0.0], [1.0, 0.0], "below"), ([0.0, 1.0], [1.0, NAN], "one finite bound"),
                                ([0.0], [1.0], "shape")]:
        with pytest.raises(ValueError, match=match):
            DensityModel(spec, torch.zeros(2), torch.ones(2), lower=torch.tensor(lower), upper=torch.tensor(upper))


# -- training and the artifact ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def bounded_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with ``box``: 2 features, the first bounded to (0, 10), trained with ``train_and_save``."""
    root = tmp_path_factory.mktemp("bounded")
    data = Dataset(_bounded_rows(2000, 0), None, ["a", "b"], [], "box")
    config = TrainConfig(flow="nsf", transforms=2, hidden_features=[16, 16], epochs=25, batch_size=128,
                         patience=50, max_minutes=1.0, seed=0, robust=False)
    train_and_save(data, "box", root, config, bounds=parse_bounds("a=0:10", ["a", "b"]))
    return root


def test_trained_bounded_model_is_certified_and_recorded(bounded_repo: Path) -> None:
    manifest = read_manifest(bounded_repo / "box" / "1")
    assert manifest.format_version == 2
    assert manifest.preprocessing.lower == [0.0, None] and manifest.preprocessing.upper == [10.0, None]
    checks = manifest.exactness["checks"]
    assert manifest.exactness["passed"], checks
    assert {"round_trip_x", "round_trip_z", "log_det_autograd", "integral"} <= set(checks)
    assert abs(checks["integral"]["integral"] - 1.0) < 0.01
    assert any("bounded" in note.lower() for note in manifest.notes)
    # shift and scale standardise the logit of the bounded feature, not the feature itself
    y = unbound_rows(_bounded_rows(2000, 0), np.array([0.0, NAN]), np.array([10.0, NAN]))[:, 0]
    assert abs(manifest.preprocessing.shift[0] - y.mean()) < 0.2 * y.std()
    art = load_artifact(bounded_repo / "box" / "1")
    s = art.model.sample(2000, seed=0).x
    assert bool(((s[:, 0] > 0) & (s[:, 0] < 10)).all())


def test_an_unbounded_model_is_still_written_as_format_1(trained_moons: Path) -> None:
    raw = json.loads((trained_moons / "model.json").read_text())
    assert raw["format_version"] == 1 and set(raw["preprocessing"]) == {"shift", "scale", "dequantized"}


def test_committed_format_1_manifest_loads_unchanged() -> None:
    raw = json.loads((MODELS / "moons" / "1" / "model.json").read_text())
    assert raw["format_version"] == 1 and "lower" not in raw["preprocessing"]
    art = load_artifact(MODELS / "moons" / "1")
    assert art.model.bounds is None and art.manifest.preprocessing.lower is None
    # bounds are no weights: an unbounded model's tensors are exactly the flow's and shift/scale
    assert not any("bound" in k or k in ("lower", "upper") for k in art.model.state_dict())


def _copy_with(src: Path, dst_root: Path, edit: Any) -> Path:
    dst = dst_root / "box" / "1"
    dst.mkdir(parents=True)
    (dst / "weights.safetensors").write_bytes((src / "weights.safetensors").read_bytes())
    raw = json.loads((src / "model.json").read_text())
    edit(raw)
    (dst / "model.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format_version=1), "format_version 2"),
    (lambda m: m["preprocessing"].update(lower=[10.0, None]), "below the upper"),
    (lambda m: m["preprocessing"].update(upper=[10.0, 1.0]), "only one bound"),
    (lambda m: m["preprocessing"].update(lower=[0.0]), "2 values"),
    (lambda m: m["preprocessing"].pop("upper"), "together"),
    (lambda m: m["preprocessing"].update(lower=["-Infinity", None]), "finite"),
    (lambda m: m.update(format_version=4), "format_version 4 is not supported"),
])
def test_bad_bounds_in_a_manifest_are_refused(bounded_repo: Path, tmp_path: Path, edit: Any, match: str) -> None:
    def apply(raw: dict[str, Any]) -> None:
        edit(raw)
        lower = raw["preprocessing"].get("lower")
        if lower and lower[0] == "-Infinity":
            raw["preprocessing"]["lower"][0] = -math.inf

    dst = _copy_with(bounded_repo / "box" / "1", tmp_path, apply)
    with pytest.raises(ArtifactError, match=match):
        load_artifact(dst)


def test_training_refuses_rows_outside_the_bounds(tmp_path: Path) -> None:
    rows = _bounded_rows(400, 1)
    rows[123, 0] = 10.0  # on the bound: density zero there
    data = Dataset(rows, None, ["a", "b"], [], "box.csv")
    with pytest.raises(DataError, match=r"'a', data row 124 is 10.*\(0, 10\)"):
        train_and_save(data, "box", tmp_path, TrainConfig(epochs=1), bounds=parse_bounds("a=0:10", ["a", "b"]))
    assert not (tmp_path / "box").exists()
    # dequantized integers k must satisfy LOW <= k <= HIGH - 1; the message says so
    ints = Dataset(np.array([[16.0], [3.0]]), None, ["p"], [], "px")
    with pytest.raises(DataError, match="HIGH - 1"):
        check_bounds(Dataset(ints.x + 0.5, None, ["p"], [], "px"), np.array([0.0]), np.array([16.0]), dequantized=True)


def test_parse_bounds() -> None:
    lo, hi = parse_bounds("0:17", ["a", "b"])
    assert lo.tolist() == [0.0, 0.0] and hi.tolist() == [17.0, 17.0]
    lo, hi = parse_bounds("b=-1:2.5", ["a", "b"])
    assert math.isnan(lo[0]) and (lo[1], hi[1]) == (-1.0, 2.5)
    lo, hi = parse_bounds("0=0:1, b=2:3", ["a", "b"])
    assert lo.tolist() == [0.0, 2.0]
    assert parse_bounds(None, ["a"]) is None and parse_bounds(" ", ["a"]) is None
    for text, match in [("1:0", "below"), ("0-17", "LOW:HIGH"), ("c=0:1", "unknown column 'c'"),
                        ("a=0:1,a=0:2", "twice"), ("0:inf", "finite"), ("a=", "LOW:HIGH")]:
        with pytest.raises(DataError, match=match):
            parse_bounds(text, ["a", "b"])


def test_cli_train_takes_bounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    path = tmp_path / "box.csv"
    np.savetxt(path, _bounded_rows(600, 2), delimiter=",", header="a,b", comments="")
    args = ["train", str(path), "--name", "box", "--model-dir", str(tmp_path / "repo"), "--epochs", "3", "--quiet"]
    assert main([*args, "--bounds", "a=0:10"]) == 0, capsys.readouterr()
    assert read_manifest(tmp_path / "repo" / "box" / "1").preprocessing.lower == [0.0, None]
    assert main([*args, "--bounds", "0:5"]) == 2  # column b has values below 0 and a above 5
    assert "not strictly inside its bounds" in capsys.readouterr().err


# -- the HTTP answer -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bounded_server(bounded_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(bounded_repo, tmp_path_factory.mktemp("bounded-server")) as proc:
        yield proc


def test_api_answers_rows_outside_the_bounds_with_null_and_flags_them(bounded_server: ServerProcess) -> None:
    rows = [[2.0, 0.5], [-1.0, 0.5], [10.0, 0.0], [4.0, 1.0]]
    with httpx.Client(base_url=bounded_server.url, timeout=60.0) as c:
        r = c.post("/v1/models/box/log_prob", json={"inputs": rows})
        assert r.status_code == 200, r.text
        lp = r.json()["log_prob"]
        assert lp[1] is None and lp[2] is None and all(math.isfinite(v) for v in (lp[0], lp[3]))
        r = c.post("/v1/models/box/inverse", json={"inputs": rows})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["latents"][1] == [None, None] and body["log_prob"][2] is None
        assert all(isinstance(v, float) for v in body["latents"][0])
        r = c.post("/v1/models/box/score", json={"inputs": rows})
        assert r.status_code == 200, r.text
        score = r.json()
        assert score["is_anomaly"][1] and score["is_anomaly"][2]
        assert score["p_value"][1] == pytest.approx(min(score["p_value"]))
        r = c.post("/v1/models/box/sample", json={"n": 500, "seed": 1, "temperature": 3.0})
        assert r.status_code == 200, r.text
        samples = np.array(r.json()["samples"])
        assert ((samples[:, 0] > 0) & (samples[:, 0] < 10)).all()
        card = c.get("/v1/models/box").json()
        assert card["preprocessing"]["lower"] == [0.0, None] and card["preprocessing"]["upper"] == [10.0, None]
