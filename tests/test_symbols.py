"""Symbols Binance does not know, found out however they came in: a resumed one is checked like
a new one, and a history answer of -1121 (invalid symbol) drops that symbol alone, reported,
instead of failing every stream's run (which each retry would fail again). Against the
emulator over wss, which knows only the symbols it is told."""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import pytest
import trio
import trustme
from kafka_broker import KafkaBroker
from timing import scaled
from worker_tools import (
    assert_matches_market,
    candles,
    produce,
    read_topic,
    running_worker,
    telemetry,
    worker_settings,
)

from loader.history import HistoryError
from loader.intervals import candle_open
from loader.router import Router
from loader.schema import Record
from loader.settings import load_settings
from loader.stats import Stats
from loader.symbols import Symbols
from loader.testing import Emulator, EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

KNOWN = ("BTCUSDT", "ETHUSDT")


@asynccontextmanager
async def wss_emulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **config: object
) -> AsyncIterator[Emulator]:
    """The emulator over wss, with a CA of its own the process trusts (as OpenSSL's default
    store), knowing only `KNOWN`."""
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    emulator_config = EmulatorConfig(speed=600, seed=11, symbols=KNOWN, ssl_context=context)
    async with open_emulator(emulator_config.replace(**config)) as emulator:
        assert emulator.url.startswith("wss://")
        yield emulator


async def _resumed(kafka: KafkaBroker, name: str, symbol: str, minutes_ago: int) -> str:
    """A topic whose newest candle of `symbol` 1m opened `minutes_ago` minutes ago: the
    worker resumes that stream from it."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, name)
    open_time = candle_open("1m", int(time.time() * 1000)) - minutes_ago * 60_000
    value = msgspec.json.encode({"open_time": open_time, "symbol": symbol, "interval": "1m"})
    await trio.to_thread.run_sync(produce, kafka, topic, [value], f"{symbol}-1m".encode())
    return topic


async def test_a_resumed_unknown_symbol_is_checked_and_dropped(
    kafka: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A symbol with a resume point in the topic, that Binance no longer knows (delisted
    since): it is asked about like a new one, dropped and reported, and the others go on."""
    topic = await _resumed(kafka, "symbols-resumed-unknown", "NOPEUSDT", 3)
    async with wss_emulator(tmp_path, monkeypatch) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL="BTCUSDT,NOPEUSDT", STALL_TIMEOUT="0.5"
        )
        async with running_worker(settings) as worker:
            # Before the fix the resumed symbol counted as heard: never checked, silent.
            with trio.fail_after(scaled(20)):
                while worker.stats.symbols_dropped == 0:
                    await worker.wait_written(worker.records_written + 1)
            await worker.wait_written(worker.records_written + 5)
            worker.stop()
            outcome = await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=1 + outcome.records_written))
        assert_matches_market(published[1:], emulator, "BTCUSDT", "1m")
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)
    assert worker.stats.symbols_dropped == 1
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    dropped = [e for e in events if "dropped symbol NOPEUSDT" in str(e["message"])]
    assert [e["status"] for e in dropped] == ["loading"]


async def test_stop_at_with_a_resumed_unknown_symbol_drops_it_and_finishes_the_others(
    kafka: KafkaBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """STOP_AT asks history for what the resumed unknown symbol lacks; Binance answers -1121.
    That symbol is dropped (reported once), the run is not failed (which each retry would
    repeat), and it ends `finished` with the known symbol complete."""
    topic = await _resumed(kafka, "symbols-stop-at-unknown", "NOPEUSDT", 10)
    async with wss_emulator(tmp_path, monkeypatch) as emulator:
        stop_at = str(int((time.time() + 1.5) * 1000))
        # The silence check comes long after STOP_AT's fill from history: that path is tested.
        settings = worker_settings(
            kafka, emulator, topic, SYMBOL="BTCUSDT,NOPEUSDT", STOP_AT=stop_at, STALL_TIMEOUT="60"
        )
        with trio.fail_after(scaled(60)):
            async with running_worker(settings) as worker:
                outcome = await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=1 + outcome.records_written))
        assert_matches_market(published[1:], emulator, "BTCUSDT", "1m")
    assert (outcome.status, outcome.exit_code) == ("finished", 0), outcome.message
    assert worker.stats.symbols_dropped == 1
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    dropped = [e for e in events if "dropped symbol NOPEUSDT" in str(e["message"])]
    assert [e["status"] for e in dropped] == ["loading"]
    assert events[-1]["status"] == "finished"


def test_a_symbol_is_dropped_and_reported_once_and_only_while_carried() -> None:
    """However many of its streams' fills are told -1121, a symbol is reported once; one whose
    streams ended meanwhile (delisted) is not reported as dropped."""
    settings = load_settings({
        "QUEUE_ID": "q", "SYMBOL": "BTCUSDT,NOPEUSDT", "INTERVAL": "1m,1h", "KAFKA_TOPIC": "t",
        "TELEMETRY_PRODUCER_ID": "p",
    })  # fmt: skip
    send, _receive = trio.open_memory_channel[Record](1)
    stats = Stats()
    router = Router(settings, send, stats)
    reported: list[str] = []
    symbols = Symbols(router, stats, reported.append)
    invalid = HistoryError(400, -1121, "Invalid symbol.")
    symbols.drop("NOPEUSDT", invalid)
    symbols.drop("NOPEUSDT", invalid)  # its other stream's fill
    assert reported == ["dropped symbol NOPEUSDT (2 stream(s)): Binance does not know it "
                        "(Invalid symbol.)"]  # fmt: skip
    assert set(router.guards) == {("BTCUSDT", "1m"), ("BTCUSDT", "1h")}
    router.remove(("BTCUSDT", "1m"))
    router.remove(("BTCUSDT", "1h"))
    symbols.drop("BTCUSDT", invalid)  # delisted already: nothing to drop, no "no stream left"
    assert stats.symbols_dropped == 1
    assert len(reported) == 1
