"""The service as a process against the emulator over wss, at the edges of its input: a frame
too implausible to let in, and a STOP_AT written in epoch seconds.

The emulator's market runs at the wall clock's pace here (speed 1, 1s candles): the process
holds every frame against the wall clock, as it does against Binance.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trustme
from kafka_broker import KafkaBroker
from timing import scaled
from worker_tools import (
    assert_matches_market,
    candles,
    env_without_kafka_vars,
    read_topic,
    telemetry,
    worker_env,
)

from loader.testing import Emulator, EmulatorConfig, KlineEvent, candle_open, open_emulator

pytestmark = pytest.mark.anyio

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT")
TEN_YEARS_MS = 10 * 365 * 86_400_000


@asynccontextmanager
async def wss_emulator(tmp_path: Path) -> AsyncIterator[tuple[Emulator, dict[str, str]]]:
    """An emulator over wss:// whose market keeps the wall clock's time, and the environment
    that makes a worker process trust its certificate."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    ca_file = tmp_path / "binance-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    config = EmulatorConfig(
        speed=1.0,
        seed=20,
        symbols=SYMBOLS,
        ssl_context=context,
        start_ms=candle_open("1s", int(time.time() * 1000)),
    )
    async with open_emulator(config) as emulator:
        assert emulator.url.startswith("wss://")
        yield emulator, {"SSL_CERT_FILE": str(ca_file)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


@asynccontextmanager
async def worker_process(env: dict[str, str]) -> AsyncIterator[tuple[trio.Process, bytearray]]:
    """The worker as a process, its output (stdout and stderr) collected."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "loader"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output = bytearray()

    async def collect() -> None:
        assert process.stdout is not None
        async for chunk in process.stdout:
            output.extend(chunk)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            yield process, output
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _published_until(
    kafka: KafkaBroker, topic: str, symbol: str, open_time: int
) -> list[dict[str, Any]]:
    """The topic's candles once it holds `symbol`'s candle opening at `open_time`."""
    seen = 0
    while True:
        published = candles(await read_topic(kafka, topic, expected=seen + 1))
        if any(c["symbol"] == symbol and c["open_time"] == open_time for c in published):
            return published
        seen = len(published)


async def test_a_future_dated_frame_is_refused_and_its_stream_goes_on(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    """Four streams; one closed BTCUSDT frame dated ten years ahead among the true ones: it
    is not in Kafka, every later BTCUSDT candle is, exactly the market's, and the refusal is
    counted and logged once."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "door-future")
    port = _free_port()
    async with wss_emulator(tmp_path) as (emulator, trust):
        env = env_without_kafka_vars(os.environ) | trust
        env |= worker_env(
            kafka, emulator, topic, SYMBOL=",".join(SYMBOLS), INTERVAL="1s",
            METRICS_PORT=str(port), LOG_FORMAT="json",
        )  # fmt: skip
        async with worker_process(env) as (process, output):
            with trio.fail_after(scaled(60)):
                await read_topic(kafka, topic, expected=2 * len(SYMBOLS))
                true = emulator.closed_klines("BTCUSDT", "1s")[-1]
                future = candle_open("1s", true.open_time + TEN_YEARS_MS)
                bad = msgspec.structs.replace(
                    true, open_time=future, close_time=future + 999, close="99999.00000000"
                )
                frame = KlineEvent("kline", emulator.market_time_ms(), "BTCUSDT", bad)
                sent = emulator.send_event(msgspec.json.encode(frame), "btcusdt@kline_1s")
                assert sent == 1
                # Five candles of the stream close after the bad frame was sent.
                after = await emulator.wait_closed(
                    "BTCUSDT", "1s", len(emulator.closed_klines("BTCUSDT", "1s")) + 5
                )
                await _published_until(kafka, topic, "BTCUSDT", after[-1].open_time)
                text = await trio.to_thread.run_sync(_metrics, port)
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 143
        published = candles(await read_topic(kafka, topic))
        assert future not in [c["open_time"] for c in published]
        for symbol in SYMBOLS:
            assert_matches_market(published, emulator, symbol, "1s")
        btc = [c["open_time"] for c in published if c["symbol"] == "BTCUSDT"]
        assert btc[-5:] == [k.open_time for k in after[-5:]]
    assert 'loader_frames_refused_total{reason="open_time_ahead"} 1.0' in text
    lines = [json.loads(line) for line in output.decode().splitlines() if line.startswith("{")]
    refused = [line["event"] for line in lines if "refused a frame" in line["event"]]
    assert len(refused) == 1, refused
    assert refused[0].startswith("btcusdt@kline_1s: refused a frame")
    assert str(future) in refused[0]
    events = telemetry(await read_topic(kafka, f"{topic}-events"))
    assert events[-1]["status"] == "interrupted"


async def test_stop_at_in_epoch_seconds_is_an_hour_away_not_1970(
    kafka: KafkaBroker, tmp_path: Path
) -> None:
    """`STOP_AT=<now + 3600>` in seconds (10 digits): the run goes on loading, and stops only
    when told to."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "stop-at-seconds")
    stop_at = int(time.time()) + 3600
    async with wss_emulator(tmp_path) as (emulator, trust):
        env = env_without_kafka_vars(os.environ) | trust
        env |= worker_env(
            kafka, emulator, topic, SYMBOL="BTCUSDT,ETHUSDT", INTERVAL="1s",
            STOP_AT=str(stop_at), TELEMETRY_INTERVAL="1", LOG_FORMAT="json",
        )  # fmt: skip
        async with worker_process(env) as (process, output):
            with trio.fail_after(scaled(60)):
                await read_topic(kafka, topic, expected=6)
                assert process.poll() is None, output.decode()
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 143
    events = telemetry(await read_topic(kafka, f"{topic}-events"))
    statuses = [e["status"] for e in events]
    assert statuses[0] == "started"
    assert "loading" in statuses
    assert statuses[-1] == "interrupted"
    assert "finished" not in statuses
    assert "past already" not in output.decode()
