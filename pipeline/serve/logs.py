"""The service's log output: one JSON object a line on stderr (python-json-logger), so log
shippers need no parsing rules.

Each line has ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``msg``, plus the
structured fields a call site passes as ``extra={"fields": {...}}``. The fields travel under
one key so that names taken from outside (an ONNX file's metadata) can never collide with
``LogRecord``'s own attributes, which would make the logging call itself fail.
"""

import logging
import sys
from typing import Any

from pythonjsonlogger.json import JsonFormatter


class _Formatter(JsonFormatter):
    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data.update(log_data.pop("fields", None) or {})  # lifted to the top level


def json_formatter() -> logging.Formatter:
    return _Formatter(
        "{levelname}{name}{message}",
        style="{",
        timestamp="ts",
        rename_fields={"levelname": "level", "name": "logger", "message": "msg", "exc_info": "exc"},
    )


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_formatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # uvicorn's own lines (start-up, shutdown) through the same JSON handler
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
