"""Resume points read from a real topic: however old, within a budget per partition, and
cancellable."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio
import trustme
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2
from kafka_broker import KafkaBroker
from timing import scaled
from worker_tools import (
    candles,
    env_without_kafka_vars,
    produce,
    read_topic,
    running_worker,
    telemetry,
    worker_env,
    worker_settings,
)

import loader.resume
from loader.intervals import candle_open
from loader.resume import Resume, ResumeCancelled, resume_points
from loader.settings import Settings, load_settings
from loader.testing import EmulatorConfig, open_emulator

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
    assert found == Resume({("BTCUSDT", "1w"): week, ("ETHUSDT", "1w"): 4999 * 60_000})


def _produce_at(kafka: KafkaBroker, topic: str, key: bytes, values: list[bytes], at: int) -> None:
    """Records written at `at` (epoch ms): their record timestamp says so."""
    producer = KafkaProducer(**kafka.producer_config())
    try:
        for value in values:
            producer.send(topic, value=value, key=key, timestamp_ms=at)
        producer.flush(timeout=10)
    finally:
        producer.close(timeout=5)


async def test_a_resume_point_written_long_ago_is_found(kafka: KafkaBroker) -> None:
    """The last 1m candle was written 30 days ago, far beyond BACKFILL_WINDOW, and 20,000
    records of another stream came after it: it is the resume point all the same (the hole
    after it is then reported, not skipped in silence)."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "resume-old")
    month_ago = int(time.time() * 1000) - 30 * 86_400_000
    old = [_candle(month_ago - 120_000), _candle(month_ago - 60_000)]
    await trio.to_thread.run_sync(_produce_at, kafka, topic, b"BTCUSDT-1m", old, month_ago)
    noise = [_candle(t * 60_000) for t in range(20_000)]
    await trio.to_thread.run_sync(produce, kafka, topic, noise, b"ETHUSDT-1s")
    settings = _settings(kafka, topic, "BTCUSDT", "1m")
    found = await trio.to_thread.run_sync(resume_points, settings)
    assert found == Resume({("BTCUSDT", "1m"): month_ago - 60_000})


