"""The /ui dashboard in a real browser: Debian's chromium, headless, driven by selenium + chromedriver.

One real server on the committed default models (moons, digits, digits-cond) on a loopback port; each
test opens a page, waits until it has drawn, and checks what it shows against the same server's
public API (the numbers on the page come from those answers), that the browser console holds no
error, and saves a full-page screenshot (to a temporary folder, and also to
``$FLOWSERVE_UI_SCREENSHOTS`` when set: ``FLOWSERVE_UI_SCREENSHOTS=docs/screenshots`` refreshes the
README's screenshots).

Skipped, with a message, only where chromium or chromedriver is not installed (``apt-get install
chromium chromium-driver``; ``make test`` does it through scripts/system-deps.sh).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.server import ROOT, ServerProcess, start_server

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="the browser tests need Debian's chromium and chromedriver "
           "(apt-get install chromium chromium-driver; make test installs them as root)")

WAIT_S = 90.0  # generous: the machine is shared; a page that draws at all draws in seconds
SCREENSHOTS_ENV = "FLOWSERVE_UI_SCREENSHOTS"


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server on the committed default models, as ``make run`` serves them."""
    with start_server(ROOT / "models", tmp_path_factory.mktemp("ui-server")) as proc:
        yield proc


@pytest.fixture(scope="module")
def api(ui_server: ServerProcess) -> Iterator[httpx.Client]:
    with ui_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_script_timeout(WAIT_S)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ui-screenshots")


# -- helpers ---------------------------------------------------------------------------------------------
def wait_for(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition)
    except TimeoutException:
        raise AssertionError(f"timed out waiting for {what}; errors on the page: {page_errors(driver)}; "
                             f"console: {driver.get_log('browser')}") from None


def open_page(driver: Any, server: ServerProcess, fragment: str, ready: str = "loaded") -> None:
    """Load the dashboard afresh at ``#fragment`` and wait until the page says it has drawn."""
    driver.get("about:blank")
    driver.get_log("browser")  # drop what came before
    driver.get(f"{server.url}/ui/#{fragment}")
    wait_for(driver, lambda d: d.execute_script(f"return document.getElementById('page').dataset.{ready}"),
             f"the page #{fragment} to draw")


def page_errors(driver: Any) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('.error')].map(e => e.textContent)")


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def screenshot(driver: Any, shots: Path, name: str) -> Path:
    """A full-page screenshot: the window grown to the page's height, charts redrawn, then captured."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + 20, 4000))
    driver.execute_script("document.activeElement && document.activeElement.blur(); window.scrollTo(0, 0);")
    time.sleep(1.5)  # ECharts redraws on resize in an animation frame
    path = shots / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 1000)
    assert path.stat().st_size > 10_000
    target = os.environ.get(SCREENSHOTS_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / path.name)
    return path


def chart_option(driver: Any, element_id: str) -> dict[str, Any]:
    """The option ECharts holds for the chart in ``#element_id`` (what it draws), as JSON."""
    text = driver.execute_script(
        "const c = echarts.getInstanceByDom(document.getElementById(arguments[0]));"
        "return c ? JSON.stringify(c.getOption()) : null;", element_id)
    assert text is not None, f"no chart in #{element_id}; errors on the page: {page_errors(driver)}"
    return json.loads(text)


def canvases_gray(driver: Any) -> list[list[int]]:
    """The grey level of every pixel of every image in the sample grid, row-major."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#sample-grid canvas')].map(c => {
          const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          const g = []; for (let i = 0; i < d.length; i += 4) g.push(d[i]); return g; });""")


def expected_gray(samples: list[list[float]]) -> np.ndarray:
    """The page's mapping of digit pixels to grey: 0 -> white, 16 and above -> black."""
    return np.round(255 * (1 - np.clip(np.asarray(samples) / 16.0, 0.0, 1.0)))


def sample_grid_request(driver: Any) -> dict[str, Any] | None:
    text = driver.execute_script("return document.getElementById('sample-grid').dataset.request || null")
    return json.loads(text) if text else None


