"""The generation service's operator settings (pydantic-settings).

Precedence: CLI flags (passed to :meth:`Settings.load`) override ``MNIST_GAN_*`` environment
variables override the defaults below. An invalid value fails before anything starts, with
one line naming the flag or env var, the value and what is allowed.
"""

import os
from pathlib import Path
from typing import Any, Literal, get_args

import annotated_types
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.inference.provenance import ALLOWED_URI, MODEL_URI

ENV_PREFIX = "MNIST_GAN_"
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class SettingsError(ValueError):
    """A setting (env var or CLI flag) is invalid; the message names it, its value and what
    is allowed."""


class Settings(BaseSettings):
    """Operator settings: CLI flags override ``MNIST_GAN_*`` env vars override defaults."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid")

    model: Path = Path("models/generator.onnx")
    # Or a registry version, e.g. models:/mnist-generator@champion (pipeline/serve/models.py):
    # fetched at start, on SIGHUP and every reload_s seconds (0: never); replaces ``model``.
    model_uri: str | None = None
    reload_s: float = Field(0, ge=0, le=86_400)
    host: str = "127.0.0.1"  # the container sets 0.0.0.0 explicitly
    port: int = Field(8000, ge=1, le=65535)
    max_n: int = Field(256, ge=1, le=1024)
    # /generate requests in flight per worker (queued for a batch, running, or being
    # encoded): the bound of the batching queue. One more gets 429 at once.
    max_concurrency: int = Field(64, ge=1, le=1024)
    max_body_bytes: int = Field(1 << 20, ge=64, le=64 << 20)
    # Dynamic batching (pipeline/serve/batcher.py): concurrent requests share one
    # onnxruntime call of up to max_batch images, formed within batch_delay_ms of the
    # oldest queued request, up to batch_parallel such calls at once (a single thread
    # leaves cores idle: the model is compute-bound at a few dozen images); a request
    # not started within queue_timeout_ms gets 503.
    batching: bool = True
    batch_delay_ms: float = Field(2.0, ge=0, le=1000)
    max_batch: int = Field(128, ge=1, le=4096)
    batch_parallel: int = Field(2, ge=1, le=64)  # batches running at once (threads)
    queue_timeout_ms: int = Field(1000, ge=1, le=60_000)
    # Processes, each with its own copy of the model and its own concurrency limit; one
    # event loop saturates one core, so more workers scale the n=1 rate with the cores.
    workers: int = Field(1, ge=1, le=64)
    # Seconds a client has to send a whole request, from connecting or from its first byte
    # (pipeline/serve/protocol.py): slower or idle sockets are closed, not held forever.
    read_timeout_s: float = Field(30.0, ge=1, le=3600)
    log_level: LogLevel = "INFO"

    @field_validator("model_uri")
    @classmethod
    def _registry_uri(cls, value: str | None) -> str | None:
        if value is not None and MODEL_URI.fullmatch(value) is None:
            raise ValueError(ALLOWED_URI)
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what the operator passes: no .env file or secrets folder read behind their back.
        return init_settings, env_settings

    @classmethod
    def load(cls, **flags: Any) -> "Settings":
        """Settings from the environment and the non-None ``flags`` (the CLI's values);
        :class:`SettingsError` names the first invalid one."""
        given = {name: value for name, value in flags.items() if value is not None}
        try:
            return cls(**given)
        except ValidationError as error:
            raise SettingsError(_explain(cls, error, given)) from None

    def to_env(self) -> dict[str, str]:
        """The ``MNIST_GAN_*`` variables that :meth:`load` turns back into these settings."""
        values = {name: getattr(self, name) for name in type(self).model_fields}
        return {env_name(name): str(value) for name, value in values.items() if value is not None}


def env_name(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _explain(cls: type[Settings], error: ValidationError, flags: dict[str, Any]) -> str:
    """``MNIST_GAN_PORT='70000' is invalid; allowed: an integer from 1 to 65535`` (or
    ``--port=...`` when the value came from the flag)."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    if field not in cls.model_fields:  # an unknown keyword: a programming error, say it plainly
        return str(error)
    if field in flags:
        source, raw = f"--{field.replace('_', '-')}", flags[field]
    else:
        source = env_name(field)
        raw = next((v for k, v in os.environ.items() if k.upper() == source), first["input"])
    return f"{source}={raw!r} is invalid; allowed: {_allowed(cls, field)}"


def _allowed(cls: type[Settings], field: str) -> str:
    info = cls.model_fields[field]
    if field == "model_uri":
        return ALLOWED_URI
    if field == "log_level":
        return " | ".join(get_args(LogLevel))
    if info.annotation is bool:
        return "true | false"
    low = next((m.ge for m in info.metadata if isinstance(m, annotated_types.Ge)), None)
    high = next((m.le for m in info.metadata if isinstance(m, annotated_types.Le)), None)
    if low is not None and high is not None:
        kind = "an integer" if info.annotation is int else "a number"
        return f"{kind} from {low} to {high}"
    return f"a {info.annotation.__name__ if info.annotation else 'value'}"
