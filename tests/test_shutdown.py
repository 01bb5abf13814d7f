"""Every Kafka wait inside the shutdown budget is bounded: a stop while the control consumer
is still reaching Kafka ends the run at once, not after the consumer's 30 s bootstrap."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from kafka_broker import KafkaBroker
from tcp_proxy import tcp_proxy
from timing import scaled
from worker_tools import read_topic, telemetry, worker_settings

from loader import Worker, run
from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def first_only_proxy(upstream: str) -> AsyncIterator[tuple[str, trio.Event]]:
    """A TCP proxy to `upstream` that forwards its first connection (the producer's bootstrap:
    the broker then advertises its own address) and holds every later one unanswered (a
    Kafka that stopped answering). Yields its address and an event set when one is held."""
    held = trio.Event()

    async def admit(number: int) -> None:
        if number > 1:
            held.set()
            await trio.sleep_forever()

    async with tcp_proxy(upstream, admit) as address:
        yield address, held


async def test_a_stop_while_the_control_consumer_reaches_kafka_ends_at_once(
    kafka: KafkaBroker,
) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "shutdown-control-bootstrap")
    async with (
        open_emulator(EmulatorConfig(speed=600, seed=4)) as emulator,
        first_only_proxy(kafka.plaintext) as (proxy, held),
    ):
        settings = worker_settings(kafka, emulator, topic, KAFKA_BOOTSTRAP_SERVERS=proxy)
        worker = Worker(settings)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(run, settings, worker=worker))
            with trio.fail_after(scaled(30)):
                await held.wait()  # the control consumer's bootstrap, never answered
            worker.stop()
            stopped = trio.current_time()
            with trio.fail_after(scaled(60)):
                outcome = await worker.finished()
            elapsed = trio.current_time() - stopped
    assert outcome.status == "interrupted"
    # Within the consumer's own 30 s bootstrap timeout before; now the stop's own steps.
    assert elapsed < scaled(5.0), f"{elapsed:.1f} s from the stop to the end"
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert [e["status"] for e in events] == ["started", "interrupted"]
