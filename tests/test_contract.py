"""The contract with the queue manager, as the README's telemetry table states it: every run
that reaches Kafka says `started` first and exactly one terminal event last, whose status,
`finished` and exit code are the table's row for how the run ended; and a stop at any moment
ends the run within the shutdown budget.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka_broker import KafkaBroker
from tcp_proxy import tcp_proxy
from timing import scaled
from worker_tools import (
    candles,
    contract,
    env_without_kafka_vars,
    for_a_process,
    produce,
    read_topic,
    row,
    running_worker,
    stop_command,
    telemetry,
    terminal,
    worker_env,
    worker_settings,
)

from loader import Worker, run
from loader.intervals import candle_open
from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=17)
# A short grace period keeps the budget tests quick: the budget is 5 s less, of which a stop
# during the Kafka bootstrap leaves it 4 s (6 s are kept for telemetry and closing).
GRACE = 15.0


def test_the_table_covers_every_terminal_status() -> None:
    rows = contract()
    assert {status for status, _, _ in rows.values()} == {"interrupted", "finished", "error"}
    assert {code for _, _, code in rows.values()} == {0, 1, 2, 3, 130, 143}


async def test_stop_before_ready_says_started_then_interrupted(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-early-stop")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic)
        stop = stop_command(settings.queue_id)
        await trio.to_thread.run_sync(produce, kafka, settings.queue_control_topic, [stop])
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert [e["status"] for e in events] == ["started", "interrupted"]
    assert terminal(events, outcome.exit_code) == row("stop command")


async def test_stop_at_is_final(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-stop-at")
    async with open_emulator(FAST) as emulator:
        stop_at = str(int(time.time() * 1000) + 1500)
        settings = worker_settings(kafka, emulator, topic, STOP_AT=stop_at)
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("`STOP_AT` reached")


async def test_stop_at_over_a_hole_is_a_final_error_naming_it(kafka: KafkaBroker) -> None:
    """Ten 1m candles missed with a five-minute BACKFILL_WINDOW, then STOP_AT: the stream is
    past STOP_AT, but five of its candles are a hole. Not `finished`: a final `error` (a
    retry would resume after the hole) that names the missing candles."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-stop-at-holes")
    clock = EmulatorConfig(speed=1e-6, seed=3, ping_interval=0.5, pong_timeout=2.0)
    config = clock.replace(start_ms=candle_open("1m", int(time.time() * 1000)))
    async with open_emulator(config) as emulator:
        opens = [emulator.market.open_time("1m", i) for i in range(14)]
        settings = worker_settings(kafka, emulator, topic, BACKFILL_WINDOW="300",
                                   STOP_AT=str(opens[13] - 1))  # fmt: skip
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            emulator.advance_to(opens[2] + 3_000)
            await worker.wait_written(2)
            emulator.stall()
            emulator.advance_to(opens[12] + 3_000)  # candles 2..11 closed meanwhile
            emulator.drop()
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            # 2..6 closed more than five minutes before the update that shows the gap.
            emulator.advance(2_000)
            await worker.wait_written(7)
            emulator.advance_to(opens[13] + 3_000)  # candle 12 closes: STOP_AT is passed
            with trio.fail_after(scaled(30)):
                outcome = await worker.finished()
        published = [c["open_time"] for c in candles(await read_topic(kafka, topic))]
    assert published == [opens[i] for i in (0, 1, 7, 8, 9, 10, 11, 12)]
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("`STOP_AT` passed over holes")
    message = str(events[-1]["message"])
    assert message.startswith(f"holes: BTCUSDT-1m {opens[2]}..{opens[7] - 1} (5 candles)"), message
    assert "retrying cannot help" in message


async def test_a_record_kafka_refuses_is_a_retried_failure(kafka: KafkaBroker) -> None:
    """Kafka answers, and refuses every candle for good (larger than the topic allows)."""
    topic = f"contract-refused-{os.urandom(6).hex()}"

    def create() -> None:
        admin = KafkaAdminClient(**kafka.client_config())
        try:
            admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "64"})])
        finally:
            admin.close()

    await trio.to_thread.run_sync(create)
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic)
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("runtime failure")
    assert "MessageSizeTooLarge" in str(events[-1]["message"])
    assert "the Job will retry" in str(events[-1]["message"])


@asynccontextmanager
async def slow_proxy(upstream: str, delay: float) -> AsyncIterator[tuple[str, trio.Event]]:
    """A TCP proxy to `upstream` that holds each connection for `delay` seconds before it
    forwards anything: a Kafka that is slow to answer the bootstrap. Yields its address and
    an event set when the first connection arrives."""
    arrived = trio.Event()

    async def admit(_: int) -> None:
        arrived.set()
        await trio.sleep(delay)  # the slowness under test, not a synchronisation

    async with tcp_proxy(upstream, admit) as address:
        yield address, arrived


