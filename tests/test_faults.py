"""Fault injection: whatever happens to Binance, Kafka or the worker, the closed candles in
Kafka equal the emulator's over the span they cover: none missing, none repeated, in order.

Each test prints its counts (`pytest -s`) for the record.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import trio
from kafka_broker import KafkaBroker, local_broker_pid, run_broker_script, wait_until_serving
from worker_tools import (
    assert_matches_market,
    candles,
    env_without_kafka_vars,
    for_a_process,
    read_topic,
    row,
    running_worker,
    telemetry,
    terminal,
    worker_env,
    worker_settings,
)

from loader import Worker
from loader.testing import Emulator, EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=5, ping_interval=0.5, pong_timeout=2.0)
SYMBOLS = "BTCUSDT,ETHUSDT"


async def _check(kafka: KafkaBroker, emulator: Emulator, topic: str, worker: Worker) -> int:
    outcome = await worker.finished()
    published = candles(await read_topic(kafka, topic, expected=outcome.records_written))
    assert len(published) == outcome.records_written
    for symbol in SYMBOLS.split(","):
        assert_matches_market(published, emulator, symbol, "1m")
    print(
        f"\n{len(published)} candles, exact; backfilled {worker.stats.candles_backfilled}, "
        f"reconnects {dict(worker.stats.reconnects)}, malformed {dict(worker.stats.malformed)}, "
        f"duplicates dropped {worker.stats.duplicates_dropped}, "
        f"stream handshakes {emulator.stream_handshakes}"
    )
    return len(published)


async def _new_topic(kafka: KafkaBroker, name: str) -> str:
    return await trio.to_thread.run_sync(kafka.new_topic, name, 2)


async def run_through(
    kafka: KafkaBroker,
    name: str,
    fault: Callable[[Emulator], object] | None,
    *,
    config: EmulatorConfig = FAST,
    handshakes: int = 2,
    **env: str,
) -> tuple[Worker, Emulator, float]:
    """Stream 10 candles, inject `fault`, wait for `handshakes` stream connections in all,
    stream 20 more, stop, and check Kafka against the market. Returns the seconds from the
    fault to the last handshake too."""
    topic = await _new_topic(kafka, name)
    async with open_emulator(config) as emulator:
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOLS, **env)
        async with running_worker(settings) as worker:
            await worker.wait_written(10)
            injected_at = trio.current_time()
            if fault is not None:
                fault(emulator)
            await emulator.wait_for(lambda e: e.stream_handshakes >= handshakes)
            recovered = trio.current_time() - injected_at
            await worker.wait_written(worker.records_written + 20)
            worker.stop()
            await _check(kafka, emulator, topic, worker)
    return worker, emulator, recovered


async def test_dropped_connection_is_backfilled(kafka: KafkaBroker) -> None:
    worker, _, _ = await run_through(kafka, "fault-drop", Emulator.drop)
    # Whether candles closed while reconnecting depends on the jittered backoff; the
    # stall and refusal tests make the outage long enough to need a backfill.
    assert worker.stats.reconnects["closed"] == 1


async def test_stalled_connection_is_replaced(kafka: KafkaBroker) -> None:
    worker, _, _ = await run_through(kafka, "fault-stall", Emulator.stall, STALL_TIMEOUT="0.5")
    assert worker.stats.reconnects["stalled"] >= 1
    assert worker.stats.candles_backfilled > 0


async def test_rotation_before_the_lifetime_overlaps(kafka: KafkaBroker) -> None:
    worker, _, _ = await run_through(kafka, "fault-rotate", None, handshakes=4, ROTATE_AFTER="0.7")
    assert worker.stats.reconnects["lifetime"] >= 3


async def test_binance_24h_cut_is_backfilled(kafka: KafkaBroker) -> None:
    worker, _, _ = await run_through(
        kafka, "fault-24h", None, config=FAST.replace(max_lifetime=0.8), handshakes=3
    )
    assert worker.stats.reconnects["closed"] >= 2


async def test_server_shutdown_rotates_without_a_gap(kafka: KafkaBroker) -> None:
    worker, _, _ = await run_through(kafka, "fault-shutdown", lambda e: e.shutdown(grace=1.0))
    assert worker.stats.reconnects["server_shutdown"] == 1


def _garbage(emulator: Emulator) -> None:
    for _ in range(3):
        emulator.send_invalid_json()
        emulator.send_binary()
        emulator.send_unknown_event()
    emulator.send_oversized()


async def test_garbage_is_skipped_and_counted(kafka: KafkaBroker) -> None:
    worker, emulator, _ = await run_through(kafka, "fault-garbage", _garbage, handshakes=1)
    assert dict(worker.stats.malformed) == {
        "invalid_json": 3,
        "binary": 3,
        "unknown_event": 3,
        "oversize": 1,
    }
    assert emulator.stream_handshakes == 1


@pytest.mark.parametrize("status", [429, 418])
async def test_refused_handshakes_honour_retry_after(kafka: KafkaBroker, status: int) -> None:
    def refuse_then_drop(emulator: Emulator) -> None:
        emulator.refuse_handshakes(2, status=status, retry_after=1)
        emulator.drop()

    worker, emulator, waited = await run_through(kafka, f"fault-{status}", refuse_then_drop)
    assert emulator.refused == 2
    assert worker.stats.reconnects[f"rejected_{status}"] == 2
    assert waited >= 2.0  # two refusals, each asking for a second
    assert worker.stats.candles_backfilled > 0


async def test_broker_restart_loses_and_repeats_nothing(private_kafka: KafkaBroker) -> None:
    kafka = private_kafka
    topic = await _new_topic(kafka, "fault-broker-restart")
    async with open_emulator(FAST) as emulator:
        # A restart (stop, start, unfencing) can take longer than the tests' short default.
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL=SYMBOLS, KAFKA_DELIVERY_TIMEOUT="120"
        )
        async with running_worker(settings) as worker:
            await worker.wait_written(10)
            await trio.to_thread.run_sync(lambda: run_broker_script("down", env=kafka.env))
            await trio.to_thread.run_sync(lambda: run_broker_script("up", env=kafka.env))
            await trio.to_thread.run_sync(wait_until_serving, kafka)
            await worker.wait_written(worker.records_written + 20)
            worker.stop()
            await _check(kafka, emulator, topic, worker)


@asynccontextmanager
async def broker_paused(kafka: KafkaBroker) -> AsyncIterator[None]:
    """The broker's JVM frozen (SIGSTOP): a real, total Kafka stall."""
    pid = local_broker_pid(kafka)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
        await trio.to_thread.run_sync(wait_until_serving, kafka)


