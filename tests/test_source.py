"""The source's pure logic with plain values: the per-stream guard, skipping, backoff."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
import pytest
import trio
import trio.testing

from loader.binance import Kline, KlineEvent, KlineUpdate, KlineUpdateEvent
from loader.schema import Candle, Record
from loader.settings import Settings, load_settings
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


def epoch_settings(env: Mapping[str, str] | None = None, *, now: float = 200.0) -> Settings:
    """Settings whose door holds frames against a clock of these candles' time: the epoch's
    first minutes (`now`, in seconds)."""
    settings = load_settings({**SETTINGS_ENV, **(env or {})})
    return msgspec.structs.replace(settings, clock=lambda: now)


async def published(events: list[KlineEvent], **env: str) -> tuple[list[Candle], Stats]:
    settings = epoch_settings(env)
    send, receive = trio.open_memory_channel[Record](100)
    stats = Stats()
    source = Source(settings, send, stats, resume={("BTCUSDT", "1m"): 0})
    for e in events:
        await source.router.kline(e)
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


async def _handover(*, cancel_old: bool) -> tuple[list[int], Stats]:
    """A connection replaced while the channel is full, with the real router and a channel of
    one: the old connection's reader waits to hand candle X to the channel; the sink takes
    what was before it, so X goes in and the old reader is woken, but before it runs, the new
    connection (promoted) routes its own copy of X (or the old reader is cancelled instead,
    X never handed). Returns the open times the sink got, after the candle before."""
    settings = epoch_settings()
    send, receive = trio.open_memory_channel[Record](1)
    stats = Stats()
    router = Source(settings, send, stats, resume={("BTCUSDT", "1m"): 0}).router
    send.send_nowait((b"before", b"{}"))  # the channel is full
    got: list[int] = []

    async def sink() -> None:
        async for _, value in receive:
            got.append(msgspec.json.decode(value, type=Candle).open_time)

    async with trio.open_nursery() as nursery:
        old = trio.CancelScope()

        async def old_reader() -> None:
            with old:
                await router.kline(event(60_000))

        nursery.start_soon(old_reader)
        await trio.testing.wait_all_tasks_blocked()  # the old reader waits in the send
        if cancel_old:
            nursery.start_soon(router.kline, event(60_000))  # the new connection's copy
            await trio.testing.wait_all_tasks_blocked()
            old.cancel()  # the replaced connection is closed before X went in
            await trio.testing.wait_all_tasks_blocked()
            receive.receive_nowait()  # what was before
            nursery.start_soon(sink)
        else:
            receive.receive_nowait()  # the sink takes what was before: X goes in
            nursery.start_soon(sink)
            # The promoted connection, in this task: it routes X before the old reader runs.
            await router.kline(event(60_000, event_time=60_002))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return got, stats


@pytest.mark.anyio
async def test_a_candle_in_flight_when_its_connection_is_replaced_is_published_once() -> None:
    got, stats = await _handover(cancel_old=False)
    assert got == [60_000]
    assert stats.duplicates_dropped == 1


@pytest.mark.anyio
async def test_a_candle_whose_send_was_cancelled_is_published_by_the_new_connection() -> None:
    got, stats = await _handover(cancel_old=True)
    assert got == [60_000]
    assert stats.duplicates_dropped == 0


@pytest.mark.anyio
async def test_a_frame_of_the_next_candle_does_not_fill_the_candle_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As above, but the promoted connection's first frame is an update of the candle after
    X: read before the old reader's send ended, it took X for missing and filled it again."""
    settings = epoch_settings()
    send, receive = trio.open_memory_channel[Record](1)
    router = Source(settings, send, Stats(), resume={("BTCUSDT", "1m"): 0}).router
    fills: list[tuple[str, str]] = []
    monkeypatch.setattr(router.fills, "start", lambda stream, _fill: fills.append(stream))
    send.send_nowait((b"before", b"{}"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(router.kline, event(60_000))
        await trio.testing.wait_all_tasks_blocked()
        receive.receive_nowait()  # X goes in; the old reader is woken, not yet run
        update = KlineUpdateEvent(
            event="kline", event_time=120_500,
            kline=KlineUpdate(open_time=120_000, symbol="BTCUSDT", interval="1m", is_closed=False),
        )  # fmt: skip
        await router.kline(update)
        await trio.testing.wait_all_tasks_blocked()
    assert fills == []
    assert router.guards[("BTCUSDT", "1m")].next_open == 120_000


@pytest.mark.anyio
async def test_a_lost_resume_point_is_reported_and_kept_as_a_hole_until_stop_at() -> None:
    """A stream whose resume point the scan could not find: reported at once as a hole of
    unknown size, and still a hole when STOP_AT comes, though it publishes from its first
    candle on."""
    settings = epoch_settings(now=661.0)
    send, _receive = trio.open_memory_channel[Record](100)
    stats = Stats()
    told: list[str] = []
    source = Source(settings, send, stats, resume_unknown=[("BTCUSDT", "1m")], on_hole=told.append)
    assert len(told) == 1
    assert "btcusdt@kline_1m" in told[0]
    assert "resume points were not found" in told[0]
    assert (stats.holes, stats.candles_lost) == (1, 0)
    await source.router.kline(event(600_000))
    assert source.lagging(659_999) == []
    ((stream, (holes, more)),) = source.holes(659_999).items()
    assert stream == ("BTCUSDT", "1m")
    assert [(h.first, h.end, h.count, more) for h in holes] == [(-1, 600_000, -1, 0)]
