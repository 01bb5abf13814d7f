"""Settings: every environment variable the worker reads, parsed once into an immutable object.

Problems are collected rather than raised one at a time, so a misconfigured Job fails with a
single message that names all of them.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final, Literal, TypeVar

import msgspec

from loader.binance import stream_name
from loader.intervals import INTERVALS
from loader.shards import MAX_STREAMS_PER_CONNECTION, Selection, parse_selection

# What the shutdown budget leaves of the pod's grace period: the process's own exit, and a
# kubelet that counts from a little earlier than the signal arrives.
SHUTDOWN_MARGIN: Final = 5.0
SASL_MECHANISMS: Final = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
DEFAULT_BOOTSTRAP: Final = "localhost:9092"
DEFAULT_WS_URL: Final = "wss://stream.binance.com:9443/ws"
DEFAULT_API_URL: Final = "wss://ws-api.binance.com:443/ws-api/v3"
TOPIC_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
# STOP_AT as a number: below 1e11 it is epoch seconds (1e11 s is the year 5138), from there
# epoch milliseconds (1e11 ms is 1973, before any candle) up to 1e14 (the year 5138 again).
_NUMBER: Final = re.compile(r"[0-9]+(?:\.[0-9]+)?")
EPOCH_SECONDS_BELOW: Final = 1e11
EPOCH_MILLISECONDS_BELOW: Final = 1e14
# 2017-01-01 UTC: Binance's candles begin in July 2017, so an earlier STOP_AT is a mistake.
EARLIEST_STOP_AT: Final = 1_483_228_800.0
# Binance cuts every market-stream connection at 24 h: a rotation must come before.
BINANCE_CONNECTION_LIFETIME: Final = 86_400.0
SYMBOL_RE: Final = re.compile(r"[A-Za-z0-9]{2,20}")

T = TypeVar("T")

LogFormat = Literal["json", "text", "auto"]
LOG_FORMATS: Final[dict[str, LogFormat]] = {"json": "json", "text": "text", "auto": "auto"}


class ConfigError(Exception):
    """The environment does not describe a runnable worker; `problems` names each fault."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class KafkaSettings(msgspec.Struct, frozen=True, kw_only=True):
    bootstrap_servers: str = DEFAULT_BOOTSTRAP
    user: str | None = None
    password: Secret | None = None
    sasl_mechanism: str = "SCRAM-SHA-512"
    ca_path: Path | None = None
    # kafka-python's own sensors (records per request, request rate...): for measuring runs
    # only, they cost several microseconds per record.
    client_metrics: bool = False

    @property
    def security_protocol(self) -> Literal["PLAINTEXT", "SSL", "SASL_SSL"]:
        if self.user is not None:
            return "SASL_SSL"
        return "SSL" if self.ca_path is not None else "PLAINTEXT"


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    queue_id: str
    # The symbols named in SYMBOL (wildcards are in `selection`).
    symbols: tuple[str, ...]
    intervals: tuple[str, ...]
    kafka_topic: str
    telemetry_producer_id: str
    kafka: KafkaSettings
    type: str = "ws_candles"
    queue_control_topic: str = "queue-control"
    queue_events_topic: str = "queue-events"
    binance_ws_url: str = DEFAULT_WS_URL
    binance_api_url: str = DEFAULT_API_URL
    # Publish every in-progress update too, not just closed candles.
    all_candles: bool = False
    telemetry_interval: float = 10.0
    # At most this long to deliver what was received, once the run is told to stop.
    stop_grace: float = 10.0
    # The pod's terminationGracePeriodSeconds: from a stop or SIGTERM, the run ends (terminal
    # event sent, producer closed) within it less SHUTDOWN_MARGIN.
    termination_grace: float = 30.0
    # kafka-python retries a record until this; past it the run ends with `error`.
    delivery_timeout: float = 120.0
    # Epoch seconds after which the run ends as `finished`.
    stop_at: float | None = None
    # How far back the control topic is read, so a stop sent before start still counts.
    control_lookback: float = 3600.0
    channel_size: int = 10_000
    # No frame for this long means a dead connection (Binance does not always ping on time).
    stall_timeout: float = 10.0
    # Binance cuts every connection at 24 h; a fresh one is opened before that, overlapping.
    rotate_after: float = 23 * 3600.0
    # How far back a gap (or a restart) is filled from the history API.
    backfill_window: float = 24 * 3600.0
    # Binance bans IPs above 300 connection attempts per 5 minutes; stay far below.
    connects_per_minute: int = 5
    metrics_port: int | None = None
    # /healthz fails when no frame arrived, or Kafka acknowledged nothing pending, this long.
    health_timeout: float = 60.0
    log_format: LogFormat = "auto"
    # SYMBOL as parsed: named symbols, `*` (every trading symbol) or quote filters (`*USDT`).
    selection: Selection = Selection()
    # This pod's share of the streams: those whose name hashes to shard_index.
    shard_count: int = 1
    shard_index: int = 0
    streams_per_connection: int = 200
    # A busy connection is read once per this many seconds (0: every frame as it comes).
    coalesce: float = 0.010
    # How often exchangeInfo is read again to follow listings and delistings.
    symbols_refresh: float = 3600.0
    # Not from the environment: now, in epoch seconds, as the door (loader/plausibility.py)
    # holds frames against it. A harness whose feed runs on a clock of its own (the emulator
    # faster than real time, a replay of old frames) gives that clock instead.
    clock: Callable[[], float] = time.time

    @property
    def shutdown_budget(self) -> float:
        """Seconds from a stop to the end of the run, everything included."""
        return max(1.0, self.termination_grace - SHUTDOWN_MARGIN)

    @property
    def streams(self) -> tuple[tuple[str, str], ...]:
        """Every (SYMBOL, interval) pair, in the order the lists gave them."""
        return tuple((s, i) for s in self.symbols for i in self.intervals)

    @property
    def stream_names(self) -> tuple[str, ...]:
        return tuple(stream_name(s, i) for s, i in self.streams)