async def test_slow_kafka_keeps_the_websocket(private_kafka: KafkaBroker) -> None:
    """Kafka stalls for 3x Binance's pong timeout: backpressure reaches the reader, which
    sheds superseded updates and keeps answering pings; nothing closed is lost."""
    kafka = private_kafka
    topic = await _new_topic(kafka, "fault-slow-kafka")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL=SYMBOLS, CANDLES="all", CHANNEL_SIZE="16"
        )
        async with running_worker(settings) as worker:
            await worker.wait_written(50)
            async with broker_paused(kafka):
                # The slowdown itself: how long Kafka stays unresponsive.
                await trio.sleep(3 * FAST.pong_timeout)
            await worker.wait_written(worker.records_written + 50)
            worker.stop()
            outcome = await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=outcome.records_written))
        closed = [
            {k: v for k, v in c.items() if k != "is_closed"} for c in published if c["is_closed"]
        ]
        for symbol in SYMBOLS.split(","):
            assert_matches_market(closed, emulator, symbol, "1m")
    assert worker.stats.updates_shed > 0
    assert emulator.stream_handshakes == 1
    assert sum(worker.stats.reconnects.values()) == 0


async def test_unreachable_broker_past_delivery_timeout_is_an_error(
    private_kafka: KafkaBroker,
) -> None:
    kafka = private_kafka
    topic = await _new_topic(kafka, "fault-dead-kafka")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL=SYMBOLS, KAFKA_DELIVERY_TIMEOUT="2", STOP_GRACE="1"
        )
        async with running_worker(settings) as worker:
            await worker.wait_written(5)
            async with broker_paused(kafka):
                outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("error", 1)
    assert "Kafka" in outcome.message


async def test_wrong_symbol_ends_with_exit_2(kafka: KafkaBroker) -> None:
    topic = await _new_topic(kafka, "fault-wrong-symbol")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic, SYMBOL="NOPEUSDT", STALL_TIMEOUT="0.5")
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("error", 2)
    assert "NOPEUSDT" in outcome.message
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("no stream left")


async def test_killed_worker_resumes_from_the_topic(kafka: KafkaBroker) -> None:
    """An evicted pod (SIGKILL, no goodbye) and its replacement: together, exact."""
    topic = await _new_topic(kafka, "fault-killed")
    async with open_emulator(for_a_process(FAST)) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, SYMBOL=SYMBOLS
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.DEVNULL
        )
        try:
            await read_topic(kafka, topic, expected=10)
        finally:
            process.kill()
            await process.wait()
        first = len(await read_topic(kafka, topic))
        # Time passes while no pod runs: these candles must come from the backfill.
        await emulator.wait_closed(
            "BTCUSDT", "1m", len(emulator.closed_klines("BTCUSDT", "1m")) + 10
        )
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOLS)
        async with running_worker(settings) as worker:
            await worker.wait_written(20)
            worker.stop()
            outcome = await worker.finished()
        published = candles(
            await read_topic(kafka, topic, expected=first + outcome.records_written)
        )
        assert len(published) == first + outcome.records_written
        for symbol in SYMBOLS.split(","):
            assert_matches_market(published, emulator, symbol, "1m")
    assert worker.stats.candles_backfilled >= 20
    print(f"\nfirst pod {first}, second pod {outcome.records_written} "
          f"(backfilled {worker.stats.candles_backfilled}), exact")  # fmt: skip


async def test_an_unknown_symbol_is_dropped_and_the_others_go_on(kafka: KafkaBroker) -> None:
    """Three symbols, one Binance does not know: it is dropped and reported (telemetry,
    metric, log), the other two are delivered exactly, and the run goes on."""
    topic = await _new_topic(kafka, "fault-one-unknown-symbol")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL="BTCUSDT,NOPEUSDT,ETHUSDT", STALL_TIMEOUT="0.5"
        )
        async with running_worker(settings) as worker:
            while worker.stats.symbols_dropped == 0:
                await worker.wait_written(worker.records_written + 1)
            await worker.wait_written(worker.records_written + 10)
            worker.stop()
            outcome = await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=outcome.records_written))
        for symbol in ("BTCUSDT", "ETHUSDT"):
            assert_matches_market(published, emulator, symbol, "1m")
    assert {c["symbol"] for c in published} == {"BTCUSDT", "ETHUSDT"}
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)
    assert worker.stats.symbols_dropped == 1
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    dropped = [e for e in events if "dropped symbol NOPEUSDT" in str(e["message"])]
    assert [e["status"] for e in dropped] == ["loading"]
    assert terminal(events, outcome.exit_code) == row("stop command")
