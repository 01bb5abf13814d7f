"""Kafka failover, against a three-node cluster of the project's own (replication factor 3,
min.insync.replicas=2) and the emulator over wss, with the service through its public entry
point: a partition leader killed, the active controller killed, a rolling restart, two of
three nodes down for longer than the producer's request timeout, and for longer than its
delivery timeout (the run ends, the next resumes), and a stop command sent as the leader of
the control and events topics is killed. Each run's closed candles in Kafka equal
the emulator's (none lost, none doubled, in order per stream), its telemetry is `started`,
`loading` at its interval, one terminal event, and once the cluster is whole again no candle
waits FRESH seconds more (from its close, or from the moment the cluster was whole for one that
closed before; the data topic stamps each record with its append time).

Measured (20 streams of 1s candles, 3 partitions): the longest close-to-append is the outage
(9-14 s after a leader kill: the controller fences the dead broker after its 9 s session
timeout; about 47 s with two nodes down for 32 s); once whole, 0.3-0.6 s. Before
loader.kafka's reconnect backoff cap, kafka-python waited up to 30 s before reconnecting to a
node that had been down, and writes to the partitions it led again waited as long (6.3 s
seen in the two-down test, a delivery timeout expired with 40 s).

The tests share one cluster (a module fixture): each leaves it whole.
"""

from __future__ import annotations

import itertools
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trustme
from kafka import KafkaAdminClient, KafkaProducer
from kafka_broker import KafkaCluster, private_cluster
from timing import scaled
from worker_tools import (
    assert_matches_market,
    candles,
    read_topic,
    row,
    running_worker,
    telemetry,
    terminal,
    worker_settings,
)

from loader import Worker
from loader.testing import Emulator, EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

# 20 streams of 1s candles on a topic of 3 partitions, as in production.
SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT",
           "ADAUSDT", "DOGEUSDT", "TRXUSDT", "LTCUSDT", "DOTUSDT",
           "AVAXUSDT", "LINKUSDT", "POLUSDT", "SHIBUSDT", "UNIUSDT",
           "ATOMUSDT", "ETCUSDT", "XLMUSDT", "NEARUSDT", "APTUSDT")  # fmt: skip
PARTITIONS = 3
INTERVAL = "1s"
# Seconds from a candle's close to its append once the cluster is whole again (the issue
# asks for 15; a whole cluster does it in well under one).
FRESH = 5.0
TELEMETRY_INTERVAL = 2.0
# How late a `loading` event may be made, beyond its interval, whatever Kafka does.
TELEMETRY_SLACK = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with private_cluster(tmp_path_factory.mktemp("failover")) as cluster:
        yield cluster


