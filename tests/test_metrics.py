"""Prometheus metrics and /healthz of a running worker."""

from __future__ import annotations

import collections
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import ItemsView, Iterable, Iterator, KeysView
from functools import partial

import pytest
import trio
from kafka_broker import KafkaBroker
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from worker_tools import running_worker, worker_settings
from wss import Wss

from loader.metrics import Metrics, healthy, serve_metrics
from loader.stats import Stats
from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=3)


def _get(port: int, path: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(_get, port, path)


def samples(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def test_metrics_count_what_the_worker_does(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "metrics")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic, METRICS_PORT="0")
        async with running_worker(settings) as worker:
            assert worker.metrics_port
            await worker.wait_written(3)
            status, first_text = await get(worker.metrics_port, "/metrics")
            assert status == 200
            first = samples(first_text)
            emulator.send_invalid_json()
            await worker.wait_written(worker.records_written + 5)
            second = samples((await get(worker.metrics_port, "/metrics"))[1])
            worker.stop()
            await worker.finished()
    assert (
        second["loader_candles_acknowledged_total"]
        > first["loader_candles_acknowledged_total"]
        >= 3
    )
    assert second["loader_candles_received_total"] >= second["loader_candles_acknowledged_total"]
    assert second["loader_frames_received_total"] > first["loader_frames_received_total"]
    assert second["loader_malformed_frames_total{kind=invalid_json}"] == 1
    assert second["loader_kafka_delivery_seconds_count"] >= 1
    assert second["loader_last_frame_age_seconds"] < 5
    assert "loader_channel_depth" in second
    assert second["loader_candles_lost_total"] == 0
    assert second["loader_holes_total"] == 0
    # kafka-python's own sensors stay off unless a measuring run asks for them.
    assert not [name for name in second if name.startswith("loader_kafka_client")]


async def test_a_measuring_run_shows_cpu_per_thread_and_kafka_pythons_requests(
    kafka: KafkaBroker, wss: Wss
) -> None:
    """Over wss, as Binance serves: per-thread CPU by thread name, and with
    KAFKA_CLIENT_METRICS=1 kafka-python's records per request and request rate."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "metrics-measuring")
    async with open_emulator(wss.serve(FAST)) as emulator:
        assert emulator.url.startswith("wss://")
        settings = worker_settings(kafka, emulator, topic, METRICS_PORT="0",
                                   KAFKA_CLIENT_METRICS="1")  # fmt: skip
        async with running_worker(settings) as worker:
            assert worker.metrics_port
            await worker.wait_written(5)
            found = samples((await get(worker.metrics_port, "/metrics"))[1])
            worker.stop()
            await worker.finished()
    threads = {
        name.removeprefix("loader_thread_cpu_seconds{thread=").removesuffix("}"): seconds
        for name, seconds in found.items()
        if name.startswith("loader_thread_cpu_seconds{")
    }
    assert threads["MainThread"] > 0  # Trio: imports, TLS handshake, decoding
    assert "loader-kafka-sender" in threads
    assert [name for name in threads if name.endswith("-network-thread")]  # kafka-python's
    assert found["loader_kafka_client{name=records-per-request-avg}"] >= 1
    assert found["loader_kafka_client{name=request-rate}"] > 0


async def test_healthz_fails_when_the_pipeline_stalls(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "healthz")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, METRICS_PORT="0", HEALTH_TIMEOUT="1.5", STALL_TIMEOUT="0.5"
        )
        async with running_worker(settings) as worker:
            assert worker.metrics_port
            await worker.wait_written(2)
            assert (await get(worker.metrics_port, "/healthz"))[0] == 200
            # Binance gone: the connection silent, its pings unanswered, a new one refused.
            emulator.refuse_handshakes(1000)
            emulator.stall()
            for _ in range(100):  # polling the endpoint under test, 10 s at most
                health = await get(worker.metrics_port, "/healthz")
                if health[0] != 200:
                    break
                await trio.sleep(0.1)
            worker.stop()
            await worker.finished()
    assert health[0] == 503
    assert "no frame from Binance" in health[1]


class _WatchedCounter(collections.Counter[str]):
    """Notes the thread of every iteration: only the Trio thread may walk a growing Counter."""

    def __init__(self) -> None:
        super().__init__()
        self.iterated_from: set[int] = set()

    def __iter__(self) -> Iterator[str]:
        self.iterated_from.add(threading.get_ident())
        return super().__iter__()

    def keys(self) -> KeysView[str]:  # type: ignore[override]  # dict's is a private type
        self.iterated_from.add(threading.get_ident())
        return super().keys()

    def items(self) -> ItemsView[str, int]:  # type: ignore[override]  # as keys()
        self.iterated_from.add(threading.get_ident())
        return super().items()


async def test_scrapes_copy_counters_on_the_trio_thread_while_they_grow() -> None:
    malformed, reconnects = _WatchedCounter(), _WatchedCounter()
    stats = Stats(malformed=malformed, reconnects=reconnects)
    metrics = Metrics(stats, lambda: 0)
    scrapes = 100
    texts: list[str] = []

    def hammer(port: int) -> None:
        for _ in range(scrapes):
            status, text = _get(port, "/metrics")
            assert status == 200, text
            texts.append(text)

    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_metrics, metrics, 0, host="127.0.0.1"))
        done = trio.Event()

        async def grow() -> None:
            for i in itertools.count():
                if done.is_set():
                    return
                # New keys all along (a bounded number, so scrapes stay small).
                malformed[f"kind{i % 2000}"] += 1
                reconnects[f"reason{i % 50}"] += 1
                await trio.sleep(0.0001)

        nursery.start_soon(grow)
        await trio.to_thread.run_sync(hammer, port)
        done.set()
        nursery.cancel_scope.cancel()
    assert len(texts) == scrapes
    last = samples(texts[-1])
    assert sum(v for k, v in last.items() if k.startswith("loader_malformed_frames_total")) > 0
    trio_thread = threading.get_ident()
    assert malformed.iterated_from == {trio_thread}
    assert reconnects.iterated_from == {trio_thread}


class _SlowCollector(Collector):
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def describe(self) -> Iterable[Metric]:
        return []  # else registering it would call collect()

    def collect(self) -> Iterable[Metric]:
        self.entered.set()
        self.release.wait(timeout=30)
        return []


async def test_a_slow_scrape_does_not_hold_up_healthz() -> None:
    metrics = Metrics(Stats(), lambda: 0)
    slow = _SlowCollector()
    metrics.registry.register(slow)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(partial(serve_metrics, metrics, 0, host="127.0.0.1"))
        scraped: list[int] = []
        scrape_done = trio.Event()

        async def scrape() -> None:
            scraped.append((await get(port, "/metrics"))[0])
            scrape_done.set()

        nursery.start_soon(scrape)
        await trio.to_thread.run_sync(slow.entered.wait)
        try:
            # One server thread would leave this request queued behind the stuck scrape.
            with trio.fail_after(6):  # the stuck scrape would hold it for 30 s
                health = await trio.to_thread.run_sync(
                    partial(_get, port, "/healthz", timeout=5), abandon_on_cancel=True
                )
        finally:
            slow.release.set()
        assert health == (200, "ok\n")
        await scrape_done.wait()
        nursery.cancel_scope.cancel()
    assert scraped == [200]


async def test_a_quiet_stream_keeps_healthz_up_while_pings_are_answered(
    kafka: KafkaBroker,
) -> None:
    """A symbol that does not trade sends nothing; the connection answering our pings is
    alive, and so is the pod. Three HEALTH_TIMEOUTs of silence must not fail the probe."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "quiet")
    # 2000 market ms between frames at this speed: minutes of real silence.
    quiet = EmulatorConfig(speed=0.001, seed=3)
    health_timeout = 2.0
    async with open_emulator(quiet) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, METRICS_PORT="0", HEALTH_TIMEOUT=str(health_timeout),
            STALL_TIMEOUT="0.5",
        )  # fmt: skip
        async with running_worker(settings) as worker:
            assert worker.metrics_port
            statuses: list[tuple[int, str]] = []
            deadline = trio.current_time() + 3.5 * health_timeout
            while trio.current_time() < deadline:  # the duration is what is tested
                statuses.append(await get(worker.metrics_port, "/healthz"))
                await trio.sleep(0.1)
            final = samples((await get(worker.metrics_port, "/metrics"))[1])
            worker.stop()
            await worker.finished()
    assert final["loader_last_frame_age_seconds"] > 3 * health_timeout, "the stream was not quiet"
    assert final["loader_last_alive_age_seconds"] < health_timeout
    assert "loader_reconnects_total{reason=stalled}" not in final
    assert final["loader_last_candle_age_seconds"] > 3 * health_timeout
    assert final["loader_shortest_interval_seconds"] == 60
    assert statuses, "the probe was never asked"
    assert {status for status, _ in statuses} == {200}, statuses


