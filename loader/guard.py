"""One stream's publishing state as a pure state machine: no I/O, no clock, plain integers.

The reader, the backfiller and the stop logic ask it what to do and tell it what they did:

- `observe(open_time, event_time)` for every frame of the stream, closed or not: a frame of a
  candle later than the next one expected proves that the candles in between have closed, so
  the gap is known at the stream's first frame after a reconnect or a restart, not at its next
  close. It returns the `Gap` to fill (and starts the fill), or None.
- `closed(open_time)` for a closed candle: publish, drop (a repeat or older), or hold (a fill
  is in progress: later candles wait, so the stream stays in order).
- `published(open_time)` once a closed candle is in the channel, from the reader or a fill.
- `finish_fill(end)` then `release()` until it returns None: the held candles in order, or a
  new gap (a held candle evicted, or history short of candles) to fill before the rest.

Times are epoch ms; `BACKFILL_WINDOW` applies to the missing candles' close times, measured
back from the event time of the frame that revealed the gap (Binance's clock, not ours).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from loader.intervals import candle_open, count_between, next_open

T = TypeVar("T")

Verdict = Literal["publish", "drop", "hold"]


@dataclass(frozen=True, slots=True)
class Gap:
    """Candles opening in `[start, end)` are to be fetched; `lost` candles before `start`
    (from `first_missing`) closed before the backfill window and are a hole to report."""

    first_missing: int
    start: int
    end: int
    lost: int

    @property
    def fetch(self) -> bool:
        return self.start < self.end


class StreamGuard(Generic[T]):
    """What was published decides what may follow; `T` is what a held candle carries."""

    __slots__ = (
        "ahead",
        "ahead_at",
        "evicted",
        "filling",
        "heard",
        "held",
        "held_limit",
        "interval",
        "last_closed",
        "last_update",
        "next_open",
        "window_ms",
    )

    def __init__(
        self, interval: str, window_ms: int, resume: int = -1, held_limit: int = 1000
    ) -> None:
        self.interval = interval
        self.window_ms = window_ms
        self.held_limit = held_limit
        self.last_closed = -1  # open time of the last closed candle published (or in Kafka)
        # The open time of the next candle to publish; -1 until the stream is first seen.
        self.next_open = -1
        # Whether Binance sent a frame of the stream: a resume point alone does not prove
        # that Binance still knows the symbol (`loader/symbols.py`).
        self.heard = False
        self.last_update = -1  # event time of the last in-progress update published
        self.filling = False
        self.held: collections.deque[tuple[int, int, T]] = collections.deque()
        self.evicted = 0  # held candles shed past `held_limit`; the gap they leave is filled
        # The latest candle a frame showed during a fill, and when: a gap that opened
        # meanwhile (a second outage) is known without waiting for another frame.
        self.ahead = self.ahead_at = -1
        if resume >= 0:
            self.published(resume)

    def observe(self, open_time: int, event_time: int) -> Gap | None:
        """Any frame of the stream; a later candle than expected opens a gap."""
        self.heard = True
        if self.next_open < 0:
            # A fresh stream starts at the first candle it sees, closed or not.
            self.next_open = open_time
            return None
        if self.filling:
            if open_time > self.ahead:
                self.ahead, self.ahead_at = open_time, event_time
            return None
        if open_time <= self.next_open:
            return None
        return self.gap_to(open_time, event_time)

    def gap_to(self, end: int, event_time: int) -> Gap | None:
        """Open a gap up to (not including) the candle opening at `end`, known closed."""
        if self.next_open < 0 or end <= self.next_open:
            return None
        first = self.next_open
        # A candle is fillable while it closed at or after `event_time - window`: the first
        # such candle is the one containing that instant.
        start = min(max(first, candle_open(self.interval, event_time - self.window_ms)), end)
        gap = Gap(first, start, end, count_between(self.interval, first, start))
        if start > first:
            # The hole is reported by the caller; the stream goes on after it.
            self.next_open = start
        self.filling = gap.fetch
        return gap

    def closed(self, open_time: int) -> Verdict:
        """A closed candle (after `observe`): publish it, drop it, or hold it."""
        if self.filling:
            newest = self.held[-1][0] if self.held else self.next_open - 1
            return "hold" if open_time > newest else "drop"
        if open_time != self.next_open:
            return "drop"
        return "publish"

    def hold(self, open_time: int, event_time: int, item: T) -> None:
        """Keep a closed candle until the fill is done; past the limit the oldest is shed."""
        if len(self.held) >= self.held_limit:
            self.held.popleft()
            self.evicted += 1
        self.held.append((open_time, event_time, item))

    def update(self, open_time: int, event_time: int) -> bool:
        """An in-progress update (`CANDLES=all`): whether it moves the stream forward."""
        return (
            not self.filling
            and open_time >= self.next_open
            and open_time > self.last_closed
            and event_time > self.last_update
        )

    def published(self, open_time: int) -> None:
        """The closed candle opening at `open_time` is in the channel (or already in Kafka)."""
        self.last_closed = open_time
        self.next_open = next_open(self.interval, open_time)

    def update_published(self, event_time: int) -> None:
        self.last_update = event_time

    def finish_fill(self, end: int) -> int:
        """The fill up to `end` fetched all history had: how many candles it lacked (a hole).
        The stream goes on from `end` either way; `release` must follow."""
        missing = count_between(self.interval, self.next_open, end) if end > self.next_open else 0
        if missing:
            self.next_open = end
        return missing

    def release(self, event_time: int) -> tuple[Literal["publish", "drop"], int, T] | Gap | None:
        """After a fill: the next held candle to publish or drop, a new gap before it or
        before a candle a frame showed meanwhile (a fill of it is in progress if it has
        candles to fetch), or None when the fill is over."""
        if not self.held:
            self.filling = False
            ahead, self.ahead = self.ahead, -1
            return self.gap_to(ahead, max(event_time, self.ahead_at))
        open_time, held_at, item = self.held[0]
        if open_time > self.next_open:
            self.filling = False
            gap = self.gap_to(open_time, max(event_time, held_at))
            assert gap is not None
            # Candles are still held: the reader keeps holding until they are all out.
            self.filling = True
            return gap
        self.held.popleft()
        return ("publish" if open_time == self.next_open else "drop"), open_time, item

    def reached(self, boundary: int) -> bool:
        """Every candle opening before `boundary` is published (a fresh stream: from its
        first candle on)."""
        return not self.filling and self.next_open >= boundary
