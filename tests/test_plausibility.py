"""The door's rule (loader/plausibility.py), with plain values and hypothesis, and the router
keeping a refused frame away from the guard and the channel."""

from __future__ import annotations

import calendar
import logging

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from loader.binance import Kline, KlineEvent, KlineUpdate, KlineUpdateEvent
from loader.intervals import INTERVALS, candle_open, length_ms, next_open
from loader.plausibility import CLOCK_SKEW_MS, MIN_EVENT_AGE_LIMIT_MS, event_age_limit, refusal
from loader.router import Router
from loader.schema import Record
from loader.settings import load_settings
from loader.stats import Stats

pytestmark = pytest.mark.anyio

# Between 2017 and 2040: Binance's history, and then some.
instants = st.integers(min_value=1_483_228_800_000, max_value=2_208_988_800_000)
intervals = st.sampled_from(INTERVALS)
# Within the allowance, either way.
skews = st.integers(-CLOCK_SKEW_MS, CLOCK_SKEW_MS)


def _ms(*when: int) -> int:
    return calendar.timegm((*when, 0, 0, 0)[:6]) * 1000


@given(intervals, instants, skews, st.integers(0, 30_000))
def test_a_true_frame_passes(interval: str, now: int, skew: int, lag: int) -> None:
    """What Binance sends: the candle in progress (or just closed) at its event time, the
    event a little before we read it, our clock off by up to the allowance."""
    event_time = now + skew - lag
    opened = candle_open(interval, event_time)
    for close_time in (next_open(interval, opened) - 1, None):
        assert refusal(interval, opened, close_time, event_time, now) is None
    # The closing frame of the previous candle, sent at the boundary.
    previous = candle_open(interval, opened - 1)
    assert refusal(interval, previous, opened - 1, event_time, now) is None


@given(intervals, instants, st.integers(1, 10_000_000))
def test_an_open_time_off_the_boundary_is_refused(interval: str, now: int, shift: int) -> None:
    opened = candle_open(interval, now)
    off = opened + shift % (next_open(interval, opened) - opened)
    if off != opened:
        assert refusal(interval, off, None, now, now) == "misaligned"


@given(intervals, instants, st.integers(-5_000, 5_000).filter(bool))
def test_a_close_time_not_the_candles_last_ms_is_refused(
    interval: str, now: int, shift: int
) -> None:
    opened = candle_open(interval, now)
    close_time = next_open(interval, opened) - 1 + shift
    assert refusal(interval, opened, close_time, now, now) == "misaligned"


@pytest.mark.parametrize(
    ("interval", "opened", "aligned"),
    [
        ("1w", _ms(2026, 11, 30), True),  # a Monday
        ("1w", _ms(2026, 12, 3), False),  # a Thursday: where the epoch's weeks would start
        ("1M", _ms(2026, 2, 1), True),
        ("1M", _ms(2026, 1, 1) + 31 * 86_400_000 - 86_400_000, False),  # 31 January
        ("3d", 3 * 86_400_000 * 6000, True),
        ("3d", 3 * 86_400_000 * 6000 + 86_400_000, False),
        ("1d", _ms(2026, 12, 4), True),
        ("1d", _ms(2026, 12, 4) + 3_600_000, False),
    ],
)
def test_long_intervals_have_their_own_boundaries(
    interval: str, opened: int, aligned: bool
) -> None:
    now = opened + 1000
    expected = None if aligned else "misaligned"
    assert refusal(interval, opened, None, now, now) == expected


@given(intervals, instants, st.integers(1, 10 * 365 * 86_400_000))
def test_a_candle_opening_past_now_and_one_interval_is_refused(
    interval: str, now: int, ahead: int
) -> None:
    opened = candle_open(interval, now + length_ms(interval) + CLOCK_SKEW_MS + ahead)
    if opened > now + length_ms(interval) + CLOCK_SKEW_MS:
        assert refusal(interval, opened, None, now, now) == "open_time_ahead"
    else:  # the boundary fell back within the allowance: still a candle that may be
        assert refusal(interval, opened, None, now, now) is None


@given(intervals, instants, st.integers(1, 10 * 365 * 86_400_000))
def test_an_event_time_ahead_of_our_clock_is_refused(interval: str, now: int, ahead: int) -> None:
    event_time = now + CLOCK_SKEW_MS + ahead
    opened = candle_open(interval, now)
    assert refusal(interval, opened, None, event_time, now) == "event_time_ahead"


@given(intervals, instants, st.integers(0, 400 * 86_400_000), st.integers(1, 3650 * 86_400_000))
def test_an_event_time_older_than_the_window_or_a_day_and_an_interval_is_refused(
    interval: str, now: int, window: int, age: int
) -> None:
    limit = event_age_limit(window, interval)
    assert limit == max(window, MIN_EVENT_AGE_LIMIT_MS) + length_ms(interval)
    for event_time, expected in ((now - limit - age, "event_time_stale"), (now - limit, None)):
        opened = candle_open(interval, event_time)
        assert refusal(interval, opened, None, event_time, now, age_limit_ms=limit) == expected


def _kline(open_time: int, close_time: int, *, closed: bool = True) -> Kline:
    return Kline(
        open_time=open_time, close_time=close_time, symbol="BTCUSDT", interval="1m",
        first_trade_id=1, last_trade_id=2, open="1.0", close="1.0", high="1.0", low="1.0",
        volume="1.0", number_of_trades=1, is_closed=closed, quote_asset_volume="1.0",
        taker_buy_base_asset_volume="1.0", taker_buy_quote_asset_volume="1.0",
    )  # fmt: skip


def _closed(open_time: int, event_time: int) -> KlineEvent:
    return KlineEvent(event_time, "BTCUSDT", _kline(open_time, open_time + 59_999))


async def test_the_router_keeps_a_refused_frame_from_the_guard_and_the_channel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Ten years ahead, among true frames: counted, logged once, and the stream goes on."""
    now = _ms(2026, 12, 4)
    settings = load_settings(
        {"QUEUE_ID": "q", "SYMBOL": "BTCUSDT", "KAFKA_TOPIC": "t", "TELEMETRY_PRODUCER_ID": "p"}
    )
    settings = msgspec.structs.replace(settings, clock=lambda: now / 1000)
    send, receive = trio.open_memory_channel[Record](100)
    stats = Stats()
    router = Router(settings, send, stats)
    guard = router.guards[("BTCUSDT", "1m")]
    future = now + 10 * 365 * 86_400_000
    frames: list[KlineEvent | KlineUpdateEvent] = [
        _closed(now - 120_000, now - 60_000),
        _closed(future, now),  # its candle ten years ahead
        _closed(future, future),  # and its event time too
        KlineUpdateEvent("kline", future, KlineUpdate(future, "BTCUSDT", "1m", False)),
        _closed(now - 60_000 + 7, now),  # off the minute
        _closed(now - 60_000, now),
    ]
    with caplog.at_level(logging.WARNING, logger="loader.router"):
        for frame in frames:
            await router.kline(frame)
    published = []
    while True:
        try:
            published.append(receive.receive_nowait())
        except trio.WouldBlock:
            break
    assert [key for key, _ in published] == [b"BTCUSDT-1m"] * 2
    assert guard.next_open == now
    assert not guard.filling
    assert router.latest_event_ms == now
    assert stats.frames_refused == {"open_time_ahead": 1, "event_time_ahead": 2, "misaligned": 1}
    assert stats.candles_received == 2
    refused = [r.getMessage() for r in caplog.records if "refused a frame" in r.getMessage()]
    assert len(refused) == 1, refused
    assert refused[0].startswith("btcusdt@kline_1m: refused a frame")
