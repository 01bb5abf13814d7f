"""One stream's publishing state as a pure state machine: no I/O, no clock, plain integers.

The reader, the backfiller and the stop logic ask it what to do and tell it what they did:

- `observe(open_time, event_time)` for every frame of the stream, closed or not: a frame of a
  candle later than the next one expected proves that the candles in between have closed, so
  the gap is known at the stream's first frame after a reconnect or a restart, not at its next
  close. It returns the `Gap` to fill (and starts the fill), or None.
- `closed(open_time)` for a closed candle: publish, drop (a repeat or older), or hold (a fill
  is in progress: later candles wait, so the stream stays in order).
- `published(open_time)` once a closed candle is in the channel, from the reader or a fill.
- `skip_to(open_time)` when a fill's next candle from history is later than expected (history
  lacks the ones between), `finish_fill(end)` when the fill is done, then `release()` until it
  returns None: the held candles in order, or a new gap (a held candle evicted, or history
  short of candles) to fill before the rest.

Wherever it moves the stream past candles that will never be published (before the window,
absent from history, or before the first candle of a stream whose resume point was lost), it
keeps the hole: `holes_before(boundary)` tells `STOP_AT` whether the stream is complete, not
merely past the boundary.

Times are epoch ms; `BACKFILL_WINDOW` applies to the missing candles' close times, measured
back from the event time of the frame that revealed the gap (Binance's clock, not ours). The
last `ALWAYS_FILLED` candles of a gap are fetched whatever the window: a weekly candle that
closed on Sunday night and is found missing on Tuesday costs one request, and a window counted
in hours would otherwise lose it (likewise `1M`, `3d`, `1d` after an outage a little longer
than a day).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from loader.intervals import candle_open, count_between, next_open, open_before

T = TypeVar("T")

Verdict = Literal["publish", "drop", "hold"]

# The newest candles of a gap that are fetched even when they closed before the window.
ALWAYS_FILLED = 2
# Holes a stream keeps (its earliest); later ones are only counted, so memory stays bounded
# in a run that goes on for months. The earliest decide whether a STOP_AT run is complete.
HOLES_KEPT = 10


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


@dataclass(frozen=True, slots=True)
class Hole:
    """`count` closed candles opening in `[first, end)` that will never be published. A stream
    whose resume point was lost has a hole of unknown size before its first candle of this
    run: `first` and `count` are -1 (and `end` too until that candle is seen)."""

    first: int
    end: int
    count: int

    @property
    def unknown(self) -> bool:
        return self.count < 0


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
        "holes",
        "holes_more",
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
        # The stream's earliest holes (at most HOLES_KEPT), and how many more there were.
        self.holes: list[Hole] = []
        self.holes_more = 0
        if resume >= 0:
            self.published(resume)

    def resume_lost(self) -> None:
        """Kafka may hold this stream's candles, but where they end is unknown (the resume
        scan ran out of its budget): it starts fresh, after a hole of unknown size."""
        if self.next_open < 0:
            self.holes.insert(0, Hole(-1, -1, -1))

    def _lose(self, first: int, end: int, count: int) -> Hole:
        hole = Hole(first, end, count)
        if len(self.holes) < HOLES_KEPT:
            self.holes.append(hole)
        else:
            self.holes_more += 1
        return hole

    def holes_before(self, boundary: int) -> list[Hole]:
        """The kept holes among the candles opening before `boundary`."""
        return [h for h in self.holes if h.first < boundary]

    def observe(self, open_time: int, event_time: int) -> Gap | None:
        """Any frame of the stream; a later candle than expected opens a gap."""
        self.heard = True
        if self.next_open < 0:
            # A fresh stream starts at the first candle it sees, closed or not.
            self.next_open = open_time
            if self.holes and self.holes[0] == Hole(-1, -1, -1):
                self.holes[0] = Hole(-1, open_time, -1)
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
        # such candle is the one containing that instant. The gap's last candles are
        # fillable whatever the window.
        windowed = candle_open(self.interval, event_time - self.window_ms)
        start = min(max(first, min(windowed, open_before(self.interval, end, ALWAYS_FILLED))), end)
        gap = Gap(first, start, end, count_between(self.interval, first, start))
        if start > first:
            # The hole is reported by the caller; the stream goes on after it.
            self._lose(first, start, gap.lost)
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

    def skip_to(self, open_time: int) -> Hole | None:
        """A fill's next candle from history opens at `open_time`: the ones before it, from
        `next_open`, history lacks (a hole to report). The candle itself is to be published."""
        if open_time <= self.next_open:
            return None
        hole = self._lose(
            self.next_open, open_time, count_between(self.interval, self.next_open, open_time)
        )
        self.next_open = open_time
        return hole

    def finish_fill(self, end: int) -> Hole | None:
        """The fill up to `end` fetched all history had: the candles it lacked, if any (a hole
        to report). The stream goes on from `end` either way; `release` must follow."""
        if end <= self.next_open:
            return None
        hole = self._lose(self.next_open, end, count_between(self.interval, self.next_open, end))
        self.next_open = end
        return hole

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
            gap = self.gap_to(open_time, max(event_time, held_at))
            assert gap is not None
            # Candles are still held: the reader keeps holding until they are all out,
            # whether or not this gap has candles to fetch.
            self.filling = True
            return gap
        self.held.popleft()
        return ("publish" if open_time == self.next_open else "drop"), open_time, item

    def reached(self, boundary: int) -> bool:
        """Every candle opening before `boundary` is published (a fresh stream: from its
        first candle on)."""
        return not self.filling and self.next_open >= boundary
