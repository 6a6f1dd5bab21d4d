"""The compare report opened in a real browser (Debian's headless chromium): the results table has
one row per model, every inline image decodes, nothing is logged to the console, and the page
does not render blank."""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from _data_files import write_class_folder
from PIL import Image

from imgarena.comparison import run_compare
from imgarena.config import CompareConfig, DataConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=10000"]
MODELS = ["mlp", "mixer_t4"]


class _Page(HTMLParser):
    """Collects the <body> attributes and the data-model of each row in table#results."""

    def __init__(self):
        super().__init__()
        self.body, self.rows, self.pair_rows, self._in_results = {}, [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "table":
            self._in_results = a.get("id") == "results"
        elif tag == "tr" and self._in_results and "data-model" in a:
            self.rows.append(a["data-model"])
        elif tag == "tr" and "data-row" in a:
            self.pair_rows.append(a["data-row"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_results = False


def _chromium(profile: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HOME": str(profile)})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    folder = write_class_folder(root / "imgs", classes=("left", "right"), per_class=10, size=8)
    cfg = CompareConfig(data=DataConfig(source=str(folder), val_fraction=0.3), models=MODELS, epochs=2,
                        batch_size=8, device="cpu", out=str(root / "cmp"), baseline="mlp")
    results = run_compare(cfg, progress=False, log=lambda *a: None)
    return Path(results["report"])


def test_report_renders_in_headless_chromium(report, tmp_path):
    assert Path(CHROMIUM).exists(), "the report test needs Debian's chromium: run `make sysdeps`"
    r = _chromium(tmp_path / "p1", "--enable-logging=stderr", "--v=0", "--dump-dom", report.resolve().as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    page = _Page()
    page.feed(r.stdout)
    assert sorted(page.rows) == sorted(MODELS)  # ranked, best first
    # set by the report's own load handler after every image decoded (naturalWidth > 0)
    assert page.body.get("data-status") == "ok", page.body
    # runs, curves, accuracy-vs-time (+ the disagreement images when the two disagree) and a
    # confusion matrix per model
    shown = report.read_text().count('src="data:image/png;base64,')
    assert shown >= 3 + len(MODELS)
    assert page.body["data-images"] == str(shown) and page.body["data-broken-images"] == "0"
    assert set(page.pair_rows) == set(MODELS)  # the pairwise matrix
    assert "<h2>Where each model looks</h2>" in r.stdout  # the side-by-side explanation maps, decoded above
    console = [line for line in r.stderr.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert console == []


def test_report_screenshot_is_not_blank(report, tmp_path):
    assert Path(CHROMIUM).exists(), "the report test needs Debian's chromium: run `make sysdeps`"
    shot = tmp_path / "shot.png"
    r = _chromium(tmp_path / "p2", "--window-size=1200,2000", f"--screenshot={shot}", report.resolve().as_uri())
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (2000, 1200)
    assert img.std() > 20  # text, table borders and figures; a blank page has std 0
    assert (img < 200).mean() > 0.02  # a real share of the page is drawn, not a few stray pixels
