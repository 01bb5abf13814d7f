"""The worker end to end: the emulator, the real broker (both listeners), telemetry and stop."""

from __future__ import annotations

import json
import time
from decimal import Decimal

import pytest
import trio
from kafka_broker import KafkaBroker, Listener
from worker_tools import (
    CANDLE_FIELDS,
    assert_matches_market,
    candles,
    produce,
    read_topic,
    running_worker,
    stop_command,
    telemetry,
    worker_settings,
)

from loader import FatalError, run
from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=7)  # a 1m candle every 0.1 s


@pytest.mark.parametrize("listener", ["plaintext", "sasl_ssl"])
async def test_closed_candles_equal_the_market(kafka: KafkaBroker, listener: Listener) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, f"candles-{listener}")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic, listener=listener)
        async with running_worker(settings) as worker:
            await worker.wait_written(8)
            worker.stop("test done")
            outcome = await worker.finished()
        records = await read_topic(kafka, topic, expected=outcome.records_written)
        assert len(records) == outcome.records_written >= 8
        assert {r.key for r in records} == {b"BTCUSDT-1m"}
        for record in records:
            assert list(json.loads(record.value)) == CANDLE_FIELDS
        published = candles(records)
        assert all(isinstance(c["open"], Decimal) for c in published)
        assert_matches_market(published, emulator, "BTCUSDT", "1m")
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)


async def test_all_candles_publishes_updates_in_order(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "candles-all")
    async with open_emulator(FAST.replace(speed=120)) as emulator:
        settings = worker_settings(kafka, emulator, topic, CANDLES="all")
        async with running_worker(settings) as worker:
            await worker.wait_written(200)
            worker.stop()
            outcome = await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=outcome.records_written))
        updates = [c for c in published if not c["is_closed"]]
        closed = [c for c in published if c["is_closed"]]
        assert updates
        assert len(closed) >= 2
        # Never backwards: each update belongs to the open candle or a later one.
        opens = [c["open_time"] for c in published]
        assert opens == sorted(opens)
        # Every candle's last publication is its close, and closes match the market.
        for c in closed:
            later = [u for u in updates if u["open_time"] == c["open_time"]]
            assert all(published.index(u) < published.index(c) for u in later)
        assert_matches_market(
            [{k: v for k, v in c.items() if k != "is_closed"} for c in closed],
            emulator,
            "BTCUSDT",
            "1m",
        )


async def test_many_streams_over_one_connection(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "candles-multi", 3)
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL="BTCUSDT,ETHUSDT,SOLUSDT", INTERVAL="1m,3m"
        )
        assert len(settings.streams) == 6
        async with running_worker(settings) as worker:
            await worker.wait_written(60)
            await emulator.wait_connections(1)
            (conn,) = emulator.connections
            worker.stop()
            outcome = await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=outcome.records_written))
        for symbol, interval in settings.streams:
            assert_matches_market(published, emulator, symbol, interval)
    assert "/stream?streams=" in conn.path


async def test_telemetry_sequence_and_counts(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "telemetry")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic, TELEMETRY_INTERVAL="0.2")
        async with running_worker(settings) as worker:
            # Three events at least: started and two loading reports.
            await read_topic(kafka, settings.queue_events_topic, expected=3)
            worker.stop("stopped by the test")
            outcome = await worker.finished()
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    statuses = [e["status"] for e in events]
    assert statuses[0] == "started"
    assert statuses[-1] == "interrupted"
    assert set(statuses[1:-1]) == {"loading"}
    assert len(statuses) >= 4
    counts = [e["records_written"] for e in events]
    assert counts == sorted(counts)
    assert counts[-1] == outcome.records_written
    written = await read_topic(kafka, topic)
    assert len(written) == outcome.records_written
    for e in events:
        assert e["queue_id"] == settings.queue_id
        assert e["symbol"] == "BTCUSDT"
        assert e["type"] == "ws_candles"
        assert e["producer"] == "loader-test"
        assert isinstance(e["timestamp"], float)
    # Only the terminal event of a final outcome (a stop by the caller) says finished.
    assert [e["finished"] for e in events] == [False] * (len(events) - 1) + [True]
    assert "stopped by the test" in events[-1]["message"]
    keys = {r.key for r in await read_topic(kafka, settings.queue_events_topic)}
    assert keys == {settings.queue_id.encode()}


async def test_stop_at_finishes(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "stop-at")
    async with open_emulator(FAST) as emulator:
        stop_at = str(int((time.time() + 1.5) * 1000))
        settings = worker_settings(kafka, emulator, topic, STOP_AT=stop_at)
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("finished", 0)
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert events[-1]["status"] == "finished"
    assert events[-1]["finished"] is True


async def test_stop_command_while_running(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "stop-running")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic)
        control = settings.queue_control_topic
        async with running_worker(settings) as worker:
            await worker.wait_written(3)
            noise = [
                b'{"command":"stop","queue_id":"somebody-else"}',
                b"not json at all",
                b'{"command":"pause","queue_id":"%s"}' % settings.queue_id.encode(),
            ]
            await trio.to_thread.run_sync(produce, kafka, control, noise)
            stop = stop_command(settings.queue_id)
            await trio.to_thread.run_sync(produce, kafka, control, [stop])
            outcome = await worker.finished()
            # The two for us that are not a stop were counted; the foreign one is not ours.
            assert worker.stats.control_ignored == 2
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)
    assert "stop command" in outcome.message
    written = await read_topic(kafka, topic)
    assert len(written) == outcome.records_written >= 3
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert [e["status"] for e in events][-1] == "interrupted"
    assert events[-1]["records_written"] == outcome.records_written


async def test_unreachable_kafka_fails_clearly(kafka: KafkaBroker) -> None:
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, "unreachable", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
            KAFKA_DELIVERY_TIMEOUT="2",
        )  # fmt: skip
        with pytest.raises(FatalError) as caught:
            await run(settings)
    message = str(caught.value)
    assert "cannot open a Kafka producer to 127.0.0.1:1" in message
    assert caught.value.exit_code == 1


async def test_wrong_password_fails_clearly(kafka: KafkaBroker) -> None:
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, "wrong-password", listener="sasl_ssl",
            KAFKA_PASSWORD_PRODUCER="not-the-password", KAFKA_DELIVERY_TIMEOUT="3",
        )  # fmt: skip
        with pytest.raises(FatalError) as caught:
            await run(settings)
    message = str(caught.value)
    assert "cannot open a Kafka producer" in message
    assert "SASL_SSL" in message
    assert "not-the-password" not in message
    assert caught.value.exit_code == 1
