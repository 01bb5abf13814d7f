"""Resume points read from a real topic: as deep as each interval needs, and cancellable."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import trio
from kafka_broker import KafkaBroker
from worker_tools import produce

from loader.resume import ResumeCancelled, resume_points
from loader.settings import Settings, load_settings

pytestmark = pytest.mark.anyio


def _settings(kafka: KafkaBroker, topic: str, symbols: str, interval: str) -> Settings:
    return load_settings({
        "QUEUE_ID": "q", "SYMBOL": symbols, "INTERVAL": interval, "KAFKA_TOPIC": topic,
        "TELEMETRY_PRODUCER_ID": "p", "KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap("plaintext"),
    })  # fmt: skip


def _candle(open_time: int, closed: bool = True) -> bytes:
    return msgspec.json.encode({"open_time": open_time, "is_closed": closed})


async def test_each_stream_resumes_after_its_newest_closed_candle(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "resume-points", 3)
    week = 7 * 86_400_000
    await trio.to_thread.run_sync(produce, kafka, topic, [_candle(0), _candle(week)],
                                  b"BTCUSDT-1w")  # fmt: skip
    # Many later records of another stream: the weekly key is further back than a chunk.
    values = [_candle(t * 60_000) for t in range(5000)]
    await trio.to_thread.run_sync(produce, kafka, topic, values, b"ETHUSDT-1w")
    await trio.to_thread.run_sync(produce, kafka, topic, [_candle(2 * week, closed=False)],
                                  b"BTCUSDT-1w")  # fmt: skip
    settings = _settings(kafka, topic, "BTCUSDT,ETHUSDT,SOLUSDT", "1w")
    found = await trio.to_thread.run_sync(resume_points, settings)
    assert found == {("BTCUSDT", "1w"): week, ("ETHUSDT", "1w"): 4999 * 60_000}


async def test_a_stop_ends_the_scan_within_a_poll(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "resume-stop")
    values = [_candle(t * 1000) for t in range(20_000)]
    await trio.to_thread.run_sync(produce, kafka, topic, values, b"ETHUSDT-1s")
    # A key never written: the scan would read the whole topic.
    settings = _settings(kafka, topic, "BTCUSDT", "1s")
    stop = threading.Event()
    stop.set()
    began = time.monotonic()
    with pytest.raises(ResumeCancelled):
        await trio.to_thread.run_sync(resume_points, settings, stop)
    assert time.monotonic() - began < 5  # the consumer's setup, then one poll at most
