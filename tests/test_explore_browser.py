"""The explorer in a real browser: `sdfeat explore` runs as a subprocess on 127.0.0.1 (stopped by its own pid),
headless Debian Chromium (driven by Playwright with the system executable, no browser download) loads the page,
clicks a token, and the overlay's canvas pixels are compared with the endpoint's map coloured by matplotlib's
viridis; no console errors; a screenshot is kept as a test artifact.

Without Chromium the test is skipped, except under CI (env CI set), where it fails: `.ci/run` installs it.
Env SDFEAT_EXPLORE_STORE serves another store (e.g. the demo store), SDFEAT_EXPLORE_SCREENSHOT copies the
screenshot there (how docs/explorer.png is made).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _require_chromium() -> str:
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI must run the browser test: apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("the playwright package is missing (pip install -e '.[dev]')")
        pytest.skip("the playwright package is missing")
    return CHROMIUM


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(base: str, path: str, **params: object) -> dict:
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(f"{base}{path}{query}", timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tiny_store: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`sdfeat explore STORE --port P` as a subprocess; yields its base URL; stopped by its pid."""
    _require_chromium()
    store = os.environ.get("SDFEAT_EXPLORE_STORE", tiny_store)
    port = _free_port()
    exe = Path(sys.executable).with_name("sdfeat")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "sdfeat.cli"]
    log = tmp_path_factory.mktemp("explore") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*command, "explore", store, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"sdfeat explore exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                _get(base, "/api/stores")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"sdfeat explore did not answer within 60 s: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        yield base
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def _viridis(values: np.ndarray, vmin: float, vmax: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected (H, W, 3) colours of index round((v - vmin) / (vmax - vmin) * 255), and its two neighbours'
    (a value on a rounding edge may land on either side)."""
    import matplotlib

    table = np.round(matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).astype(int)  # (256, 3)
    index = np.clip(np.round((values - vmin) / (vmax - vmin) * 255).astype(int), 0, 255)
    return table[index], table[np.clip(index - 1, 0, 255)], table[np.clip(index + 1, 0, 255)]


def _canvas_pixels(page, canvas_id: str) -> np.ndarray:
    data = page.evaluate("""(id) => {
        const c = document.getElementById(id);
        return {w: c.width, h: c.height, data: Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)};
    }""", canvas_id)
    return np.array(data["data"], dtype=int).reshape(data["h"], data["w"], 4)  # (H, W, RGBA)


def _assert_colours(pixels: np.ndarray, values: np.ndarray, vmin: float, vmax: float) -> None:
    assert pixels.shape[:2] == values.shape
    assert (pixels[..., 3] == 255).all()
    exact, below, above = _viridis(values, vmin, vmax)
    rgb = pixels[..., :3]
    near = (rgb == exact).all(-1) | (rgb == below).all(-1) | (rgb == above).all(-1)
    assert near.all(), f"{(~near).sum()} of {near.size} tokens differ from the endpoint's map"
    assert (rgb == exact).all(-1).mean() > 0.95


def test_click_a_token_draws_the_endpoints_similarity_map(server: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    meta = _get(server, "/api/stores")[0]
    block = next((b for b in meta["blocks"] if b["name"] == "up_blocks.1.upsamplers.0"), meta["blocks"][-1])
    _, height, width = block["shape"]
    y, x = height // 3, (2 * width) // 3
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_require_chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('overlay').dataset.drawn === 'none'", timeout=30000)
            before = _canvas_pixels(page, "overlay")

            box = page.locator("#marks").bounding_box()
            page.mouse.click(box["x"] + (x + 0.5) * box["width"] / width, box["y"] + (y + 0.5) * box["height"] / height)
            page.wait_for_function(f"document.getElementById('overlay').dataset.drawn === 'similarity:0:{y}:{x}'",
                                   timeout=30000)
            after = _canvas_pixels(page, "overlay")
            assert after.shape != before.shape or (after != before).any()
            sim = _get(server, "/api/stores/0/similarity", block=block["name"], row=0, y=y, x=x)
            _assert_colours(after, np.array(sim["values"]), -1.0, 1.0)
            assert f"token (y={y}, x={x})" in page.inner_text("#readout")

            # top-k: the other images of the page get their best tokens outlined on their thumbnails
            page.wait_for_function("""() => [...document.querySelectorAll('.cell')].filter(c => c.dataset.row !== '0')
                .some(c => c.title.includes('best similarity'))""", timeout=30000)
            marked = page.evaluate("""() => [...document.querySelectorAll('.cell canvas')].map(c =>
                c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v > 0))""")
            assert sum(marked) == min(meta["samples"], 24) - 1  # every other finished image of the page

            page.select_option("#mode", "norm")
            page.wait_for_function("document.getElementById('overlay').dataset.drawn === 'norm:0'", timeout=30000)
            norm = _get(server, "/api/stores/0/norm", block=block["name"], row=0)
            _assert_colours(_canvas_pixels(page, "overlay"), np.array(norm["values"]), norm["vmin"], norm["vmax"])
            page.select_option("#mode", "similarity")
            page.wait_for_function(f"document.getElementById('overlay').dataset.drawn === 'similarity:0:{y}:{x}'",
                                   timeout=30000)
            page.wait_for_load_state("networkidle")
            shot = tmp_path / "explorer.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    if os.environ.get("SDFEAT_EXPLORE_SCREENSHOT"):
        shutil.copy(shot, os.environ["SDFEAT_EXPLORE_SCREENSHOT"])
    assert problems == []


@pytest.mark.parametrize("path", ["/static/../../../../etc/passwd", "/static/..%2f..%2f..%2fetc%2fpasswd",
                                  "/../../../../etc/passwd", "/static//etc/passwd"])
def test_raw_traversal_paths_are_refused_by_the_server(server: str, path: str) -> None:
    """Sent byte for byte (no client-side normalisation of `..`)."""
    host, port = urllib.parse.urlsplit(server).netloc.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("GET", path, skip_host=False, skip_accept_encoding=True)
    conn.endheaders()
    response = conn.getresponse()
    body = response.read().decode(errors="replace")
    conn.close()
    assert 400 <= response.status < 500 and "root:" not in body
