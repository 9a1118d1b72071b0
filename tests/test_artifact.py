"""The artifact on disk: save → load gives the same model; every malformed artifact is refused by name."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from service.model.artifact import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    ArtifactError,
    _sha256,
    check_name,
    load_artifact,
    save_artifact,
)
from service.model.density import DensityModel
from service.model.flows import ARCHITECTURES, flow_spec
from service.model.repository import ModelRepository

ARCHS = sorted(ARCHITECTURES)


def _model(name: str = "nsf", context: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0) -> DensityModel:
    torch.manual_seed(seed)
    spec = flow_spec(name, 3, context, transforms=2, hidden_features=[8, 8])
    model = DensityModel(spec, torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.2, 3.0]), dtype=dtype)
    return model.eval().requires_grad_(False)


def _fields(model: DensityModel, name: str = "m", **extra: Any) -> dict[str, Any]:
    d, c = model.features, model.context_features
    return {
        "name": name,
        "flow": model.flow_spec,
        "dtype": str(model.dtype).removeprefix("torch."),
        "feature_names": [f"f{i}" for i in range(d)],
        "context_names": [f"c{i}" for i in range(c)],
        "preprocessing": {"shift": model.shift.double().tolist(), "scale": model.scale.double().tolist()},
        "calibration": [-3.0, -2.0, -1.5],
        **extra,
    }


def _outputs(model: DensityModel, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, model.features, generator=g, dtype=torch.float64).to(model.dtype) * 2
    c = torch.randn(64, model.context_features, generator=g).to(model.dtype) if model.context_features else None
    with torch.inference_mode():
        enc = model.encode(x, c)
        dec = model.decode(enc.z, c)
        smp = model.sample(64, seed=5, context=c)
    return {"z": enc.z, "log_det": enc.log_det, "log_prob": enc.log_prob, "x": dec.x, "sample": smp.x,
            "sample_lp": smp.log_prob}


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A valid artifact ``<tmp>/m/1`` of a small NSF."""
    return save_artifact(tmp_path, _fields(_model()), _model())


def _edit_manifest(version_dir: Path, change: Callable[[dict[str, Any]], None]) -> None:
    path = version_dir / MANIFEST_FILE
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


def _rewrite_weights(version_dir: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors and record the new file's sha256, so only the tensor check can object."""
    tensors = load_file(str(version_dir / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(version_dir / WEIGHTS_FILE))
    digest = _sha256(version_dir / WEIGHTS_FILE)
    _edit_manifest(version_dir, lambda m: m["weights"].update(sha256=digest))


def _refused(version_dir: Path, *fragments: str) -> str:
    with pytest.raises(ArtifactError) as info:
        load_artifact(version_dir)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# -- round trips through the disk ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("context", [0, 2])
def test_every_architecture_saves_and_loads_identically(tmp_path: Path, name: str, context: int) -> None:
    model = _model(name, context, seed=3)
    folder = save_artifact(tmp_path, _fields(model), model)
    assert folder == tmp_path / "m" / "1"
    loaded = load_artifact(folder)
    assert loaded.name == "m" and loaded.version == 1 and loaded.path == folder
    assert loaded.manifest.flow == model.flow_spec
    before, after = _outputs(model), _outputs(loaded.model)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)
    # and the decode inverts the encode (the flow's inverse works after loading)
    assert float((before["x"] - _outputs(model)["x"]).abs().max()) == 0.0


def test_float64_manifest(tmp_path: Path) -> None:
    model = _model("maf", context=1, dtype=torch.float64)
    folder = save_artifact(tmp_path, _fields(model), model)
    assert json.loads((folder / MANIFEST_FILE).read_text())["dtype"] == "float64"
    loaded = load_artifact(folder)
    assert loaded.model.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in loaded.model.parameters())
    before, after = _outputs(model), _outputs(loaded.model)
    for key in before:
        assert after[key].dtype == torch.float64
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=0, msg=key)


