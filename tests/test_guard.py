"""The per-stream guard and the interval arithmetic, with plain values and hypothesis."""

from __future__ import annotations

import calendar
import collections
import time
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from loader.guard import ALWAYS_FILLED, HOLES_KEPT, Gap, Hole, StreamGuard
from loader.intervals import (
    INTERVALS,
    candle_open,
    count_between,
    length_ms,
    next_open,
    open_before,
)

# Between 2017 and 2040: Binance's history, and then some.
instants = st.integers(min_value=1_483_228_800_000, max_value=2_208_988_800_000)


@given(st.sampled_from(INTERVALS), instants)
def test_a_candle_contains_the_instants_between_its_open_and_its_close(
    interval: str, ms: int
) -> None:
    opened = candle_open(interval, ms)
    following = next_open(interval, opened)
    assert opened <= ms < following
    assert candle_open(interval, following) == following
    assert candle_open(interval, following - 1) == opened
    assert count_between(interval, opened, following) == 1
    if interval == "1M":
        assert 28 * 86_400_000 <= following - opened <= 31 * 86_400_000
        year, month = time.gmtime(opened / 1000)[:2]
        assert calendar.timegm((year, month, 1, 0, 0, 0)) * 1000 == opened
    else:
        assert following - opened == length_ms(interval)
    if interval == "1w":
        assert time.gmtime(opened / 1000).tm_wday == 0  # Monday


@given(st.sampled_from(INTERVALS), instants, st.integers(0, 40))
def test_count_between_counts_candles(interval: str, ms: int, n: int) -> None:
    first = candle_open(interval, ms)
    t = first
    for _ in range(n):
        t = next_open(interval, t)
    assert count_between(interval, first, t) == n


@given(st.sampled_from(INTERVALS), instants, st.integers(0, 40))
def test_open_before_steps_back_over_whole_candles(interval: str, ms: int, n: int) -> None:
    opened = candle_open(interval, ms)
    earlier = open_before(interval, opened, n)
    assert candle_open(interval, earlier) == earlier
    assert count_between(interval, earlier, opened) == n


@dataclass
class Run:
    """Drives a guard the way the source does: frames in, fills done from a perfect history."""

    interval: str
    opens: list[int]
    guard: StreamGuard[int]
    published: list[int] = field(default_factory=list)
    lost: int = 0
    fills: collections.deque[Gap] = field(default_factory=collections.deque)

    def event_time(self, index: int) -> int:
        # A frame of candle `index` is sent within it or just after its close.
        return next_open(self.interval, self.opens[index]) + 250

    def frame(self, index: int, closed: bool) -> None:
        o = self.opens[index]
        e = self.event_time(index) if closed else self.opens[index] + 1
        gap = self.guard.observe(o, e)
        if gap is not None:
            self.gap(gap)
        if not closed:
            return
        verdict = self.guard.closed(o)
        if verdict == "publish":
            self.publish(o)
        elif verdict == "hold":
            self.guard.hold(o, e, o)

    def gap(self, gap: Gap) -> None:
        assert gap.first_missing <= gap.start <= gap.end
        self.lost += gap.lost
        if gap.fetch:
            self.fills.append(gap)

    def publish(self, o: int) -> None:
        assert o == self.guard.next_open
        self.published.append(o)
        self.guard.published(o)

    def complete_fill(self, now: int) -> None:
        gap = self.fills.popleft()
        assert self.guard.filling
        for o in self.opens:
            if gap.start <= o < gap.end and o > self.guard.last_closed:
                self.publish(o)
        lacking = self.guard.finish_fill(gap.end)
        self.lost += lacking.count if lacking is not None else 0
        while True:
            step = self.guard.release(now)
            if step is None:
                return
            if isinstance(step, Gap):
                self.gap(step)
                if step.fetch:
                    return  # the next fill; held candles wait for it
                continue
            verdict, o, item = step
            assert item == o
            if verdict == "publish":
                self.publish(o)


frames = st.lists(
    st.tuples(st.integers(-2, 6), st.booleans(), st.booleans()), min_size=1, max_size=60
)


