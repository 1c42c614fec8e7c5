"""The dashboard's page in a real browser: Debian's headless Chromium, driven by Selenium
through Debian's chromium-driver (``.ci/run`` installs both). The page shows a deployment;
its replica count changes, without a reload, when the app is scaled; a chart has points after
some requests; a replica whose ``check_health`` fails shows its deployment as unhealthy.

With ``SERVAL_SCREENSHOTS=<dir>`` the tests save what the browser shows there as PNGs
(``docs/dashboard*.png`` are made so:
``SERVAL_SCREENSHOTS=docs pytest tests/test_dashboard_browser.py``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import serval as serve
from conftest import free_port, poll
from serval import api

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.fail(  # (not a skip: .ci/run installs them; a machine without them fails here)
        f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install chromium chromium-driver",
        pytrace=False,
    )


@serve.deployment(health_check_period_s=0.5, health_check_timeout_s=2)
class Model:
    def __init__(self) -> None:
        import logging

        logging.getLogger("ray.serve").info("model loaded")

    async def __call__(self, request: Any) -> str:
        return "ok"

    def note(self, text: str) -> str:
        import logging

        logging.getLogger("ray.serve").info(text)
        return "ok"


@serve.deployment(health_check_period_s=0.3, health_check_timeout_s=2)
class Sick:
    def check_health(self) -> None:
        raise RuntimeError("the model's GPU is gone")

    def __call__(self, request: Any) -> str:
        return "still here"


class Page:
    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def js(self, script: str) -> Any:
        return self.driver.execute_script(script)

    def read(self, app: str, deployment: str, css: str, what: str = "textContent") -> Any:
        """``what`` of the first ``css`` element in the deployment's part of the page, read in
        one script (the page re-renders every second: elements do not stay)."""
        return self.driver.execute_script(
            """const [app, dep, css, what] = arguments;
            const part = [...document.querySelectorAll("section[data-app]")]
              .find((s) => s.dataset.app === app);
            const box = part && [...part.querySelectorAll("div[data-deployment]")]
              .find((d) => d.dataset.deployment === dep);
            const el = box && box.querySelector(css);
            if (!el) return null;
            return what === "count" ? box.querySelectorAll(css).length
              : what.startsWith("data-") ? el.getAttribute(what) : el[what];""",
            app,
            deployment,
            css,
            what,
        )

    def replica_count(self, app: str, deployment: str) -> int | None:
        text = self.read(app, deployment, ".replica-count")
        return None if text is None else int(text)

    def points(self, app: str, deployment: str, chart: str) -> int:
        return int(self.read(app, deployment, f'svg[data-chart="{chart}"]', "data-points") or 0)

    def screenshot(self, name: str) -> None:
        where = os.environ.get("SERVAL_SCREENSHOTS")
        if where:
            os.makedirs(where, exist_ok=True)
            self.driver.save_screenshot(os.path.join(where, name))


@pytest.fixture(scope="module")
def cluster_with_dashboard() -> Iterator[tuple[str, str]]:
    http, port = free_port(), free_port()
    serve.start(http_options={"port": http}, dashboard_options={"port": port})
    try:
        url = api.dashboard_url()
        assert url is not None
        yield url, f"http://127.0.0.1:{http}"
    finally:
        serve.shutdown()


@pytest.fixture
def page(cluster_with_dashboard: tuple[str, str]) -> Iterator[Page]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="chromium-")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield Page(driver, cluster_with_dashboard[0])
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
        for name in list(serve.status().applications):
            serve.delete(name)


@pytest.mark.timeout(120)
def test_the_page_follows_a_scaled_app_and_charts_its_requests(
    page: Page, cluster_with_dashboard: tuple[str, str]
) -> None:
    serve.run(Model.options(num_replicas=1).bind(), name="shop", route_prefix="/shop")
    page.driver.get(page.url)  # the token URL: it sets the cookie and redirects to /
    assert "token=" not in page.driver.current_url
    poll(lambda: page.replica_count("shop", "Model") == 1, 20, "the deployment on the page")
    page.js("window.notReloaded = true")

    serve.run(Model.options(num_replicas=3).bind(), name="shop", route_prefix="/shop")
    poll(lambda: page.replica_count("shop", "Model") == 3, 20, "3 replicas on the page")
    assert page.js("return window.notReloaded") is True  # updated in place
    # (rows appear as replicas start; the status turns once all three run)
    poll(
        lambda: page.read("shop", "Model", ".deployment-status") == "HEALTHY",
        20,
        "the scaled deployment HEALTHY on the page",
    )
    assert page.read("shop", "Model", "tr.replica", "count") == 3

    # requests: the latency chart gets points (none without requests: no latency to draw)
    assert page.points("shop", "Model", "latency") == 0
    stop = threading.Event()

    def load() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                client.get(f"{cluster_with_dashboard[1]}/shop")

    threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        poll(lambda: page.points("shop", "Model", "latency") >= 3, 20, "latency on the chart")
        assert page.points("shop", "Model", "rate") >= 3
        if os.environ.get("SERVAL_SCREENSHOTS"):  # a picture with some history in it
            poll(lambda: page.points("shop", "Model", "latency") >= 45, 40, "more points")
        page.screenshot("dashboard.png")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert page.js("return window.notReloaded") is True


@pytest.mark.timeout(90)
def test_a_failing_health_check_shows_as_unhealthy(page: Page) -> None:
    serve.run(Model.bind(), name="fine", route_prefix="/fine")
    page.driver.get(page.url)
    poll(lambda: page.replica_count("fine", "Model") == 1, 20, "the healthy app on the page")
    serve.run(Sick.bind(), name="sick", route_prefix="/sick")
    poll(
        lambda: page.read("sick", "Sick", ".deployment-status") == "UNHEALTHY",
        20,
        "the sick deployment shown unhealthy",
    )
    message = page.read("sick", "Sick", '[data-role="deployment-message"]')
    assert message is not None and "failed its health check" in message
    assert "the model's GPU is gone" in message
    app_badge = page.js(
        "return document.querySelector('section[data-app=\"sick\"] h2 .badge').textContent"
    )
    assert app_badge == "UNHEALTHY"
    assert page.read("fine", "Model", ".deployment-status") == "HEALTHY"
    page.screenshot("dashboard-unhealthy.png")


def test_the_page_without_the_token_says_how_to_get_in(page: Page) -> None:
    page.driver.get(page.url.split("?", 1)[0])
    text = page.driver.find_element(By.TAG_NAME, "body").text
    assert "a token is needed" in text and "dashboard.token" in text


def test_a_replicas_recent_log_lines_show_on_the_page(page: Page) -> None:
    """The page shows each replica's last lines, read from the log file the replica writes:
    its constructor's line, and one logged while it serves a request."""
    serve.run(Model.bind(), name="logged", route_prefix="/logged")
    handle = serve.get_app_handle("logged")
    assert handle.options(method_name="note").remote("a line written just now").result() == "ok"
    page.driver.get(page.url)
    panel = "details.logs pre"
    poll(
        lambda: "a line written just now" in (page.read("logged", "Model", panel) or ""),
        20,
        "the replica's log lines on the page",
    )
    assert "model loaded" in page.read("logged", "Model", panel)