class _Reader:
    """Reads typed values from the environment, noting every problem instead of stopping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def get(self, *names: str, required: bool = False) -> str | None:
        for name in names:
            value = self.env.get(name, "").strip()
            if value:
                return value
        if required:
            self.problems.append(f"{' or '.join(names)} is required")
        return None

    def parse(self, name: str, default: T, convert: Callable[[str], T], expected: str) -> T:
        raw = self.get(name)
        if raw is None:
            return default
        try:
            return convert(raw)
        except ValueError:
            self.problems.append(f"{name}={raw!r} is not {expected}")
            return default

    def choice(
        self, name: str, options: tuple[str, ...], default: str, *, upper: bool = False
    ) -> str:
        raw = self.get(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            self.problems.append(f"{name}={raw!r} is not one of {', '.join(options)}")
            return default
        return value

    def url(self, name: str, default: str, *, base: bool = False) -> str:
        """A ws:// or wss:// URL with a host; with `base`, one the worker appends its own
        path and query to, so it must carry neither a query nor a fragment."""
        value = self.get(name) or default
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("ws", "wss"):
            self.problems.append(f"{name}={value!r} is not a ws:// or wss:// URL")
        elif not parts.hostname:
            self.problems.append(f"{name}={value!r} has no host")
        elif base and (parts.query or parts.fragment or "?" in value or "#" in value):
            self.problems.append(
                f"{name}={value!r} has a query or fragment: the worker adds its own path and "
                "query (/ws/<stream>, /stream?streams=...), so the URL must end at its path"
            )
        return value

    def topic(self, name: str, default: str | None = None) -> str:
        value = self.get(name, required=default is None) or default or ""
        if value and not TOPIC_RE.fullmatch(value):
            self.problems.append(f"{name}={value!r} is not a valid Kafka topic name")
        return value


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(raw)
    return value


def _milliseconds(raw: str) -> float:
    value = float(raw)
    if not 0 <= value <= 100:
        raise ValueError(raw)
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError(raw)
    return value


def _port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError(raw)
    return value


def _stop_at(raw: str) -> float:
    """STOP_AT in epoch seconds: an ISO 8601 time (naive ones are UTC), or a number of epoch
    seconds or milliseconds told apart by magnitude (`EPOCH_SECONDS_BELOW`). A number past
    milliseconds' range (microseconds?) or a time before `EARLIEST_STOP_AT` is refused."""
    if _NUMBER.fullmatch(raw):
        value = float(raw)
        if value >= EPOCH_MILLISECONDS_BELOW:
            raise ValueError(raw)
        seconds = value if value < EPOCH_SECONDS_BELOW else value / 1000
    else:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        seconds = parsed.timestamp()
    if seconds < EARLIEST_STOP_AT:
        raise ValueError(raw)
    return seconds


