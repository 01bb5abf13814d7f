"""Helpers for tests that run the worker against the emulator and the real broker."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import trio
from jsonschema import Draft202012Validator
from kafka import KafkaProducer
from kafka_broker import KafkaBroker, Listener
from timing import scaled

from loader import Settings, Worker, contracts, load_settings, run
from loader.testing import Emulator, Kline

CANDLE_FIELDS = [
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_asset_volume",
    "number_of_trades", "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume", "symbol",
    "interval",
]  # fmt: skip
TELEMETRY_FIELDS = [
    "queue_id", "symbol", "type", "status", "message", "records_written", "finished", "producer",
    "timestamp",
]  # fmt: skip


def worker_env(
    kafka: KafkaBroker,
    emulator: Emulator,
    topic: str,
    *,
    listener: Listener = "plaintext",
    **extra: str,
) -> dict[str, str]:
    """The environment a Job would get, pointed at the test broker and the emulator."""
    env = {
        "QUEUE_ID": f"q-{topic}",
        "SYMBOL": "BTCUSDT",
        "INTERVAL": "1m",
        "KAFKA_TOPIC": topic,
        "TELEMETRY_PRODUCER_ID": "loader-test",
        "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap(listener),
        "QUEUE_CONTROL_TOPIC": f"{topic}-control",
        "QUEUE_EVENTS_TOPIC": f"{topic}-events",
        "BINANCE_WS_URL": emulator.raw_url(),
        "BINANCE_API_URL": emulator.ws_api_url,
        "KAFKA_DELIVERY_TIMEOUT": str(scaled(20)),
    }
    if listener == "sasl_ssl":
        env |= {
            "KAFKA_USER_PRODUCER": kafka.username,
            "KAFKA_PASSWORD_PRODUCER": kafka.password,
            "CA_PATH": kafka.ca_path,
        }
    return env | extra


def worker_settings(kafka: KafkaBroker, emulator: Emulator, topic: str, **extra: Any) -> Settings:
    return load_settings(worker_env(kafka, emulator, topic, **extra))


@asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker in its own nursery; leaving the block without stopping it cancels it."""
    async with trio.open_nursery() as nursery:
        worker: Worker = await nursery.start(run, settings)
        yield worker
        if worker.outcome is None:
            nursery.cancel_scope.cancel()


async def read_topic(kafka: KafkaBroker, topic: str, expected: int | None = None) -> list[Any]:
    """Every record of `topic` (at least `expected`), read in a thread."""
    return await trio.to_thread.run_sync(lambda: kafka.read_all(topic, expected=expected))


@functools.cache
def validators(name: str) -> tuple[Any, Any]:
    """JSON Schema validators of a message `name` (loader/contracts): its value and its key."""
    schema = json.loads(contracts.committed(name))
    return Draft202012Validator(schema), Draft202012Validator(schema["$defs"]["key"])


def conforms(name: str, key: bytes | None, value: object) -> None:
    """Raises when a message breaks its published contract, as a consumer would see it."""
    payload, key_schema = validators(name)
    payload.validate(value)
    key_schema.validate(None if key is None else key.decode())


def candles(records: list[Any]) -> list[dict[str, Any]]:
    """Published values, numbers as exact decimals; each checked against the candle schema."""
    published = [json.loads(r.value, parse_float=Decimal) for r in records]
    for record, candle in zip(records, published, strict=True):
        conforms("candle", record.key, candle)
        assert record.key == f"{candle['symbol']}-{candle['interval']}".encode()
    return published


def expected_candle(k: Kline) -> dict[str, Any]:
    """What the worker must publish for a closed emulator kline."""
    return {
        "open_time": k.open_time,
        "open": Decimal(k.open),
        "high": Decimal(k.high),
        "low": Decimal(k.low),
        "close": Decimal(k.close),
        "volume": Decimal(k.volume),
        "close_time": k.close_time,
        "quote_asset_volume": Decimal(k.quote_volume),
        "number_of_trades": k.trades,
        "taker_buy_base_asset_volume": Decimal(k.taker_buy_volume),
        "taker_buy_quote_asset_volume": Decimal(k.taker_buy_quote_volume),
        "symbol": k.symbol,
        "interval": k.interval,
    }


def assert_matches_market(
    published: list[dict[str, Any]], emulator: Emulator, symbol: str, interval: str
) -> None:
    """The stream's closed candles equal the market's over the span they cover: none
    missing, none repeated, in order."""
    mine = [c for c in published if (c["symbol"], c["interval"]) == (symbol, interval)]
    assert mine, f"nothing published for {symbol} {interval}"
    truth = emulator.closed_klines(symbol, interval, mine[0]["open_time"], mine[-1]["open_time"])
    assert [c["open_time"] for c in mine] == [k.open_time for k in truth]
    assert mine == [expected_candle(k) for k in truth]


def produce(kafka: KafkaBroker, topic: str, values: list[bytes], key: bytes | None = None) -> None:
    producer = KafkaProducer(**kafka.producer_config())
    try:
        for value in values:
            producer.send(topic, value=value, key=key)
        producer.flush(timeout=10)
    finally:
        producer.close(timeout=5)


def telemetry(records: list[Any]) -> list[dict[str, Any]]:
    """Telemetry events, each checked against the telemetry schema and its key."""
    events = [json.loads(r.value) for r in records]
    for record, event in zip(records, events, strict=True):
        assert list(event) == TELEMETRY_FIELDS
        conforms("telemetry", record.key, event)
        assert record.key == event["queue_id"].encode()
    return events


def stop_command(queue_id: str) -> bytes:
    """A stop command for `queue_id`, as the queue manager sends it (checked against the
    control schema)."""
    command = {"command": "stop", "queue_id": queue_id}
    conforms("control", queue_id.encode(), command)
    return msgspec.json.encode(command)


def contract() -> dict[str, tuple[str, bool, int]]:
    """The README's table: first words of 'how the run ends' -> (status, finished, exit)."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text[text.index("<!-- telemetry-contract") :].split("\n\n", 1)[0]
    rows: dict[str, tuple[str, bool, int]] = {}
    for line in table.splitlines()[3:]:
        how, status, finished, code, _then = (cell.strip() for cell in line.strip("|").split("|"))
        rows[how] = (status.strip("`"), finished == "`true`", int(code))
    return rows


def row(starts_with: str) -> tuple[str, bool, int]:
    (found,) = [v for k, v in contract().items() if k.startswith(starts_with)]
    return found


def terminal(events: list[dict[str, object]], exit_code: int) -> tuple[object, object, int]:
    """(status, finished, exit code) of a run whose events these are, after checking the
    order every run keeps: started first, then loading, then one terminal event."""
    statuses = [e["status"] for e in events]
    assert statuses[0] == "started", statuses
    assert set(statuses[1:-1]) <= {"loading"}, statuses
    assert statuses[-1] in {"interrupted", "error", "finished"}, statuses
    assert [e["finished"] for e in events[:-1]] == [False] * (len(events) - 1)
    return events[-1]["status"], events[-1]["finished"], exit_code


def env_without_kafka_vars(base: Mapping[str, str]) -> dict[str, str]:
    """The test process's environment minus anything that would configure a worker."""
    prefixes = ("KAFKA", "QUEUE", "SYMBOL", "INTERVAL", "BINANCE", "CA_PATH", "TELEMETRY")
    return {k: v for k, v in base.items() if not k.startswith(prefixes)}
