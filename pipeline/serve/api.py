"""What the service's API says and does, apart from the routes: the request and response
models (so the OpenAPI schema states every limit), and the work behind ``/generate``
(seed, explicit ``z``, batched or not (:mod:`pipeline.serve.batcher`), PNG or JSON rendering).

Only onnxruntime, numpy and zlib do the work (via :mod:`pipeline.inference.generator` and
:mod:`pipeline.core.png`): no TensorFlow or Pillow import anywhere on this path.
"""

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import anyio.to_thread
import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.core.images import to_uint8
from pipeline.inference.generator import Draw, Generator, InputError, encode_png
from pipeline.serve.models import ModelSlot

log = logging.getLogger("pipeline.serve")

MAX_SEED = 2**53 - 1  # the largest integer every JSON client (JavaScript too) keeps exact
MAX_ABS_Z = 100.0  # trained noise is N(0, 1) or U(-1, 1); far larger values only make NaNs
DEFAULT_N = 16
# Up to this many images the onnxruntime call plus encoding takes well under a millisecond,
# less than handing it to a worker thread costs, so it runs inline on the event loop.
INLINE_MAX_N = 8

# --------------------------------------------------------------------------- schema

Format = Literal["png", "json"]
DType = Literal["uint8", "float32"]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="same seed, same images")]
LatentValue = Annotated[float, Field(ge=-MAX_ABS_Z, le=MAX_ABS_Z, allow_inf_nan=False)]


class Images(BaseModel):
    n: int
    shape: list[int] = Field(description="[n, 28, 28]")
    dtype: DType
    seed: int | None = Field(description="the seed used (drawn at random when not given)")
    digit: int | None
    images: list[list[list[float]]] = Field(description="pixel rows; uint8 0..255 or [0, 1]")


