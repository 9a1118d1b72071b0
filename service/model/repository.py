"""The model repository (as in Triton): one folder per model, one integer folder per version.

```
models/
  moons/1/model.json, weights.safetensors
  moons/2/...          # the highest version is the default
```
Hidden folders (a version being written) and non-integer folders are ignored.
"""

from __future__ import annotations

from pathlib import Path

import torch

from service.model.artifact import MANIFEST_FILE, ArtifactError, LoadedArtifact, check_name, load_artifact

__all__ = ["ModelRepository"]


class ModelRepository:
    """Read-only view of a model repository folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def names(self) -> list[str]:
        """Model names that have at least one version folder with a manifest."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith(".") and self.versions(p.name):
                out.append(p.name)
        return out

    def versions(self, name: str) -> list[int]:
        """The integer versions of ``name``, ascending (empty when there is none)."""
        check_name(name)
        model_dir = self.root / name
        if not model_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in model_dir.iterdir()
            if p.is_dir() and p.name.isdigit() and (p / MANIFEST_FILE).is_file()
        )

    def path(self, name: str, version: int | None = None) -> Path:
        """The folder of ``name`` at ``version`` (the highest when ``None``)."""
        versions = self.versions(name)
        if not versions:
            raise ArtifactError(self.root / name, f"no model {name!r} in the repository")
        if version is None:
            version = versions[-1]
        if version not in versions:
            raise ArtifactError(self.root / name / str(version), f"model {name!r} has no version {version} (has {versions})")
        return self.root / name / str(version)

    def load(self, name: str, version: int | None = None, device: torch.device | str = "cpu") -> LoadedArtifact:
        """Load and verify ``name`` at ``version`` (the highest when ``None``)."""
        return load_artifact(self.path(name, version), device=device)
