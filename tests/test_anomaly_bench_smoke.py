"""The anomaly benchmark (``python -m bench.anomaly``) runs end to end on one small set and one seed,
scores every detector and writes its table and results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench.anomaly.datasets import SETS, build
from bench.anomaly.run import main

DETECTORS = ["flowserve", "IForest", "LOF", "ECOD", "KDE", "GMM"]


@pytest.mark.parametrize("name", sorted(SETS))
def test_every_set_builds_with_about_five_percent_anomalies(name: str) -> None:
    data = build(name)
    assert data.x.ndim == 2 and data.x.shape[0] == data.y.shape[0]
    assert 0.04 <= data.y.mean() <= 0.06
    assert (data.x.std(axis=0) > 0).all()


def test_the_harness_runs_and_tabulates_every_detector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--sets", "iris", "--seeds", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    (md,) = tmp_path.glob("anomaly-*.md")
    (js,) = tmp_path.glob("anomaly-*.json")
    text = md.read_text()
    assert text.strip().endswith(printed.strip().splitlines()[-1])
    header = next(line for line in text.splitlines() if line.startswith("| set"))
    assert [c.strip() for c in header.strip("|").split("|")][1:] == DETECTORS
    row = next(line for line in text.splitlines() if line.startswith("| iris"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert len(cells) == len(DETECTORS)
    for cell in cells:
        mean = float(re.match(r"\**([0-9.]+) ±", cell).group(1))  # type: ignore[union-attr]
        assert 0.0 <= mean <= 1.0
    result = json.loads(js.read_text())
    assert set(result["auroc"]["iris"]) == set(DETECTORS)
    assert all(len(v) == 1 for v in result["auroc"]["iris"].values())
    assert result["shapes"]["iris"] == [105, 4, 5]


def test_first_seed_runs_a_later_draw_into_its_own_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--first-seed 3 --seeds 1`` is seed 3 of a ``--seeds 4`` run, every detector alike, and is written beside
    the main table, not over it."""
    assert main(["--sets", "iris", "--seeds", "1", "--first-seed", "3", "--out", str(tmp_path)]) == 0
    assert main(["--sets", "iris", "--seeds", "4", "--out", str(tmp_path)]) == 0
    assert "over 1 seeds (3..3)" in capsys.readouterr().out
    (later,) = tmp_path.glob("anomaly-*-seeds-3-3.json")
    (whole,) = (p for p in tmp_path.glob("anomaly-*.json") if "-seeds-" not in p.name)
    one, four = json.loads(later.read_text()), json.loads(whole.read_text())
    assert one["first_seed"] == 3 and four["first_seed"] == 0
    assert {d: v[0] for d, v in one["auroc"]["iris"].items()} == {d: v[3] for d, v in four["auroc"]["iris"].items()}
    with pytest.raises(SystemExit) as refused:
        main(["--sets", "iris", "--first-seed", "-1", "--out", str(tmp_path)])
    assert refused.value.code == 2 and "--first-seed must be >= 0" in capsys.readouterr().err
