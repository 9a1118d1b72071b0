"""Robust training for anomaly use: the trimmed likelihood, the defaults chosen from the data size,
the training thread count, and what ``flowserve train`` and the model card record of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from service.cli import main
from service.model.artifact import MANIFEST_FILE, ArtifactError, load_artifact
from service.model.density import DensityModel
from service.model.flows import flow_spec
from service.training.fit import (MEDIUM_FLOW, SMALL_DATA_ROWS, SMALL_FLOW, TrainConfig, epoch_batches, fit, mean_nll, resolve,
                                  trimmed_nll, zero_output_layers)
from service.training.robust_start import gaussian_start, mcd
from tests.tolerance import ulp_tolerance


def test_trimmed_nll_averages_the_most_likely_rows_and_ignores_the_rest() -> None:
    log_p = torch.tensor([-1.0, -2.0, -3.0, -50.0, -4.0, -1.5, -2.5, -3.5, -0.5, -100.0], requires_grad=True)
    loss = trimmed_nll(log_p, 0.2)  # drops floor(0.2 * 10) = 2 rows: -100 and -50
    kept = [-1.0, -2.0, -3.0, -4.0, -1.5, -2.5, -3.5, -0.5]
    assert float(loss.detach()) == pytest.approx(-sum(kept) / 8)
    loss.backward()
    grad = log_p.grad
    assert grad is not None
    assert grad[3] == 0 and grad[9] == 0  # the two least likely rows get no gradient
    assert torch.allclose(grad[[0, 1, 2, 4, 5, 6, 7, 8]], torch.full((8,), -1 / 8))
    # nothing to drop: the plain mean
    assert float(trimmed_nll(log_p.detach()[:4], 0.2)) == pytest.approx(14.0)
    assert float(trimmed_nll(log_p.detach(), 0.0)) == pytest.approx(float(-log_p.detach().mean()))


def _anomaly_weights(batches: list[torch.Tensor], log_p: torch.Tensor, trim: float) -> list[float]:
    """The gradient each batch's trimmed NLL puts on row 0 (the anomaly), batch by batch."""
    weights = []
    for idx in batches:
        rows = log_p.detach().clone().requires_grad_(True)
        trimmed_nll(rows[idx], trim).backward()
        assert rows.grad is not None
        weights.append(float(rows.grad[0]))
    return weights


def test_every_batch_of_an_epoch_is_trimmed_so_an_anomaly_never_gets_full_weight() -> None:
    """52 rows in batches of 16 used to leave a remainder of 4, floor(0.1 * 4) = 0 rows trimmed: an anomaly
    drawn into it was fitted with full weight. Equal batches (four of 13) each drop their least likely row."""
    log_p = torch.full((52,), -1.0)
    log_p[0] = -100.0  # row 0: far less likely than the others
    gen = torch.Generator().manual_seed(0)
    remainder_hits = 0
    for _ in range(200):  # epochs
        perm = torch.randperm(52, generator=gen)
        batches = list(epoch_batches(perm, 16))
        assert [b.numel() for b in batches] == [13, 13, 13, 13]
        assert all(w == 0.0 for w in _anomaly_weights(batches, log_p, 0.1))
        # the old cut: three batches of 16 and the remainder
        old = [perm[i : i + 16] for i in range(0, 52, 16)]
        remainder_hits += any(w != 0.0 for w in _anomaly_weights(old, log_p, 0.1))
    assert 5 < remainder_hits < 30  # ~4/52 of 200 epochs (15) put the anomaly in the untrimmed remainder


