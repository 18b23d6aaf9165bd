"""The digits page in a real browser: Debian's chromium, headless, driven by Playwright, against
the real service (uvicorn on 127.0.0.1) and against the static site (`make web`'s output,
served by http.server on 127.0.0.1), both on the small exported generators of conftest.

What the page draws is read back from its canvas (getImageData) and compared with what the
service answers for the same seed, digit and z: exactly in API mode (the page only paints
the service's bytes), within 1e-4 per float pixel in static mode (onnxruntime-web in
WebAssembly vs onnxruntime in Python). The page's Content-Security-Policy stays on, so a
request to anywhere but the page's origin would fail these tests."""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from filelock import FileLock

from pipeline.core.images import sample_latents, tile
from pipeline.inference.generator import Generator
from pipeline.serve.app import Settings, create_app
from pipeline.serve.page import ORT_DIST, ORT_FILES, build_site

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
GRID_N, COLS, SIDE = 30, 10, 28  # as pipeline/serve/web/app.js draws them
TIMEOUT_MS = 30_000  # per wait: this machine is shared and slow, but every wait is bounded

Page = Any  # playwright.sync_api.Page; playwright is imported only when chromium is here


# --------------------------------------------------------------------------- servers


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """The service on 127.0.0.1 (a free port), in a thread of this process."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    # Module scripts and streamed WebAssembly need these types, whatever /etc/mime.types says.
    extensions_map = {".mjs": "text/javascript", ".wasm": "application/wasm"}  # noqa: RUF012

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    handler = functools.partial(StaticHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def service(onnx_generators: dict[str, Path]) -> Iterator[str]:
    with serve_in_thread(create_app(Settings(model=onnx_generators["conditional"]))) as url:
        yield url


@pytest.fixture(scope="module")
def ort_dist() -> Path:
    """onnxruntime-web as `make web` gets it: `npm ci` from package-lock.json when missing.
    Under a lock: each pytest-xdist worker runs this fixture, and two `npm ci` at once in one
    node_modules delete each other's files."""
    with FileLock(REPO / "node_modules.lock", timeout=600):
        if not all((ORT_DIST / name).is_file() for name in ORT_FILES):
            npm = shutil.which("npm")
            assert npm, "npm not found: the static site needs node 20 + npm (see docs/serving.md)"
            subprocess.run(
                [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
                cwd=REPO,
                check=True,
                timeout=300,
            )
    return ORT_DIST


@pytest.fixture(scope="module")
def static_sites(
    onnx_generators: dict[str, Path], ort_dist: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """`make web`'s output for each small generator, each on its own loopback static server."""
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, model in onnx_generators.items():
            site = tmp_path_factory.mktemp(f"web-{name}")
            build_site(model, site, ort_dist)
            urls[name] = stack.enter_context(serve_folder(site))
        yield urls


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.is_file():
        pytest.skip(
            f"Debian's chromium is not installed ({CHROMIUM}); .ci/run installs it "
            "(apt-get install chromium)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """Opens a URL in a fresh tab, waits for the first grid, and afterwards checks that the
    page logged no error: no script error, no request its CSP refused. (Chromium also logs
    each 4xx reply; the tests check those statuses themselves.)"""
    context = browser.new_context(viewport={"width": 800, "height": 900})
    errors: list[str] = []

    def opened(url: str, key: str | None) -> Page:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
        page.on(
            "console",
            lambda message: message.type == "error" and errors.append(message.text),
        )
        page.goto(url)
        if key is not None:  # the first grid drawn, for this seed/digit
            page.wait_for_selector(f'#grid[data-key="{key}"]')
        return page

    yield opened
    context.close()
    unexpected = [text for text in errors if not text.startswith("Failed to load resource")]
    assert not unexpected, unexpected


# Pixels come back from the page as base64 of their bytes: a JSON list of 100,000 numbers
# costs seconds on a busy machine.
TO_BASE64 = """(bytes) => {
    let text = "";
    for (let i = 0; i < bytes.length; i += 8192) {
        text += String.fromCharCode(...bytes.subarray(i, i + 8192));
    }
    return btoa(text);
}"""


def canvas(page: Page, selector: str) -> np.ndarray:
    """The canvas's pixels as uint8 [height, width] (all grey and opaque: one channel)."""
    width, height, encoded = page.evaluate(
        f"""(selector) => {{
            const c = document.querySelector(selector);
            const data = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
            return [c.width, c.height, ({TO_BASE64})(data)];
        }}""",
        selector,
    )
    pixels = np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).reshape(height, width, 4)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 3] == 255).all()
    return pixels[..., 0]


