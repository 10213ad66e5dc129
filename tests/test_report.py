"""`cas report`: one self-contained HTML page per run. In-process for what the page
says; a slow test renders it in headless Chromium and reads what the browser laid out."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import textwrap

import pytest

from tests.conftest import cas_inproc
from tests.test_cli_run import one_error_line

FAN = textwrap.dedent(
    """
    from castore import Pipeline, StepInput, step
    from castore.steps import LoadDataFromDicts

    @step(inputs=["n"], outputs=["double"])
    def Double(inputs: StepInput, by: int = 2):
        return [{**r, "double": r["n"] * by} for r in inputs]

    @step(inputs=["n"], outputs=["label"])
    def Label(inputs: StepInput):
        return [{**r, "label": f"<script>alert({r['n']})</script>"} for r in inputs]

    @step(inputs=["double", "label"], outputs=["both"])
    def Both(inputs: StepInput):
        return [{**r, "both": f"{r['double']}/{r['label']}"} for r in inputs]

    with Pipeline(name="fan") as pipeline:
        load = LoadDataFromDicts(data=[{"n": i} for i in range(30)], batch_size=10)
        load >> [Double(name="double"), Label(name="label")] >> Both(name="both")
    """
)


@pytest.fixture
def made(tmp_path):
    """A fan-out / fan-in run, then the same with one param changed (some steps cached,
    some computed), and its report."""
    path = tmp_path / "fan.py"
    path.write_text(FAN)
    cache = tmp_path / "c"
    assert cas_inproc("run", str(path), "--quiet", cache_dir=cache).returncode == 0
    r = cas_inproc("run", str(path), "--quiet", "--param", "double.by=3", cache_dir=cache)
    assert r.returncode == 0, r
    out = tmp_path / "report.html"
    r = cas_inproc("report", "fan", "-o", str(out), "--json", cache_dir=cache)
    assert r.returncode == 0, r
    assert r.json()["path"] == str(out)
    return out, cache


def test_the_page_says_what_the_run_did_and_needs_no_network(made):
    out, _ = made
    page = out.read_text()
    for name in ("load_data_from_dicts", "double", "label", "both"):
        assert f"data-step='{name}'" in page
    # Counts in the boxes and the table: label was cached, double computed again.
    assert "3/3 batches: 3 cached, 0 computed, 0 failed" in page  # the loader
    assert "1/1 batches: 1 cached, 0 computed, 0 failed" in page  # label
    assert "1/1 batches: 0 cached, 1 computed, 0 failed" in page  # double, both
    assert "class='step cached'" in page and "class='step computed'" in page
    # Why: the param that changed, old -> new, as `cas explain` says it.
    assert re.search(r"by.{0,40}2.{0,20}3", page)
    # Edges: 4 of them, drawn as paths with arrowheads.
    assert page.count("class='edge'") == 4
    # The first rows of the leaf, escaped (a value is never markup).
    assert "both: 10 of 30 rows" in page
    assert "&lt;script&gt;alert(0)&lt;/script&gt;" in page
    assert "<script>alert" not in page
    # Self-contained: nothing fetched (the SVG namespace is a name, not a request).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_default_file_name_and_errors(made, tmp_path, monkeypatch):
    _, cache = made
    monkeypatch.chdir(tmp_path)
    r = cas_inproc("report", "fan", cache_dir=cache)
    assert r.returncode == 0, r
    written = list(tmp_path.glob("fan-*.html"))
    assert len(written) == 1 and written[0].name in r.stdout
    one_error_line(cas_inproc("report", "nope", cache_dir=cache), "no run named")
    bad = cas_inproc("report", "fan", "-o", str(tmp_path / "missing" / "r.html"), cache_dir=cache)
    one_error_line(bad, "no folder")
    assert not (tmp_path / "missing").exists()


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    pytest.skip("no chromium on this machine (apt-get install chromium)")


def _browser(tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ]
    return subprocess.run([_chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_rendered_in_chromium_every_box_is_drawn_and_every_label_fits(made, tmp_path):
    out, _ = made
    dom = _browser(tmp_path, "--dump-dom", out.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    # The page's script measured the drawing as laid out: 4 boxes on the canvas, none
    # overlapping, each label inside its box.
    layout = re.search(r'<body[^>]*data-layout="([^"]*)"', dom.stdout)
    assert layout is not None, dom.stdout[:2000]
    assert layout.group(1) == "ok: 4 steps drawn"
    assert re.search(r'<p id="layout-warning" hidden="?"?>', dom.stdout)  # no warning shown
    shot = tmp_path / "report.png"
    r = _browser(tmp_path, "--window-size=1100,1400", f"--screenshot={shot}", out.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    head = shot.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1100, 1400)
    assert shot.stat().st_size > 20_000  # a page with text and boxes, not a blank one
