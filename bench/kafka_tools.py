"""The orchestrator's side of Kafka: the local broker, topics, stop commands, telemetry, counts."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from bench.procs import REPO_ROOT
from loader.schema import TelemetryEvent

BROKER = REPO_ROOT / "kafka" / "broker.py"


@dataclass(frozen=True)
class Broker:
    bootstrap: str  # PLAINTEXT
    home: Path
    pid: int

    @property
    def version(self) -> str:
        """Kafka's version, from the broker jar's name (kafka_2.13-<version>.jar)."""
        for jar in sorted((self.home / "libs").glob("kafka_2.13-*.jar")):
            return jar.stem.removeprefix("kafka_2.13-")
        return "unknown"


def _broker_script(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(BROKER), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"kafka/broker.py {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def local_broker() -> Broker:
    """``kafka/broker.py up`` (a no-op when it runs), then where it listens."""
    _broker_script("up")
    env = json.loads(_broker_script("env", "--json"))
    status = json.loads(_broker_script("status", "--json"))
    return Broker(env["LOADER_TEST_KAFKA_BOOTSTRAP"], Path(status["home"]), int(status["pid"]))


@dataclass(frozen=True)
class Topics:
    """One worker run's topics: candles, control and telemetry events."""

    candles: str
    control: str
    events: str
    queue_id: str

    @property
    def all(self) -> tuple[str, str, str]:
        return self.candles, self.control, self.events


class Kafka:
    """One admin client, producer and consumer for the whole benchmark."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        config: dict[str, Any] = {"bootstrap_servers": broker.bootstrap}
        self.admin = KafkaAdminClient(**config)
        self.producer = KafkaProducer(**config, acks="all", linger_ms=0)
        self.consumer = KafkaConsumer(**config, group_id=None, enable_auto_commit=False)
        self.created: list[str] = []

    def close(self) -> None:
        try:
            if self.created:
                self.admin.delete_topics(self.created)
        finally:
            self.producer.close(timeout=5)
            self.consumer.close(autocommit=False)
            self.admin.close()

    def topics(self, name: str) -> Topics:
        """Create fresh topics (1 partition, the broker's default) for one run."""
        base = f"bench-{name}-{uuid.uuid4().hex[:8]}"
        topics = Topics(base, f"{base}-control", f"{base}-events", f"q-{base}")
        self.create(*topics.all)
        return topics

    def create(self, *names: str) -> None:
        self.admin.create_topics({n: {"num_partitions": 1} for n in names}, wait_for_metadata=True)
        self.created.extend(names)

    def send_stop(self, topics: Topics) -> tuple[int, int]:
        """Produce the stop command; ``(time_ns before sending, time_ns once acknowledged)``."""
        value = json.dumps({"command": "stop", "queue_id": topics.queue_id}).encode()
        before = time.time_ns()
        self.producer.send(topics.control, value=value).get(timeout=10)
        return before, time.time_ns()

    def count(self, topic: str) -> int:
        """Records in the topic: end offsets minus beginning offsets."""
        tps = self._partitions(topic)
        ends = self.consumer.end_offsets(tps)
        starts = self.consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)

    def events(self, topics: Topics) -> list[TelemetryEvent]:
        """Every telemetry event of the run, in order."""
        tps = self._partitions(topics.events)
        ends = self.consumer.end_offsets(tps)
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        decode = msgspec.json.Decoder(TelemetryEvent).decode
        events: list[TelemetryEvent] = []
        deadline = time.monotonic() + 10
        while any(self.consumer.position(tp) < ends[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topics.events} took over 10 s")
            for records in self.consumer.poll(timeout_ms=200).values():
                events.extend(decode(r.value) for r in records)
        return events

    def wait_event(self, topics: Topics, status: str, timeout: float) -> TelemetryEvent:
        """Poll the events topic until an event with ``status`` is there."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(topics):
                if event.status == status:
                    return event
            time.sleep(0.05)
        raise TimeoutError(f"no {status!r} telemetry on {topics.events} within {timeout} s")

    def _partitions(self, topic: str) -> list[Any]:
        partitions = self.consumer.partitions_for_topic(topic) or set()
        return [TopicPartition(topic, p) for p in sorted(partitions)]
