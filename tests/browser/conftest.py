"""Browser tests: the standalone app (``python -m lora_trainer ui``) in a subprocess on a free port, with its own
data and Lora folders, and a headless Debian Chromium driven by Playwright. Screenshots go to test-artifacts/."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
STARTUP_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_up(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}:\n{log.read_text(encoding='utf-8', errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"the app did not answer at {url} within {STARTUP_SECONDS} s:\n{log.read_text(encoding='utf-8', errors='replace')}")


@pytest.fixture(scope="session")
def app_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standalone")
    return {"data": root / "data", "lora": root / "Lora"}


@pytest.fixture(scope="session")
def app_url(app_folders):
    """The app's URL (the bundled sample dataset is an allowed root); the app runs for the whole session and is killed afterwards. Its log is kept in test-artifacts/."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = _free_port()
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # one app per test worker
    log = ARTIFACTS / (f"standalone-app-{worker}.log" if worker else "standalone-app.log")
    command = [sys.executable, "-m", "lora_trainer", "ui", "--port", str(port), "--data", str(app_folders["data"]),
               "--lora-dir", str(app_folders["lora"])]
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(command, cwd=app_folders["data"].parent, stdout=output, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"},
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_up(url, process, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        _kill_trainers(app_folders["data"])


def _kill_trainers(data: Path) -> None:
    """Trainer subprocesses run in their own session (a job outlives its app): end the ones this app started."""
    from lora_trainer.jobs.store import JobStore

    store = JobStore(data / "jobs.sqlite", data / "jobs")
    for job in store.all():
        if job.status == "running" and job.pid:
            try:
                os.killpg(job.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():  # said, as a skip: the README's test command must run on a fresh machine
        pytest.skip(f"no Chromium at {CHROMIUM}: `sudo apt-get install chromium` runs the browser tests (.ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url, request):
    """A fresh page on the app; a screenshot of its last state is saved as test-artifacts/<test>-end.png."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(app_url)
    yield page
    try:
        page.screenshot(path=str(screenshot_path(request.node.name, "end")), full_page=True)
    finally:
        context.close()


@pytest.fixture
def screenshot(page, request):
    """``screenshot("running")`` saves test-artifacts/<test>-running.png."""
    return lambda label: page.screenshot(path=str(screenshot_path(request.node.name, label)), full_page=True)


@pytest.fixture
def open_tab(page):
    """``open_tab("Prompt-Lora-Grid")`` clicks that top-level tab: a plain button in gradio 3's tab bar,
    ``role="tab"`` in gradio 4's, so found by the bar and its exact text."""

    def click(title: str) -> None:
        page.locator(".tab-nav button").filter(has_text=re.compile(f"^\\s*{re.escape(title)}\\s*$")).first.click()

    return click


def screenshot_path(test_name: str, label: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in test_name)
    return ARTIFACTS / f"{safe}-{label}.png"
