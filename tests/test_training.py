"""Data reading and checking, the seeded split, the fit loop and a whole training run to an artifact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from service.model.artifact import load_artifact
from service.training.data import (
    MAX_CALIBRATION_ROWS,
    DataError,
    Dataset,
    dequantize,
    load_dataset,
    min_rows,
    parse_columns,
    split,
    validate,
)
from service.model.density import DensityModel
from service.training.exactness import certify, gaussian_log_prob
from service.model.flows import ARCHITECTURES
from service.training.run import OOD_NOTE, train_and_save
from service.training.fit import TrainConfig, fit


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _table(n: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3))


# -- reading --------------------------------------------------------------------------------------------
def test_csv_columns_by_name_and_index(tmp_path: Path) -> None:
    path = _csv(tmp_path / "d.csv", "a,b,c,label", ["1,2,3,0", "4,5,6,1", "7,8,9.5,1"])
    data = load_dataset(path)
    assert data.feature_names == ["a", "b", "c", "label"] and data.context is None
    np.testing.assert_array_equal(data.x[2], [7, 8, 9.5, 1])
    data = load_dataset(path, features=["c", "0"], context=["label"])
    assert data.feature_names == ["c", "a"] and data.context_names == ["label"]
    np.testing.assert_array_equal(data.x[:, 0], [3, 6, 9.5])
    np.testing.assert_array_equal(data.context[:, 0], [0, 1, 1])
    data = load_dataset(path, context=["3"])  # every other column becomes a feature
    assert data.feature_names == ["a", "b", "c"] and data.context_names == ["label"]


def test_npy_and_npz(tmp_path: Path) -> None:
    x = _table(50)
    np.save(tmp_path / "x.npy", x)
    data = load_dataset(tmp_path / "x.npy", context=["2"])
    assert data.feature_names == ["x0", "x1"] and data.context_names == ["x2"]
    np.testing.assert_array_equal(data.context[:, 0], x[:, 2])
    np.savez(tmp_path / "one.npz", anything=x)
    assert load_dataset(tmp_path / "one.npz").feature_names == ["x0", "x1", "x2"]
    np.savez(tmp_path / "xc.npz", x=x, context=np.eye(2)[np.arange(50) % 2])
    data = load_dataset(tmp_path / "xc.npz", features=["x1"])
    assert data.feature_names == ["x1"] and data.context_names == ["c0", "c1"]
    np.testing.assert_array_equal(data.x[:, 0], x[:, 1])


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([[1, "a"], [2, None]], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy.*pickled objects are refused"):
        load_dataset(tmp_path / "obj.npy")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="obj.npz.*pickled objects are refused"):
        load_dataset(tmp_path / "obj.npz")


@pytest.mark.parametrize(
    ("header", "rows", "kwargs", "message"),
    [
        ("a,b", ["1,2", "3,x"], {}, r"column 'b', line 3: 'x' is not a number"),
        ("a,b", ["1,2", "3,"], {}, r"column 'b', line 3: '' is not a number"),
        ("a,b", ["1,2", "3,4,5"], {}, r"line 3 has 3 values, the header has 2"),
        ("1,2", ["3,4"], {}, r"looks like data; a header row with column names is needed"),
        ("a,a", ["1,2"], {}, r"repeats column names \['a'\]"),
        ("a,b", ["1,2"], {"features": ["zz"]}, r"--features names unknown column 'zz'; the columns are \['a', 'b'\]"),
        ("a,b", ["1,2"], {"context": ["7"]}, r"--context names unknown column '7'"),
        ("a,b", ["1,2"], {"features": ["a"], "context": ["a"]}, r"\['a'\] are chosen both as features and as context"),
        ("a,b", ["1,2"], {"context": ["a", "b"]}, r"no feature columns are left"),
    ],
)
def test_unreadable_csv_is_refused_by_column_and_line(
    tmp_path: Path, header: str, rows: list[str], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=message) as info:
        load_dataset(_csv(tmp_path / "bad.csv", header, rows), **kwargs)
    assert str(info.value).startswith("bad.csv:")


def test_other_file_types_are_refused(tmp_path: Path) -> None:
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"unsupported file type '.parquet'"):
        load_dataset(tmp_path / "d.parquet")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "missing.csv")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(DataError, match="not numeric"):
        load_dataset(tmp_path / "s.npy")


def test_parse_columns() -> None:
    assert parse_columns("a, b,c") == ["a", "b", "c"]
    assert parse_columns(None) is None and parse_columns("") is None
    with pytest.raises(DataError, match="empty column name"):
        parse_columns("a,,b")


# -- checking ---------------------------------------------------------------------------------------------
def _dataset(x: np.ndarray, context: np.ndarray | None = None) -> Dataset:
    names = [f"f{i}" for i in range(x.shape[1])]
    cnames = [] if context is None else [f"c{i}" for i in range(context.shape[1])]
    return Dataset(x, context, names, cnames, "data.csv")


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "infinity"), (-np.inf, "infinity")])
def test_non_finite_values_are_refused_by_column_and_row(value: float, kind: str) -> None:
    x = _table()
    x[6, 1] = value
    with pytest.raises(DataError, match=rf"feature column 'f1', data row 7 holds {kind}"):
        validate(_dataset(x))
    c = np.ones((60, 2))
    c[9, 0] = value
    with pytest.raises(DataError, match=rf"context column 'c0', data row 10 holds {kind}"):
        validate(_dataset(_table(), c))


def test_constant_feature_is_refused_unless_dequantized() -> None:
    x = _table()
    x[:, 2] = 4.0
    with pytest.raises(DataError, match=r"feature column 'f2' is constant \(4 in every row\)"):
        validate(_dataset(x))
    validate(_dataset(np.round(x)), dequantizing=True)  # x + U(0,1) is not constant


def test_too_few_rows_says_how_many_are_needed() -> None:
    assert min_rows(2) == 40 and min_rows(64) == 186
    with pytest.raises(DataError, match=r"39 rows is too few; 3 feature\(s\) need at least 40 rows"):
        validate(_dataset(_table(39)))
    with pytest.raises(DataError, match=r"need at least 186 rows"):
        validate(_dataset(np.random.default_rng(0).normal(size=(185, 64))))
    validate(_dataset(_table(40)))


def test_dequantize_is_seeded_and_only_for_integers() -> None:
    x = np.random.default_rng(0).integers(0, 5, size=(50, 3)).astype(float)
    a, b, other = dequantize(_dataset(x), 1), dequantize(_dataset(x), 1), dequantize(_dataset(x), 2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, other.x)
    assert np.all(a.x >= x) and np.all(a.x < x + 1)
    x[3, 2] = 0.5
    with pytest.raises(DataError, match=r"--dequantize needs integer data, but feature column 'f2', data row 4 is 0.5"):
        dequantize(_dataset(x), 1)


def test_split_is_seeded_disjoint_and_complete() -> None:
    a, b, other = split(1000, 3), split(1000, 3), split(1000, 4)
    for part in ("train", "validation", "calibration"):
        np.testing.assert_array_equal(getattr(a, part), getattr(b, part))
    assert not np.array_equal(a.calibration, other.calibration)
    assert (a.train.size, a.validation.size, a.calibration.size) == (700, 150, 150)
    every = np.concatenate([a.train, a.validation, a.calibration])
    np.testing.assert_array_equal(np.sort(every), np.arange(1000))
    big = split(100_000, 0)
    assert big.calibration.size == MAX_CALIBRATION_ROWS == 10_000


# -- the Gaussian baseline ----------------------------------------------------------------------------------
def test_gaussian_baseline_is_the_maximum_likelihood_gaussian() -> None:
    rng = np.random.default_rng(0)
    xt = rng.multivariate_normal([1, -1, 0], [[2, 0.5, 0], [0.5, 1, 0.2], [0, 0.2, 0.5]], size=500)
    xe = rng.normal(size=(50, 3))
    expected = multivariate_normal(xt.mean(0), np.cov(xt.T, bias=True)).logpdf(xe)
    np.testing.assert_allclose(gaussian_log_prob(xt, xe), expected, rtol=1e-10)
    # conditional: mean linear in the context
    ct, ce = rng.normal(size=(500, 2)), rng.normal(size=(50, 2))
    w = np.array([[1.0, 0.0, 2.0], [0.0, -1.0, 0.5]])
    yt = xt + ct @ w
    at = np.hstack([ct, np.ones((500, 1))])
    coef = np.linalg.lstsq(at, yt, rcond=None)[0]
    resid = yt - at @ coef
    mean_e = np.hstack([ce, np.ones((50, 1))]) @ coef
    expected = [multivariate_normal(m, resid.T @ resid / 500).logpdf(row) for m, row in zip(mean_e, xe)]
    np.testing.assert_allclose(gaussian_log_prob(yt, xe, ct, ce), expected, rtol=1e-10)


# -- fitting ---------------------------------------------------------------------------------------------
def test_fit_learns_and_is_reproducible(moons_rows: np.ndarray, tiny: dict[str, Any]) -> None:
    x = moons_rows[:1500]
    config = TrainConfig(flow="nsf", epochs=8, seed=5, **tiny)
    history: list[dict[str, float]] = []
    first = fit(x[:1200], x[1200:], config, on_epoch=history.append)
    again = fit(x[:1200], x[1200:], config)
    assert [row["epoch"] for row in history] == list(range(1, 9))
    assert history[-1]["val_nll"] < history[0]["val_nll"]
    assert first.best_val_nll == min(row["val_nll"] for row in history)
    assert first.best_val_nll == again.best_val_nll
    for key, value in first.model.state_dict().items():
        torch.testing.assert_close(again.model.state_dict()[key], value, rtol=0, atol=0)


def test_fit_stops_early_without_improvement(moons_rows: np.ndarray, tiny: dict[str, Any]) -> None:
    config = TrainConfig(flow="maf", epochs=100, **{**tiny, "patience": 2, "lr": 1e-9})
    result = fit(moons_rows[:400], moons_rows[400:600], config)
    assert result.epochs < 100


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("conditional", [False, True])
def test_every_architecture_trains_certifies_and_reloads(
    tmp_path: Path, blob_rows: tuple[np.ndarray, np.ndarray], tiny: dict[str, Any], name: str, conditional: bool
) -> None:
    x, c = blob_rows
    data = Dataset(x, c if conditional else None, ["a", "b", "c"], ["k0", "k1", "k2"] if conditional else [], "blobs")
    folder = train_and_save(data, "blobs", tmp_path, TrainConfig(flow=name, epochs=3, **tiny))
    loaded = load_artifact(folder)
    m = loaded.manifest
    assert m.flow["name"] == name and m.context_names == (["k0", "k1", "k2"] if conditional else [])
    checks = m.exactness["checks"]
    assert set(checks) == {"round_trip_x", "round_trip_z", "log_det_autograd"}  # 3-D: no grid integral
    failed = {k: v for k, v in checks.items() if not v["pass"]}
    assert not failed and m.exactness["passed"]
    # the loaded model's round trip on the calibration rows, with their own context
    rows = torch.as_tensor(x[:200], dtype=torch.float32)
    ctx = torch.as_tensor(c[:200], dtype=torch.float32) if conditional else None
    back = loaded.model.decode(loaded.model.encode(rows, ctx).z, ctx).x
    assert float((back - rows).abs().max()) <= checks["round_trip_x"]["tolerance"]


def test_training_run_writes_a_complete_manifest(trained_moons: Path) -> None:
    raw = json.loads((trained_moons / "model.json").read_text())
    tr, ex = raw["training"], raw["exactness"]
    assert raw["feature_names"] == ["x", "y"] and raw["context_names"] == []
    assert tr["split"] == {"train": 2100, "validation": 450, "calibration": 450} and tr["rows"] == 2100
    for key in ("epochs", "seconds", "val_nll", "val_nll_per_dim", "test_nll", "test_nll_per_dim",
                "gaussian_test_nll", "gaussian_test_nll_per_dim", "seed", "data_file", "dequantized"):
        assert key in tr, key
    assert tr["val_nll_per_dim"] == pytest.approx(tr["val_nll"] / 2)
    assert tr["data_file"] == "moons" and tr["dequantized"] is False and tr["seed"] == 0
    assert len(raw["calibration"]) == 450
    assert tr["test_nll"] == pytest.approx(-np.mean(raw["calibration"]), rel=1e-9)
    assert set(ex["checks"]) == {"round_trip_x", "round_trip_z", "log_det_autograd", "integral"}
    for name, check in ex["checks"].items():
        assert {"value", "tolerance", "pass", "what"} <= set(check), name
        assert check["pass"], (name, check)
    assert ex["passed"] and ex["dtype"] == "float32"
    assert ex["nll"]["better_than_gaussian"] and ex["nll"]["nll"] == tr["test_nll"]
    assert OOD_NOTE in raw["notes"] and "Nalisnick et al., 2019" in OOD_NOTE
    assert raw["anomaly_alpha"] == 0.01


def test_calibration_set_is_the_held_out_log_densities(trained_moons: Path, moons_rows: np.ndarray) -> None:
    loaded = load_artifact(trained_moons)
    parts = split(len(moons_rows), loaded.manifest.training["seed"])
    lp = loaded.model.log_prob(torch.as_tensor(moons_rows[parts.calibration], dtype=torch.float32))
    np.testing.assert_allclose(loaded.manifest.calibration, lp.double().numpy(), rtol=1e-6, atol=1e-6)


def test_dequantized_float64_run_records_it(tmp_path: Path, tiny: dict[str, Any]) -> None:
    x = np.random.default_rng(0).poisson([3.0, 8.0], size=(300, 2)).astype(float)
    folder = train_and_save(Dataset(x, None, ["a", "b"], [], "counts.csv"), "counts", tmp_path,
                            TrainConfig(flow="realnvp", epochs=3, dtype="float64", **tiny), dequantize_data=True, alpha=0.05)
    loaded = load_artifact(folder)
    m = loaded.manifest
    assert m.dtype == "float64" and loaded.model.dtype == torch.float64
    assert m.preprocessing.dequantized and m.training["dequantized"] and any("dequantized" in n for n in m.notes)
    assert m.anomaly_alpha == 0.05
    checks = m.exactness["checks"]
    assert checks["round_trip_x"]["tolerance"] < 1e-8  # float64 tolerances
    assert m.exactness["passed"], checks


def test_bad_data_is_refused_before_training(tmp_path: Path) -> None:
    x = _table(100)
    x[50, 0] = np.nan
    with pytest.raises(DataError, match="'f0', data row 51 holds NaN"):
        train_and_save(_dataset(x), "bad", tmp_path, TrainConfig(epochs=1))
    with pytest.raises(ValueError, match="invalid model name"):
        train_and_save(_dataset(_table(100)), "../bad", tmp_path, TrainConfig(epochs=1))
    assert not any(tmp_path.iterdir())


class _OffByAConstant(DensityModel):
    """A model whose reported log-Jacobian is 0.05 nats too high: not a normalised density."""

    def _standardisation_log_det(self) -> torch.Tensor:
        return super()._standardisation_log_det() + 0.05


def test_certify_flags_a_density_that_lies(trained_moons: Path, moons_rows: np.ndarray) -> None:
    honest = load_artifact(trained_moons).model
    lying = _OffByAConstant(honest.flow_spec, honest.shift, honest.scale, dtype=honest.dtype)
    lying.load_state_dict(honest.state_dict())
    figures = certify(lying.eval(), moons_rows[:2100], moons_rows[2100:2500])
    checks = figures["checks"]
    assert checks["round_trip_x"]["pass"] and checks["round_trip_z"]["pass"]  # the map itself is fine
    assert checks["log_det_autograd"]["value"] == pytest.approx(0.05, abs=1e-3)
    assert not checks["log_det_autograd"]["pass"]
    assert checks["integral"]["integral"] == pytest.approx(np.exp(0.05), rel=1e-3)
    assert not checks["integral"]["pass"] and not figures["passed"]
