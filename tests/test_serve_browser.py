"""The page at / of `imgarena serve`, driven in Debian's headless chromium over the Chrome DevTools
Protocol: a file is put into the page's <input type=file> (as a user choosing it would), the page
POSTs it, and the predicted label and its bars appear, with nothing logged to the console."""

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from serve_helpers import Server, train_tiny

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0"]
WAIT = 30  # s for each step

websockets_sync = pytest.importorskip("websockets.sync.client")


class DevTools:
    """A minimal CDP client for one page target: commands by id, events kept in order."""

    def __init__(self, ws):
        self.ws = ws
        self.events: list[dict] = []
        self._id = 0

    def send(self, method: str, **params) -> dict:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + WAIT
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def pump(self, seconds: float) -> None:
        """Collect events for a while."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for e in self.events:
                if e.get("method") == method:
                    return e
            self.pump(0.2)
        raise TimeoutError(f"no {method} within {WAIT} s")

    def eval(self, expr: str):
        r = self.send("Runtime.evaluate", expression=expr, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expr: str):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            value = self.eval(expr)
            if value:
                return value
            self.pump(0.2)
        raise TimeoutError(f"{expr} stayed false for {WAIT} s")

    def problems(self) -> list[str]:
        """Console errors/warnings, uncaught exceptions and browser log errors (CSP, failed loads)."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {}).get('description', '')}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.append(f"log {p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    run, onnx = train_tiny(tmp_path_factory.mktemp("model"))
    srv = Server([onnx], tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@pytest.fixture
def browser(tmp_path):
    assert Path(CHROMIUM).exists(), "the page test needs Debian's chromium: run `make sysdeps`"
    profile = tmp_path / "profile"
    log = tmp_path / "chromium.err"
    with open(log, "wb") as err:
        proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"], stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, "HOME": str(profile)})
    try:
        deadline = time.monotonic() + WAIT
        while not (m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read_text(errors="replace"))):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        port = m.group(1)
        while True:  # the about:blank page target appears shortly after the browser endpoint
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=WAIT) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert pages, "chromium opened no page"
        with websockets_sync.connect(pages[0]["webSocketDebuggerUrl"], max_size=None, proxy=None,
                                     open_timeout=WAIT) as ws:
            devtools = DevTools(ws)
            for domain in ("Runtime", "Log", "Page", "DOM"):
                devtools.send(f"{domain}.enable")
            yield devtools
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _api_label(server, path: Path) -> str:
    req = urllib.request.Request(server.url + "/predict", data=path.read_bytes(), method="POST",
                                 headers={"Content-Type": "image/png", "X-Filename": path.name})
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        return json.load(r)["rows"][0]["label"]


def _choose_file(devtools: DevTools, path: Path) -> None:
    root = devtools.send("DOM.getDocument")["root"]["nodeId"]
    node = devtools.send("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    assert node, "the page has no #files input"
    devtools.send("DOM.setFileInputFiles", files=[str(path)], nodeId=node)


RESULT = """(() => { const r = document.querySelector('#results .result[data-file="%s"]');
  return r && r.dataset.state !== 'pending' ? {state: r.dataset.state, label: r.dataset.label || null,
    bars: Array.from(r.querySelectorAll('.bar .label')).map(e => e.textContent),
    widths: Array.from(r.querySelectorAll('.bar .fill')).map(e => e.getBoundingClientRect().width),
    track: (r.querySelector('.bar .track') || {getBoundingClientRect: () => ({width: 0})}).getBoundingClientRect().width,
    error: (r.querySelector('.error') || {}).textContent || null} : null; })()"""


def test_page_classifies_an_uploaded_image(server, browser, tmp_path):
    from imgarena.data.builtin import load_sample

    shoe = tmp_path / "shoe.png"
    Image.fromarray(load_sample().parts["test"][0][0][0], "L").save(shoe)  # a real Fashion-MNIST image
    browser.send("Page.navigate", url=server.url + "/")
    browser.wait_event("Page.loadEventFired")
    browser.wait_for("document.body.dataset.status === 'ready'")
    assert "mlp" in browser.eval("document.getElementById('model').textContent")  # from /info

    _choose_file(browser, shoe)
    result = browser.wait_for(RESULT % "shoe.png")
    assert result["state"] == "done", result
    assert result["label"] == _api_label(server, shoe) == result["bars"][0]
    assert len(result["bars"]) == 3 and result["widths"] == sorted(result["widths"], reverse=True)
    assert 0 < result["widths"][0] <= result["track"]  # drawn bars (px), the top one longest
    browser.pump(0.5)  # late console messages, if any
    assert browser.problems() == []

    # a text file renamed .png: the page shows the server's error for it
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    _choose_file(browser, fake)
    result = browser.wait_for(RESULT % "fake.png")
    assert result["state"] == "error" and result["error"].startswith("fake.png: not an image"), result
    # the only complaint logged is the failed request itself (HTTP 400); no script error
    browser.pump(0.5)
    assert all("400" in p for p in browser.problems()), browser.problems()
