"""The whole market: `SYMBOL=*` over many connections, listings and delistings followed
without a restart, and shards side by side, against the emulator and the real broker."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest
import trio
from kafka_broker import KafkaBroker
from timing import scaled
from worker_tools import (
    candles,
    expected_candle,
    produce,
    read_topic,
    running_worker,
    stop_command,
    telemetry,
    worker_settings,
)
from wss import Wss

from loader import Settings, Worker, run
from loader.shards import shard_of
from loader.testing import Emulator, EmulatorConfig, Listing, market_symbols, open_emulator

pytestmark = pytest.mark.anyio

MINUTE = 60_000
START = 1_700_000_040_000  # a whole minute


def _by_stream(published: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    streams: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for candle in published:
        streams[(candle["symbol"], candle["interval"])].append(candle)
    return streams


def _assert_exact(emulator: Emulator, stream: tuple[str, str], mine: list[dict[str, Any]]) -> None:
    """The stream's candles are the market's closed ones over the span they cover: none
    missing, none repeated, in order, every value equal."""
    symbol, interval = stream
    truth = emulator.closed_klines(symbol, interval, mine[0]["open_time"], mine[-1]["open_time"])
    assert mine == [expected_candle(k) for k in truth], stream


async def _wait_streams(emulator: Emulator, count: int) -> None:
    await emulator.wait_for(
        lambda e: sum(len(c.subscriptions) for c in e.connections if c.kind == "stream") >= count
    )


async def test_every_symbol_over_several_connections_follows_listings(
    kafka: KafkaBroker, wss: Wss
) -> None:
    symbols = market_symbols(3000)
    listed_at = START + 3 * MINUTE
    delisted_at = START + 3 * MINUTE
    config = EmulatorConfig(
        start_ms=START,
        speed=30,  # a 1m candle every 2 s: 1,500 closing frames a second
        seed=11,
        symbols=symbols,
        listings=(Listing("NEWUSDT", listed_ms=listed_at), Listing(symbols[7], None, delisted_at)),
        intermediate_updates=False,
    )
    gone = symbols[7]
    topic = await trio.to_thread.run_sync(kafka.new_topic, "market-all")
    async with open_emulator(wss.serve(config)) as emulator:
        settings = worker_settings(
            kafka,
            emulator,
            topic,
            SYMBOL="*",
            STREAMS_PER_CONNECTION="1024",
            # Longer than a candle: the listing is seen after its first candle closed, so that
            # one comes from history.
            SYMBOLS_REFRESH="3",
            TELEMETRY_INTERVAL="1",
            BACKFILL_WINDOW="3600",
        )
        async with running_worker(settings) as worker:
            await _wait_streams(emulator, 3000)
            stream_conns = [c for c in emulator.connections if c.kind == "stream"]
            assert len(stream_conns) >= 3
            assert max(len(c.subscriptions) for c in stream_conns) <= 1024
            # The listing is subscribed without a restart ...
            await emulator.wait_for(
                lambda e: any("newusdt@kline_1m" in c.subscriptions for c in e.connections)
            )
            # ... and four of its candles close (candle 3 is its first) and are in Kafka.
            await emulator.wait_closed("NEWUSDT", "1m", 3 + 4)
            await _published_through(worker, ("NEWUSDT", "1m"), listed_at + 3 * MINUTE)
            stop = stop_command(settings.queue_id)
            await trio.to_thread.run_sync(produce, kafka, settings.queue_control_topic, [stop])
            outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0)
    # SUBSCRIBE within Binance's 5 messages a second, 1,024 streams a connection: no
    # connection was refused or closed for it.
    assert not worker.stats.reconnects, dict(worker.stats.reconnects)
    published = candles(await read_topic(kafka, topic, outcome.records_written))
    assert len(published) == outcome.records_written
    streams = _by_stream(published)
    assert set(streams) == {(s, "1m") for s in (*symbols, "NEWUSDT")}
    for stream, mine in streams.items():
        _assert_exact(emulator, stream, mine)
    # The listing from its very first candle on; the delisted symbol up to its last.
    new = streams[("NEWUSDT", "1m")]
    assert new[0]["open_time"] == listed_at
    assert len(new) >= 4
    ended = streams[(gone, "1m")]
    assert ended[-1]["close_time"] == delisted_at - 1
    events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    messages = [e["message"] for e in events]
    assert any(m.startswith(f"delisted: {gone}") for m in messages), messages
    assert any(m.startswith("listed: NEWUSDT") for m in messages), messages
    # A summary, not 3,000 symbols.
    assert all(len(e["symbol"]) < 100 for e in events)
    assert events[-1]["symbol"].startswith("*: 3000 symbols x 1m")


async def _published_through(worker: Worker, stream: tuple[str, str], open_time: int) -> None:
    """Until the stream's candles up to the one opening at `open_time` are acknowledged.
    Nothing signals a stream's progress, so its guard is looked at every 50 ms."""
    with trio.fail_after(scaled(60)):
        while worker.source is None or not (  # noqa: ASYNC110 - no event tells a stream's progress
            stream in worker.source.guards and worker.source.guards[stream].reached(open_time + 1)
        ):
            await trio.sleep(0.05)
        await worker.wait_written(worker.stats.candles_published)


