"""``flowserve models``, ``score``, ``explain`` and ``sample``: real subprocesses, real files, real models and a real
server (the session's :mod:`tests.conftest`); the in-process and ``--url`` paths give the same
numbers. Refusals are checked through :func:`service.cli.main` (the same code, without a process
start each) and once through a subprocess, for the absence of a traceback."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from flowserve_client import Client

from service.model.calibration import Calibration
from service.cli import main
from service.serving.inprocess import LocalModel
from tests.server import ROOT, ServerProcess, free_port, start_server
from tests.tolerance import BATCH_ULPS, assert_batch_invariant, ulp_tolerance



@pytest.fixture(autouse=True)
def no_flowserve_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process calls see no $FLOWSERVE_URL / _MODEL_DIR / _API_KEY of the caller's shell."""
    for name in ("FLOWSERVE_URL", "FLOWSERVE_MODEL_DIR", "FLOWSERVE_API_KEY"):
        monkeypatch.delenv(name, raising=False)


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m service ARGS`` with no FLOWSERVE_* variables from the caller's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "service", *map(str, args)], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def read_csv(path: Path | str) -> dict[str, list[str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {name: [r[j] for r in rows[1:]] for j, name in enumerate(rows[0])}


def floats(column: list[str]) -> np.ndarray:
    return np.array([float(v) for v in column])


def calibration(repo: Path, name: str, version: int) -> np.ndarray:
    return np.sort(json.loads((repo / name / str(version) / "model.json").read_text())["calibration"])