def floats(page: Page, what: str, n: int) -> np.ndarray:
    """The float32 pixels the static page computed (before rounding them to bytes)."""
    encoded = page.evaluate(f"({TO_BASE64})(new Uint8Array(window.digits.{what}.floats.buffer))")
    return np.frombuffer(base64.b64decode(encoded), dtype="<f4").reshape(n, SIDE, SIDE)


def grid(images: np.ndarray) -> np.ndarray:
    return tile(np.asarray(images, dtype=np.uint8), COLS)


def api_pixels(service: str, **query: Any) -> np.ndarray:
    """What the service answers (uint8 [n, 28, 28]): GET with a seed, POST with a z."""
    fields = {"format": "json", "dtype": "uint8", **query}
    if "z" in fields:
        response = httpx.post(f"{service}generate", json=fields, timeout=30)
    else:
        response = httpx.get(f"{service}generate", params=fields, timeout=30)
    assert response.status_code == 200, response.text
    return np.array(response.json()["images"], dtype=np.uint8)


def walk_to(page: Page, percent: int, key_prefix: str) -> None:
    page.locator("#walk").fill(str(percent))
    page.wait_for_selector(f'#walk-canvas[data-key="{key_prefix}/{percent / 100:g}"]')


# --------------------------------------------------------------------------- API mode


def test_page_draws_the_services_digits_and_sevens_on_click(
    service: str, open_page, capsys: pytest.CaptureFixture[str]
) -> None:
    page = open_page(f"{service}#seed=11", "11/null")
    assert page.evaluate("window.digits.mode") == "api"
    assert "Drawn by the service" in page.text_content("#mode")
    # Every digit in turn, one per column: the service's pixels, exactly.
    np.testing.assert_array_equal(
        canvas(page, "#grid"), grid(api_pixels(service, n=GRID_N, seed=11))
    )
    page.get_by_role("button", name="7", exact=True).click()
    page.wait_for_selector('#grid[data-key="11/7"]')
    assert page.get_attribute("#digits button[data-digit='7']", "aria-pressed") == "true"
    sevens = api_pixels(service, n=GRID_N, seed=11, digit=7)
    np.testing.assert_array_equal(canvas(page, "#grid"), grid(sevens))
    # The footer: where the model comes from (GET /metadata).
    assert page.text_content("#meta-preset") == "smoke"
    assert page.text_content("#meta-run") == "test-run"
    assert page.text_content("#meta-date").startswith("20")
    # "new samples": another seed, put in the box, drawn.
    page.click("#new")
    page.wait_for_selector('#grid:not([data-key="11/7"])')
    seed = int(page.input_value("#seed"))
    np.testing.assert_array_equal(
        canvas(page, "#grid"), grid(api_pixels(service, n=GRID_N, seed=seed, digit=7))
    )
    # With the service and the browser warm: how long from navigation to the first grid.
    page.reload()
    page.wait_for_selector("#grid[data-key]")
    with capsys.disabled():
        print(f"\nfirst draw, API mode, warm: {page.evaluate('window.digits.firstDrawMs')} ms")


def test_slider_walks_from_the_first_row_to_the_next_seeds(
    service: str, open_page, onnx_generators: dict[str, Path]
) -> None:
    page = open_page(f"{service}#seed=11&digit=7", "11/7")
    page.wait_for_selector('#walk-canvas[data-key="11/7/0"]')
    start = canvas(page, "#walk-canvas")
    np.testing.assert_array_equal(start, canvas(page, "#grid")[:SIDE])  # the grid's first row
    walk_to(page, 100, "11/7")
    end = canvas(page, "#walk-canvas")
    np.testing.assert_array_equal(end, grid(api_pixels(service, n=COLS, seed=12, digit=7)))
    walk_to(page, 50, "11/7")
    middle = canvas(page, "#walk-canvas")
    assert (middle != start).mean() > 0.05 and (middle != end).mean() > 0.05
    # Halfway along the great circle between the two seeds' latents; drawn by POST with z.
    generator = Generator(onnx_generators["conditional"])
    a, b = (sample_latents(generator.noise, COLS, generator.latent_dim, s) for s in (11, 12))
    z = page.evaluate("Array.from(window.digits.walk.z)")
    z = np.array(z, dtype=np.float32).reshape(COLS, generator.latent_dim)
    np.testing.assert_allclose(z, slerp(a, b, 0.5), atol=1e-5)
    np.testing.assert_array_equal(middle, grid(api_pixels(service, z=z.tolist(), digit=7)))


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    cos = (a64 * b64).sum(1) / np.linalg.norm(a64, axis=1) / np.linalg.norm(b64, axis=1)
    omega = np.arccos(np.clip(cos, -1, 1))[:, None]
    return (np.sin((1 - t) * omega) * a64 + np.sin(t * omega) * b64) / np.sin(omega)


