"""Robust training for anomaly use: the trimmed likelihood, the defaults chosen from the data size,
the training thread count, and what ``flowserve train`` and the model card record of them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.cli import main
from service.model.artifact import MANIFEST_FILE
from service.training.fit import MEDIUM_FLOW, SMALL_DATA_ROWS, SMALL_FLOW, TrainConfig, fit, mean_nll, resolve, trimmed_nll


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


def test_defaults_follow_the_number_of_training_rows() -> None:
    small = resolve(TrainConfig(), 300, 10)  # 30 rows per feature
    assert small.robust is True and small.batch_size == 75  # 300 // 4
    assert (small.transforms, small.hidden_features) == (SMALL_FLOW["transforms"], SMALL_FLOW["hidden_features"])
    medium = resolve(TrainConfig(), 300, 2)  # 150 rows per feature
    assert medium.robust is True and medium.batch_size == 75
    assert (medium.transforms, medium.hidden_features) == (MEDIUM_FLOW["transforms"], MEDIUM_FLOW["hidden_features"])
    assert resolve(TrainConfig(), 60, 2).batch_size == 16 and resolve(TrainConfig(), 1999, 2).batch_size == 256
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
    assert tr["config"]["batch_size"] == 35  # 140 training rows // 4
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