def drive(
    interval: str, start: int, steps: list[tuple[int, bool, bool]], window: int, held_limit: int,
    resume: bool,
) -> tuple[Run, int, int]:  # fmt: skip
    opens = [candle_open(interval, start)]
    while len(opens) < 400:
        opens.append(next_open(interval, opens[-1]))
    window_ms = window * length_ms(interval)
    guard = StreamGuard[int](interval, window_ms, resume=opens[0] if resume else -1,
                             held_limit=held_limit)  # fmt: skip
    run = Run(interval, opens, guard)
    index, first, top = 1, None, 0
    for step, closed, finish in steps:
        # Mostly forward, sometimes a repeat or an older frame (an overlapping connection).
        index = max(1, min(len(opens) - 2, index + step))
        first = index if first is None else first
        run.frame(index, closed)
        top = max(top, index if closed else index - 1)
        if finish and run.fills:
            run.complete_fill(run.event_time(index))
    while run.fills:
        run.complete_fill(run.event_time(len(opens) - 2))
    assert first is not None
    return run, (0 if resume else first), top


@settings(max_examples=300)
@given(st.sampled_from(INTERVALS), instants, frames, st.integers(1, 2000), st.integers(1, 4),
       st.booleans())  # fmt: skip
def test_every_candle_once_in_order_or_reported(
    interval: str, start: int, steps: list[tuple[int, bool, bool]], window: int,
    held_limit: int, resume: bool,
) -> None:  # fmt: skip
    run, first, top = drive(interval, start, steps, window, held_limit, resume)
    published = run.published
    assert published == sorted(set(published)), "out of order or repeated"
    assert not run.guard.filling
    assert not run.guard.held
    if not published:
        return
    # From the stream's start (its resume point, or its first frame) to the last candle
    # known closed, every candle is published or counted as lost: never silently missing.
    expected = [o for o in run.opens[first + resume :] if o <= run.opens[top]]
    assert set(published) <= set(expected)
    assert len(expected) - len(published) == run.lost
    # The guard keeps each hole: with the published candles they cover the stream exactly.
    holes = run.guard.holes
    if run.guard.holes_more:
        assert len(holes) == HOLES_KEPT
        return
    assert sum(h.count for h in holes) == run.lost
    for o in expected:
        within = [h for h in holes if h.first <= o < h.end]
        assert len(within) == (0 if o in published else 1), o
    boundary = next_open(interval, published[-1])
    assert (run.guard.holes_before(boundary) == []) == (run.lost == 0)


@settings(max_examples=200)
@given(st.sampled_from(INTERVALS), instants, frames, st.integers(1, 4), st.booleans())
def test_without_a_window_limit_nothing_is_lost(
    interval: str, start: int, steps: list[tuple[int, bool, bool]], held_limit: int,
    resume: bool,
) -> None:  # fmt: skip
    run, _, _ = drive(interval, start, steps, 10_000, held_limit, resume)
    assert run.lost == 0
    published = run.published
    if published:
        assert published == run.opens[run.opens.index(published[0]) :][: len(published)]


def test_a_gap_is_known_from_an_update_before_any_close() -> None:
    guard = StreamGuard[int]("1M", 120 * 86_400_000, resume=_month(2026, 1))
    # The stream's first frame after a reconnect: an update of May. February to April closed.
    gap = guard.observe(_month(2026, 5), _month(2026, 5) + 2000)
    assert gap == Gap(_month(2026, 2), _month(2026, 2), _month(2026, 5), 0)
    assert guard.closed(_month(2026, 5)) == "hold"


def test_the_window_applies_to_close_times_for_long_intervals() -> None:
    """A week missed by a short outage: it closed within the window though it opened
    long before it, so it is filled, not lost."""
    week = 7 * 86_400_000
    monday = candle_open("1w", 1_790_000_000_000)
    guard = StreamGuard[int]("1w", 86_400_000, resume=monday)
    gap = guard.observe(monday + 2 * week, monday + 2 * week + 60_000)
    assert gap == Gap(monday + week, monday + week, monday + 2 * week, 0)


def test_the_weekly_candle_closed_before_a_short_window_is_still_filled() -> None:
    """An outage from Sunday to Tuesday with the default one-day window: the weekly candle
    that closed on Sunday night closed more than a day before the Tuesday frame, and is
    filled all the same (one request), not lost."""
    day, week = 86_400_000, 7 * 86_400_000
    monday = candle_open("1w", 1_790_000_000_000)
    guard = StreamGuard[int]("1w", day, resume=monday - week)
    tuesday_noon = monday + week + day + day // 2
    gap = guard.observe(monday + week, tuesday_noon)
    assert gap == Gap(monday, monday, monday + week, 0)


@settings(max_examples=500)
@given(st.sampled_from(INTERVALS), instants, st.integers(1, 30), st.integers(0, 40 * 86_400_000),
       st.integers(0, 400 * 86_400))  # fmt: skip
