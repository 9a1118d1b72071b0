"""``flowserve train`` end to end: a small CSV in, a loadable, certified artifact with a card out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.cli import main
from service.commands.models import local_card
from service.model.repository import ModelRepository

ROOT = Path(__file__).resolve().parents[1]


def _flowserve(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)


def _write_csv(path: Path, rows: int = 400, seed: int = 0) -> Path:
    """Columns ``a, b`` (a banana: b ≈ a²) and ``group`` (an integer context)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=rows)
    group = rng.integers(0, 3, size=rows)
    b = a**2 + 0.3 * rng.normal(size=rows) + group
    lines = ["a,b,group"] + [f"{x:.6f},{y:.6f},{g}" for x, y, g in zip(a, b, group)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_a_csv_end_to_end(tmp_path: Path) -> None:
    data = _write_csv(tmp_path / "banana.csv")
    done = _flowserve("train", str(data), "--name", "banana", "--model-dir", "repo", "--context", "group",
                      "--epochs", "4", "--transforms", "2", "--hidden", "16,16", "--seed", "3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "held-out NLL (60 calibration rows)" in out and "fitted Gaussian on the same rows" in out
    for check in ("round_trip_x", "round_trip_z", "log_det_autograd", "integral"):
        assert f"pass  {check}" in out, out
    assert f"written: {Path('repo') / 'banana' / '1'}" in out

    repo = ModelRepository(tmp_path / "repo")
    loaded = repo.load("banana")
    m = loaded.manifest
    assert (m.name, m.version, m.feature_names, m.context_names) == ("banana", 1, ["a", "b"], ["group"])
    assert m.flow["name"] == "nsf" and m.flow["kwargs"]["hidden_features"] == [16, 16]
    assert m.training["data_file"] == "banana.csv" and m.training["seed"] == 3 and m.training["epochs"] <= 4
    assert len(m.calibration) == 60 and m.exactness["passed"]

    card = local_card(tmp_path / "repo", "banana", None)
    assert card["exactness"]["checks"]["integral"]["pass"]
    assert card["calibration"]["size"] == 60 and card["training"]["val_nll_per_dim"] > -10
    assert any("Nalisnick" in note for note in card["notes"])

    # a second run writes version 2
    again = _flowserve("train", str(data), "--name", "banana", "--model-dir", "repo", "--context", "group",
                       "--epochs", "1", "--transforms", "1", "--hidden", "8", "--quiet", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert repo.versions("banana") == [1, 2]


def test_bad_data_is_refused_by_the_subprocess_with_status_2(tmp_path: Path) -> None:
    data = tmp_path / "nan.csv"
    data.write_text("a,b\n" + "".join(f"{i},{i % 7}\n" for i in range(60)).replace("17,3", "17,nan"))
    done = _flowserve("train", str(data), "--name", "n", "--model-dir", "repo", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "flowserve train: error: nan.csv: feature column 'b', data row 18 holds NaN " \
        "(1 non-finite value in all); remove or impute them"
    assert "Traceback" not in done.stderr and not (tmp_path / "repo").exists()


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        ("a,b\n" + "".join(f"{i},1.5\n" for i in range(60)), [],
         "feature column 'b' is constant (1.5 in every row)"),
        ("a,b\n" + "".join(f"{i},{i % 3}\n" for i in range(12)), [],
         "12 rows is too few; 2 feature(s) need at least 40 rows"),
        ("a,b\n" + "".join(f"{i},{i % 3}\n" for i in range(60)), ["--features", "a,c"],
         "--features names unknown column 'c'; the columns are ['a', 'b']"),
        ("a,b\n" + "".join(f"{i},{i % 3}\n" for i in range(60)), ["--context", "group"],
         "--context names unknown column 'group'"),
        ("a,b\n1,2\n3,oops\n", [], "column 'b', line 3: 'oops' is not a number"),
        ("a,b\n" + "".join(f"{i},{i % 3}.5\n" for i in range(60)), ["--dequantize"],
         "--dequantize needs integer data, but feature column 'b', data row 1 is 0.5"),
        ("a,b\n" + "".join(f"{i},{i % 3}\n" for i in range(60)), ["--alpha", "1.5"], "alpha must lie in (0, 1), got 1.5"),
    ],
)
def test_bad_data_and_options_are_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, extra: list[str], message: str
) -> None:
    data = tmp_path / "d.csv"
    data.write_text(content)
    status = main(["train", str(data), "--name", "d", "--model-dir", str(tmp_path / "repo"), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("flowserve train: error: ") and message in err, err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", ".."])
def test_bad_model_name_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    data = _write_csv(tmp_path / "d.csv", rows=60)
    assert main(["train", str(data), "--name", name, "--model-dir", str(tmp_path / "repo")]) == 2
    assert f"invalid model name {name!r}" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists() and not (tmp_path / "x").exists()


def test_npz_float64_dequantized_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    x = rng.poisson([2.0, 5.0, 9.0], size=(200, 3)).astype(np.int64)
    np.savez(tmp_path / "counts.npz", x=x, context=np.eye(2)[rng.integers(0, 2, 200)])
    status = main(["train", str(tmp_path / "counts.npz"), "--name", "counts", "--model-dir", str(tmp_path / "repo"),
                   "--flow", "maf", "--float64", "--dequantize", "--epochs", "2", "--hidden", "8", "--quiet"])
    assert status == 0, capsys.readouterr().err
    m = ModelRepository(tmp_path / "repo").load("counts").manifest
    assert m.dtype == "float64" and m.feature_names == ["x0", "x1", "x2"] and m.context_names == ["c0", "c1"]
    assert m.preprocessing.dequantized and m.training["dequantized"]


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "flowserve train data/moons.csv --name moons" in text
    for option in ("--flow", "--context", "--features", "--epochs", "--max-minutes", "--seed", "--dequantize",
                   "--model-dir", "--transforms", "--hidden", "--bins", "--float64", "--batch-size", "--lr",
                   "--patience", "--alpha"):
        assert option in text, option
