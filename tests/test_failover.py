"""Kafka failover, against a three-node cluster of the project's own (replication factor 3,
min.insync.replicas=2) and the emulator over wss, with the service through its public entry
point: a partition leader killed, a rolling restart, two of three nodes down for longer than
the producer's request timeout. Each run's closed candles in Kafka equal the emulator's (none
lost, none doubled, in order per stream), its telemetry is `started`, `loading` at its interval,
one terminal event, and once the cluster is whole again every candle reaches Kafka within
FRESH seconds of its close (the data topic stamps each record with its append time).

The tests share one cluster (a module fixture): each leaves it whole.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from kafka import KafkaAdminClient
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

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT",
           "ADAUSDT", "DOGEUSDT", "TRXUSDT", "LTCUSDT", "DOTUSDT")  # fmt: skip
INTERVAL = "1s"
# Seconds from a candle's close to its append once the cluster is whole again.
FRESH = 15.0
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
    """One partition, three replicas, each record stamped with the time the leader appended
    it (LogAppendTime)."""
    name = f"{prefix}-{time.monotonic_ns()}"
    admin = KafkaAdminClient(**cluster.broker.client_config("plaintext"))
    try:
        admin.create_topics(
            {name: {"num_partitions": 1, "configs": {"message.timestamp.type": "LogAppendTime"}}},
            wait_for_metadata=True,
        )
    finally:
        admin.close()
    cluster.wait_full_isr(name)
    return name


@dataclass
class Run:
    worker: Worker
    settings: Any
    whole_at: float
    """Wall time (time.time()) at which the fault was over: every node up, the ISR full."""
    delays: list[tuple[float, float]]
    """(close time, seconds from close to append) of every candle, in append order."""


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
    is whole again), stream 10 s more, stop; check the candles and the telemetry."""
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
                await worker.wait_written(worker.records_written + 10 * len(SYMBOLS))
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
    delays = [
        (candle["close_time"] / 1000, (record.timestamp - candle["close_time"]) / 1000)
        for record, candle in zip(records, published, strict=True)
    ]
    after = [delay for closed, delay in delays if closed >= whole_at]
    print(
        f"\n{name}: {len(published)} candles, exact; close-to-append max "
        f"{max(delay for _, delay in delays):.1f} s overall, {max(after):.1f} s once whole "
        f"({len(after)} candles); loading gaps max {max(gaps):.1f} s"
    )
    assert max(after) < FRESH, sorted(after)[-5:]
    assert max(gaps) < TELEMETRY_INTERVAL + TELEMETRY_SLACK, gaps
    return Run(worker, settings, whole_at, delays)


async def test_killed_leader_of_the_data_partition(
    cluster: KafkaCluster, binance_ca: trustme.CA
) -> None:
    async def kill_leader(cluster: KafkaCluster, topic: str, worker: Worker) -> None:
        leader = (await in_thread(cluster.partition, topic)).leader
        await in_thread(cluster.kill, leader)
        # The two others go on without it (a new leader, an ISR of two).
        with trio.fail_after(scaled(60)):
            await worker.wait_written(worker.records_written + 3 * len(SYMBOLS))
        await in_thread(cluster.start)
        await in_thread(cluster.wait_full_isr, topic)

    await through(cluster, binance_ca, "failover-kill-leader", kill_leader)