class Problem(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    reason: str | None = Field(description="why the model is not loaded")


class Registry(BaseModel):
    name: str
    version: str
    alias: str | None = Field(description="the alias it was fetched by, e.g. champion")
    run_id: str | None
    metrics: dict[str, float] = Field(description="fid, recall, precision, ... at promotion")


class Metadata(BaseModel):
    latent_dim: int
    noise: str
    num_classes: int = Field(description="0 for an unconditional model")
    conditional: bool
    max_n: int = Field(description="largest n one request may ask for")
    metadata: dict[str, str] = Field(description="the ONNX file's metadata_props")
    registry: Registry | None = Field(
        description="the registry version served (MNIST_GAN_MODEL_URI, or a fetched file)"
    )


def request_models(
    max_n: int, num_classes: int, latent_dim: int | None
) -> tuple[type[BaseModel], type[BaseModel]]:
    """The fields of GET's query and POST's JSON body: the same, plus ``z`` in the body.
    The limits come from the settings and the loaded model, so the schema states them."""
    digit_type = Annotated[
        int,
        Field(ge=0, le=num_classes - 1, description="class to draw (conditional models only)"),
    ]

    class Fields(BaseModel):
        model_config = ConfigDict(extra="forbid")  # a typo (?digt=3) is an error, not ignored

        n: int | None = Field(
            None, ge=1, le=max_n, description=f"number of images; default {DEFAULT_N}, or len(z)"
        )
        seed: Seed | None = None
        digit: digit_type | None = None
        format: Format = "png"
        dtype: DType = Field("uint8", description="pixel type of format=json")

    class GenerateQuery(Fields):
        n: int = Field(DEFAULT_N, ge=1, le=max_n, description="number of images")

    row = Field(min_length=latent_dim, max_length=latent_dim) if latent_dim else Field()

    class GenerateBody(Fields):
        # strict: JSON types as declared (no true for 1, no "5" for 5).
        model_config = ConfigDict(extra="forbid", strict=True)

        z: list[Annotated[list[LatentValue], row]] | None = Field(
            None,
            min_length=1,
            max_length=max_n,
            description="explicit latent vectors [n, latent_dim] instead of seeded noise",
        )

    return GenerateQuery, GenerateBody


def query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI ``parameters`` of GET's query, from its model: what FastAPI would write
    for ``Annotated[model, Query()]``, for a route that parses the query itself."""
    schema = model.model_json_schema()
    required = set(schema.get("required", []))
    parameters = []
    for name, field in schema["properties"].items():
        parameter = {"name": name, "in": "query", "required": name in required, "schema": field}
        if "description" in field:
            parameter["description"] = field["description"]
        parameters.append(parameter)
    return parameters


def parse_query(model: type[BaseModel], request: Request) -> Any:
    """``model`` from the query string, with FastAPI's 422 on bad input (same ``loc``).

    Validating with pydantic directly instead of FastAPI's query-model dependency saves
    most of the per-request framework time on small requests (measured: see docs/benchmarks.md,
    HTTP service benchmark); the model and its errors are the same."""
    try:
        return model.model_validate(dict(request.query_params))  # repeated key: the last
    except ValidationError as error:
        errors = [{**item, "loc": ("query", *item["loc"])} for item in error.errors()]
        raise RequestValidationError(errors) from None


def generate_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": Images,
            "description": "a PNG grid (format=png) or the images as JSON arrays",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
        },
        400: {"model": Problem, "description": "a body that is not even text (not UTF-8)"},
        413: {"model": Problem, "description": "request body over MNIST_GAN_MAX_BODY_BYTES"},
        429: {"model": Problem, "description": "MNIST_GAN_MAX_CONCURRENCY requests in flight"},
        503: {
            "model": Problem,
            "description": "the model is not loaded (see /readyz), or the request waited "
            "over MNIST_GAN_QUEUE_TIMEOUT_MS for its batch (Retry-After)",
        },
    }


# --------------------------------------------------------------------------- the work


class NotReadyError(Exception):
    pass


class BadInputError(Exception):
    def __init__(self, where: str, error: InputError) -> None:
        self.where = where
        self.error = error


@dataclass(frozen=True)
class Job:
    """One request's work, as the batcher or a plain call runs it: its checked inputs (the
    seed or ``z``, the digit) and its rendering."""

    generator: Generator
    draw: Draw
    fmt: Format
    dtype: DType

    def respond(self, images: np.ndarray) -> Response:
        draw = self.draw
        return respond(self.generator, images, draw.seed, draw.digit, self.fmt, self.dtype)

    def render(self) -> Response:
        """Unbatched: one onnxruntime call for this request alone."""
        return self.respond(self.generator.run(self.generator.feeds([self.draw])))


def respond(
    generator: Generator,
    images: np.ndarray,
    seed: int,
    digit: int | None,
    fmt: Format,
    dtype: DType,
) -> Response:
    """``images`` (float32 [n, 28, 28]) as a PNG grid or JSON arrays."""
    n = len(images)
    headers = {"X-Seed": str(seed)}
    if fmt == "png":
        png = encode_png(images, generator.columns(n, digit))
        return Response(png, media_type="image/png", headers=headers)
    compact = (",", ":")
    if dtype == "uint8":
        pixels = json_uint8(to_uint8(images))  # the common case, and the costly one
    else:
        pixels = json.dumps(images.tolist(), separators=compact).encode()
    # The envelope by json, the pixels spliced in.
    fields = {"n": n, "shape": list(images.shape), "dtype": dtype, "seed": seed, "digit": digit}
    envelope = json.dumps(fields, separators=compact)[:-1].encode()
    body = b"".join((envelope, b',"images":', pixels, b"}"))
    return Response(body, media_type="application/json", headers=headers)


def _words(texts: Iterable[str]) -> np.ndarray:
    """Four-character strings as uint32 words, one each."""
    return np.frombuffer("".join(texts).encode("ascii"), np.uint32)


# Each byte value's JSON text, padded to four characters (whitespace is valid JSON), ending
# a row's cell with "," or, for its last cell, "]"; and the openers of a row, of the first
# row of an image (closing the image before it) and of the very first row.
_CELL = _words(f"{value:>3}," for value in range(256))
_LAST_CELL = _words(f"{value:>3}]" for value in range(256))
_ROW, _IMAGE, _FIRST = _words(["  ,[", "],[[", "  [["])


def json_uint8(pixels: np.ndarray) -> bytes:
    """uint8 [n, h, w] as JSON nested arrays, e.g. ``[[[  0,255],[ 12,  7]]]`` with its
    spaces, built as one array of four-byte words (an opener per row, then one word per
    pixel) by two table look-ups: 8.5x (n=1) to 29x (n=16) faster than
    ``json.dumps(pixels.tolist())``, and this is most of a JSON request's own work."""
    n, height, width = pixels.shape
    words = np.empty((n, height, width + 1), np.uint32)
    words[:, :, 0] = _ROW
    words[:, 0, 0] = _IMAGE
    words[0, 0, 0] = _FIRST
    words[:, :, 1:] = _CELL[pixels]
    words[:, :, width] = _LAST_CELL[pixels[:, :, -1]]
    return b"[" + words.tobytes() + b"]]"


async def generate(slot: ModelSlot, where: str, request: Any) -> Response:
    """Serves GET (``request`` is the query model) and POST (the body model, maybe with z);
    through the model's batcher when batching is on, so concurrent requests share
    onnxruntime calls. The model is taken once: a swap meanwhile does not touch this one."""
    loaded = slot.current
    if loaded is None:
        raise NotReadyError(slot.reason)
    generator, batcher = loaded.generator, loaded.batcher
    # GET's model has no z: looked up in the fields, as getattr's miss costs pydantic an
    # exception per request.
    n, z, latent = request.n, vars(request).get("z"), None
    try:
        if z is not None:
            if n is not None and n != len(z):
                raise InputError("n", n, f"omitted, or len(z) = {len(z)}")
            n, latent = len(z), np.asarray(z, dtype=np.float32)
        n = DEFAULT_N if n is None else n
        # An unseeded request is random; the seed that draw picks (up to MAX_SEED) is reported,
        # so it can be replayed.
        draw = generator.draw(n, seed=request.seed, digit=request.digit, z=latent)
    except InputError as error:  # checked before any work: a bad request joins no batch
        raise BadInputError(where, error) from None
    job = Job(generator, draw, request.format, request.dtype)
    if batcher is None:
        if n <= INLINE_MAX_N:
            return job.render()
        return await anyio.to_thread.run_sync(job.render)
    return await batcher.generate(draw, job.respond)  # QueueTimeoutError: 503
