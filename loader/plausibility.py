"""The door: which kline frames are too implausible to let near a stream's guard.

A guard trusts every frame it sees: a closed candle dated ten years ahead would be published,
and every true candle after it dropped as already published. So each kline frame is held
against our clock first, by a pure function (no I/O; the clock is read by the caller):

- its open time must be on its interval's boundary (epoch-aligned, weeks from Monday 00:00
  UTC, `1M` the calendar month), and a decoded close time must be that candle's last ms;
- its open time must not be later than now plus one interval (plus `CLOCK_SKEW_MS`): no
  candle opens in the future;
- its event time must not be more than `CLOCK_SKEW_MS` ahead of now, nor older than
  `BACKFILL_WINDOW` or `MIN_EVENT_AGE_LIMIT_MS` (a day), whichever is longer, plus one
  interval.

Binance stamps its frames with its own clock, which NTP keeps within milliseconds of ours;
`CLOCK_SKEW_MS` is the allowance for the two clocks and the network between them. The past
gets a wider bound than the future: a true frame may wait in buffers (Kafka backpressure, a
replacement connection's first frames) but never comes from ahead of now. A frame older than
anything the run would fill tells of a broken feed, and as the first frame of a fresh stream
it would start the stream there and report every true candle since as a hole. One interval
more, as ahead: a long candle's frames are judged on its own scale.

A refused frame is counted and logged by the router, never published, and never moves a
guard: the next plausible frame of its stream reveals its candle as a gap, filled from
history as any other.
"""

from __future__ import annotations

from typing import Final, Literal

from loader.intervals import candle_open, length_ms, next_open

# How far Binance's clock and ours (with the network between) may disagree.
CLOCK_SKEW_MS: Final = 10_000
# How old a frame's event time may be at least (BACKFILL_WINDOW when longer): a frame this
# late is a broken feed, not a slow one.
MIN_EVENT_AGE_LIMIT_MS: Final = 24 * 3600 * 1000

Refusal = Literal["misaligned", "open_time_ahead", "event_time_ahead", "event_time_stale"]

DESCRIPTIONS: Final[dict[Refusal, str]] = {
    "misaligned": "its open or close time is not its interval's boundary",
    "open_time_ahead": "its candle opens more than one interval after our clock",
    "event_time_ahead": f"its event time is over {CLOCK_SKEW_MS // 1000} s ahead of our clock",
    "event_time_stale": "its event time is older than BACKFILL_WINDOW (or a day) and an interval",
}


def event_age_limit(window_ms: int, interval: str) -> int:
    """How old (ms) a frame of `interval` may be, given `BACKFILL_WINDOW` in ms."""
    return max(MIN_EVENT_AGE_LIMIT_MS, window_ms) + length_ms(interval)


def refusal(
    interval: str,
    open_time: int,
    close_time: int | None,
    event_time: int,
    now_ms: int,
    *,
    age_limit_ms: int = MIN_EVENT_AGE_LIMIT_MS,
) -> Refusal | None:
    """Why a kline frame is refused at `now_ms` (epoch ms), or None when it is plausible.

    `close_time` is None when the frame was only looked at (an in-progress update read for
    its open time). `interval` is one of Binance's (the router only asks for its own streams).
    `age_limit_ms` is `event_age_limit(window, interval)`.
    """
    if candle_open(interval, open_time) != open_time:
        return "misaligned"
    if close_time is not None and close_time != next_open(interval, open_time) - 1:
        return "misaligned"
    if event_time > now_ms + CLOCK_SKEW_MS:
        return "event_time_ahead"
    if event_time < now_ms - age_limit_ms:
        return "event_time_stale"
    if open_time > now_ms + length_ms(interval) + CLOCK_SKEW_MS:
        return "open_time_ahead"
    return None
