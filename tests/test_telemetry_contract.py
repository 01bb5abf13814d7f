"""The telemetry contract (README, "Telemetry contract"): `started` first in every run; `finished`
true only on an outcome after which the Job runs no new pod (exit 0 or 2); an ending the Job
retries (exit 1, 143) leaves `finished` false and says it will retry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import msgspec
import pytest
import trio
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka_broker import KafkaBroker
from worker_tools import (
    env_without_kafka_vars,
    produce,
    read_topic,
    running_worker,
    telemetry,
    worker_env,
    worker_settings,
)

from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=13)
WILL_RETRY = "the Job will retry"


def statuses(events: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """(status, finished) of each event, `loading` ones left out: their number depends on time."""
    return [(e["status"], e["finished"]) for e in events if e["status"] != "loading"]


async def test_a_stop_before_readiness_still_starts_first(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-early-stop")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic)
        stop = msgspec.json.encode({"command": "stop", "queue_id": settings.queue_id})
        await trio.to_thread.run_sync(produce, kafka, settings.queue_control_topic, [stop])
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    events = telemetry(await read_topic(kafka, settings.queue_events_topic, expected=2))
    assert statuses(events) == [("started", False), ("interrupted", True)]
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)
    assert WILL_RETRY not in events[-1]["message"]


async def test_a_stop_command_is_a_final_outcome(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-stop")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic)
        async with running_worker(settings) as worker:
            await worker.wait_written(2)
            worker.stop("stopped by the test")
            outcome = await worker.finished()
    events = telemetry(await read_topic(kafka, settings.queue_events_topic, expected=2))
    assert statuses(events) == [("started", False), ("interrupted", True)]
    assert outcome.exit_code == 0
    assert events[-1]["records_written"] == outcome.records_written


def _tiny_topic(kafka: KafkaBroker, name: str) -> None:
    """A topic whose broker refuses any candle: too large for its max.message.bytes."""
    admin = KafkaAdminClient(**kafka.client_config("plaintext"))
    try:
        admin.create_topics([NewTopic(name, 1, 1, topic_configs={"max.message.bytes": "64"})])
    finally:
        admin.close()


async def test_a_failure_the_job_retries_is_not_final_and_says_so(kafka: KafkaBroker) -> None:
    topic = f"contract-refused-{os.urandom(6).hex()}"
    await trio.to_thread.run_sync(_tiny_topic, kafka, topic)
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic)
        async with running_worker(settings) as worker:
            outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("error", 1)
    events = telemetry(await read_topic(kafka, settings.queue_events_topic, expected=2))
    assert statuses(events) == [("started", False), ("error", False)]
    assert "MessageSizeTooLarge" in events[-1]["message"]
    assert WILL_RETRY in events[-1]["message"]
    assert "exit 1" in events[-1]["message"]


async def test_sigterm_before_readiness_starts_then_says_it_will_retry(
    kafka: KafkaBroker,
) -> None:
    """A pod evicted while it cannot reach Binance yet: `started`, then `interrupted` with
    `finished` false, exit 143; the Job's next pod carries on."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "contract-sigterm-early")
    async with open_emulator(FAST) as emulator:
        emulator.refuse_handshakes(1000, status=429, retry_after=1)
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, LOG_FORMAT="json"
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        with trio.fail_after(30):
            # Refused by Binance: past the Kafka bootstrap, not ready yet.
            await emulator.wait_for(lambda e: e.refused >= 1)
            process.send_signal(signal.SIGTERM)
            code = await process.wait()
    assert code == 143
    events = telemetry(await read_topic(kafka, f"{topic}-events", expected=2))
    assert statuses(events) == [("started", False), ("interrupted", False)]
    assert "stopped by SIGTERM" in events[-1]["message"]
    assert WILL_RETRY in events[-1]["message"]
    assert "exit 143" in events[-1]["message"]