def moons_points(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    x, _ = make_moons(n_samples=n, noise=0.08, random_state=seed)
    return np.vstack([x, [[4.0, 4.0], [-3.0, 3.0], [0.5, -3.0]]])  # three points far from the moons


# -- models ------------------------------------------------------------------------------------------------
def test_models_table_card_and_server_agree(model_repo: Path, server: ServerProcess) -> None:
    local = cli("models", "--model-dir", model_repo)
    remote = cli("models", "--url", server.url)
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    lines = local.stdout.splitlines()
    assert lines[0].split() == ["name", "version", "versions", "features", "context", "flow"]
    assert [line.split() for line in lines[1:]] == [["cond", "1", "1", "2", "3", "maf"],
                                                   ["moons", "2", "1,2", "2", "0", "nsf"],
                                                   ["nocal", "1", "1", "2", "0", "nsf"]]
    assert remote.stdout == local.stdout

    from service.commands.models import local_card

    with Client(server.url) as client:
        for name, version in (("moons", None), ("moons", 1), ("cond", None), ("nocal", None)):
            mine, theirs = local_card(model_repo, name, version), client.card(name, version)
            shared = set(mine) & set(theirs)
            assert {"feature_names", "context_names", "flow_config", "calibration", "training", "exactness",
                    "sha256", "created_at", "versions"} <= shared
            assert {k: mine[k] for k in shared} == {k: theirs[k] for k in shared}


def test_models_card_text_and_json(model_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = cli("models", "cond", "--model-dir", model_repo)
    assert text.returncode == 0, text.stderr
    assert "context_names: [\"c0\", \"c1\", \"c2\"]" in text.stdout and "calibration:" in text.stdout
    assert main(["models", "moons", "--version", "1", "--json", "--model-dir", str(model_repo)]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "moons" and card["version"] == 1 and card["versions"] == [1, 2]
    assert card["calibration"]["size"] == calibration(model_repo, "moons", 1).size


# -- score -------------------------------------------------------------------------------------------------
def test_score_in_process_and_through_server_agree(model_repo: Path, server: ServerProcess, tmp_path: Path) -> None:
    x = moons_points(200, seed=5)
    data = tmp_path / "points.csv"
    with open(data, "w", newline="") as f:  # columns in another order than the model's: read by name
        w = csv.writer(f)
        w.writerow(["x1", "x0"])
        w.writerows([[repr(b), repr(a)] for a, b in x.tolist()])

    local = cli("score", data, "--model", "moons", "--model-dir", model_repo, "--batch-size", "64")
    remote = cli("score", data, "--model", "moons", "--url", server.url, "--batch-size", "50",
                 "--output", tmp_path / "remote.npy", "--quiet")
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    assert remote.stdout == "" and remote.stderr == ""  # --quiet: no summary; output went to the file

    out = read_csv(_write(tmp_path / "local.csv", local.stdout))
    assert list(out) == ["log_prob", "score", "p_value", "is_anomaly"] and len(out["log_prob"]) == len(x)
    lp = floats(out["log_prob"])
    assert set(out["is_anomaly"]) <= {"true", "false"}
    flags = np.array([v == "true" for v in out["is_anomaly"]])
    threshold = Calibration.from_values(calibration(model_repo, "moons", 2)).threshold(0.01)
    assert local.stderr == (f"moons v2: {flags.sum()} of {len(x)} rows are anomalies at alpha=0.01 "
                            f"(log_prob below {threshold})\n")

    table = np.load(tmp_path / "remote.npy")
    assert table.dtype.names == ("log_prob", "score", "p_value", "is_anomaly")
    assert table["is_anomaly"].dtype == np.bool_ and table["p_value"].dtype == np.float64
    assert_batch_invariant(table["log_prob"], lp, np.float32)
    np.testing.assert_array_equal(table["is_anomaly"], flags)

    # the numbers are the model's: its log-density, and the conformal p-value against its calibration set
    model = LocalModel.load(model_repo, "moons")
    assert_batch_invariant(lp, model.log_prob(x), np.float32)
    np.testing.assert_array_equal(floats(out["score"]), -lp)
    cal = calibration(model_repo, "moons", 2)
    np.testing.assert_array_equal(floats(out["p_value"]), (1 + np.searchsorted(cal, lp, side="right")) / (cal.size + 1))
    np.testing.assert_array_equal(flags, floats(out["p_value"]) <= 0.01)
    assert flags[-3:].all() and flags[:-3].mean() < 0.05  # the far points, and few of the moons


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_score_conditional_context_by_column_file_and_npz(model_repo: Path, server: ServerProcess,
                                                          tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    label = rng.integers(0, 3, size=40)
    centres = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    x = centres[label] + 0.4 * rng.standard_normal((40, 2))
    c = np.eye(3)[label]
    x[0] = [6.0, -6.0]  # far from every blob

    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["c2", "x0", "c0", "x1", "c1"])
        w.writerows([[c[i, 2], x[i, 0], c[i, 0], x[i, 1], c[i, 1]] for i in range(len(x))])
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "context.csv", c, delimiter=",", header="c0,c1,c2", comments="")
    np.savez(tmp_path / "both.npz", inputs=x, context=c)

    by_column = cli("score", tmp_path / "rows.csv", "--model", "cond", "--model-dir", model_repo,
                    "--alpha", "0.05", "-o", tmp_path / "a.csv")
    by_file = cli("score", tmp_path / "x.npy", "--model", "cond", "--url", server.url, "--context-file",
                  tmp_path / "context.csv", "--alpha", "0.05", "-o", tmp_path / "b.npz")
    assert by_column.returncode == 0 and by_file.returncode == 0, by_column.stderr + by_file.stderr
    a, b = read_csv(tmp_path / "a.csv"), np.load(tmp_path / "b.npz")
    assert_batch_invariant(floats(a["log_prob"]), b["log_prob"], np.float32)
    np.testing.assert_array_equal(np.array(a["is_anomaly"]) == "true", b["is_anomaly"])
    expected = LocalModel.load(model_repo, "cond").score(x, c, alpha=0.05)
    assert_batch_invariant(b["log_prob"], expected["log_prob"], np.float32)
    assert b["is_anomaly"][0] and expected["is_anomaly"][0]

    table = np.empty(len(x), dtype=[("c1", "f8"), ("x1", "f4"), ("x0", "f8"), ("c0", "i8"), ("c2", "f8")])
    for j, name in enumerate(["x0", "x1"]):
        table[name] = x[:, j]
    for j, name in enumerate(["c0", "c1", "c2"]):
        table[name] = c[:, j]
    np.save(tmp_path / "table.npy", table)
    for source in ("both.npz", "table.npy"):  # the same CLI code in this process, to save a start-up
        out = tmp_path / f"{source}.csv"
        assert main(["score", str(tmp_path / source), "--model", "cond", "--model-dir", str(model_repo),
                     "-q", "-o", str(out)]) == 0
        assert_batch_invariant(floats(read_csv(out)["log_prob"]), b["log_prob"], np.float32)


# -- explain -----------------------------------------------------------------------------------------------
AR_FEATURES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def ar_repo(tmp_path_factory: pytest.TempPathFactory, blob_rows: tuple[np.ndarray, np.ndarray]) -> Path:
    """A repository with ``ar``: one MAF transform (identity order) on 3-D blobs, so explanations are exact."""
    from service.training.data import Dataset
    from service.training.fit import TrainConfig
    from service.training.run import train_and_save

    root = tmp_path_factory.mktemp("ar-models")
    config = TrainConfig(flow="maf", transforms=1, hidden_features=[16, 16], epochs=8, batch_size=128,
                         patience=50, max_minutes=0.5, seed=0)
    train_and_save(Dataset(blob_rows[0], None, AR_FEATURES, [], "blobs"), "ar", root, config)
    return root


@pytest.fixture(scope="module")
def ar_server(ar_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(ar_repo, tmp_path_factory.mktemp("ar-server")) as proc:
        yield proc


def test_explain_autoregressive_rows_sum_to_log_prob(ar_repo: Path, ar_server: ServerProcess, tmp_path: Path) -> None:
    x = np.random.default_rng(4).normal(scale=2.0, size=(150, 3))
    x[0] = [9.0, -9.0, 9.0]  # far out: large terms
    data = tmp_path / "rows.csv"
    with open(data, "w", newline="") as f:  # columns in another order than the model's: read by name
        w = csv.writer(f)
        w.writerow(["c", "a", "b"])
        w.writerows([[repr(r[2]), repr(r[0]), repr(r[1])] for r in x.tolist()])

    local = cli("explain", data, "--model", "ar", "--model-dir", ar_repo, "--batch-size", "64")
    remote = cli("explain", data, "--model", "ar", "--url", ar_server.url, "--batch-size", "40",
                 "-o", tmp_path / "remote.npz")
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    summary = "ar v1: 150 rows explained by chain-rule (exact: each row's contributions sum to its log_prob)\n"
    assert local.stderr == summary and remote.stderr == summary

    out = read_csv(_write(tmp_path / "local.csv", local.stdout))
    assert list(out) == ["log_prob", *AR_FEATURES] and len(out["log_prob"]) == len(x)
    lp = floats(out["log_prob"])
    terms = np.stack([floats(out[name]) for name in AR_FEATURES], axis=1)
    # the chain rule: log p(x) = sum_i log p(x_i | x_<i), up to float32 rounding of D terms' magnitudes
    atol = ulp_tolerance(np.abs(terms).sum(axis=1), BATCH_ULPS, np.float32)
    np.testing.assert_allclose(terms.sum(axis=1), lp, rtol=0, atol=atol)
    model = LocalModel.load(ar_repo, "ar")
    assert_batch_invariant(lp, model.log_prob(x), np.float32)  # and log_prob is the model's

    npz = np.load(tmp_path / "remote.npz")
    assert npz["method"].item() == "chain-rule" and npz["exact"].item() is True
    assert npz["feature_names"].tolist() == AR_FEATURES and npz["contributions"].shape == (150, 3)
    assert_batch_invariant(npz["contributions"], terms, np.float32)
    assert_batch_invariant(npz["log_prob"], lp, np.float32)
    assert_batch_invariant(npz["contributions"].sum(axis=1), npz["log_prob"], np.float32)


def test_explain_occlusion_in_process_and_through_server_agree(model_repo: Path, server: ServerProcess,
                                                               tmp_path: Path) -> None:
    x = moons_points(60, seed=8)
    np.save(tmp_path / "x.npy", x)
    local = cli("explain", tmp_path / "x.npy", "--model", "moons", "--model-dir", model_repo, "-o", tmp_path / "a.npy")
    assert local.returncode == 0, local.stderr
    assert "explained by occlusion (approximate: the contributions need not sum to log_prob)" in local.stderr
    out = tmp_path / "b.csv"  # the same CLI code in this process, to save a start-up
    assert main(["explain", str(tmp_path / "x.npy"), "--model", "moons", "--url", server.url, "-q",
                 "-o", str(out)]) == 0
    a, b = np.load(tmp_path / "a.npy"), read_csv(out)
    assert a.dtype.names == ("log_prob", "x0", "x1") and list(b) == ["log_prob", "x0", "x1"]
    for name in a.dtype.names:
        assert_batch_invariant(floats(b[name]), a[name], np.float32, err_msg=name)
    with Client(server.url) as client:  # the numbers are the server's /explain
        want = client.explain("moons", x)
    assert want["method"] == "occlusion" and want["exact"] is False
    assert_batch_invariant(np.stack([a["x0"], a["x1"]], axis=1), want["contributions"], np.float32)
    assert_batch_invariant(a["log_prob"], want["log_prob"], np.float32)
    # occlusion terms are no split of log_prob: the check of the exact test above tells them apart
    sums = a["x0"] + a["x1"]
    assert np.abs(sums - a["log_prob"]).max() > 1.0


# -- sample ------------------------------------------------------------------------------------------------
def test_sample_in_process_and_through_server_agree(model_repo: Path, server: ServerProcess, tmp_path: Path) -> None:
    local = cli("sample", "--model", "moons", "-n", "300", "--seed", "5", "--batch-size", "128",
                "--model-dir", model_repo, "--log-prob", "-o", tmp_path / "a.csv")
    remote = cli("sample", "--model", "moons", "-n", "300", "--seed", "5", "--batch-size", "128",
                 "--url", server.url, "-o", tmp_path / "b.npz")
    assert local.returncode == 0 and remote.returncode == 0, local.stderr + remote.stderr
    a, b = read_csv(tmp_path / "a.csv"), np.load(tmp_path / "b.npz")
    assert list(a) == ["x0", "x1", "log_prob"]
    xa = np.stack([floats(a["x0"]), floats(a["x1"])], axis=1)
    assert xa.shape == (300, 2) and b["samples"].shape == (300, 2)
    np.testing.assert_allclose(xa, b["samples"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(floats(a["log_prob"]), b["log_prob"], rtol=1e-5, atol=1e-6)
    assert np.unique(xa, axis=0).shape[0] == 300  # chunks draw different noise

    with Client(server.url) as client:  # chunk 0 is the server's own /sample for that seed
        first = client.sample("moons", 128, seed=5)
        np.testing.assert_allclose(xa[:128], first, rtol=1e-6)
        # each row's log_prob is the model's log-density there
        np.testing.assert_allclose(floats(a["log_prob"]), client.log_prob("moons", xa), rtol=1e-4, atol=1e-4)


def test_sample_conditional_and_npy(model_repo: Path, tmp_path: Path) -> None:
    out = cli("sample", "--model", "cond", "-n", "400", "--seed", "1", "--context", "c0=0,c1=1,c2=0",
              "--temperature", "0.8", "--model-dir", model_repo, "-o", tmp_path / "s.npy")
    assert out.returncode == 0, out.stderr
    x = np.load(tmp_path / "s.npy")
    assert x.shape == (400, 2) and x.dtype == np.float64
    model = LocalModel.load(model_repo, "cond")
    # chunk 0 (up to --batch-size rows) is exactly what /sample draws for that seed, context by name
    expected = model.sample(400, seed=1, temperature=0.8, context=np.array([[0.0, 1.0, 0.0]]))["samples"]
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    other = model.sample(400, seed=1, temperature=0.8, context=np.array([[1.0, 0.0, 0.0]]))["samples"]
    assert np.abs(x - other).max() > 1e-3  # the context reached the flow


# -- help and refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["models", "score", "explain", "sample"])
def test_help_has_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"flowserve {command}" in text and "examples:" in text and "--url" in text


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "ok.csv").write_text("x0,x1\n0.5,0.25\n")
    (d / "columns.csv").write_text("x0,y\n0.5,0.25\n")
    (d / "word.csv").write_text("x0,x1\n0.5,0.25\n0.1,abc\n")
    (d / "nan.csv").write_text("x0,x1\n0.5,nan\n")
    (d / "ragged.csv").write_text("x0,x1\n0.5\n")
    (d / "fake.npy").write_text("not numpy")
    np.save(d / "wide.npy", np.zeros((3, 5)))
    (d / "rows.txt").write_text("0.5 0.25\n")
    return d


CASES = [
    (["score", "{d}/ok.csv", "--model", "nope"], "no model 'nope' in"),
    (["score", "{d}/ok.csv", "--model", "moons", "--version", "9"], "has no version 9"),
    (["score", "{d}/columns.csv", "--model", "moons"], "missing column(s) ['x1'], unknown column(s) ['y']"),
    (["score", "{d}/word.csv", "--model", "moons"], "line 3, column 'x1': 'abc' is not a finite number"),
    (["score", "{d}/nan.csv", "--model", "moons"], "line 2, column 'x1': 'nan' is not a finite number"),
    (["score", "{d}/ragged.csv", "--model", "moons"], "line 2 has 1 fields, the header has 2"),
    (["score", "{d}/fake.npy", "--model", "moons"], "not a .npy file"),
    (["score", "{d}/wide.npy", "--model", "moons"], "2-D array with 2 columns, got shape (3, 5)"),
    (["score", "{d}/rows.txt", "--model", "moons"], "unsupported file type '.txt'"),
    (["score", "{d}/missing.csv", "--model", "moons"], "missing.csv: no such file"),
    (["score", "{d}/ok.csv", "--model", "cond"], "model 'cond' is conditional"),
    (["score", "{d}/ok.csv", "--model", "nocal"], "has no calibration set"),
    (["score", "{d}/ok.csv", "--model", "moons", "--alpha", "1.5"], "--alpha: Input should be less than 1"),
    (["explain", "{d}/ok.csv", "--model", "cond"], "model 'cond' is conditional"),
    (["explain", "{d}/wide.npy", "--model", "moons"], "2-D array with 2 columns, got shape (3, 5)"),
    (["explain", "{d}/ok.csv", "--model", "moons", "-o", "{d}/out.txt"], "unsupported output type"),
    (["explain", "{d}/ok.csv", "--model", "moons", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["sample", "--model", "moons", "-n", "0"], "-n: Input should be greater than or equal to 1"),
    (["sample", "--model", "moons", "-n", "2", "--temperature", "0"], "--temperature: Input should be greater than 0"),
    (["sample", "--model", "moons", "-n", "2", "--seed", "-1"], "--seed: Input should be greater than or equal to 0"),
    (["sample", "--model", "cond", "-n", "3", "--context", "c0=1"], "missing ['c1', 'c2']"),
    (["sample", "--model", "moons", "-n", "3", "--context", "1"], "this model takes no context"),
    (["models", "nope"], "no model 'nope' in the repository"),
]


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_refusals_are_one_line_with_status_2(argv: list[str], message: str, model_repo: Path, bad_files: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = [a.format(d=bad_files) for a in argv] + ["--model-dir", str(model_repo)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"flowserve {argv[0]}: error: "), err
    assert message in err, err


@pytest.mark.parametrize(("argv", "message"), [
    (["score", "{d}/ok.csv", "--model", "nope"], "server answered 404 Not Found: no model named 'nope'"),
    (["score", "{d}/ok.csv", "--model", "moons", "--version", "7"], "server answered 404"),
    (["score", "{d}/ok.csv", "--model", "nocal"], "server answered 409"),
    (["sample", "--model", "cond", "-n", "2"], "model 'cond' is conditional"),
    (["explain", "{d}/ok.csv", "--model", "nope"], "server answered 404 Not Found: no model named 'nope'"),
])
def test_refusals_through_the_server(argv: list[str], message: str, server: ServerProcess, bad_files: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main([a.format(d=bad_files) for a in argv] + ["--url", server.url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_unreachable_server_and_no_traceback(bad_files: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = cli("score", bad_files / "ok.csv", "--model", "moons", "--url", url)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"flowserve score: error: cannot reach {url}") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr
