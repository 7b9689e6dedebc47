"""Headless Chromium for the page tests, and what they do in it.

The browser is the system's ``chromium`` with its ``chromedriver`` (Debian's ``chromium`` and
``chromium-driver`` packages) driven by Selenium with an explicit driver path: never a browser
download. The tests skip, saying why, when Selenium, the browser or the driver is missing. A
:class:`Page` opens a page with fresh logs, lists its console errors and the requests it made beyond
its own origin, waits, hovers and reads the tooltip, and keeps a screenshot when
``CROSSPATCH_SCREENSHOTS=DIR`` is set.

The fixtures live here, not in a conftest.py (tests/core imports its ``conftest`` by name, and a
second conftest module would shadow it); test modules import ``chrome`` and ``page`` from here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import pytest


def page_number(value: float) -> str:
    """A number as the pages print it (explorer.js ``fmt``: 4 significant digits, else 3-digit exponents)."""
    if value != 0 and not 1e-3 <= abs(value) < 1e5:
        return f"{value:.3e}".replace("e-0", "e-").replace("e+0", "e+")
    text = repr(float(f"{value:.4g}"))
    return text[:-2] if text.endswith(".0") else text


class Page:
    """Opens a page in the shared browser and reads what it logged and fetched since."""

    def __init__(self, driver: Any):
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get("about:blank")
        self.driver.get_log("browser")  # drain what earlier pages logged
        self.driver.get_log("performance")
        self.driver.get(url)

    def console_errors(self) -> list[dict]:
        return [e for e in self.driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]

    def requests(self) -> list[str]:
        urls = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                urls.append(message["params"]["request"]["url"])
        return urls

    def foreign_requests(self, own: str) -> list[str]:
        """Requests to anything but ``own`` (a file URL, or a server's scheme://host:port) and data: URLs."""
        base = urlparse(own)
        out = []
        for url in self.requests():
            parsed = urlparse(url)
            if parsed.scheme == "data":
                continue
            if base.scheme == "file" and url.split("#")[0] == own.split("#")[0]:
                continue
            if base.scheme != "file" and (parsed.scheme, parsed.netloc) == (base.scheme, base.netloc):
                continue
            out.append(url)
        return out

    def wait(self, condition: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.05)

    def hover(self, element: Any) -> str:
        """Move the mouse onto ``element`` and return the tooltip's text."""
        from selenium.webdriver.common.action_chains import ActionChains

        ActionChains(self.driver).move_to_element(element).perform()
        tip = self.wait(lambda: self._visible_tip(), 5, "the tooltip")
        return tip.text

    def _visible_tip(self):
        from selenium.webdriver.common.by import By

        tips = self.driver.find_elements(By.ID, "cp-tip")
        return tips[0] if tips and tips[0].is_displayed() else None

    def screenshot(self, name: str) -> None:
        folder = os.environ.get("CROSSPATCH_SCREENSHOTS")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(1400, min(max(int(height) + 40, 600), 4000))
            self.driver.save_screenshot(str(Path(folder) / f"{name}.png"))
            self.driver.set_window_size(1400, 1800)


# fake_zoo (a tiny GPT-2 checkpoint with the IOI word tokenizer) lives beside the core tests.
_CORE_TESTS = str(Path(__file__).resolve().parents[1] / "core")
if _CORE_TESTS not in sys.path:
    sys.path.append(_CORE_TESTS)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--window-size=1400,1800")


def _find(names, env: str) -> str | None:
    given = os.environ.get(env)
    if given:
        return given if Path(given).exists() else None
    return next((found for found in map(shutil.which, names) if found), None)


@pytest.fixture(scope="session")
def chrome():
    """One headless Chromium for the session (fresh profile), with browser and network logs on."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the dev extra has it)")
    from selenium.webdriver.chrome.service import Service

    binary = _find(BROWSERS, "CROSSPATCH_CHROMIUM")
    driver_path = _find(DRIVERS, "CROSSPATCH_CHROMEDRIVER")
    if binary is None:
        pytest.skip("no Chromium found (apt-get install chromium chromium-driver, or set CROSSPATCH_CHROMIUM)")
    if driver_path is None:
        pytest.skip("no chromedriver found (apt-get install chromium-driver, or set CROSSPATCH_CHROMEDRIVER)")
    profile = tempfile.mkdtemp(prefix="crosspatch-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)  # an explicit driver: no download
    except Exception as exc:  # a driver that does not match the browser, a browser that cannot start
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium did not start: {' '.join(str(exc).split())[:300]}")
    driver.set_page_load_timeout(30)
    # Downloads ("Save as study.toml") land in the profile, where a test can read them.
    driver.download_dir = Path(profile) / "downloads"
    driver.download_dir.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(driver.download_dir)})
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(chrome) -> "Page":
    return Page(chrome)
