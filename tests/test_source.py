"""The source's pure logic with plain values: the per-stream guard, skipping, backoff."""

from __future__ import annotations

import msgspec
import pytest
import trio
import trio.testing

from loader.binance import Kline, KlineEvent
from loader.schema import Candle, Record
from loader.settings import load_settings
from loader.source import Backoff, Source
from loader.stats import Stats

SETTINGS_ENV = {
    "QUEUE_ID": "q",
    "SYMBOL": "BTCUSDT",
    "KAFKA_TOPIC": "t",
    "TELEMETRY_PRODUCER_ID": "p",
}


def event(open_time: int, *, closed: bool = True, symbol: str = "BTCUSDT", price: str = "1.5",
          event_time: int | None = None) -> KlineEvent:  # fmt: skip
    k = Kline(
        open_time=open_time, close_time=open_time + 59_999, symbol=symbol, interval="1m",
        first_trade_id=1, last_trade_id=2, open=price, close="1.5", high="1.5", low="1.5",
        volume="2", number_of_trades=2, is_closed=closed, quote_asset_volume="3",
        taker_buy_base_asset_volume="1", taker_buy_quote_asset_volume="1.5",
    )  # fmt: skip
    return KlineEvent(event_time=event_time or open_time + 1, symbol=symbol, kline=k)


async def published(events: list[KlineEvent], **env: str) -> tuple[list[Candle], Stats]:
    settings = load_settings({**SETTINGS_ENV, **env})
    send, receive = trio.open_memory_channel[Record](100)
    stats = Stats()
    source = Source(settings, send, stats, resume={("BTCUSDT", "1m"): 0})
    for e in events:
        await source.kline(e)
    send.close()
    return [msgspec.json.decode(value, type=Candle) async for _, value in receive], stats


@pytest.mark.anyio
async def test_repeated_and_older_closed_candles_are_dropped() -> None:
    candles, stats = await published(
        [event(60_000), event(120_000), event(60_000), event(120_000), event(180_000)]
    )
    assert [c.open_time for c in candles] == [60_000, 120_000, 180_000]
    assert stats.duplicates_dropped == 2


@pytest.mark.anyio
async def test_a_resumed_stream_does_not_repeat_what_the_topic_holds() -> None:
    candles, stats = await published([event(0), event(60_000)])
    assert [c.open_time for c in candles] == [60_000]
    assert stats.duplicates_dropped == 1


@pytest.mark.anyio
async def test_streams_not_asked_for_and_bad_numbers_are_skipped_and_counted() -> None:
    candles, stats = await published(
        [event(60_000, symbol="ETHUSDT"), event(60_000, price="1,5"), event(60_000)]
    )
    assert [c.open_time for c in candles] == [60_000]
    assert dict(stats.malformed) == {"unexpected_stream": 1, "invalid_number": 1}


@pytest.mark.anyio
async def test_in_progress_updates_only_with_candles_all_and_never_backwards() -> None:
    updates = [
        event(60_000, closed=False, event_time=61_000),
        event(60_000, closed=False, event_time=60_500),  # older than one published
        event(60_000, closed=True, event_time=120_500),
        event(60_000, closed=False, event_time=121_000),  # for a candle already closed
    ]
    closed_only, _ = await published(updates)
    assert [c.open_time for c in closed_only] == [60_000]
    assert closed_only[0].is_closed is msgspec.UNSET
    everything, stats = await published(updates, CANDLES="all")
    assert [(c.open_time, c.is_closed) for c in everything] == [(60_000, False), (60_000, True)]
    assert stats.duplicates_dropped == 2


def test_backoff_grows_with_jitter_caps_and_honours_retry_after() -> None:
    backoff = Backoff(per_minute=5, base=1.0, cap=8.0, rng=lambda: 1.0)
    assert [backoff.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert backoff.failed(at_least=30.0) == 30.0
    backoff.reset()
    assert backoff.failed() == 1.0
    assert Backoff(per_minute=5, rng=lambda: 0.0).failed() == 0.0


def test_backoff_allows_a_few_attempts_a_minute() -> None:
    async def attempts() -> list[float]:
        backoff = Backoff(per_minute=3)
        times = []
        for _ in range(7):
            await backoff.turn()
            times.append(trio.current_time())
        return times

    times = trio.run(attempts, clock=trio.testing.MockClock(autojump_threshold=0))
    start = times[0]
    assert [round(t - start) for t in times] == [0, 0, 0, 60, 60, 60, 120]


@pytest.mark.anyio
async def test_a_lost_resume_point_is_reported_and_kept_as_a_hole_until_stop_at() -> None:
    """A stream whose resume point the scan could not find: reported at once as a hole of
    unknown size, and still a hole when STOP_AT comes, though it publishes from its first
    candle on."""
    settings = load_settings(SETTINGS_ENV)
    send, _receive = trio.open_memory_channel[Record](100)
    stats = Stats()
    told: list[str] = []
    source = Source(settings, send, stats, resume_unknown=[("BTCUSDT", "1m")], on_hole=told.append)
    assert len(told) == 1
    assert "btcusdt@kline_1m" in told[0]
    assert "resume points were not found" in told[0]
    assert (stats.holes, stats.candles_lost) == (1, 0)
    await source.kline(event(600_000))
    assert source.lagging(659_999) == []
    ((stream, (holes, more)),) = source.holes(659_999).items()
    assert stream == ("BTCUSDT", "1m")
    assert [(h.first, h.end, h.count, more) for h in holes] == [(-1, 600_000, -1, 0)]
