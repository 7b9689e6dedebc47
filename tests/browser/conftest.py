"""Headless Chromium for the page tests: the system's ``chromium`` and ``chromedriver`` (Debian's
``chromium`` and ``chromium-driver`` packages) driven by Selenium; never a browser download.

The tests skip, saying why, when Selenium, the browser or the driver is missing. Set
``CROSSPATCH_SCREENSHOTS=DIR`` to keep a screenshot of every page the tests look at.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from browser_pages import Page

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
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(chrome) -> Page:
    return Page(chrome)
