"""``/docs`` and ``/redoc`` work without internet (issue 9, item 9).

The pages load only files this package serves (checked byte for byte against the vendored ones),
the files ship in a built wheel with their licences, and a real browser (Debian's headless
chromium, with every host but 127.0.0.1 unresolvable) renders every documented operation on both
pages from a real server on the default models, while its network log shows that no request the
pages made left the server. Swagger UI opens with ``{name}`` prefilled with a model the server holds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from service.http.docs import ASSETS_PATH, CONTENT_SECURITY_POLICY, STATIC_DIR
from tests.server import ROOT, ServerProcess, start_server

DEFAULT_MODELS = ROOT / "models"
ASSETS = ["swagger-ui/swagger-ui-bundle.js", "swagger-ui/swagger-ui.css", "swagger-ui/favicon-32x32.png",
          "redoc/redoc.standalone.js"]
LICENCES = ["swagger-ui/LICENSE", "swagger-ui/NOTICE", "redoc/LICENSE"]
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.skipif(not (DEFAULT_MODELS / "moons").is_dir(), reason="the default models are not built")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with start_server(DEFAULT_MODELS, tmp_path_factory.mktemp("docs")) as proc:
        yield proc


@pytest.fixture(scope="module")
def document(server: ServerProcess) -> dict[str, Any]:
    return httpx.get(server.url + "/openapi.json", timeout=30).json()


def _references(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: *['"]([^'"]+)['"]""", html) \
        + re.findall(r"""spec-url=["']([^"']+)["']""", html)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_pages_load_only_packaged_assets(server: ServerProcess, page: str) -> None:
    with server.client() as client:
        answer = client.get(page)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        refs = _references(answer.text)
        assert "/openapi.json" in refs and any(r.startswith(ASSETS_PATH) for r in refs), refs
        for ref in refs:
            assert ref.startswith("/") and not ref.startswith("//"), f"{page} loads {ref} from elsewhere"
            fetched = client.get(ref)
            assert fetched.status_code == 200, ref
            if ref.startswith(ASSETS_PATH):
                assert fetched.content == (STATIC_DIR / ref[len(ASSETS_PATH) + 1:]).read_bytes(), ref


def test_vendored_files_and_licences_present() -> None:
    for name in ASSETS + LICENCES:
        assert (STATIC_DIR / name).stat().st_size > 0, name
    assert "Apache License" in (STATIC_DIR / "swagger-ui/LICENSE").read_text()
    assert "MIT License" in (STATIC_DIR / "redoc/LICENSE").read_text()


def test_wheel_ships_the_assets(tmp_path: Path) -> None:
    """A non-editable install has the files: build a wheel from a copy of the sources and look inside."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "service", source / "service", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (tmp_path / "dist").glob("flowserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ASSETS + LICENCES:
        assert f"service/http/static/{name}" in names, name


# -- a real browser, offline ----------------------------------------------------------------------------
def render(url: str, tmp_path: Path) -> tuple[str, list[str]]:
    """The DOM of ``url`` after up to 20 s of virtual time in headless chromium that can resolve no
    host but 127.0.0.1, and the URLs of every request the page itself made (from the net log: the
    requests with the page as initiator, and the navigation; the browser's own background requests
    have no initiator and are not the page's)."""
    netlog = tmp_path / "net.json"
    command = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
               f"--log-net-log={netlog}", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--virtual-time-budget=20000", "--dump-dom", url]
    run = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    events = json.loads(netlog.read_text())["events"]
    page = []
    for event in events:
        params = event.get("params", {})
        initiator = params.get("initiator")
        if "url" in params and initiator is not None and (initiator != "not an origin" or params["url"] == url):
            page.append(params["url"])
    return run.stdout, page


def _documented(document: dict[str, Any]) -> list[tuple[str, str]]:
    return [(path, op["operationId"]) for path, item in document["paths"].items() for op in item.values()]


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed (scripts/system-deps.sh installs it with apt-get)")
def test_browser_renders_swagger_ui_offline(server: ServerProcess, document: dict[str, Any], tmp_path: Path) -> None:
    dom, requests = render(server.url + "/docs#/operations/log_prob", tmp_path)
    shown = re.findall(r'class="opblock-summary-path" data-path="([^"]+)"', dom)
    assert sorted(shown) == sorted(path for path, _ in _documented(document)), shown
    # the deep-linked operation is open, in "Try it out", with {name} filled with a model the server holds
    held = {m["name"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["models"]}
    prefilled = re.findall(r'placeholder="name" value="([^"]*)"', dom)
    assert prefilled and set(prefilled) <= held, prefilled
    _only_loopback(server, requests, ["/docs", "/openapi.json", f"{ASSETS_PATH}/swagger-ui/swagger-ui-bundle.js"])


@pytest.mark.skipif(BROWSER is None, reason="chromium is not installed (scripts/system-deps.sh installs it with apt-get)")
def test_browser_renders_redoc_offline(server: ServerProcess, document: dict[str, Any], tmp_path: Path) -> None:
    dom, requests = render(server.url + "/redoc", tmp_path)
    sections = set(re.findall(r'data-section-id="(?:tag/[^/"]+/)?operation/([^"]+)"', dom))
    assert sections == {op for _, op in _documented(document)}, sections
    assert "API docs by Redocly" in dom  # the sidebar rendered; its logo from cdn.redoc.ly was blocked
    _only_loopback(server, requests, ["/redoc", "/openapi.json", f"{ASSETS_PATH}/redoc/redoc.standalone.js"])


def _only_loopback(server: ServerProcess, requests: list[str], expected: list[str]) -> None:
    outside = [url for url in requests if not url.startswith(server.url + "/")]
    assert not outside, f"the page requested {outside}"
    paths = {url[len(server.url):].split("#")[0] for url in requests}
    assert set(expected) <= paths, paths