@pytest.fixture
def binance_ca(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> trustme.CA:
    """A CA of this test's own, in OpenSSL's default trust store (as a pod trusts Binance's)."""
    ca = trustme.CA()
    ca_file = tmp_path / "binance-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    return ca


@asynccontextmanager
async def wss_emulator(ca: trustme.CA) -> AsyncIterator[Emulator]:
    """Real time (1s candles, one a second per stream), market time = wall time: a candle's
    close_time is when it closed."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    config = EmulatorConfig(
        speed=1, start_ms=int(time.time() * 1000), symbols=SYMBOLS, ssl_context=context
    )
    async with open_emulator(config) as emulator:
        assert emulator.url.startswith("wss://")
        yield emulator


def data_topic(cluster: KafkaCluster, prefix: str) -> str:
    """PARTITIONS partitions of three replicas, each record stamped with the time its leader
    appended it (LogAppendTime)."""
    name = f"{prefix}-{time.monotonic_ns()}"
    admin = KafkaAdminClient(**cluster.broker.client_config("plaintext"))
    try:
        admin.create_topics(
            {
                name: {
                    "num_partitions": PARTITIONS,
                    "configs": {"message.timestamp.type": "LogAppendTime"},
                }
            },
            wait_for_metadata=True,
        )
    finally:
        admin.close()
    whole(cluster, name)
    return name


def whole(cluster: KafkaCluster, topic: str) -> None:
    """Until every partition of `topic` has all three replicas in sync."""
    for partition in range(PARTITIONS):
        cluster.wait_full_isr(topic, partition)


@dataclass
class Run:
    worker: Worker
    settings: Any
    whole_at: float
    """Wall time (time.time()) at which the fault was over: every node up, the ISR full."""
    times: list[tuple[float, float]]
    """(close, append) wall-clock times of every candle, by partition and offset."""


Fault = Callable[[KafkaCluster, str, Worker], Awaitable[None]]


async def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    return await trio.to_thread.run_sync(function, *args)


async def through(
    cluster: KafkaCluster,
    ca: trustme.CA,
    name: str,
    fault: Fault,
    *,
    delivery_timeout: float = 60.0,
) -> Run:
    """Stream until 5 s of candles are in Kafka, inject `fault` (which returns once the cluster
    is whole again), stream 5 s more, stop; check the candles and the telemetry."""
    topic = await in_thread(data_topic, cluster, name)
    async with wss_emulator(ca) as emulator:
        settings = worker_settings(
            cluster.broker, emulator, topic, listener="sasl_ssl", SYMBOL=",".join(SYMBOLS),
            INTERVAL=INTERVAL, KAFKA_DELIVERY_TIMEOUT=str(delivery_timeout),
            TELEMETRY_INTERVAL=str(TELEMETRY_INTERVAL),
        )  # fmt: skip
        async with running_worker(settings) as worker:
            with trio.fail_after(scaled(60)):
                await worker.wait_written(5 * len(SYMBOLS))
            await fault(cluster, topic, worker)
            whole_at = time.time()
            await in_thread(cluster.wait_full_isr, settings.queue_events_topic)
            with trio.fail_after(scaled(60)):
                await worker.wait_written(worker.records_written + 5 * len(SYMBOLS))
            worker.stop()
            outcome = await worker.finished()
        records = await read_topic(cluster.broker, topic, expected=outcome.records_written)
        published = candles(records)
        assert len(published) == outcome.records_written
        for symbol in SYMBOLS:
            assert_matches_market(published, emulator, symbol, INTERVAL)
    events = telemetry(await read_topic(cluster.broker, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("stop command")
    loading = [event["timestamp"] for event in events if event["status"] == "loading"]
    gaps = [later - earlier for earlier, later in itertools.pairwise(loading)]
    # (close, append) of every candle, wall-clock seconds.
    times = [
        (candle["close_time"] / 1000, record.timestamp / 1000)
        for record, candle in zip(records, published, strict=True)
    ]
    # Once the cluster is whole, how long each candle still waited: from its close, or from
    # the moment the cluster was whole for one that closed before.
    waits = [appended - max(closed, whole_at) for closed, appended in times]
    print(
        f"\n{name}: {len(published)} candles, exact; close-to-append max "
        f"{max(appended - closed for closed, appended in times):.1f} s; once whole, the "
        f"longest wait {max(waits):.1f} s; loading gaps max {max(gaps):.1f} s"
    )
    assert max(waits) < FRESH, sorted(waits)[-5:]
    assert max(gaps) < TELEMETRY_INTERVAL + TELEMETRY_SLACK, gaps
    return Run(worker, settings, whole_at, times)


def assert_slow_writes_told(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """A write held back past sink.SLOW_WRITE was logged, naming a partition of the data topic
    and its leader (or that none is known), and counted; none waits at the end."""
    slow = [
        record.getMessage()
        for record in caplog.records
        if record.name == "loader.sink" and record.levelno == logging.WARNING
    ]
    print("\n".join(slow))
    assert slow
    assert all(re.search(rf"waiting on {re.escape(run.settings.kafka_topic)}-\d ", m) for m in slow)
    assert all("leader broker" in m or "no leader known" in m for m in slow)
    assert run.worker.stats.slow_writes == len(slow)
    assert run.worker.stats.kafka_wait() == 0.0  # every batch acknowledged: none waits


async def test_killed_leader_of_the_data_partition(
    cluster: KafkaCluster, binance_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    async def kill_leader(cluster: KafkaCluster, topic: str, worker: Worker) -> None:
        leader = (await in_thread(cluster.partition, topic)).leader
        await in_thread(cluster.kill, leader)
        # The two others go on without it (a new leader, an ISR of two).
        with trio.fail_after(scaled(60)):
            await worker.wait_written(worker.records_written + 3 * len(SYMBOLS))
        await in_thread(cluster.start)
        await in_thread(whole, cluster, topic)
        # Leadership goes back to the restarted node, as the controller's periodic rebalance
        # does (every 5 minutes by default, so in some runs, not others).
        await in_thread(cluster.elect_preferred_leaders, topic)
        assert (await in_thread(cluster.partition, topic)).leader == leader

    run = await through(cluster, binance_ca, "failover-kill-leader", kill_leader)
    assert_slow_writes_told(run, caplog)


async def test_killed_active_controller(cluster: KafkaCluster, binance_ca: trustme.CA) -> None:
    """The quorum's leader killed (kill -9): the two other controllers elect one of them, and
    writes go on."""

    async def kill_controller(cluster: KafkaCluster, topic: str, worker: Worker) -> None:
        controller = await in_thread(cluster.active_controller)
        await in_thread(cluster.kill, controller)
        with trio.fail_after(scaled(60)):
            await worker.wait_written(worker.records_written + 3 * len(SYMBOLS))
        assert await in_thread(cluster.active_controller) != controller
        await in_thread(cluster.start)
        await in_thread(whole, cluster, topic)

    await through(cluster, binance_ca, "failover-kill-controller", kill_controller)


async def test_rolling_restart(cluster: KafkaCluster, binance_ca: trustme.CA) -> None:
    """As Strimzi restarts a cluster: each node in turn stopped (SIGTERM) and started again,
    the next once the data partition's ISR is full again."""

    async def roll(cluster: KafkaCluster, topic: str, worker: Worker) -> None:
        for node in cluster.nodes:
            await in_thread(cluster.stop, node)
            await in_thread(cluster.start)
            await in_thread(whole, cluster, topic)

    await through(cluster, binance_ca, "failover-rolling", roll)


async def test_two_of_three_down_past_the_request_timeout(
    cluster: KafkaCluster, binance_ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    """Below min.insync.replicas for longer than a produce request may wait, shorter than
    the delivery timeout: nothing is written meanwhile, nothing is lost, and writes resume
    once the nodes are back."""
    delivery_timeout = scaled(60.0)
    request_timeout = min(30.0, delivery_timeout / 2)  # loader.kafka.open_producer's

    async def two_down(cluster: KafkaCluster, topic: str, worker: Worker) -> None:
        leader = (await in_thread(cluster.partition, topic)).leader
        other = next(node for node in cluster.nodes if node != leader)
        await in_thread(cluster.kill, leader)
        await in_thread(cluster.kill, other)
        # The outage itself: longer than a produce request's timeout.
        await trio.sleep(request_timeout + 2.0)
        # The oldest batch has waited about that long, and the gauge says so.
        assert worker.stats.kafka_wait() > request_timeout
        await in_thread(cluster.start)
        await in_thread(whole, cluster, topic)

    run = await through(cluster, binance_ca, "failover-two-down", two_down,
                        delivery_timeout=delivery_timeout)  # fmt: skip
    assert_slow_writes_told(run, caplog)


async def test_below_min_isr_past_the_delivery_timeout_ends_with_exit_1_and_the_next_pod_resumes(
    cluster: KafkaCluster, binance_ca: trustme.CA
) -> None:
    """Two of three nodes down for longer than KAFKA_DELIVERY_TIMEOUT: the run ends with
    `error`, exit 1, and its terminal event does not reach the events topic (below its
    min.insync.replicas too); the Job's next pod, once the cluster is back, resumes from the
    topic: together, exact. As README's telemetry table says."""
    topic = await in_thread(data_topic, cluster, "failover-below-min-isr")
    async with wss_emulator(binance_ca) as emulator:
        env = {
            "SYMBOL": ",".join(SYMBOLS), "INTERVAL": INTERVAL, "KAFKA_DELIVERY_TIMEOUT": "6",
            "TELEMETRY_INTERVAL": str(TELEMETRY_INTERVAL),
        }  # fmt: skip
        settings = worker_settings(cluster.broker, emulator, topic, listener="sasl_ssl", **env)
        async with running_worker(settings) as worker:
            with trio.fail_after(scaled(60)):
                await worker.wait_written(5 * len(SYMBOLS))
            leader = (await in_thread(cluster.partition, topic)).leader
            other = next(node for node in cluster.nodes if node != leader)
            await in_thread(cluster.kill, leader)
            await in_thread(cluster.kill, other)
            with trio.fail_after(scaled(60)):
                outcome = await worker.finished()
        assert (outcome.status, outcome.final, outcome.exit_code) == row("Kafka below")
        assert "Kafka did not acknowledge" in outcome.message
        await in_thread(cluster.start)
        await in_thread(whole, cluster, topic)
        await in_thread(cluster.wait_full_isr, settings.queue_events_topic)
        # The Job's next pod.
        async with running_worker(settings) as second:
            with trio.fail_after(scaled(60)):
                await second.wait_written(10 * len(SYMBOLS))
            second.stop()
            resumed = await second.finished()
        published = candles(await read_topic(cluster.broker, topic))
        assert len(published) >= outcome.records_written + resumed.records_written
        for symbol in SYMBOLS:
            assert_matches_market(published, emulator, symbol, INTERVAL)
    events = telemetry(await read_topic(cluster.broker, settings.queue_events_topic))
    starts = [n for n, event in enumerate(events) if event["status"] == "started"]
    assert len(starts) == 2
    first, then = events[: starts[1]], events[starts[1] :]
    # No terminal event from the first pod: the queue manager sees its `loading` stop.
    assert {event["status"] for event in first[1:]} <= {"loading"}
    assert terminal(then, resumed.exit_code) == row("stop command")
    print(
        f"\nfirst pod {outcome.records_written} candles, then exit 1; next pod "
        f"{resumed.records_written} (backfilled {second.stats.candles_backfilled})"
    )


def send_one(cluster: KafkaCluster, topic: str, value: bytes) -> float:
    """One record, acknowledged (acks=all), however long a leader election takes; returns
    its timestamp (the append time, on a LogAppendTime topic), in seconds."""
    producer = KafkaProducer(**cluster.broker.producer_config())
    try:
        metadata = producer.send(topic, value=value).get(timeout=scaled(60))
        return float(metadata.timestamp) / 1000
    finally:
        producer.close(timeout=5)


def topics_led_by(cluster: KafkaCluster, node: int, names: list[str]) -> None:
    """Create one-partition topics whose preferred leader (first replica) is `node`, each
    record stamped with its append time."""
    replicas = [node, *(other for other in cluster.nodes if other != node)]
    admin = KafkaAdminClient(**cluster.broker.client_config("plaintext"))
    try:
        admin.create_topics(
            {
                name: {
                    "assignments": {0: replicas},
                    "configs": {"message.timestamp.type": "LogAppendTime"},
                }
                for name in names
            },
            wait_for_metadata=True,
        )
    finally:
        admin.close()
    for name in names:
        cluster.wait_full_isr(name)
        assert cluster.partition(name).leader == node


async def test_stop_command_while_the_control_and_events_leaders_move(
    cluster: KafkaCluster, binance_ca: trustme.CA
) -> None:
    """A stop command sent as the node leading the control and events topics is killed: the
    worker reads it from the new leader and obeys it once (one terminal event, `interrupted`),
    within the shutdown budget counted from the command's append to the control topic."""
    topic = await in_thread(data_topic, cluster, "failover-stop")
    async with wss_emulator(binance_ca) as emulator:
        settings = worker_settings(
            cluster.broker, emulator, topic, listener="sasl_ssl", SYMBOL=",".join(SYMBOLS),
            INTERVAL=INTERVAL, KAFKA_DELIVERY_TIMEOUT="60",
        )  # fmt: skip
        doomed = cluster.nodes[0]
        await in_thread(
            topics_led_by, cluster, doomed,
            [settings.queue_control_topic, settings.queue_events_topic],
        )  # fmt: skip
        async with running_worker(settings) as worker:
            with trio.fail_after(scaled(60)):
                await worker.wait_written(5 * len(SYMBOLS))
            await in_thread(cluster.kill, doomed)
            stop = msgspec.json.encode({"command": "stop", "queue_id": settings.queue_id})
            appended = await in_thread(send_one, cluster, settings.queue_control_topic, stop)
            with trio.fail_after(scaled(settings.shutdown_budget + 5)):
                outcome = await worker.finished()
            # At most: the run may have ended while send_one was still closing its producer.
            took = time.time() - appended
        await in_thread(cluster.start)
        await in_thread(whole, cluster, topic)
        published = candles(
            await read_topic(cluster.broker, topic, expected=outcome.records_written)
        )
        assert len(published) == outcome.records_written
        for symbol in SYMBOLS:
            assert_matches_market(published, emulator, symbol, INTERVAL)
    assert took < settings.shutdown_budget
    assert worker.stats.control_ignored == 0
    events = telemetry(await read_topic(cluster.broker, settings.queue_events_topic))
    assert terminal(events, outcome.exit_code) == row("stop command")
    print(
        f"\nstopped {took:.1f} s after the command was appended "
        f"(budget {settings.shutdown_budget:.0f} s); {len(published)} candles, exact"
    )