def test_a_refusal_of_the_service_is_shown_in_words(service: str, open_page) -> None:
    page = open_page(f"{service}#seed=11", "11/null")
    before = canvas(page, "#grid")
    page.fill("#seed", str(2**53))  # one past the largest seed JSON keeps exact
    page.press("#seed", "Enter")
    message = page.wait_for_selector("#message:not([hidden])").text_content()
    assert "HTTP 422" in message and "seed: " in message, message
    assert "less than or equal to 9007199254740991" in message, message
    assert page.get_attribute("#grid", "data-key") == "11/null"  # the last good grid stays
    np.testing.assert_array_equal(canvas(page, "#grid"), before)
    page.goto(f"{service}#seed=12&digit=3")  # a link to another grid: same page, new hash
    page.wait_for_selector('#grid[data-key="12/3"]')
    assert page.is_hidden("#message") and page.input_value("#seed") == "12"


def test_a_service_without_a_model_or_gone_is_named(
    open_page, onnx_generators: dict[str, Path], tmp_path: Path
) -> None:
    # GET /metadata answers JSON (503): API mode, not a fall-back to a static model.
    with serve_in_thread(create_app(Settings(model=tmp_path / "missing.onnx"))) as url:
        page = open_page(url, None)
        message = page.wait_for_selector("#message:not([hidden])").text_content()
    assert "HTTP 503" in message and "missing.onnx not found" in message, message
    assert page.text_content("#mode") == "Not connected."
    # The service stops while the page is open: the next click says so.
    with serve_in_thread(create_app(Settings(model=onnx_generators["conditional"]))) as url:
        page = open_page(f"{url}#seed=1", "1/null")
    page.click("#new")
    message = page.wait_for_selector("#message:not([hidden])").text_content()
    assert message.startswith("Could not reach the service"), message


# --------------------------------------------------------------------------- static mode


def test_static_site_draws_what_the_service_draws(
    service: str,
    static_sites: dict[str, str],
    open_page,
    onnx_generators: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.perf_counter()
    page = open_page(f"{static_sites['conditional']}#seed=11&digit=7", "11/7")
    loaded = time.perf_counter() - started
    assert page.evaluate("window.digits.mode") == "static"
    assert "Drawn in this browser" in page.text_content("#mode")
    assert page.text_content("#meta-run") == "test-run"  # from metadata.json
    generator = Generator(onnx_generators["conditional"])
    # The same seed draws the same sevens as onnxruntime in Python, and as the service.
    expected = generator.generate(GRID_N, seed=11, digit=7)
    got = floats(page, "grid", GRID_N)
    with capsys.disabled():
        print(
            f"\nstatic site: first grid {loaded:.1f} s after navigation; "
            f"max |pixel - Python onnxruntime's| = {np.abs(got - expected).max():.1e}"
        )
    np.testing.assert_allclose(got, expected, atol=1e-4)
    service_grid = grid(api_pixels(service, n=GRID_N, seed=11, digit=7)).astype(int)
    assert np.abs(canvas(page, "#grid").astype(int) - service_grid).max() <= 1
    # The same z along the walk.
    walk_to(page, 100, "11/7")
    z = sample_latents(generator.noise, COLS, generator.latent_dim, 12)
    np.testing.assert_allclose(
        floats(page, "walk", COLS), generator.generate(COLS, z=z, digit=7), atol=1e-4
    )
    # Static mode checks the seed itself, naming the field and what is allowed.
    page.fill("#seed", "-3")
    page.press("#seed", "Enter")
    message = page.wait_for_selector("#message:not([hidden])").text_content()
    assert message.startswith('seed: got "-3"; allowed: an integer from 0 to'), message


def test_static_site_of_an_unconditional_model(
    static_sites: dict[str, str], open_page, onnx_generators: dict[str, Path]
) -> None:
    page = open_page(f"{static_sites['unconditional']}#seed=3", "3/null")
    assert page.is_hidden("#digits")  # no digit to choose
    generator = Generator(onnx_generators["unconditional"])  # uniform noise, sigmoid output
    np.testing.assert_allclose(
        floats(page, "grid", GRID_N), generator.generate(GRID_N, seed=3), atol=1e-4
    )


# --------------------------------------------------------------------------- /docs


def test_the_api_docs_render_offline(service: str, browser: Any) -> None:
    """/docs is Swagger UI served by the service itself (fastapi-offline), not from a CDN:
    with every other host unreachable, it still lists the routes."""
    context = browser.new_context()
    outside: list[str] = []

    def only_loopback(route: Any) -> None:
        if route.request.url.startswith(service):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{service}docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path")
    paths = page.locator(".swagger-ui .opblock-summary-path").all_inner_texts()
    assert "/generate" in paths
    assert "MNIST GAN generator" in page.locator(".swagger-ui .info .title").inner_text()
    assert outside == []
    context.close()