@pytest.mark.parametrize(("rows", "batch"), [(52, 16), (490, 30), (1999, 124), (256, 256), (20_000, 256), (7, 16), (1, 16)])
def test_epoch_batches_cover_the_epoch_once_in_equal_batches(rows: int, batch: int) -> None:
    perm = torch.randperm(rows, generator=torch.Generator().manual_seed(rows))
    batches = epoch_batches(perm, batch)
    sizes = [b.numel() for b in batches]
    assert len(batches) == -(-rows // batch) and max(sizes) <= batch and max(sizes) - min(sizes) <= 1
    assert torch.equal(torch.cat(batches), perm)
    assert epoch_batches(perm[:0], batch) == ()


def test_defaults_follow_the_number_of_training_rows() -> None:
    small = resolve(TrainConfig(), 300, 10)  # 30 rows per feature
    assert small.robust is True and small.batch_size == 18  # 300 // 16: about 16 steps an epoch
    assert (small.transforms, small.hidden_features) == (SMALL_FLOW["transforms"], SMALL_FLOW["hidden_features"])
    medium = resolve(TrainConfig(), 300, 2)  # 150 rows per feature
    assert medium.robust is True and medium.batch_size == 18
    assert (medium.transforms, medium.hidden_features) == (MEDIUM_FLOW["transforms"], MEDIUM_FLOW["hidden_features"])
    assert resolve(TrainConfig(), 60, 2).batch_size == 16 and resolve(TrainConfig(), 1999, 2).batch_size == 124
    large = resolve(TrainConfig(), SMALL_DATA_ROWS, 2)
    assert large.robust is False and large.batch_size == 256
    assert large.transforms is None and large.hidden_features is None  # the flow's own defaults
    # whatever is given is kept
    given = resolve(TrainConfig(robust=False, batch_size=64, transforms=3), 300, 2)
    assert (given.robust, given.batch_size, given.transforms, given.hidden_features) == (False, 64, 3, None)
    assert resolve(TrainConfig(robust=True), 50_000, 2).robust is True
    with pytest.raises(ValueError, match="trim"):
        resolve(TrainConfig(trim=0.5), 300, 2)


def test_robust_fit_early_stops_on_the_trimmed_validation_nll(moons_rows: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    x = np.vstack([moons_rows[:380], rng.uniform(-6, 6, size=(20, 2))])[rng.permutation(400)]
    before = torch.get_num_threads()
    result = fit(x[:300], x[300:], TrainConfig(epochs=6, seed=1, threads=1))
    assert torch.get_num_threads() == before  # the training thread count is restored
    assert result.objective == "trimmed-nll(0.1)" and result.config is not None and result.config.robust
    xv = torch.as_tensor(x[300:], dtype=torch.float32)
    trimmed, plain = mean_nll(result.model, xv, None, trim=0.1), mean_nll(result.model, xv, None)
    assert result.best_val_nll == pytest.approx(trimmed, rel=1e-6)
    assert result.best_val_nll == min(row["val_nll"] for row in result.history)
    assert trimmed < plain  # the dropped rows are the least likely ones
    plain_fit = fit(x[:300], x[300:], TrainConfig(epochs=2, seed=1, robust=False))
    assert plain_fit.objective == "nll"


def _csv(path: Path, rows: int) -> Path:
    rng = np.random.default_rng(0)
    a = rng.normal(size=rows)
    b = a**2 + 0.3 * rng.normal(size=rows)
    path.write_text("a,b\n" + "".join(f"{x:.6f},{y:.6f}\n" for x, y in zip(a, b)))
    return path


@pytest.mark.parametrize(("flags", "objective", "robust"), [
    ([], "trimmed-nll(0.1)", True),
    (["--trim", "0.2"], "trimmed-nll(0.2)", True),
    (["--no-robust"], "nll", False),
])
def test_train_records_the_objective_on_the_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], objective: str, robust: bool
) -> None:
    data = _csv(tmp_path / "d.csv", 200)
    status = main(["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), "--epochs", "2",
                   "--quiet", *flags])
    out = capsys.readouterr().out
    assert status == 0
    manifest = json.loads((tmp_path / "repo" / "d" / "1" / MANIFEST_FILE).read_text())
    tr = manifest["training"]
    assert tr["objective"] == objective and tr["robust"] is robust
    assert tr["config"]["batch_size"] == 16  # 140 training rows // 16 = 8, raised to the floor of 16
    assert manifest["flow"]["kwargs"]["transforms"] == 3 and manifest["flow"]["kwargs"]["hidden_features"] == [32, 32]  # 70 rows per feature
    assert f"validation {objective}:" in out