async def test_three_shards_split_the_market_and_one_stop_ends_them_all(
    kafka: KafkaBroker, wss: Wss
) -> None:
    symbols = market_symbols(300)
    config = EmulatorConfig(
        start_ms=START, speed=60, seed=12, symbols=symbols, intermediate_updates=False
    )
    topic = await trio.to_thread.run_sync(kafka.new_topic, "market-shards")
    async with open_emulator(wss.serve(config)) as emulator, trio.open_nursery() as nursery:
        shards: list[Worker] = []
        settings: list[Settings] = []
        for index in range(3):
            s = worker_settings(
                kafka, emulator, topic, SYMBOL="*", INTERVAL="1m,5m", SHARD_COUNT="3",
                JOB_COMPLETION_INDEX=str(index), STREAMS_PER_CONNECTION="64",
            )  # fmt: skip
            settings.append(s)
            shards.append(await nursery.start(run, s))
        await _wait_streams(emulator, 600)
        for worker in shards:
            await worker.wait_written(worker.records_written + 200)
        # One command for the one queue id: every shard reads it (no consumer group).
        stop = stop_command(settings[0].queue_id)
        await trio.to_thread.run_sync(produce, kafka, settings[0].queue_control_topic, [stop])
        with trio.fail_after(scaled(30)):
            outcomes = [await worker.finished() for worker in shards]
    assert [(o.status, o.exit_code) for o in outcomes] == [("interrupted", 0)] * 3
    carried = [set(worker.source.streams) for worker in shards if worker.source is not None]
    everything = {(s, i) for s in symbols for i in ("1m", "5m")}
    assert sum(len(c) for c in carried) == len(everything)  # none in two shards
    assert set().union(*carried) == everything  # the union is the whole set
    for index, streams in enumerate(carried):
        assert all(shard_of(f"{s.lower()}@kline_{i}", 3) == index for s, i in streams)
    total = sum(o.records_written for o in outcomes)
    published = candles(await read_topic(kafka, topic, total))
    assert len(published) == total
    keys = Counter((c["symbol"], c["interval"], c["open_time"]) for c in published)
    assert max(keys.values()) == 1  # no candle from two shards
    for stream, mine in _by_stream(published).items():
        _assert_exact(emulator, stream, mine)
    events = telemetry(await read_topic(kafka, settings[0].queue_events_topic))
    producers = {e["producer"] for e in events}
    assert producers == {f"loader-test/shard-{i}-of-3" for i in range(3)}
    terminal = [e for e in events if e["status"] != "loading" and e["status"] != "started"]
    assert sorted(e["producer"] for e in terminal) == sorted(producers)
    assert all(e["status"] == "interrupted" and e["finished"] for e in terminal)