def set_value(driver: Any, element_id: str, value: str) -> None:
    """Set an input's value as a user would and fire its change event."""
    driver.execute_script(
        "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
        "e.dispatchEvent(new Event('input', {bubbles: true})); e.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id, value)


def explain_documented(api: httpx.Client) -> bool:
    """Whether the server documents ``POST /v1/models/{name}/explain`` (the page asks the same document)."""
    paths = api.get("/openapi.json").json()["paths"]
    return any(re.fullmatch(r"/v1/models/\{[^}/]+\}/explain", p) and "post" in item for p, item in paths.items())


# -- the pages -------------------------------------------------------------------------------------------
def test_ui_is_served_from_the_package(ui_server: ServerProcess, api: httpx.Client) -> None:
    """/ui redirects to /ui/, whose page and every script it loads come from this server."""
    r = api.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = api.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the network
    for asset in ("vendor/echarts.min.js", "js/app.js", "app.css"):
        assert api.get(f"/ui/{asset}").status_code == 200
    assert "/ui" not in api.get("/openapi.json").json()["paths"]


def test_models_page(driver: Any, ui_server: ServerProcess, api: httpx.Client, shots: Path) -> None:
    driver.get("about:blank")
    driver.get(f"{ui_server.url}/ui")  # the bare path, as users type it
    wait_for(driver, lambda d: d.execute_script("return document.getElementById('page').dataset.loaded"), "models")
    listed = {m["name"]: m for m in api.get("/v1/models").json()["models"]}
    assert set(listed) == {"moons", "digits", "digits-cond"}
    for name, entry in listed.items():
        row = driver.find_element("css selector", f"#models-table tr[data-model='{name}']")
        assert row.find_element("css selector", ".version").text == str(entry["version"])
        assert row.find_element("css selector", ".state").text == entry["state"] == "ready"
        card = api.get(f"/v1/models/{name}").json()
        panel = driver.find_element("css selector", f".model-card[data-model='{name}']")
        assert panel.find_element("css selector", ".calibration-size").text.startswith(
            f"{card['calibration']['size']} held-out log-densities")
        assert f"{card['flow_config']['kwargs']['transforms']} transforms" in panel.find_element("css selector", ".flow").text
        assert panel.find_element("css selector", ".features").text.startswith(f"{card['features']}: ")
        checks = {e.get_attribute("data-check") for e in panel.find_elements("css selector", "table.exactness tr[data-check]")}
        assert checks == set(card["exactness"]["checks"])
        assert f"{card['training']['rows']} rows" in panel.find_element("css selector", ".training").text
    # the moons card shows the integral of its density, to the digits the card holds
    integral = api.get("/v1/models/moons").json()["exactness"]["checks"]["integral"]["integral"]
    text = driver.find_element("css selector", ".model-card[data-model='moons'] tr[data-check='integral']").text
    assert f"∫ p = {integral:.7g}" in text
    assert console_errors(driver) == []
    screenshot(driver, shots, "models")


def test_moons_page(driver: Any, ui_server: ServerProcess, api: httpx.Client, shots: Path, tmp_path: Path) -> None:
    open_page(driver, ui_server, "/model/moons")
    card = api.get("/v1/models/moons").json()

    # heat map: an 80x80 grid of the server's log p, with the server's samples for seed 0 overlaid
    option = chart_option(driver, "density-chart")
    heat, scatter = option["series"][0], option["series"][1]
    assert len(heat["data"]) == 80 * 80
    samples = api.post("/v1/models/moons/sample", json={"n": 600, "seed": 0, "temperature": 1.0}).json()["samples"]
    assert scatter["data"] == samples
    cx, cy = option["xAxis"][0]["data"], option["yAxis"][0]["data"]
    i, j, shown = max(heat["data"], key=lambda cell: cell[2])
    lp = api.post("/v1/models/moons/log_prob", json={"inputs": [[cx[i], cy[j]]]}).json()["log_prob"][0]
    assert shown == pytest.approx(lp, rel=1e-4, abs=1e-4)
    # the grid covers the samples' range: the density's mass on it is close to 1, never above (midpoint rule)
    mass = float(driver.find_element("id", "density-chart").get_attribute("data-mass"))
    assert 0.9 < mass < 1.02

    # marginal of x: a 40-bin histogram of samples and the grid's exact marginal
    marginal = chart_option(driver, "marginal-chart")
    assert len(marginal["series"]) == 2 and len(marginal["series"][0]["data"]) == 40
    assert len(marginal["series"][1]["data"]) == 80

    # calibration: the card's histogram, and the threshold /score gives at the chosen alpha
    hist = card["calibration"]["histogram"]
    bars = chart_option(driver, "calibration-chart")["series"][0]["data"]
    assert [b[2] for b in bars] == hist["counts"] and sum(b[2] for b in bars) == card["calibration"]["size"]
    for alpha in ("0.01", "0.05"):
        set_value(driver, "alpha", alpha)
        expected = api.post("/v1/models/moons/score", json={"inputs": [[0.0, 0.0]], "alpha": float(alpha)}).json()
        wait_for(driver, lambda d: float(d.find_element("id", "calibration-chart").get_attribute("data-threshold")
                                         or "nan") == expected["threshold"]["log_prob"],
                 f"the threshold at alpha {alpha}")
        assert f"α = {alpha}" in driver.find_element("id", "threshold").text

    # pasted rows: a point on a moon is not flagged, a far-away one is (alpha 0.05 chosen above)
    box = driver.find_element("id", "rows-input")
    box.clear()
    box.send_keys("0, 1\n3, 3")
    driver.find_element("id", "score-button").click()
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#score-table tbody tr")) == 2, "two scored rows")
    rows = driver.find_elements("css selector", "#score-table tbody tr")
    scored = api.post("/v1/models/moons/score", json={"inputs": [[0, 1], [3, 3]], "alpha": 0.05}).json()
    assert scored["is_anomaly"] == [False, True]
    assert [r.get_attribute("data-flag") for r in rows] == ["false", "true"]
    assert rows[1].find_element("css selector", ".flag").text == "flagged"
    for row, p in zip(rows, scored["p_value"]):
        assert float(row.find_element("css selector", ".pv").text) == pytest.approx(p, rel=2e-3)
    # the explanation column is there exactly when the server documents an explain operation
    head = [th.text for th in driver.find_elements("css selector", "#score-table thead th")]
    assert ("EXPLANATION" in head) == explain_documented(api)

    # an uploaded CSV whose header puts the features in another order
    upload = tmp_path / "rows.csv"
    upload.write_text("y,x\n1,0\n3,3\n-0.5,1\n")
    driver.find_element("id", "rows-file").send_keys(str(upload))
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#score-table tbody tr")) == 3, "three uploaded rows")
    flags = [r.get_attribute("data-flag") for r in driver.find_elements("css selector", "#score-table tbody tr")]
    assert flags == ["false", "true", "false"]
    assert console_errors(driver) == []
    screenshot(driver, shots, "model-moons")


def test_digits_page(driver: Any, ui_server: ServerProcess, api: httpx.Client, shots: Path) -> None:
    open_page(driver, ui_server, "/model/digits")
    assert len(driver.find_elements("css selector", "#sample-grid canvas")) == 32
    # fewer images, then a lower temperature: each time the grid shows exactly the server's samples
    set_value(driver, "image-n", "12")
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#sample-grid canvas")) == 12, "12 images")
    for temperature in (1.0, 0.5):
        if temperature != 1.0:
            set_value(driver, "temperature", str(temperature))
            wait_for(driver, lambda d: (sample_grid_request(d) or {}).get("temperature") == temperature,
                     f"samples at temperature {temperature}")
        body = {"n": 12, "seed": 0, "temperature": temperature}
        samples = api.post("/v1/models/digits/sample", json=body).json()["samples"]
        shown = np.asarray(canvases_gray(driver))
        assert shown.shape == (12, 64)
        assert np.abs(shown - expected_gray(samples)).max() <= 1
    assert driver.find_element("id", "temperature-value").text == "0.50"
    bars = chart_option(driver, "calibration-chart")["series"][0]["data"]
    assert sum(b[2] for b in bars) == api.get("/v1/models/digits").json()["calibration"]["size"]
    marginal = chart_option(driver, "marginal-chart")
    assert len(marginal["series"]) == 1 and len(marginal["series"][0]["data"]) == 40
    assert console_errors(driver) == []
    set_value(driver, "temperature", "1")
    wait_for(driver, lambda d: (sample_grid_request(d) or {}).get("temperature") == 1, "samples at temperature 1")
    screenshot(driver, shots, "model-digits")


def test_digits_cond_picker(driver: Any, ui_server: ServerProcess, api: httpx.Client, shots: Path) -> None:
    open_page(driver, ui_server, "/model/digits-cond")
    buttons = driver.find_elements("css selector", "#context-picker button")
    assert [b.text for b in buttons] == [str(d) for d in range(10)]
    shown = {}
    for digit in (3, 7):
        buttons[digit].click()
        one_hot = [1 if k == digit else 0 for k in range(10)]
        wait_for(driver, lambda d: (sample_grid_request(d) or {}).get("context") == [one_hot], f"the digit {digit}")
        samples = api.post("/v1/models/digits-cond/sample",
                           json={"n": 32, "seed": 0, "temperature": 1.0, "context": [one_hot]}).json()["samples"]
        shown[digit] = np.asarray(canvases_gray(driver))
        assert shown[digit].shape == (32, 64)
        assert np.abs(shown[digit] - expected_gray(samples)).max() <= 1
        assert "on" in buttons[digit].get_attribute("class")
    assert np.abs(shown[3] - shown[7]).max() > 100  # another digit, other images
    assert console_errors(driver) == []
    screenshot(driver, shots, "model-digits-cond")


def test_live_page(driver: Any, ui_server: ServerProcess, shots: Path) -> None:
    """Requests sent while the page is open show up in its rates, totals and per-model table."""
    open_page(driver, ui_server, "/live", ready="ticks")
    sent = 240
    answered = [0, 0, 0, 0]  # 200 answers per thread (a busy server may answer 503 to some)
    done = threading.Event()

    def load() -> None:  # bounded: `sent` requests over 4 threads, a few seconds
        def worker(k: int) -> None:
            with httpx.Client(base_url=ui_server.url, timeout=30.0) as c:
                for i in range(sent // 4):
                    r = c.post("/v1/models/moons/log_prob", json={"inputs": [[0.1 * k, 0.01 * i]] * 8})
                    assert r.status_code in (200, 503), r.text
                    answered[k] += r.status_code == 200
                    time.sleep(0.05)  # about 4-6 s of load: several scrapes see it
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()

    loader = threading.Thread(target=load)
    loader.start()
    try:
        rates: list[float] = []
        batches: list[float] = []

        def seen(d: Any) -> bool:
            for element_id, values in (("live-rps", rates), ("live-batch", batches)):
                text = d.find_element("id", element_id).text
                if text not in ("–", ""):
                    values.append(float(text))
            return any(r > 0 for r in rates) and bool(batches)

        wait_for(driver, seen, "a non-zero requests/s and a batch size")
        ticks = int(driver.find_element("id", "page").get_attribute("data-ticks"))
        wait_for(driver, lambda d: int(d.find_element("id", "page").get_attribute("data-ticks")) >= ticks + 3 or done.is_set(),
                 "a few more scrapes for the charts")
        # a mean over the batches of one interval: at least one row each
        assert min(batches) >= 1
        screenshot(driver, shots, "live")
    finally:
        loader.join(60)
    assert done.is_set() and sum(answered) >= sent // 2
    sent = sum(answered)

    def counted(d: Any) -> bool:  # read in one script: the table is rebuilt every second
        text = d.execute_script("const c = document.querySelector("
                                "\"#live-table tr[data-model='moons'][data-operation='log_prob'] .requests\");"
                                "return c ? c.textContent : null;")
        return text is not None and int(text) >= sent

    wait_for(driver, counted, f"{sent} moons log_prob requests in the table")
    assert int(driver.find_element("id", "live-total").text) >= sent
    wait_for(driver, lambda d: d.find_element("id", "live-queue").text == "0", "an empty queue after the load")
    assert console_errors(driver) == []
