"""Logs: one JSON object per line for the cluster's collectors, plain text on a terminal."""

from __future__ import annotations

import collections
import datetime as dt
import logging
import sys
import time
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
    # kafka-python logs every retry at WARNING/ERROR; our own messages say it once, quoting
    # its last words on failure (loader.kafka), so its records stop at its own logger.
    kafka = logging.getLogger("kafka")
    kafka.setLevel(logging.WARNING)
    kafka.propagate = False
    kafka.handlers[:] = [logging.NullHandler()]
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)


class ThrottledLog:
    """Logs the first occurrence of each kind, then at most once per `period` with a count."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        self._logger = logger
        self._period = period
        self._next: dict[str, float] = {}
        self._suppressed: collections.Counter[str] = collections.Counter()

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] += 1
            return
        self._next[kind] = now + self._period
        skipped = self._suppressed.pop(kind, 0)
        suffix = f" ({skipped} more like it since the last report)" if skipped else ""
        self._logger.warning("%s: %s%s", kind, message, suffix)
