"""The service's operator settings (env vars, flags, one-line refusals) and its JSON log
lines: cheap checks, no model and no server (one short CLI process)."""

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.serve.app import Settings, SettingsError
from pipeline.serve.logs import json_formatter

REPO = Path(__file__).resolve().parent.parent


def test_settings_from_env_and_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MNIST_GAN_MAX_N": "32", "MNIST_GAN_PORT": "9000", "MNIST_GAN_MODEL": "m.onnx"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings.load(port="9001", host=None)
    assert (settings.max_n, settings.port, settings.model) == (32, 9001, Path("m.onnx"))
    assert settings.host == "127.0.0.1"  # loopback unless asked otherwise


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MNIST_GAN_MAX_N", "0"),
        ("MNIST_GAN_MAX_N", "lots"),
        ("MNIST_GAN_MAX_CONCURRENCY", "-1"),
        ("MNIST_GAN_MAX_BODY_BYTES", "1e9"),
        ("MNIST_GAN_PORT", "70000"),
        ("MNIST_GAN_LOG_LEVEL", "loud"),
        ("MNIST_GAN_BATCHING", "maybe"),
        ("MNIST_GAN_BATCH_DELAY_MS", "-1"),
        ("MNIST_GAN_QUEUE_TIMEOUT_MS", "0"),
    ],
)
def test_invalid_settings_are_named(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=f"{name}='{value}' is invalid; allowed: "):
        Settings.load()


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("MNIST_GAN_BATCHING", "maybe", "true | false"),
        ("MNIST_GAN_BATCH_DELAY_MS", "-1", "a number from 0 to 1000"),
        ("MNIST_GAN_MAX_BATCH", "0", "an integer from 1 to 4096"),
        ("MNIST_GAN_READ_TIMEOUT_S", "0", "a number from 1 to 3600"),
    ],
)
def test_batching_settings_say_what_is_allowed(
    name: str, value: str, allowed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    expected = re.escape(f"{name}='{value}' is invalid; allowed: {allowed}") + "$"
    with pytest.raises(SettingsError, match=expected):
        Settings.load()
    monkeypatch.delenv(name)
    monkeypatch.setenv("MNIST_GAN_BATCHING", "false")  # the off switch
    assert Settings.load().batching is False


def test_invalid_flag_is_named_as_the_flag() -> None:
    allowed = "allowed: an integer from 1 to 65535"
    with pytest.raises(SettingsError, match=f"--port='70000' is invalid; {allowed}"):
        Settings.load(port="70000")


def test_cli_refuses_invalid_settings_before_starting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.serve"],
        env={**os.environ, "MNIST_GAN_MAX_CONCURRENCY": "0"},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "MNIST_GAN_MAX_CONCURRENCY='0' is invalid" in result.stderr


def test_log_lines_are_json_with_the_fields_lifted() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("pipeline.serve.test-log-lines")
    logger.addHandler(handler)
    try:
        # "name" is a LogRecord attribute: as a plain extra= key the call itself would raise;
        # ONNX metadata is outside data, so the fields travel under one key.
        fields = {"model": "m.onnx", "name": "from-a-file", "latent_dim": "64"}
        logger.warning("loaded %s", "m", extra={"fields": fields})
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    loaded, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (loaded["level"], loaded["logger"], loaded["msg"]) == (
        "WARNING",
        "pipeline.serve.test-log-lines",
        "loaded m",
    )
    assert (loaded["model"], loaded["name"], loaded["latent_dim"]) == (
        "m.onnx",
        "from-a-file",
        "64",
    )
    assert loaded["ts"].endswith("+00:00") and "fields" not in loaded
    assert failed["level"] == "ERROR" and "ZeroDivisionError: boom" in failed["exc"]