def test_float64_shift_keeps_its_precision(tmp_path: Path) -> None:
    """A float64 model keeps a large offset exactly (no float32 rounding on the way)."""
    spec = flow_spec("nsf", 1, 0, transforms=1, hidden_features=[4])
    model = DensityModel(spec, torch.tensor([1e6 + 0.123456789], dtype=torch.float64), torch.tensor([1e-3]),
                         dtype=torch.float64)
    loaded = load_artifact(save_artifact(tmp_path, _fields(model), model))
    assert float(loaded.model.shift[0]) == 1e6 + 0.123456789


def test_versions_count_up_and_the_repository_serves_the_highest(tmp_path: Path) -> None:
    first = save_artifact(tmp_path, _fields(_model(seed=1)), _model(seed=1))
    second = save_artifact(tmp_path, _fields(_model(seed=2)), _model(seed=2))
    assert (first.name, second.name) == ("1", "2")
    repo = ModelRepository(tmp_path)
    assert repo.names() == ["m"] and repo.versions("m") == [1, 2]
    assert repo.load("m").version == 2 and repo.load("m", 1).version == 1
    with pytest.raises(ArtifactError, match=r"has no version 7 \(has \[1, 2\]\)"):
        repo.path("m", 7)
    with pytest.raises(ArtifactError, match="no model 'other'"):
        repo.path("other")
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_calibration_is_loaded(saved: Path) -> None:
    loaded = load_artifact(saved)
    assert loaded.calibration is not None and loaded.calibration.size == 3


# -- refusals -------------------------------------------------------------------------------------------
def test_missing_manifest(saved: Path) -> None:
    (saved / MANIFEST_FILE).unlink()
    _refused(saved, str(saved / MANIFEST_FILE), "missing manifest")


def test_missing_weights(saved: Path) -> None:
    (saved / WEIGHTS_FILE).unlink()
    _refused(saved, str(saved / WEIGHTS_FILE), "missing weights file")


def test_bad_json(saved: Path) -> None:
    (saved / MANIFEST_FILE).write_text('{"name": "m", ')
    _refused(saved, str(saved / MANIFEST_FILE), "not valid JSON")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.update(version="one"), "version"),
        (lambda m: m.update(anomaly_alpha=2.0), "anomaly_alpha"),
        (lambda m: m.update(format_version=99), "format_version"),
        (lambda m: m.update(dtype="float16"), "dtype"),
        (lambda m: m["preprocessing"].update(scale=[1.0, -1.0, 1.0]), "preprocessing.scale"),
        (lambda m: m.update(feature_names=["a", "b"]), "feature_names"),
        (lambda m: m.update(extra_field=1), "extra_field"),
        (lambda m: m["weights"].update(sha256="not-a-digest"), "weights.sha256"),
        (lambda m: m.update(name="../x"), "name"),
    ],
)
def test_bad_manifest_field(saved: Path, change: Callable[[dict[str, Any]], None], field: str) -> None:
    _edit_manifest(saved, change)
    _refused(saved, str(saved / MANIFEST_FILE), "bad manifest", field)


def test_manifest_in_the_wrong_folder(saved: Path) -> None:
    _edit_manifest(saved, lambda m: m.update(version=4))
    _refused(saved, "says version 4", "'1'")


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda f: f.update({"class": "os.system"}), "class 'os.system'"),
        (lambda f: f.update(library="torch"), "library 'torch'"),
        (lambda f: f.update(name="glow"), "flow.name 'glow' is not an allowed architecture"),
        (lambda f: f.update(name="__import__('os')"), "is not an allowed architecture"),
        (lambda f: f["kwargs"].update(activation="os.system"), "flow.kwargs.activation is not an allowed argument"),
        (lambda f: f["kwargs"].update(transforms="4"), "flow.kwargs.transforms has type str"),
        (lambda f: f["kwargs"].update(hidden_features=[8, -1]), "hidden_features must be a list of positive integers"),
        (lambda f: f.update(kwargs=[]), "flow.kwargs must be an object"),
    ],
)
def test_flow_outside_the_allow_list(saved: Path, change: Callable[[dict[str, Any]], None], fragment: str) -> None:
    _edit_manifest(saved, lambda m: change(m["flow"]))
    message = _refused(saved, str(saved / MANIFEST_FILE), fragment)
    assert "bad flow" in message or "bad manifest" in message


