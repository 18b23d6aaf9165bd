"""The digits page without a browser: how the service serves it (types, caching, limits),
what it may load (its own origin only), how big it is, that the page's JavaScript sampler
is pipeline/core/images.py's bit for bit (run by Node), and build_site's refusals.
tests/test_browser.py drives the page itself in Chromium."""

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pipeline.core.images import sample_latents
from pipeline.serve.app import Settings, create_app
from pipeline.serve.page import ORT_FILES, PAGE_FILES, WEB_DIR, SiteError, build_site
from pipeline.serve.page import main as page_main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def client(onnx_generators: dict[str, Path]) -> Iterator[TestClient]:
    app = create_app(Settings(model=onnx_generators["conditional"], max_body_bytes=256))
    with TestClient(app) as test_client:
        yield test_client


@pytest.mark.parametrize(
    ("url", "content_type", "name"),
    [
        ("/", "text/html; charset=utf-8", "index.html"),
        ("/app.js", "text/javascript; charset=utf-8", "app.js"),
        ("/latents.js", "text/javascript; charset=utf-8", "latents.js"),
        ("/style.css", "text/css; charset=utf-8", "style.css"),
    ],
)
def test_page_files_have_type_etag_and_revalidate(
    client: TestClient, url: str, content_type: str, name: str
) -> None:
    response = client.get(url)
    assert response.status_code == 200
    assert response.content == (WEB_DIR / name).read_bytes()
    assert response.headers["content-type"] == content_type
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    etag = response.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    # A browser that kept a copy asks with its ETag: 304, no body.
    for tags in (etag, f'"stale", W/{etag}'):
        again = client.get(url, headers={"If-None-Match": tags})
        assert (again.status_code, again.content, again.headers["etag"]) == (304, b"", etag)
    assert client.get(url, headers={"If-None-Match": '"stale"'}).status_code == 200
    head = client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(response.content))


def test_page_is_not_part_of_the_api_schema_and_other_paths_stay_404(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not {"/", "/app.js", "/latents.js", "/style.css"} & set(paths)
    assert client.get("/index.html").status_code == 404
    assert client.get("/generator.onnx").status_code == 404  # the model is not for download
    assert client.post("/").status_code == 405


def test_page_is_under_the_services_limits(client: TestClient) -> None:
    # The body limit (256 bytes here) is checked before routing, for the page as for the API.
    response = client.post("/", content=b"x" * 1000)
    assert response.status_code == 413 and "MNIST_GAN_MAX_BODY_BYTES" in response.json()["detail"]


def test_page_is_small_and_loads_nothing_from_elsewhere() -> None:
    sizes = {name: (WEB_DIR / name).stat().st_size for name in PAGE_FILES}
    assert sum(sizes.values()) < 100_000, sizes
    for name in PAGE_FILES:
        text = (WEB_DIR / name).read_text()
        # No absolute URL anywhere (no CDN, no fonts, no analytics), not even protocol-relative.
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), name
    html = (WEB_DIR / "index.html").read_text()
    csp = re.search(r'http-equiv="Content-Security-Policy"\s+content="([^"]+)"', html)
    assert csp and "default-src 'self'" in csp.group(1) and "connect-src 'self'" in csp.group(1)


NODE = shutil.which("node")


@pytest.mark.skipif(NODE is None, reason="node not found (make web needs it too)")
def test_javascript_sampler_is_the_python_one_bit_for_bit() -> None:
    cases = [
        (noise, n, dim, seed)
        for noise in ("normal", "uniform")
        for n, dim, seed in ((3, 100, 0), (2, 64, 7), (1, 5, 2**32 + 5), (4, 100, 2**53 - 1))
    ]
    script = (
        f"import {{ sampleLatents }} from {json.dumps((WEB_DIR / 'latents.js').as_uri())};"
        "const cases = JSON.parse(process.argv[1]);"
        "console.log(JSON.stringify(cases.map(c => Array.from(sampleLatents(...c)))));"
    )
    result = subprocess.run(
        [NODE, "--input-type=module", "-e", script, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for (noise, n, dim, seed), values in zip(cases, json.loads(result.stdout), strict=True):
        expected = sample_latents(noise, n, dim, seed)
        got = np.array(values, dtype=np.float32).reshape(n, dim)
        np.testing.assert_array_equal(got, expected, err_msg=f"{noise} seed={seed}")


def test_build_site_refuses_bad_inputs_before_writing(
    onnx_generators: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "site"
    with pytest.raises(SiteError, match=r"^model: model file .*missing.onnx not found"):
        build_site(tmp_path / "missing.onnx", out)
    with pytest.raises(SiteError, match=r"onnxruntime-web: .*ort\.wasm\.min\.mjs.*npm ci"):
        build_site(onnx_generators["conditional"], out, ort_dist=tmp_path / "no-dist")
    assert not out.exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    dist = tmp_path / "dist"  # a runtime in place, whether or not `npm ci` ran here
    dist.mkdir()
    for name in ORT_FILES:
        (dist / name).write_text("")
    with pytest.raises(SiteError, match="is not a folder"):
        build_site(onnx_generators["conditional"], a_file, ort_dist=dist)


def test_make_web_cli_names_the_bad_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        page_main(["--model", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "site")])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "model: model file" in stderr and "nope.onnx not found" in stderr
    assert not (tmp_path / "site").exists()


def copied_sources(dockerfile: str) -> set[str]:
    """The sources of the Dockerfile's COPY instructions (not their destinations)."""
    sources: set[str] = set()
    for line in dockerfile.replace("\\\n", " ").splitlines():
        words = line.split()
        if words[:1] == ["COPY"]:
            sources |= {word for word in words[1:-1] if not word.startswith("--")}
    return sources


def test_serve_image_carries_the_page() -> None:
    """The serve image takes what both .dockerignore (an allow-list) and the Dockerfile's
    COPY lines let through: each page file must pass both, itself or in a copied folder."""
    sources = copied_sources((REPO / "Dockerfile").read_text())
    allowed = (REPO / ".dockerignore").read_text().splitlines()
    for path in ["pipeline/serve/page.py", *(f"pipeline/serve/web/{name}" for name in PAGE_FILES)]:
        names = {path, *(f"{folder}/" for folder in PurePosixPath(path).parents if folder.name)}
        assert any(f"!{name}" in allowed for name in names), path
        assert names & sources, path
