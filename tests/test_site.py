"""The documentation site: every module has an API page, and the built site works in a browser.

The browser test opens the built site (``build/docs/html``) from plain file paths in headless
Chromium over the DevTools protocol and checks the landing page, a tutorial and an API page: no
console errors or uncaught exceptions, no request leaving the machine, the tutorial's figures
present as images with data, and its math rendered by the local MathJax. It saves screenshots
to ``build/docs/screenshots/``. It is marked ``browser`` and skipped when Chromium or
websocket-client is missing, or when the site is not built (CI sets MINIDRESS_SITE_REQUIRED=1,
which turns that skip into a failure). Build the site first::

    python -m sphinx -W --keep-going -c docs -b html . build/docs/html
"""
import base64
import json
import os
import pkgutil
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

import minidress

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "build" / "docs" / "html"
SHOTS = ROOT / "build" / "docs" / "screenshots"


def test_every_public_package_has_an_api_page():
    """docs/api/*.rst document packages with ``minidress-modules``, which lists their modules at
    build time; a new subpackage needs a page (the top-level modules are on core.rst)."""
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.rst"))
    documented = set(re.findall(r"^\.\. minidress-modules:: (\S+)", pages, flags=re.M))
    assert "minidress" in documented and ":flat:" in (ROOT / "docs/api/core.rst").read_text()
    packages = {m.name for m in pkgutil.iter_modules(minidress.__path__, "minidress.")
                if m.ispkg and not m.name.rsplit(".", 1)[-1].startswith("_")}
    missing = sorted(packages - documented)
    assert not missing, f"no API page for {missing}: add docs/api/NAME.rst like docs/api/nn.rst"
    index = (ROOT / "docs" / "api" / "index.md").read_text()
    for page in (ROOT / "docs" / "api").glob("*.rst"):
        assert page.stem in index, f"docs/api/index.md does not list {page.name}"


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page)."""

    def __init__(self, executable, profile):
        import websocket

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--no-first-run", "--no-default-browser-check", "--allow-file-access-from-files",
             f"--user-data-dir={profile}", "--remote-debugging-port=0",
             "--window-size=1280,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("Chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60,
                                              suppress_origin=True)
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                del self.events[: i + 1]
                return event
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == method:
                return msg
            self.events.append(msg)
        raise TimeoutError(method)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        return result["result"].get("value")

    def open(self, url, settle=1.5):
        """Load url; return the console errors, exceptions and non-local requests it caused."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired")
        time.sleep(settle)                       # MathJax typesets after the load event
        self.evaluate("1")                       # drain the events that arrived meanwhile
        problems = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                problems.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                   for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown":
                problems.append("exception: " + p["exceptionDetails"].get("text", "")
                                + str(p["exceptionDetails"].get("exception", {})
                                      .get("description", "")))
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                problems.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.requestWillBeSent":
                req = p["request"]["url"]
                if not req.startswith(("file:", "data:", "blob:", "about:")):
                    problems.append(f"network request leaving the machine: {req}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                problems.append(f"failed to load: {p.get('errorText')}")
        return problems

    def screenshot(self, path, scroll_to=None):
        """Save a PNG of the viewport, at the top or with element ``scroll_to`` in view."""
        if scroll_to:
            self.evaluate(f"document.querySelector({json.dumps(scroll_to)}).scrollIntoView()")
        else:
            self.evaluate("window.scrollTo(0, 0)")
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close")
        except Exception:
            pass
        try:
            self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    pytest.importorskip("websocket", reason="pip install websocket-client (the docs extra)")
    if not (SITE / "README.html").exists():
        message = ("the site is not built: python -m sphinx -W --keep-going -c docs -b html . "
                   "build/docs/html")
        if os.environ.get("MINIDRESS_SITE_REQUIRED"):
            pytest.fail(message)
        pytest.skip(message)
    with tempfile.TemporaryDirectory(prefix="minidress-chromium-") as profile:
        b = Browser(executable, profile)
        try:
            yield b
        finally:
            b.close()


@pytest.mark.browser
def test_landing_page(browser):
    problems = browser.open((SITE / "index.html").as_uri())   # the redirect to README.html
    assert browser.evaluate("location.pathname").endswith("/README.html")
    assert not problems, problems
    assert browser.evaluate("document.querySelector('h1').textContent").startswith("minidress")
    # the sidebar lists every tutorial
    links = browser.evaluate("[...document.querySelectorAll('nav a')].map(a => a.href)")
    notebooks = sorted(p.stem for p in (ROOT / "tutorials").glob("[0-9]*.ipynb"))
    for stem in notebooks:
        assert any(link.endswith(f"tutorials/{stem}.html") for link in links), stem
    browser.screenshot(SHOTS / "landing.png")


@pytest.mark.browser
def test_tutorial_page_has_its_figures_math_and_download(browser):
    page = SITE / "tutorials" / "01_manual_backprop.html"
    problems = browser.open(page.as_uri(), settle=3)
    assert not problems, problems
    figures = browser.evaluate(
        "[...document.querySelectorAll('.cell_output img')]"
        ".filter(i => i.complete && i.naturalWidth > 0 && i.getAttribute('src')).length")
    assert figures >= 1, "the executed tutorial shows no figure"
    note = browser.evaluate("document.querySelector('main .admonition.note').innerText")
    assert "MINIDRESS_FAST=1" in note and "executed while the site was built" in note, note
    math = browser.evaluate("document.querySelectorAll('mjx-container svg').length")
    assert math >= 1, "no math was typeset by the local MathJax"
    downloads = browser.evaluate(
        "[...document.querySelectorAll('a')].map(a => a.getAttribute('href') || '')"
        ".filter(h => h.endsWith('.ipynb'))")
    assert downloads, "no link to download the notebook"
    target = (page.parent / downloads[0]).resolve()
    assert target.exists() and json.loads(target.read_text())["cells"], target
    browser.screenshot(SHOTS / "tutorial-01.png")
    browser.screenshot(SHOTS / "tutorial-01-figure.png", scroll_to=".cell_output img")


@pytest.mark.browser
def test_api_page(browser):
    problems = browser.open((SITE / "docs" / "api" / "nn.html").as_uri())
    assert not problems, problems
    ids = browser.evaluate("[...document.querySelectorAll('dt[id]')].map(d => d.id)")
    assert "minidress.nn.layers.Linear" in ids, ids[:20]
    browser.screenshot(SHOTS / "api-nn.png")