def test_robust_on_large_data_only_when_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _csv(tmp_path / "d.csv", 3000)
    args = ["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), "--epochs", "1", "--quiet",
            "--transforms", "1", "--hidden", "8"]
    assert main(args) == 0 and main([*args, "--robust"]) == 0
    cards = [json.loads((tmp_path / "repo" / "d" / v / MANIFEST_FILE).read_text())["training"] for v in ("1", "2")]
    assert [c["objective"] for c in cards] == ["nll", "trimmed-nll(0.1)"]
    assert [c["config"]["batch_size"] for c in cards] == [256, 256]


@pytest.mark.parametrize("trim", ["0.5", "-0.1", "x"])
def test_a_bad_trim_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], trim: str) -> None:
    data = _csv(tmp_path / "d.csv", 100)
    with pytest.raises(SystemExit) as info:
        main(["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), "--trim", trim])
    assert info.value.code == 2 and "--trim" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


# -- the robust Gaussian start ------------------------------------------------------------------------
_COV = np.array([[1.0, 0.6, 0.2], [0.6, 2.0, -0.4], [0.2, -0.4, 0.5]])


def _contaminated(rows: int = 400, seed: int = 0) -> np.ndarray:
    """A correlated 3-D Gaussian (mean (1, -2, 0.5), covariance ``_COV``) with 10 % of its rows moved far away."""
    rng = np.random.default_rng(seed)
    x = rng.multivariate_normal([1.0, -2.0, 0.5], _COV, size=rows)
    x[: rows // 10] = rng.uniform(8.0, 12.0, size=(rows // 10, 3))
    return x


def test_the_mcd_ignores_the_contamination_the_sample_covariance_follows() -> None:
    x = _contaminated()
    clean = x[40:]  # the 90 % drawn from the Gaussian: their own moments are what an estimator can reach
    mu, cov = mcd(x, seed=0)
    assert np.abs(mu - clean.mean(axis=0)).max() < 0.1  # ~ its standard error, sqrt(2 / 360) = 0.075
    assert np.abs(cov - np.cov(clean, rowvar=False)).max() < 0.3
    assert np.abs(np.cov(x, rowvar=False) - _COV).max() > 5  # what plain moments give
    shift, scale, linear = gaussian_start(x, seed=0)
    assert np.array_equal(linear, np.tril(linear)) and (np.diag(linear) > 0).all()
    np.testing.assert_allclose(shift, mu)
    # A diag(1/sigma) Sigma diag(1/sigma) A^T = I: the flow's input has identity scatter
    whitened = linear @ (cov / np.outer(scale, scale)) @ linear.T
    np.testing.assert_allclose(whitened, np.eye(3), atol=ulp_tolerance(whitened, 64, np.float64))
    with pytest.raises(ValueError, match="needs at least 6 rows"):
        mcd(x[:5], seed=0)


def test_the_mcd_keeps_three_quarters_of_the_rows_and_breaks_down_past_a_quarter() -> None:
    """The default support (0.75) ignores up to a quarter of far rows; the half-sample MCD (support 0.5)
    still ignores 40 %, which the default then follows (the price of its lower variance)."""
    rng = np.random.default_rng(3)
    x = rng.multivariate_normal([1.0, -2.0, 0.5], _COV, size=400)
    x[:80] = rng.uniform(8.0, 12.0, size=(80, 3))  # 20 %: within the default's breakdown
    mu, _ = mcd(x, seed=0)
    assert np.abs(mu - x[80:].mean(axis=0)).max() < 0.1
    x[:160] = rng.uniform(8.0, 12.0, size=(160, 3))  # 40 %: past it
    assert np.abs(mcd(x, seed=0)[0] - x[160:].mean(axis=0)).max() > 1.0
    assert np.abs(mcd(x, seed=0, support=0.5)[0] - x[160:].mean(axis=0)).max() < 0.15  # 240 clean rows
    with pytest.raises(ValueError, match="support"):
        mcd(x, seed=0, support=1.5)


@pytest.mark.parametrize("data", ["contaminated", "iris", "wine", "breast_cancer"])
def test_the_mcd_agrees_with_scikit_learns_min_cov_det(data: str) -> None:
    r"""The numpy FastMCD against the field's implementation (``sklearn.covariance.MinCovDet``, same support).

    scikit-learn stops after reweighting; :func:`mcd` then makes the reweighted covariance consistent at the
    Gaussian again (as robustbase's ``covMcd`` does), so sklearn's covariance is compared after that same
    factor, :math:`\mathrm{med}_i d_i^2 / \chi^2_{d,0.5}`. What is left differs by the search (random
    subsets, a local optimum each) and the Wilson-Hilferty quantiles: up to ~8 % of an entry, 0.12 in log det.
    """
    from scipy.stats import chi2
    from sklearn import datasets
    from sklearn.covariance import MinCovDet

    x = _contaminated() if data == "contaminated" else getattr(datasets, f"load_{data}")().data
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    mu, cov = mcd(x, seed=0)
    ref = MinCovDet(support_fraction=0.75, random_state=0).fit(x)
    ref_cov = ref.covariance_ * np.median(ref.mahalanobis(x)) / chi2.ppf(0.5, x.shape[1])
    assert np.abs(mu - ref.location_).max() < 0.05  # standardised units
    assert np.abs(cov - ref_cov).max() < 0.1 * np.abs(ref_cov).max()
    assert abs(np.linalg.slogdet(cov)[1] - np.linalg.slogdet(ref_cov)[1]) < 0.25


def _gaussian_log_pdf(x: np.ndarray, mu: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = x.shape[1]
    prec = np.linalg.inv(cov)
    return -0.5 * np.einsum("ij,jk,ik->i", x - mu, prec, x - mu) - 0.5 * np.linalg.slogdet(cov)[1] - 0.5 * d * np.log(2 * np.pi)


@pytest.mark.parametrize("flow", ["nsf", "nsf-ar", "maf", "realnvp", "nice"])
def test_at_the_mcd_start_every_flow_is_the_robust_gaussian(flow: str) -> None:
    x = _contaminated()
    shift, scale, linear = gaussian_start(x, seed=0)
    model = DensityModel(flow_spec(flow, 3, 0, transforms=2, hidden_features=[8, 8]), torch.as_tensor(shift),
                         torch.as_tensor(scale), dtype=torch.float64, linear=torch.as_tensor(linear))
    zero_output_layers(model)
    _, cov = mcd(x, seed=0)
    with torch.inference_mode():
        got = model.log_prob(torch.as_tensor(x)).numpy()
        back = model.decode(model.encode(torch.as_tensor(x)).z)
    want = _gaussian_log_pdf(x, shift, cov)
    np.testing.assert_allclose(got, want, rtol=0, atol=ulp_tolerance(want, 256, np.float64))
    np.testing.assert_allclose(back.x.numpy(), x, rtol=0, atol=ulp_tolerance(x, 256, np.float64))
    np.testing.assert_allclose(back.log_prob.numpy(), got, rtol=0, atol=ulp_tolerance(got, 256, np.float64))


def test_with_a_decorrelating_matrix_the_chain_rule_gives_the_gaussian_conditionals() -> None:
    x = _contaminated()[40:100]
    shift, scale, linear = gaussian_start(_contaminated(), seed=0)
    model = DensityModel(flow_spec("maf", 3, 0, transforms=1, hidden_features=[8, 8]), torch.as_tensor(shift),
                         torch.as_tensor(scale), dtype=torch.float64, linear=torch.as_tensor(linear))
    zero_output_layers(model)
    assert model.chain_rule_exact  # A is lower-triangular: dz/dx stays triangular
    cov = np.diag(scale) @ np.linalg.inv(linear) @ np.linalg.inv(linear).T @ np.diag(scale)
    with torch.inference_mode():
        terms = model.chain_rule_terms(torch.as_tensor(x)).numpy()
    # log p(x_i | x_<i) = log N(x_<=i) - log N(x_<i), from the marginals of N(shift, cov)
    marginals = [np.zeros(x.shape[0])] + [_gaussian_log_pdf(x[:, :k], shift[:k], cov[:k, :k]) for k in (1, 2, 3)]
    want = np.column_stack([marginals[k + 1] - marginals[k] for k in range(3)])
    np.testing.assert_allclose(terms, want, rtol=0, atol=ulp_tolerance(want, 1024, np.float64))


def test_the_start_follows_the_objective_and_the_rows_per_feature() -> None:
    assert resolve(TrainConfig(), 300, 10).start == "mcd"
    assert resolve(TrainConfig(), 19, 10).start == "standard"  # fewer than 2 rows per feature
    assert resolve(TrainConfig(), SMALL_DATA_ROWS, 2).start == "standard"  # large data: plain NLL, plain start
    assert resolve(TrainConfig(robust=False), 300, 2).start == "standard"
    assert resolve(TrainConfig(start="standard"), 300, 2).start == "standard"
    assert resolve(TrainConfig(robust=True), 50_000, 2).start == "mcd"
    # the pooled rows' Gaussian ignores the context a conditional model places its modes by
    assert resolve(TrainConfig(), 300, 2, conditional=True).start == "standard"
    assert resolve(TrainConfig(start="mcd"), 300, 2, conditional=True).start == "mcd"
    with pytest.raises(ValueError, match="start"):
        resolve(TrainConfig(start="kmeans"), 300, 2)


def test_a_robust_fit_starts_at_the_mcd_gaussian() -> None:
    x = _contaminated(500, seed=1)
    result = fit(x[:400], x[400:], TrainConfig(epochs=1, lr=1e-12, seed=0))  # one step that moves nothing
    assert result.config is not None and result.config.start == "mcd" and result.model.decorrelated
    mu, cov = mcd(x[:400], seed=0)
    with torch.inference_mode():
        got = result.model.log_prob(torch.as_tensor(x[400:], dtype=torch.float32)).double().numpy()
    want = _gaussian_log_pdf(x[400:], mu, cov)
    np.testing.assert_allclose(got, want, rtol=float(np.sqrt(np.finfo(np.float32).eps)), atol=1e-3)
    plain = fit(x[:400], x[400:], TrainConfig(epochs=1, seed=0, start="standard"))
    assert not plain.model.decorrelated


def test_train_writes_the_mcd_start_as_an_exact_format_3_artifact(tmp_path: Path) -> None:
    data = _csv(tmp_path / "d.csv", 200)
    assert main(["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), "--epochs", "3", "--quiet"]) == 0
    folder = tmp_path / "repo" / "d" / "1"
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["format_version"] == 3 and manifest["training"]["start"] == "mcd"
    linear = np.array(manifest["preprocessing"]["linear"])
    assert linear.shape == (2, 2) and linear[0, 1] == 0 and (np.diag(linear) > 0).all()
    assert manifest["exactness"]["passed"] is True
    model = load_artifact(folder).model
    assert model.decorrelated and np.array_equal(model.linear.double().numpy(), linear.astype(np.float32))
    # --start standard: no matrix, and the format an older flowserve reads
    assert main(["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), "--epochs", "1", "--quiet",
                 "--start", "standard"]) == 0
    plain = json.loads((tmp_path / "repo" / "d" / "2" / MANIFEST_FILE).read_text())
    assert plain["format_version"] == 1 and "linear" not in plain["preprocessing"]
    assert plain["training"]["start"] == "standard"


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda p: p.update(linear=[[1.0, 0.5], [0.0, 1.0]]), "lower-triangular"),
    (lambda p: p.update(linear=[[1.0, 0.0], [0.3, -1.0]]), "positive diagonal"),
    (lambda p: p.update(linear=[[1.0, 0.0]]), "2 x 2"),
    (lambda p: p.update(linear=[[1.0, 0.0], [float("nan"), 1.0]]), "not finite"),
])
def test_a_bad_decorrelating_matrix_is_refused(tmp_path: Path, change: Any, fragment: str) -> None:
    data = _csv(tmp_path / "d.csv", 200)
    assert main(["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), "--epochs", "1", "--quiet"]) == 0
    path = tmp_path / "repo" / "d" / "1" / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    change(manifest["preprocessing"])
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=fragment):
        load_artifact(path.parent)
    manifest["format_version"] = 2  # a format-2 manifest cannot carry the matrix at all
    manifest["preprocessing"]["linear"] = [[1.0, 0.0], [0.0, 1.0]]
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format_version 3"):
        load_artifact(path.parent)
