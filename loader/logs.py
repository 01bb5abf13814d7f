"""Logs: one JSON object per line for the cluster's collectors, plain text on a terminal."""

from __future__ import annotations

import datetime as dt
import logging
import sys
from typing import Any

import msgspec

from loader.settings import LogFormat

# Attributes every LogRecord has; anything else was passed with `extra=` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, context: dict[str, str]) -> None:
        super().__init__()
        self.context = context
        self._encode = msgspec.json.Encoder(enc_hook=repr).encode

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **self.context,
        }
        entry.update((k, v) for k, v in record.__dict__.items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return self._encode(entry).decode()


def configure(log_format: LogFormat, context: dict[str, str], level: int = logging.INFO) -> None:
    """Route the root logger to stdout in the chosen format; `context` tags every JSON line."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    if use_json:
        handler.setFormatter(JsonFormatter(context))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # kafka-python logs every reconnect attempt at WARNING/ERROR; our own messages say it once.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
