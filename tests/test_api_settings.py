"""Configuration: FLOWSERVE_* variables and ``flowserve serve`` options, validated at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from service.http import create_app
from service.settings import Settings, SettingsError, load_settings
from tests.server import ROOT

def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    s = Settings()
    assert (s.model_dir, s.models, s.device, s.host, s.port) == (Path("models"), None, "auto", "127.0.0.1", 8000)
    assert (s.max_batch_rows, s.max_wait_ms, s.max_queue_rows) == (None, 0.0, 1_000_000)
    assert (s.batch_rows_for(torch.device("cpu")), s.batch_rows_for(torch.device("cuda", 0))) == (8192, 65536)
    assert s.torchscript and s.cuda_graphs
    assert Settings(max_batch_rows=100).batch_rows_for(torch.device("cuda")) == 100
    assert (s.request_timeout_s, s.max_rows, s.max_samples, s.max_body_bytes) == (30.0, 1_000_000, 1_000_000, 256 << 20)
    assert s.drain_delay_s == 0.0 and s.api_keys == [] and s.admin_key is None


def test_environment_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWSERVE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("FLOWSERVE_MODELS", "moons, digits-cond")
    monkeypatch.setenv("FLOWSERVE_DEVICE", "CUDA:1")
    monkeypatch.setenv("FLOWSERVE_MAX_WAIT_MS", "2.5")
    s = load_settings(port=9000, max_rows=None)
    assert s.models == ["moons", "digits-cond"] and s.device == "cuda:1" and s.max_wait_ms == 2.5
    assert s.port == 9000 and s.max_rows == 1_000_000 and s.model_dir == tmp_path
    assert load_settings(models="").models is None


@pytest.mark.parametrize("overrides, message", [
    ({"device": "tpu"}, "FLOWSERVE_DEVICE: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    ({"models": "../etc"}, "FLOWSERVE_MODELS: invalid model name '../etc'"),
    ({"models": "a,a"}, "FLOWSERVE_MODELS: names a model twice"),
    ({"model_dir": "/no/such/dir"}, "FLOWSERVE_MODEL_DIR: '/no/such/dir' is not a directory"),
    ({"port": 70000}, "FLOWSERVE_PORT"),
    ({"max_batch_rows": 0}, "FLOWSERVE_MAX_BATCH_ROWS"),
    ({"max_wait_ms": -1}, "FLOWSERVE_MAX_WAIT_MS"),
    ({"request_timeout_s": 0}, "FLOWSERVE_REQUEST_TIMEOUT_S"),
    ({"max_body_bytes": "lots"}, "FLOWSERVE_MAX_BODY_BYTES"),
    ({"log_level": "loud"}, "FLOWSERVE_LOG_LEVEL"),
    ({"max_rows": 10, "max_queue_rows": 5}, "max_rows (10) exceeds max_queue_rows (5)"),
    ({"max_samples": 10, "max_rows": 5, "max_queue_rows": 5}, "max_samples (10) exceeds max_queue_rows (5)"),
])
def test_invalid_settings_name_the_variable(tmp_path: Path, overrides: dict, message: str) -> None:
    overrides.setdefault("model_dir", str(tmp_path))
    with pytest.raises(SettingsError) as err:
        load_settings(**overrides)
    assert message in str(err.value)


def test_torchscript_and_its_deprecated_name_trace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """``FLOWSERVE_TORCHSCRIPT`` turns tracing off; the old ``FLOWSERVE_TRACE`` still does, with a
    warning, unless the new name is set; ``trace`` stays a log level."""
    monkeypatch.setenv("FLOWSERVE_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("FLOWSERVE_TORCHSCRIPT", "false")
    assert load_settings().torchscript is False
    monkeypatch.delenv("FLOWSERVE_TORCHSCRIPT")
    monkeypatch.setenv("FLOWSERVE_TRACE", "false")
    with caplog.at_level("WARNING", logger="flowserve.settings"):
        assert load_settings().torchscript is False
        assert load_settings(torchscript="true").torchscript is True  # an option beats both variables
    assert "FLOWSERVE_TRACE is deprecated: set FLOWSERVE_TORCHSCRIPT instead" in caplog.text
    caplog.clear()
    monkeypatch.setenv("FLOWSERVE_TORCHSCRIPT", "true")
    with caplog.at_level("WARNING", logger="flowserve.settings"):
        assert load_settings().torchscript is True
    assert "FLOWSERVE_TRACE is ignored: FLOWSERVE_TORCHSCRIPT is set" in caplog.text
    assert load_settings(log_level="trace").log_level == "trace"


def test_serve_reads_the_deprecated_trace_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    # a value that fails validation shows the old option reached the torchscript setting, before anything starts
    assert main(["serve", "--model-dir", str(tmp_path), "--trace", "maybe"]) == 2
    err = capsys.readouterr().err
    assert "--trace is deprecated, use --torchscript" in err
    assert "FLOWSERVE_TORCHSCRIPT: Input should be a valid boolean" in err


def test_keys_are_read_comma_separated(tmp_path: Path) -> None:
    s = load_settings(model_dir=str(tmp_path), api_keys=" key-one, key-two ,,", admin_key="the-admin-key")
    assert [k.get_secret_value() for k in s.api_keys] == ["key-one", "key-two"]
    assert s.admin_key.get_secret_value() == "the-admin-key"
    assert "key-one" not in repr(s) and "the-admin-key" not in repr(s)  # secrets stay out of logs
    create_app(s)  # enforced by the app (tests/test_api_auth.py), so accepted


def test_each_app_has_its_own_metrics(tmp_path: Path) -> None:
    a = create_app(load_settings(model_dir=str(tmp_path)))
    b = create_app(load_settings(model_dir=str(tmp_path)))
    ma, mb = a.state.flowserve.metrics, b.state.flowserve.metrics
    ma.requests.labels("m", "1", "log_prob", "200").inc()
    assert ma.registry is not mb.registry
    assert b'flowserve_requests_total{model="m"' in ma.render()
    assert b'flowserve_requests_total{model="m"' not in mb.render()


@pytest.mark.parametrize("argv, env, message", [
    (["--port", "0"], {"FLOWSERVE_DEVICE": "tpu"}, "FLOWSERVE_DEVICE: 'tpu' is not one of auto, cpu, cuda, cuda:N"),
    (["--device", "cuda:99", "--port", "0"], {}, "FLOWSERVE_DEVICE=cuda:99: "),
    (["--max-rows", "10", "--max-queue-rows", "5"], {}, "max_rows (10) exceeds max_queue_rows (5)"),
    (["--model-dir", "/no/such/dir"], {}, "FLOWSERVE_MODEL_DIR: '/no/such/dir' is not a directory"),
], ids=["device", "missing-device", "limits", "model-dir"])
def test_serve_refuses_bad_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str], argv: list[str], env: dict,
                                         message: str) -> None:
    from service.cli import main

    monkeypatch.setenv("FLOWSERVE_MODEL_DIR", str(tmp_path))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["serve", *argv]) == 2  # before anything starts
    err = capsys.readouterr().err
    assert err.startswith("flowserve serve: ") and message in err


def test_serve_stops_when_a_chosen_model_is_missing(tmp_path: Path) -> None:
    env = {"FLOWSERVE_MODEL_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "service", "serve", "--models", "moons,nothere", "--device", "cpu",
                           "--port", "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr  # uvicorn's status for a failed application startup
    assert "no model ['moons', 'nothere'] in the repository" in done.stderr