def _split(raw: str | None) -> list[str]:
    return [part.strip() for part in (raw or "").split(",") if part.strip()]


def _streams(r: _Reader) -> tuple[Selection, tuple[str, ...]]:
    selection, problems = parse_selection(_split(r.get("SYMBOL", required=True)))
    r.problems.extend(problems)
    intervals = tuple(dict.fromkeys(_split(r.get("INTERVAL")))) or ("1m",)
    for interval in intervals:
        if interval not in INTERVALS:
            r.problems.append(f"INTERVAL {interval!r} is not one of {' '.join(INTERVALS)}")
    return selection, intervals


def _shards(r: _Reader) -> tuple[int, int]:
    """SHARD_COUNT and SHARD_INDEX; the index defaults to the Indexed Job's completion index."""
    count = r.parse("SHARD_COUNT", 1, _positive_int, "a positive whole number")
    index_name = "SHARD_INDEX" if r.get("SHARD_INDEX") is not None else "JOB_COMPLETION_INDEX"
    index = r.parse(index_name, 0, _index, "a whole number from 0")
    if index >= count:
        r.problems.append(f"{index_name}={index} is not below SHARD_COUNT={count}")
    return count, index


def _index(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _per_connection(raw: str) -> int:
    value = int(raw)
    if not 1 <= value <= MAX_STREAMS_PER_CONNECTION:
        raise ValueError(raw)
    return value


def _kafka(r: _Reader) -> KafkaSettings:
    user = r.get("KAFKA_USER_PRODUCER", "KAFKA_USER")
    password = r.get("KAFKA_PASSWORD_PRODUCER", "KAFKA_PASSWORD")
    if user and not password:
        r.problems.append("KAFKA_USER_PRODUCER is set but KAFKA_PASSWORD_PRODUCER is not")
    if password and not user:
        r.problems.append("KAFKA_PASSWORD_PRODUCER is set but KAFKA_USER_PRODUCER is not")
    mechanism = r.choice("KAFKA_SASL_MECHANISM", SASL_MECHANISMS, "SCRAM-SHA-512", upper=True)
    ca_raw = r.get("CA_PATH")
    ca_path = Path(ca_raw) if ca_raw else None
    if ca_path is not None and not ca_path.is_file():
        r.problems.append(f"CA_PATH={ca_raw!r} is not a readable file")
    return KafkaSettings(
        bootstrap_servers=r.get("KAFKA_BOOTSTRAP_SERVERS") or DEFAULT_BOOTSTRAP,
        user=user,
        password=Secret(password) if password else None,
        sasl_mechanism=mechanism,
        ca_path=ca_path,
        client_metrics=r.choice("KAFKA_CLIENT_METRICS", ("0", "1"), "0") == "1",
    )


def _seconds(r: _Reader, name: str, default: float) -> float:
    return r.parse(name, default, _positive_float, "a positive number of seconds")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from `env` (default: the process environment) or raise `ConfigError`."""
    r = _Reader(os.environ if env is None else env)
    queue_id = r.get("QUEUE_ID", required=True) or ""
    selection, intervals = _streams(r)
    shard_count, shard_index = _shards(r)
    kafka_topic = r.topic("KAFKA_TOPIC")
    producer_id = r.get("TELEMETRY_PRODUCER_ID", required=True) or ""
    kafka = _kafka(r)
    ws_url = r.url("BINANCE_WS_URL", DEFAULT_WS_URL, base=True)
    api_url = r.url("BINANCE_API_URL", DEFAULT_API_URL)
    candles = r.choice("CANDLES", ("closed", "all"), "closed")
    log_format = LOG_FORMATS[r.choice("LOG_FORMAT", tuple(LOG_FORMATS), "auto")]
    channel_size = r.parse("CHANNEL_SIZE", 10_000, _positive_int, "a positive whole number")
    settings = Settings(
        queue_id=queue_id,
        symbols=selection.symbols,
        intervals=intervals,
        kafka_topic=kafka_topic,
        telemetry_producer_id=producer_id,
        kafka=kafka,
        type=r.get("TYPE") or "ws_candles",
        queue_control_topic=r.topic("QUEUE_CONTROL_TOPIC", "queue-control"),
        queue_events_topic=r.topic("QUEUE_EVENTS_TOPIC", "queue-events"),
        binance_ws_url=ws_url,
        binance_api_url=api_url,
        all_candles=candles == "all",
        telemetry_interval=_seconds(r, "TELEMETRY_INTERVAL", 10.0),
        stop_grace=_seconds(r, "STOP_GRACE", 10.0),
        termination_grace=_seconds(r, "TERMINATION_GRACE_PERIOD", 30.0),
        delivery_timeout=_seconds(r, "KAFKA_DELIVERY_TIMEOUT", 120.0),
        stop_at=r.parse(
            "STOP_AT",
            None,
            _stop_at,
            "an ISO 8601 time, epoch seconds (below 1e11) or epoch milliseconds (below 1e14) "
            "from 2017 on",
        ),
        control_lookback=_seconds(r, "CONTROL_LOOKBACK", 3600.0),
        channel_size=channel_size,
        stall_timeout=_seconds(r, "STALL_TIMEOUT", 10.0),
        rotate_after=_seconds(r, "ROTATE_AFTER", 23 * 3600.0),
        backfill_window=_seconds(r, "BACKFILL_WINDOW", 24 * 3600.0),
        connects_per_minute=r.parse(
            "CONNECTS_PER_MINUTE", 5, _positive_int, "a positive whole number"
        ),
        metrics_port=r.parse("METRICS_PORT", None, _port, "a TCP port number"),
        health_timeout=_seconds(r, "HEALTH_TIMEOUT", 60.0),
        log_format=log_format,
        selection=selection,
        shard_count=shard_count,
        shard_index=shard_index,
        streams_per_connection=r.parse(
            "STREAMS_PER_CONNECTION", 200, _per_connection, "a whole number from 1 to 1024"
        ),
        symbols_refresh=_seconds(r, "SYMBOLS_REFRESH", 3600.0),
        coalesce=r.parse(
            "COALESCE_MS", 10.0, _milliseconds, "a number of milliseconds from 0 to 100"
        )
        / 1000,
    )
    r.problems.extend(_cross_checks(r, settings))
    if r.problems:
        raise ConfigError(r.problems)
    return settings


def _cross_checks(r: _Reader, s: Settings) -> list[str]:
    """Values each valid alone that do not work together; a variable that was itself
    refused (its default stands in) is not judged again."""
    refused = {p.split("=", 1)[0] for p in r.problems}
    problems = []
    if "ROTATE_AFTER" not in refused and s.rotate_after >= BINANCE_CONNECTION_LIFETIME:
        problems.append(
            f"ROTATE_AFTER={s.rotate_after:g} is not below {BINANCE_CONNECTION_LIFETIME:g}: "
            "Binance cuts every connection at 24 h, so the worker must replace it before"
        )
    if not refused & {"HEALTH_TIMEOUT", "STALL_TIMEOUT"} and s.health_timeout <= s.stall_timeout:
        problems.append(
            f"HEALTH_TIMEOUT={s.health_timeout:g} is not above STALL_TIMEOUT={s.stall_timeout:g}:"
            " the worker pings Binance only after STALL_TIMEOUT of silence, so /healthz would "
            "fail a live connection first"
        )
    if "TERMINATION_GRACE_PERIOD" not in refused and s.termination_grace <= SHUTDOWN_MARGIN:
        problems.append(
            f"TERMINATION_GRACE_PERIOD={s.termination_grace:g} is not above "
            f"{SHUTDOWN_MARGIN:g}: the run ends its shutdown {SHUTDOWN_MARGIN:g} s before the "
            "pod's grace period does, so nothing would be left for it"
        )
    return problems
