"""The Python client is its own distribution (``clients/python``, ``flowserve-client``, import name
``flowserve_client``): it imports without torch and without the server's ``service`` package, its
wheel declares httpx and numpy only and ships ``py.typed``, and the CLI's ``--url`` mode, which needs
it, says how to install it where it is missing (one line, exit status 2)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import flowserve_client

from tests.server import ROOT, free_port

CLIENT = ROOT / "clients" / "python"
PACKAGE = CLIENT / "src" / "flowserve_client"


def _name(requirement: str) -> str:
    """The distribution name at the start of a PEP 508 requirement (``httpx<1,>=0.27`` -> ``httpx``)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return match.group(1).lower()


def test_the_installed_client_is_the_one_in_clients_python() -> None:
    assert Path(flowserve_client.__file__).resolve().parent == PACKAGE.resolve()
    assert not (ROOT / "service" / "client.py").exists()


def test_import_loads_neither_torch_nor_the_server_package() -> None:
    # -I: isolated (no cwd on sys.path, no PYTHON* variables), so `service` is not importable by
    # accident from the repository root; torch *is* installed in this environment, so its absence
    # from sys.modules means the client did not import it.
    probe = ("import sys, flowserve_client; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'service', 'zuko', 'fastapi'}))")
    out = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_of_the_client_imports_torch_or_service_even_lazily() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "client.py", "aio.py", "errors.py", "bodies.py"}
    allowed = {"__future__", "asyncio", "collections", "dataclasses", "email", "io", "random", "time", "typing",
               "httpx", "numpy"}
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text(), str(module))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{module.name}:{node.lineno} imports {roots - allowed}"


def test_distribution_metadata_and_wheel(tmp_path: Path) -> None:
    project = tomllib.loads((CLIENT / "pyproject.toml").read_text())["project"]
    assert project["name"] == "flowserve-client" and project["license"] == "MIT"
    assert sorted(_name(dep) for dep in project["dependencies"]) == ["httpx", "numpy"]
    assert (PACKAGE / "py.typed").exists()
    # the wheel pip would install (built offline with this environment's setuptools)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path), str(CLIENT)], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("flowserve_client-0.1.0-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "flowserve_client/py.typed" in names and "flowserve_client/client.py" in names
    assert not [n for n in names if n.startswith(("service/", "tests/"))]
    requires = sorted(_name(line.split(":", 1)[1]) for line in metadata.splitlines()
                      if line.startswith("Requires-Dist:"))
    assert requires == ["httpx", "numpy"]
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names)


def test_cli_url_mode_without_the_client_says_how_to_install_it() -> None:
    # sys.modules["flowserve_client"] = None makes `import flowserve_client` raise ImportError, as on a
    # machine where only the service was installed (`pip install .`, e.g. the Docker image)
    run = ("import sys; sys.modules['flowserve_client'] = None; from service.cli import main; "
           f"sys.exit(main(['models', '--url', 'http://127.0.0.1:{free_port()}']))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSERVE_")}
    out = subprocess.run([sys.executable, "-c", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert "flowserve models: error: --url needs the flowserve-client package" in out.stderr
    assert "pip install ./clients/python" in out.stderr
