"""Screenshots of the digits page in both modes, for docs/serving.md.

Runs what a user runs, on loopback: ``python -m pipeline.serve`` (API mode) and ``python -m
pipeline.serve.page`` + ``python -m http.server`` (static mode), then Debian's headless chromium
(``apt-get install chromium``) driven by Playwright takes one picture of each:

- ``page_api.png``: the page served by the service at ``/``;
- ``page_static.png``: the static site, the model running in the browser (WebAssembly).

From the repo root, after ``make repro`` (or with any exported generator) and ``npm ci``:
``python -m tools.page_screenshots --model models/generator.onnx docs``
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

from pipeline.serve.page import build_site

API_PORT, STATIC_PORT = 8765, 8766  # not 8000/8080, so servers the user runs are left alone
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
# What each picture shows: a URL fragment (seed, digit) and a point on the latent walk.
VIEWS = {"page_api.png": ("#seed=2026", 35), "page_static.png": ("#seed=7&digit=7", 60)}


@contextlib.contextmanager
def running(command: list[str], url: str) -> Iterator[str]:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{' '.join(command)} did not answer at {url}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


def shoot(browser: Any, url: str, fragment: str, walk: int, out: Path) -> None:
    page = browser.new_page(viewport={"width": 820, "height": 880})
    page.set_default_timeout(60_000)
    page.goto(url + fragment)
    page.wait_for_selector("#grid[data-key]")
    page.locator("#walk").fill(str(walk))
    page.wait_for_selector(f'#walk-canvas[data-key$="/{walk / 100:g}"]')
    page.locator("#walk").blur()  # no focus ring in the picture
    page.screenshot(path=str(out), full_page=True)
    page.close()
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/generator.onnx"))
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs"))
    args = parser.parse_args()
    serve = [sys.executable, "-m", "pipeline.serve", "--model", str(args.model),
             "--port", str(API_PORT), "--log-level", "WARNING"]  # fmt: skip
    with tempfile.TemporaryDirectory() as site, contextlib.ExitStack() as stack:
        build_site(args.model, Path(site))
        static = [sys.executable, "-m", "http.server", "-b", "127.0.0.1", "-d", site,
                  str(STATIC_PORT)]  # fmt: skip
        urls = {
            "page_api.png": stack.enter_context(running(serve, f"http://127.0.0.1:{API_PORT}/")),
            "page_static.png": stack.enter_context(
                running(static, f"http://127.0.0.1:{STATIC_PORT}/")
            ),
        }
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS
            )
            for name, (fragment, walk) in VIEWS.items():
                shoot(browser, urls[name], fragment, walk, args.out / name)
            browser.close()


if __name__ == "__main__":
    main()