def test_liveness_counts_from_the_first_connection_attempt_not_from_process_start() -> None:
    """A slow start (Kafka, the resume scan, exchangeInfo retries) longer than HEALTH_TIMEOUT
    is not a dead connection: the probe passes until Binance has had HEALTH_TIMEOUT since
    the first connection attempt to show life, and fails after."""
    timeout = 60.0
    stats = Stats()
    # The counters were made when the process started, longer ago than the timeout.
    started = time.monotonic() - 2 * timeout
    stats.last_frame_at = stats.last_alive_at = stats.last_ack_at = started
    stats.candles_handed = 0
    assert healthy(stats, timeout) == (True, "ok")
    stats.connecting()
    assert healthy(stats, timeout) == (True, "ok")
    # Candles handed at once are not "unacknowledged for" the whole slow start either.
    stats.candles_handed = 3
    assert healthy(stats, timeout) == (True, "ok")
    stats.candles_handed = 0
    # Connecting for longer than the timeout without a frame: dead.
    assert stats.connecting_since is not None
    stats.connecting_since -= timeout + 1
    ok, reason = healthy(stats, timeout)
    assert not ok
    assert "no frame from Binance" in reason
    stats.last_frame_at = time.monotonic()
    stats.candles_handed = 3
    ok, reason = healthy(stats, timeout)
    assert not ok
    assert "3 candles unacknowledged" in reason