async def test_sigterm_while_kafka_is_slow_to_answer(kafka: KafkaBroker) -> None:
    """SIGTERM during the Kafka bootstrap: the run waits for Kafka within the budget, says
    `started` and `interrupted` (not final), and exits 143 within the grace period."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-sigterm-bootstrap")
    async with (
        open_emulator(for_a_process(FAST)) as emulator,
        slow_proxy(kafka.plaintext, delay=2.0) as (proxy, arrived),
    ):
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, KAFKA_BOOTSTRAP_SERVERS=proxy,
            TERMINATION_GRACE_PERIOD=str(GRACE), LOG_FORMAT="json",
        )  # fmt: skip
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.DEVNULL
        )
        with trio.fail_after(scaled(60)):
            await arrived.wait()
        process.send_signal(signal.SIGTERM)
        signalled = trio.current_time()
        with trio.fail_after(GRACE):
            code = await process.wait()
        elapsed = trio.current_time() - signalled
    events = telemetry(await read_topic(kafka, f"{topic}-events"))
    assert [e["status"] for e in events] == ["started", "interrupted"]
    assert terminal(events, code) == row("SIGTERM")
    assert elapsed < GRACE - 5.0 + 1.0, f"{elapsed:.1f} s from SIGTERM to exit"


async def test_sigterm_while_streaming_is_not_final(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-sigterm")
    async with open_emulator(for_a_process(FAST)) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, TERMINATION_GRACE_PERIOD=str(GRACE)
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.DEVNULL
        )
        await read_topic(kafka, topic, expected=3)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(GRACE):
            code = await process.wait()
    events = telemetry(await read_topic(kafka, f"{topic}-events"))
    assert terminal(events, code) == row("SIGTERM")
    assert re.search(
        r"stopped by SIGTERM; \d+ candles written; exit 143: the Job will retry",
        str(events[-1]["message"]),
    )


class LogEvent(logging.Handler):
    """Sets a Trio event when a record whose message starts with `prefix` is logged (from
    any thread), and remembers every message."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.prefix = prefix
        self.seen = trio.Event()
        self.messages: list[str] = []
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if message.startswith(self.prefix):
            self._token.run_sync_soon(self.seen.set)


@asynccontextmanager
async def logged(logger: str, prefix: str) -> AsyncIterator[LogEvent]:
    handler = LogEvent(prefix)
    target = logging.getLogger(logger)
    level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


def sigterm(worker: Worker) -> None:
    """What loader.cli does on SIGTERM."""
    worker.stop("stopped by SIGTERM", final=False, exit_code=143)


async def test_sigterm_during_resume_ends_within_the_budget(kafka: KafkaBroker) -> None:
    """The topic holds 100,000 records of other streams, all within the window, so the resume
    scan reads them all: a stop meanwhile ends the scan and the run within the budget, with
    `started` and one terminal event."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-sigterm-resume")
    noise = [b'{"open_time":%d,"symbol":"OTHER","interval":"1m"}' % i for i in range(100_000)]
    await trio.to_thread.run_sync(lambda: produce(kafka, topic, noise, key=b"OTHERUSDT-1m"))
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic, TERMINATION_GRACE_PERIOD=str(GRACE))
        async with logged("loader.resume", "reading ") as resume, trio.open_nursery() as nursery:
            worker = Worker(settings)
            nursery.start_soon(partial(run, settings, worker=worker))
            with trio.fail_after(scaled(60)):
                await resume.seen.wait()
            sigterm(worker)
            stopped = trio.current_time()
            outcome = await worker.finished()
            elapsed = trio.current_time() - stopped
    assert not any(m.startswith("resuming ") for m in resume.messages), "the scan had ended"
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert [e["status"] for e in events] == ["started", "interrupted"]
    assert terminal(events, outcome.exit_code) == row("SIGTERM")
    assert elapsed < settings.shutdown_budget, f"{elapsed:.1f} s from the stop to the end"


async def test_sigterm_during_a_backfill_ends_within_the_budget(kafka: KafkaBroker) -> None:
    """A day missed on a 1s stream (86,400 candles, 87 pages of history): a stop while it is
    being filled ends the run within the budget, with one terminal event, and what reached
    Kafka is the stream's candles in order, without a gap or a repeat."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-sigterm-backfill")
    clock = EmulatorConfig(speed=1e-6, seed=3, ping_interval=0.5, pong_timeout=2.0)
    config = clock.replace(start_ms=candle_open("1s", int(time.time() * 1000)))
    async with open_emulator(config) as emulator:
        # A window of two days: the whole day is to be filled, none of it a hole.
        settings = worker_settings(
            kafka, emulator, topic, INTERVAL="1s", TERMINATION_GRACE_PERIOD=str(GRACE),
            BACKFILL_WINDOW=str(2 * 86_400),
        )  # fmt: skip
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            emulator.advance_to(emulator.market.open_time("1s", 3) + 500)
            await worker.wait_written(2)
            emulator.stall()
            emulator.advance_to(emulator.market.open_time("1s", 86_403) + 500)
            emulator.drop()
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            emulator.advance(1_000)  # a frame of the new connection shows the gap
            while worker.stats.candles_backfilled == 0:
                await worker.wait_written(worker.records_written + 1)
            sigterm(worker)
            stopped = trio.current_time()
            outcome = await worker.finished()
            elapsed = trio.current_time() - stopped
        published = candles(await read_topic(kafka, topic, expected=outcome.records_written))
        truth = emulator.closed_klines("BTCUSDT", "1s")
    assert worker.stats.candles_backfilled < 86_400, "the fill ended before the stop"
    assert worker.stats.candles_lost == 0
    opens = [c["open_time"] for c in published]
    assert opens == [k.open_time for k in truth[: len(opens)]]
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("SIGTERM")
    assert elapsed < settings.shutdown_budget, f"{elapsed:.1f} s from the stop to the end"