async def test_a_partition_out_of_budget_leaves_its_streams_unknown(kafka: KafkaBroker) -> None:
    """No time to read: the streams whose partition holds records have an unknown resume
    point (not "never written"); a stream whose partition is empty was never written."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "resume-budget", 2)
    await trio.to_thread.run_sync(produce, kafka, topic, [_candle(0)], b"BTCUSDT-1m")
    # By the default partitioner, BTCUSDT-1m and ETHUSDT-1m live on partition 1, ADAUSDT-1m
    # on partition 0, which stays empty.
    keys = [f"{s}-1m".encode() for s in ("BTCUSDT", "ETHUSDT", "ADAUSDT")]
    assert [(murmur2(key) & 0x7FFFFFFF) % 2 for key in keys] == [1, 1, 0]
    settings = _settings(kafka, topic, "BTCUSDT,ETHUSDT,ADAUSDT", "1m")
    with_time = await trio.to_thread.run_sync(resume_points, settings)
    assert with_time == Resume({("BTCUSDT", "1m"): 0})
    found = await trio.to_thread.run_sync(partial(resume_points, settings, budget=0.0))
    assert found == Resume({}, (("BTCUSDT", "1m"), ("ETHUSDT", "1m")))


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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _until_hole_told(kafka: KafkaBroker, events: str) -> None:
    """Return once the events topic holds a `hole:` event (each read waits for one more)."""
    seen = 0
    while True:
        records = await read_topic(kafka, events, expected=seen + 1)
        if any(json.loads(r.value)["message"].startswith("hole:") for r in records):
            return
        seen = len(records)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith(f"{name} ")]
    return float(line.split()[1])


async def test_a_restart_after_an_outage_longer_than_the_window_fills_it_and_reports_the_rest(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    """The service as a process, Binance over wss: 1s candles, BACKFILL_WINDOW=15, kill -9,
    25 candles closed while nothing ran, and the topic's last record older than the window by
    the time the worker restarts. It resumes after candle 2: the candles that closed within
    the window are filled, the older ones are one `hole:` (telemetry, metric, error log),
    and the topic holds each candle once, in order."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "resume-restart")
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    config = EmulatorConfig(
        speed=1e-6, seed=3, ping_interval=0.5, pong_timeout=2.0, ssl_context=server,
        start_ms=candle_open("1s", int(time.time() * 1000)),
    )  # fmt: skip
    async with open_emulator(config) as emulator:
        assert emulator.url.startswith("wss://")
        port = _free_port()
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, INTERVAL="1s", BACKFILL_WINDOW="15", LOG_FORMAT="json",
            METRICS_PORT=str(port),
        ) | {"SSL_CERT_FILE": str(ca_file)}  # fmt: skip

        def opens(*indices: int) -> list[int]:
            return [emulator.market.open_time("1s", i) for i in indices]

        first = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.DEVNULL
        )
        try:
            await emulator.wait_connections(1)
            emulator.advance_to(opens(3)[0] + 500)  # candles 0..2 close
            with trio.fail_after(scaled(30)):
                written = await read_topic(kafka, topic, expected=3)
        finally:
            first.kill()
            await first.wait()
        # The outage: 25 candles (3..27) close while nothing runs, and by the wall clock the
        # topic's last record grows older than the window (plus two 1s intervals) too.
        emulator.advance_to(opens(28)[0] + 500)
        older = max(r.timestamp for r in written) + 20_000 - time.time() * 1000
        await trio.sleep(max(0.0, older / 1000))  # the outage under test, not a wait for it
        second = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        output = bytearray()
        async with trio.open_nursery() as nursery:

            async def collect() -> None:
                assert second.stdout is not None
                async for chunk in second.stdout:
                    output.extend(chunk)

            nursery.start_soon(collect)
            with trio.fail_after(scaled(60)):
                await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
                # Candle 28 closes; its frame (event time 250 ms after its close) shows the
                # gap: 14..27 closed within the 15 s before it, 3..13 before that.
                emulator.advance_to(opens(29)[0] + 500)
                await read_topic(kafka, topic, expected=3 + 15)
                await _until_hole_told(kafka, f"{topic}-events")
                lost = await trio.to_thread.run_sync(_metric, port, "loader_candles_lost_total")
                second.send_signal(signal.SIGTERM)
                assert await second.wait() == 143
        published = [c["open_time"] for c in candles(await read_topic(kafka, topic))]
        assert published == opens(0, 1, 2, *range(14, 29))
        events = telemetry(await read_topic(kafka, f"{topic}-events"))
    holes = [str(e["message"]) for e in events if str(e["message"]).startswith("hole:")]
    hole = f"11 closed candles of btcusdt@kline_1s opening from {opens(3)[0]} to before "
    assert len(holes) == 1, holes
    assert holes[0].startswith(f"hole: {hole}{opens(14)[0]} lost (beyond BACKFILL_WINDOW)")
    assert lost == 11
    logged = [json.loads(line) for line in output.decode().splitlines() if line.strip()]
    assert len([x for x in logged if x["level"] == "error" and hole in x["event"]]) == 1


async def test_a_lost_resume_point_is_told_at_start_and_stop_at_over_it_is_not_finished(
    kafka: KafkaBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The topic holds the stream, but its partition's budget runs out before the scan finds
    it: the run says so at once (a `hole:` event), streams from its first candle on, and
    reaching STOP_AT ends in a final `error` naming the stream, not `finished`."""
    monkeypatch.setattr(loader.resume, "PARTITION_BUDGET", 0.0)
    topic = await trio.to_thread.run_sync(kafka.new_topic, "resume-lost")
    await trio.to_thread.run_sync(produce, kafka, topic, [_candle(0)], b"BTCUSDT-1m")
    clock = EmulatorConfig(speed=1e-6, seed=3, ping_interval=0.5, pong_timeout=2.0)
    config = clock.replace(start_ms=candle_open("1m", int(time.time() * 1000)))
    async with open_emulator(config) as emulator:
        opens = [emulator.market.open_time("1m", i) for i in range(4)]
        settings = worker_settings(kafka, emulator, topic, STOP_AT=str(opens[3] - 1))
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            emulator.advance_to(opens[2] + 3_000)
            await worker.wait_written(2)
            emulator.advance_to(opens[3] + 3_000)  # candle 2 closes: STOP_AT is passed
            with trio.fail_after(scaled(30)):
                outcome = await worker.finished()
        seeded, *written = await read_topic(kafka, topic)
        # After the seeded resume point (not a whole candle: not the worker's), the worker's.
        published = [c["open_time"] for c in candles(written)]
    assert seeded.value == _candle(0)
    assert published == opens[:3]
    assert (outcome.status, outcome.exit_code, outcome.final) == ("error", 3, True)
    assert outcome.message.startswith(f"holes: BTCUSDT-1m ..{opens[0] - 1} (resume point lost")
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    holes = [str(e["message"]) for e in events if str(e["message"]).startswith("hole:")]
    assert len(holes) == 1
    assert "btcusdt@kline_1m" in holes[0]
    assert "resume points were not found" in holes[0]