def test_the_last_candles_of_a_gap_are_fetched_whatever_the_window(
    interval: str, ms: int, missing: int, late: int, window_s: int
) -> None:
    first = candle_open(interval, ms)
    end = first
    for _ in range(missing):
        end = next_open(interval, end)
    guard = StreamGuard[int](interval, window_s * 1000, resume=open_before(interval, first))
    gap = guard.gap_to(end, end + late)
    assert gap is not None
    assert (gap.first_missing, gap.end) == (first, end)
    # Every missing candle is either fetched or reported, and the newest ones are fetched.
    assert gap.lost + count_between(interval, gap.start, gap.end) == missing
    assert count_between(interval, gap.start, gap.end) >= min(ALWAYS_FILLED, missing)
    # Within the window (close time at or after the reveal less the window), none is lost.
    window_start = end + late - window_s * 1000
    assert gap.lost == 0 or gap.start - 1 < window_start  # the last lost one's close


def test_an_outage_longer_than_the_window_is_a_reported_hole() -> None:
    guard = StreamGuard[int]("1m", 10 * 60_000, resume=0)
    gap = guard.observe(100 * 60_000, 100 * 60_000 + 2000)
    # Candles 1..89 closed more than ten minutes before; 90..99 are fillable.
    assert gap == Gap(60_000, 90 * 60_000, 100 * 60_000, 89)


def test_history_short_of_candles_is_a_hole_and_held_candles_follow() -> None:
    guard = StreamGuard[str]("1m", 86_400_000, resume=0)
    gap = guard.observe(5 * 60_000, 5 * 60_000 + 2000)
    assert gap is not None
    guard.hold(5 * 60_000, 6 * 60_000, "five")
    guard.published(60_000)  # history had only candle 1
    assert guard.finish_fill(gap.end) == Hole(2 * 60_000, 5 * 60_000, 3)
    assert guard.release(0) == ("publish", 5 * 60_000, "five")
    guard.published(5 * 60_000)
    assert guard.release(0) is None
    assert not guard.filling


def test_history_lacking_candles_inside_a_fill_is_a_kept_hole() -> None:
    guard = StreamGuard[int]("1m", 86_400_000, resume=0)
    assert guard.observe(6 * 60_000, 6 * 60_000 + 2000) is not None
    guard.published(60_000)
    assert guard.skip_to(4 * 60_000) == Hole(2 * 60_000, 4 * 60_000, 2)
    guard.published(4 * 60_000)
    assert guard.skip_to(5 * 60_000) is None
    assert guard.holes_before(2 * 60_000) == []
    assert guard.holes_before(2 * 60_000 + 1) == [Hole(2 * 60_000, 4 * 60_000, 2)]


def test_a_lost_resume_point_is_a_hole_of_unknown_size_before_the_first_candle() -> None:
    guard = StreamGuard[int]("1m", 86_400_000)
    guard.resume_lost()
    assert guard.holes_before(0) == [Hole(-1, -1, -1)]
    assert guard.observe(7 * 60_000, 7 * 60_000 + 2000) is None
    assert guard.closed(7 * 60_000) == "publish"
    (hole,) = guard.holes_before(8 * 60_000)
    assert hole == Hole(-1, 7 * 60_000, -1)
    assert hole.unknown
    assert guard.reached(7 * 60_000)


def test_holes_past_the_kept_ones_are_counted() -> None:
    guard = StreamGuard[int]("1s", 1000, resume=0)
    for n in range(HOLES_KEPT + 3):
        start = n * 100_000
        gap = guard.gap_to(start + 50_000, start + 50_000)
        assert gap is not None
        assert gap.lost > 0
        guard.filling = False
        guard.published(start + 99_000)
    assert len(guard.holes) == HOLES_KEPT
    assert guard.holes_more == 3


def test_held_candles_past_the_limit_are_shed_and_their_gap_filled() -> None:
    guard = StreamGuard[int]("1s", 86_400_000, resume=0, held_limit=2)
    assert guard.observe(3000, 4000) is not None
    for o in (3000, 4000, 5000):
        assert guard.closed(o) == "hold"
        guard.hold(o, o + 1000, o)
    assert guard.evicted == 1
    for o in (1000, 2000):
        guard.published(o)
    assert guard.finish_fill(3000) is None
    assert guard.release(6000) == Gap(3000, 3000, 4000, 0)
    assert guard.filling


def _month(year: int, month: int) -> int:
    return calendar.timegm((year, month, 1, 0, 0, 0)) * 1000