def test_tensor_of_the_wrong_shape(saved: Path) -> None:
    key = "flow.transform.transforms.0.hyper.0.weight"
    _rewrite_weights(saved, lambda t: t.update({key: torch.zeros(9, 9)}))
    _refused(saved, str(saved / WEIGHTS_FILE), repr(key), "shape (9, 9)")


def test_tensor_of_an_unexpected_name(saved: Path) -> None:
    _rewrite_weights(saved, lambda t: t.update({"evil.payload": torch.zeros(2)}))
    _refused(saved, str(saved / WEIGHTS_FILE), "unexpected ['evil.payload']")


def test_missing_tensor(saved: Path) -> None:
    _rewrite_weights(saved, lambda t: t.pop("shift"))
    _refused(saved, str(saved / WEIGHTS_FILE), "missing ['shift']")


def test_tensor_of_the_wrong_dtype(saved: Path) -> None:
    _rewrite_weights(saved, lambda t: t.update(scale=t["scale"].double()))
    _refused(saved, str(saved / WEIGHTS_FILE), "'scale' has dtype torch.float64")


def test_sha256_mismatch(saved: Path) -> None:
    tensors = load_file(str(saved / WEIGHTS_FILE))
    tensors["scale"] = tensors["scale"] * 2  # a silent change of the weights
    save_file(tensors, str(saved / WEIGHTS_FILE))
    message = _refused(saved, str(saved / WEIGHTS_FILE), "sha256", "does not match the manifest's")
    assert json.loads((saved / MANIFEST_FILE).read_text())["weights"]["sha256"] in message


def test_weights_that_are_not_safetensors(saved: Path) -> None:
    (saved / WEIGHTS_FILE).write_bytes(b"\x80\x04pickle-ish bytes")
    digest = _sha256(saved / WEIGHTS_FILE)
    _edit_manifest(saved, lambda m: m["weights"].update(sha256=digest))
    _refused(saved, str(saved / WEIGHTS_FILE), "not a readable safetensors file")


BAD_NAMES = ["../x", "a/b", "..", "", ".", ".hidden", "a\\b", "x" * 65, "a..b", "/abs", "name with space"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_with_path_tricks(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid model name") as info:
        check_name(name)
    assert repr(name) in str(info.value)
    with pytest.raises(ValueError, match="invalid model name"):
        save_artifact(tmp_path / "repo", _fields(_model(), name=name), _model())
    with pytest.raises(ValueError, match="invalid model name"):
        ModelRepository(tmp_path / "repo").path(name)
    assert not (tmp_path / "repo").exists() or not any((tmp_path / "repo").iterdir())
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name", ["moons", "digits-cond", "a.b_c-1", "M2"])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


def test_folder_of_another_name(saved: Path, tmp_path: Path) -> None:
    moved = tmp_path / "other" / "1"
    moved.parent.mkdir()
    saved.rename(moved)
    _refused(moved, "says name 'm'", "'other'")


def test_hidden_and_non_integer_folders_are_not_versions(saved: Path) -> None:
    (saved.parent / ".3-tmp").mkdir()
    (saved.parent / "latest").mkdir()
    assert ModelRepository(saved.parent.parent).versions("m") == [1]


def test_weights_are_safetensors_not_pickle(saved: Path) -> None:
    head = (saved / WEIGHTS_FILE).read_bytes()[:16]
    assert not head.startswith(b"\x80")  # no pickle protocol header
    header_len = int.from_bytes(head[:8], "little")
    header = json.loads((saved / WEIGHTS_FILE).read_bytes()[8 : 8 + header_len])
    assert "shift" in header and np.all([isinstance(v, dict) for v in header.values()])
