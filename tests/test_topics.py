"""A topic that does not exist, on a Kafka that does not create topics on first use (as an
operator-managed cluster often is): the service names it at start and exits 2, within
seconds, instead of waiting in kafka-python's sends for metadata that never comes (a minute
each, past the pod's grace period, then exit 1 and a retry that fails the same way)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest
import trio
from kafka import KafkaAdminClient
from kafka_broker import KafkaBroker, private_broker
from timing import scaled
from worker_tools import (
    env_without_kafka_vars,
    read_topic,
    running_worker,
    telemetry,
    worker_env,
    worker_settings,
)

from loader.kafka import aclose, open_producer
from loader.settings import load_settings
from loader.sink import KafkaSink
from loader.stats import Stats
from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def strict_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of this module's own with `auto.create.topics.enable=false`."""
    with private_broker(tmp_path_factory.mktemp("kafka"), auto_create_topics=False) as broker:
        assert broker.env["LOADER_KAFKA_AUTO_CREATE_TOPICS"] == "false"
        yield broker


async def test_a_misnamed_events_topic_fails_at_start_naming_it(
    strict_kafka: KafkaBroker,
) -> None:
    topic = await trio.to_thread.run_sync(strict_kafka.new_topic, "topics-candles")
    control = await trio.to_thread.run_sync(strict_kafka.new_topic, "topics-control")
    misnamed = f"{topic}-evnets"
    async with open_emulator(EmulatorConfig(speed=600, seed=2)) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            strict_kafka, emulator, topic, QUEUE_EVENTS_TOPIC=misnamed,
            QUEUE_CONTROL_TOPIC=control, LOG_FORMAT="text",
        )  # fmt: skip
        began = trio.current_time()
        # Before the check: `started` waited 60 s for the topic, then the run ended after
        # about two minutes with exit 1.
        with trio.fail_after(scaled(30)):
            result = await trio.run_process(
                [sys.executable, "-m", "loader"], env=env, capture_stdout=True,
                capture_stderr=True, check=False,
            )  # fmt: skip
        elapsed = trio.current_time() - began
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 2, output
    assert repr(misnamed) in output
    assert "QUEUE_EVENTS_TOPIC" in output
    print(f"\nexit 2 after {elapsed:.1f} s")


async def test_existing_topics_pass_the_check_on_a_strict_kafka(
    strict_kafka: KafkaBroker,
) -> None:
    topic = await trio.to_thread.run_sync(strict_kafka.new_topic, "topics-ok")
    async with open_emulator(EmulatorConfig(speed=600, seed=2)) as emulator:
        settings = worker_settings(strict_kafka, emulator, topic)
        for name in (settings.queue_events_topic, settings.queue_control_topic):
            await trio.to_thread.run_sync(_create, strict_kafka, name)
        async with running_worker(settings) as worker:
            await worker.wait_written(2)
            worker.stop()
            outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)
    events = telemetry(await read_topic(strict_kafka, settings.queue_events_topic))
    assert [e["status"] for e in events][:: len(events) - 1] == ["started", "interrupted"]


def _create(kafka: KafkaBroker, name: str) -> None:
    admin = KafkaAdminClient(**kafka.client_config("plaintext"))
    try:
        admin.create_topics({name: {"num_partitions": 1}}, wait_for_metadata=True)
    finally:
        admin.close()


async def test_a_send_waiting_for_metadata_ends_with_its_deadline(
    strict_kafka: KafkaBroker,
) -> None:
    """Telemetry within the shutdown budget: kafka-python's send waits (max_block_ms) for a
    topic's metadata in a thread; the caller's deadline abandons that wait rather than
    waiting it out (before: 60 s, past the pod's grace period)."""
    settings = load_settings({
        "QUEUE_ID": "q", "SYMBOL": "BTCUSDT", "KAFKA_TOPIC": "t", "TELEMETRY_PRODUCER_ID": "p",
        "KAFKA_BOOTSTRAP_SERVERS": strict_kafka.bootstrap("plaintext"),
    })  # fmt: skip
    producer = await trio.to_thread.run_sync(
        lambda: open_producer(settings.kafka, delivery_timeout=settings.delivery_timeout)
    )
    try:
        sink = KafkaSink(producer, "t", Stats())
        began = trio.current_time()
        with trio.move_on_after(1.0) as scope:
            await sink.publish(f"no-such-topic-{os.urandom(4).hex()}", b"q", b"{}")
        elapsed = trio.current_time() - began
    finally:
        await aclose(producer, seconds=1.0)
    assert scope.cancelled_caught
    assert elapsed < 1.0 + scaled(1.0), f"{elapsed:.1f} s"
