"""flowserve models [NAME]: the models of a repository or a server, or the card of one.

Without --url it reads the manifests of --model-dir (weights are not loaded); with
--url it asks the server (GET /v1/models, GET /v1/models/{name}).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.commands.common import CommandError, add_source_arguments, client_for, guarded

__all__ = ["add_parser", "local_card", "local_models", "run"]

EXAMPLES = """\
examples:
  flowserve models                                  # table of the models in ./models
  flowserve models moons                            # the card of moons (its latest version)
  flowserve models moons --version 1 --json         # the card of moons v1 as JSON
  flowserve models --url http://127.0.0.1:8000      # what a running server hosts
"""

COLUMNS = ("name", "version", "versions", "features", "context", "flow")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models", help="list the models, or show the card of one",
        description=__doc__.split("\n\n", 1)[1], epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", default=None, help="show the card of this model")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_source_arguments(p)
    p.set_defaults(run=run)
    return p


# -- in process: from the manifests ------------------------------------------------------------------
def local_models(model_dir: Path) -> list[dict[str, Any]]:
    """The list entry (as ``GET /v1/models`` has it) of every model in the repository ``model_dir``."""
    from service.model.repository import ModelRepository

    repo = ModelRepository(model_dir)
    if not repo.root.is_dir():
        raise CommandError(f"{model_dir}: no such model repository (give --model-dir or --url)")
    return [_entry(repo, name, None) for name in repo.names()]


def local_card(model_dir: Path, name: str, version: int | None) -> dict[str, Any]:
    """The model card of ``name`` at ``version`` (latest when ``None``), from its manifest."""
    from service.model.artifact import read_manifest
    from service.model.calibration import Calibration
    from service.model.repository import ModelRepository

    repo = ModelRepository(model_dir)
    card = _entry(repo, name, version)
    m = read_manifest(repo.path(name, version))
    calibration = Calibration.from_values(m.calibration) if m.calibration else None
    card.update(
        feature_names=list(m.feature_names),
        context_names=list(m.context_names),
        description=m.description,
        flow_config=m.flow,
        dtype=m.dtype,
        base=m.base,
        training=m.training,
        calibration=calibration.summary() if calibration else None,
        anomaly_alpha=m.anomaly_alpha,
        exactness=m.exactness,
        notes=list(m.notes),
        sha256=m.weights.sha256,
        created_at=m.created_at,
    )
    return card


def _entry(repo: Any, name: str, version: int | None) -> dict[str, Any]:
    from service.model.artifact import read_manifest

    m = read_manifest(repo.path(name, version))
    return {"name": m.name, "version": m.version, "versions": repo.versions(name), "features": m.features,
            "context_features": m.context_features, "flow": m.flow.get("name")}


# -- printing -----------------------------------------------------------------------------------------
def _table(models: list[dict[str, Any]]) -> str:
    rows = [COLUMNS] + [
        (str(m["name"]), str(m["version"]), ",".join(map(str, m.get("versions", []))), str(m["features"]),
         str(_count(m.get("context_features", 0))), str(m.get("flow", "")))
        for m in models
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else int(value or 0)


def _outline(value: Any, indent: int = 0) -> list[str]:
    """A nested card as indented ``key: value`` lines (lists of scalars on one line)."""
    pad = "  " * indent
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{pad}{key}:")
            lines.extend(_outline(item, indent + 1))
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            lines.append(f"{pad}{key}:")
            for i, entry in enumerate(item):
                lines.append(f"{pad}  - [{i}]")
                lines.extend(_outline(entry, indent + 2))
        else:
            text = json.dumps(item) if not isinstance(item, str) else item
            lines.append(f"{pad}{key}: {text}")
    return lines


@guarded
def run(args: argparse.Namespace) -> int:
    if args.version is not None and not args.name:
        raise CommandError("--version needs a model NAME")
    if args.url:
        with client_for(args) as client:
            result = client.card(args.name, args.version) if args.name else client.models()
    elif args.name:
        result = local_card(args.model_dir, args.name, args.version)
    else:
        result = local_models(args.model_dir)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        sys.stdout.write("\n")
    elif args.name:
        print("\n".join(_outline(result)))
    elif result:
        print(_table(result))
    else:
        where = args.url or args.model_dir
        print(f"no models in {where}", file=sys.stderr)
    return 0
