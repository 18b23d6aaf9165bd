"""The digits page (``pipeline/serve/web/``): served by the service at ``/``, or built into a static
site that runs the model in the browser.

- :func:`mount_page` adds ``GET /`` and the page's few files to the service. They are read
  once, at start-up, and served from memory with their content type, an ETag (a hash of
  the bytes) and ``Cache-Control: no-cache``: browsers keep a copy and ask with
  ``If-None-Match``, so an upgraded service is seen at once and an unchanged page costs a
  304. The service's middleware covers them as it covers the API: the body limit and the
  access log (the concurrency limit counts ``/generate`` only).
- :func:`build_site` (``make web``) writes the same page beside ``generator.onnx``, its
  metadata as ``metadata.json`` (what ``GET /metadata`` says of it) and onnxruntime-web's
  WebAssembly runtime from ``node_modules/``: any static host can serve the folder.

    python -m pipeline.serve.page --model models/generator.onnx --out web
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.routing import Route

from pipeline.core.files import atomic_path, write_json
from pipeline.inference.generator import Generator, ModelError

WEB_DIR = Path(__file__).resolve().parent / "web"
ORT_DIST = Path(__file__).resolve().parents[2] / "node_modules" / "onnxruntime-web" / "dist"
# The page's own files, and the URL each one has (index.html is the folder's page).
PAGE_FILES = {"index.html": "/", "app.js": "/app.js", "latents.js": "/latents.js",
              "style.css": "/style.css"}  # fmt: skip
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
# What the static page loads of onnxruntime-web: its WebAssembly-only build (no WebGL or
# WebGPU code) and the runtime that build instantiates.
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def read(cls, path: Path) -> Asset:
        body = path.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        return cls(body, CONTENT_TYPES[path.suffix], etag)

    def response(self, request: Request) -> Response:
        headers = {
            "ETag": self.etag,
            "Cache-Control": "no-cache",  # keep it, but revalidate: cheap with the ETag
            "X-Content-Type-Options": "nosniff",
        }
        if self.etag in _etags(request.headers.get("if-none-match", "")):
            return Response(status_code=304, headers=headers)
        body = b"" if request.method == "HEAD" else self.body
        response = Response(body, media_type=self.content_type, headers=headers)
        response.headers["Content-Length"] = str(len(self.body))
        return response


def _etags(header: str) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",")}


def mount_page(app: FastAPI) -> None:
    """Serve the page at ``/`` (and its script and style beside it). Not in the OpenAPI
    schema: it is for people, not API clients."""
    for name, url in PAGE_FILES.items():
        asset = Asset.read(WEB_DIR / name)

        async def serve(request: Request, asset: Asset = asset) -> Response:
            return asset.response(request)

        app.router.routes.append(
            Route(url, serve, methods=["GET", "HEAD"], include_in_schema=False)
        )


# --------------------------------------------------------------------------- static site


class SiteError(ValueError):
    """An input of build_site is unusable; the message names it and what is needed."""


def model_metadata(generator: Generator) -> dict:
    """What ``GET /metadata`` says about the model (without the service's max_n)."""
    return {
        "latent_dim": generator.latent_dim,
        "noise": generator.noise,
        "num_classes": generator.num_classes,
        "conditional": generator.conditional,
        "metadata": generator.metadata,
    }


def build_site(model: Path, out: Path, ort_dist: Path = ORT_DIST) -> list[Path]:
    """Write the static site into ``out`` (created or refreshed; other files there are left
    alone) and return the files written. Every input is checked before anything is
    written, and each file is written whole (temp file + rename)."""
    try:
        generator = Generator(model)
    except ModelError as error:
        raise SiteError(f"model: {error}") from None
    missing = [name for name in ORT_FILES if not (ort_dist / name).is_file()]
    if missing:
        raise SiteError(
            f"onnxruntime-web: {missing} not in {ort_dist}; run `npm ci` in the repository "
            "(make web does)"
        )
    if out.exists() and not out.is_dir():
        raise SiteError(f"out: {out} exists and is not a folder")

    sources = {name: WEB_DIR / name for name in PAGE_FILES}
    sources |= {f"ort/{name}": ort_dist / name for name in ORT_FILES}
    sources["generator.onnx"] = model
    written = []
    for name, source in sources.items():
        target = out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as temp:
            shutil.copyfile(source, temp)
        written.append(target)
    write_json(out / "metadata.json", model_metadata(generator))
    written.append(out / "metadata.json")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.serve.page", description="Build the static digits site (make web)."
    )
    parser.add_argument("--model", type=Path, default=Path("models/generator.onnx"))
    parser.add_argument("--out", type=Path, default=Path("web"))
    parser.add_argument("--ort-dist", type=Path, default=ORT_DIST, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        written = build_site(args.model, args.out, args.ort_dist)
    except SiteError as error:
        parser.error(str(error))
    size = sum(path.stat().st_size for path in written) / 1e6
    print(f"wrote {len(written)} files ({size:.1f} MB) to {args.out}/")
    host = f"python -m http.server --bind 127.0.0.1 -d {args.out} 8080"
    print(f"serve it with any static host, e.g.: {host}")


if __name__ == "__main__":
    main()
