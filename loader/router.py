"""Every candle on its way into the channel: the stream's guard decides, and the router owns
each stream's gap from start to end: found, its lost part reported, its candles fetched by
the backfiller (a service, `loader/backfill.py`), then what the reader held meanwhile
released, a gap among that filled in turn.

The reader of the current connection calls `kline` for each frame; a fill publishes each
candle from history and then releases what the reader held meanwhile. Exactly one of them
publishes a stream's closed candles at a time: while a fill is in progress the guard holds
that stream's live candles, so each stream stays in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

import trio

from loader.backfill import Backfiller
from loader.binance import BadFrame, Kline, KlineEvent, KlineUpdateEvent, RecordEncoder, stream_name
from loader.guard import Gap, StreamGuard
from loader.intervals import INTERVALS
from loader.logs import ThrottledLog
from loader.plausibility import DESCRIPTIONS, Refusal, event_age_limit, refusal
from loader.schema import Record
from loader.settings import Settings
from loader.stats import Stats

log = logging.getLogger(__name__)

Stream = tuple[str, str]  # (SYMBOL, interval)
Guard = StreamGuard[KlineEvent]
# Live candles of one stream held while its gap is filled; past this the oldest are shed
# (counted) and the gap they leave is filled in turn, so memory stays bounded.
HELD_LIMIT = 1000
NEVER = 2**62
# A stream's refused frames are logged at most this often (each is counted).
REFUSED_LOG_PERIOD = 60.0


class Router:
    def __init__(
        self,
        settings: Settings,
        candles: trio.MemorySendChannel[Record],
        stats: Stats,
        *,
        resume: dict[Stream, int] | None = None,
        on_hole: Callable[[str], object] = lambda _: None,
        streams: Iterable[Stream] | None = None,
        resume_unknown: Iterable[Stream] = (),
        fills: Backfiller | None = None,
    ) -> None:
        self.settings = settings
        # Fetches the gaps (none: a gap to fill is a bug of the caller's wiring).
        self.fills = fills
        self.candles = candles
        self.stats = stats
        self.on_hole = on_hole
        resume = resume or {}
        self.window_ms = int(settings.backfill_window * 1000)
        self.guards: dict[Stream, Guard] = {}
        for stream in settings.streams if streams is None else streams:
            self.add(stream, resume.get(stream, -1))
        self._resume_lost([s for s in resume_unknown if s in self.guards])
        self.all_candles = settings.all_candles
        # Each candle's Kafka record, built once here: value bytes, key cached per stream.
        self.encode = RecordEncoder(with_state=settings.all_candles)
        # The latest event time seen: Binance's clock, as far as we know it.
        self.latest_event_ms = 0
        self._watch_ms = NEVER
        self._watch = trio.Event()
        self.bad = ThrottledLog(log)
        # What the door holds frames against: the wall clock, in epoch seconds.
        self.clock = settings.clock
        # How old a frame may be, per interval.
        self.age_limit_ms = {i: event_age_limit(self.window_ms, i) for i in INTERVALS}
        self.refused = ThrottledLog(log, REFUSED_LOG_PERIOD)
        # Guards whose next candle is being sent, under backpressure, right now, each with
        # the event set once that send has ended (the candle in the channel, or cancelled).
        self.sending: dict[Guard, trio.Event] = {}

    def drop_symbol(self, symbol: str) -> int:
        """Stop publishing `symbol`'s streams (Binance does not know it); how many there were.
        Their frames, should any come, are skipped as unexpected."""
        streams = [stream for stream in self.guards if stream[0] == symbol]
        for stream in streams:
            del self.guards[stream]
        return len(streams)

    def add(self, stream: Stream, resume: int = -1, first_open: int = -1) -> None:
        """Start guarding a stream: after `resume` (the last candle in Kafka), or from the
        candle opening at `first_open` (a listing's first: what precedes it never existed),
        or from the first candle seen."""
        guard: Guard = StreamGuard(stream[1], self.window_ms, resume, HELD_LIMIT)
        if resume < 0 and first_open >= 0:
            guard.next_open = first_open
        self.guards[stream] = guard

    def remove(self, stream: Stream) -> None:
        """Stop guarding a stream (delisted): its frames, if any still come, are skipped."""
        self.guards.pop(stream, None)

    async def kline(self, event: KlineEvent | KlineUpdateEvent) -> None:
        """One frame of the current connection (hot path). With CANDLES=closed an in-progress
        update comes only looked at (`KlineUpdateEvent`): enough to reveal a gap."""
        k = event.kline
        stream = (k.symbol, k.interval)
        guard = self.guards.get(stream)
        if guard is not None and self.sending:
            guard = await self._after_send(stream, guard)
        if guard is None:
            self.skip("unexpected_stream", f"{k.symbol} {k.interval} was not asked for")
            return
        event_time = event.event_time
        close_time = k.close_time if isinstance(k, Kline) else None
        now_ms = int(self.clock() * 1000)
        age_limit_ms = self.age_limit_ms[k.interval]
        why = refusal(
            k.interval, k.open_time, close_time, event_time, now_ms, age_limit_ms=age_limit_ms
        )
        if why is not None:
            self.refuse(stream, why, k.open_time, event_time, now_ms)
            return
        if event_time > self.latest_event_ms:
            self.latest_event_ms = event_time
            if event_time > self._watch_ms:
                self._watch.set()
        gap = guard.observe(k.open_time, event_time)
        if gap is not None:
            self.gap(stream, guard, gap)
        if k.is_closed:
            assert isinstance(event, KlineEvent)  # the look never stands in for a closed one
            self.stats.candles_received += 1
            verdict = guard.closed(k.open_time)
            if verdict == "publish":
                await self.publish(guard, event.kline)
            elif verdict == "hold":
                evicted = guard.evicted
                guard.hold(k.open_time, event_time, event)
                self.stats.held_evicted += guard.evicted - evicted
            else:
                self.stats.duplicates_dropped += 1
        elif self.all_candles:
            assert isinstance(event, KlineEvent)  # decoded in full with CANDLES=all
            self._update(guard, event.kline, event_time)

    async def _after_send(self, stream: Stream, guard: Guard) -> Guard | None:
        """Wait while another task hands this stream's candle to the channel: a connection
        replaced meanwhile, its reader woken but not yet run. Until that send has ended, the
        guard does not know whether the candle went in, and a frame of the new connection
        read now would publish (or fill) it again. The stream may be gone after the wait."""
        current: Guard | None = guard
        while current is not None and (sent := self.sending.get(current)) is not None:
            await sent.wait()
            current = self.guards.get(stream)
        return current

    def _update(self, guard: Guard, k: Kline, event_time: int) -> None:
        if not guard.update(k.open_time, event_time):
            if not guard.filling:
                self.stats.duplicates_dropped += 1
            return
        try:
            candle = self.encode(k)
        except BadFrame as bad:
            self.skip(bad.kind, str(bad))
            return
        # An update is superseded by the next one: under backpressure it is shed, so the
        # reader keeps reading and trio-websocket keeps answering pings.
        try:
            self.candles.send_nowait(candle)
        except trio.WouldBlock:
            self.stats.updates_shed += 1
            return
        guard.update_published(event_time)
        self.stats.candles_published += 1

    async def wait_event_time(self, ms: int) -> None:
        """Return once a frame shows Binance's clock past `ms`."""
        self._watch_ms = ms
        if self.latest_event_ms <= ms:
            await self._watch.wait()

    async def publish(self, guard: Guard, k: Kline) -> bool:
        """Send a closed candle the guard admitted; the guard moves only once it is in the
        channel, so a send cancelled by a rotation leaves it to the next publisher."""
        try:
            candle = self.encode(k)
        except BadFrame as bad:
            # Left out, the candle is a gap the stream's next frame reveals and history fills.
            self.skip(bad.kind, str(bad))
            return False
        try:
            self.candles.send_nowait(candle)  # the usual case: no trip through the scheduler
        except trio.WouldBlock:
            # While this waits, nothing else may fill or publish from this candle on (see
            # `sending`, and `kline`).
            sent = self.sending[guard] = trio.Event()
            try:
                await self.candles.send(candle)
            finally:
                del self.sending[guard]
                sent.set()
        guard.published(k.open_time)
        self.stats.candles_published += 1
        return True

    async def publish_filled(self, stream: Stream, guard: Guard, k: Kline) -> None:
        """A closed candle from history, in a fill of this stream."""
        if k.open_time < guard.next_open:
            return
        if (lacks := guard.skip_to(k.open_time)) is not None:
            self.hole(stream, lacks.first, lacks.end, lacks.count, "history lacks")
        if await self.publish(guard, k):
            self.stats.candles_backfilled += 1

    def gap(self, stream: Stream, guard: Guard, gap: Gap) -> None:
        """A gap the guard opened: its lost part reported, its fillable part fetched."""
        if self._opened(stream, gap):
            if self.fills is None:
                raise RuntimeError("a gap to fill, and no backfiller")
            self.fills.start(stream, partial(self._fill, stream, guard, gap))

    def fill_to(self, stream: Stream, boundary: int, binance_now: int) -> bool:
        """Fill `stream` up to the candle opening at `boundary`, closed by `binance_now`,
        unless a fill or a send of it is in progress (that one gets there): whether a fill
        started."""
        guard = self.guards[stream]
        if guard.filling or guard in self.sending:
            return False
        gap = guard.gap_to(boundary, binance_now)
        if gap is None:
            return False
        self.gap(stream, guard, gap)
        return True

    def _opened(self, stream: Stream, gap: Gap) -> bool:
        """Report `gap`'s lost part; whether it has candles to fetch."""
        if gap.lost:
            self.hole(stream, gap.first_missing, gap.start, gap.lost, "beyond BACKFILL_WINDOW")
        if gap.fetch:
            self.stats.fills_started += 1
        return gap.fetch

    async def _fill(self, stream: Stream, guard: Guard, gap: Gap) -> None:
        """Fetch `gap`, then release what the reader held meanwhile; a gap found among that
        is fetched in turn, until the guard has nothing held."""
        assert self.fills is not None
        publish = partial(self.publish_filled, stream, guard)
        current: Gap | None = gap
        while current is not None:
            await self.fills.fetch(stream, current, publish)
            lacking = guard.finish_fill(current.end)
            if lacking is not None:
                self.hole(stream, lacking.first, lacking.end, lacking.count, "history lacks")
            current = await self._release(stream, guard)

    async def _release(self, stream: Stream, guard: Guard) -> Gap | None:
        """Publish what the reader held during the fill, up to a gap with candles to fetch."""
        while (step := guard.release(self.latest_event_ms)) is not None:
            if isinstance(step, Gap):
                if self._opened(stream, step):
                    return step
                continue
            verdict, _, event = step
            if verdict == "publish":
                await self.publish(guard, event.kline)
            else:
                self.stats.duplicates_dropped += 1
        return None

    def _resume_lost(self, streams: list[Stream]) -> None:
        """Streams the resume scan could not place: each starts afresh after a hole of unknown
        size, told once for them all (a deep topic may leave many unplaced)."""
        if not streams:
            return
        for stream in streams:
            self.guards[stream].resume_lost()
        self.stats.holes += len(streams)
        names = [stream_name(*s) for s in streams]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" * (len(names) > 10))
        message = (
            f"an unknown number of closed candles of {len(streams)} stream(s) lost ({shown}): "
            "their resume points were not found in time, so each starts afresh from the first "
            "candle it sees"
        )
        log.error(message)
        self.on_hole(message)

    def hole(self, stream: Stream, start: int, end: int, count: int, why: str) -> None:
        """Candles that will never be published: never silent."""
        if count <= 0:
            return
        self.stats.candles_lost += count
        self.stats.holes += 1
        name = stream_name(*stream)
        message = (
            f"{count} closed candles of {name} opening from {start} to before {end} lost ({why})"
        )
        log.error(message, extra={"stream": name, "gap_start": start, "gap_end": end})
        self.on_hole(message)

    def refuse(
        self, stream: Stream, why: Refusal, open_time: int, event_time: int, now_ms: int
    ) -> None:
        """A frame the door keeps out (`loader/plausibility.py`): counted, logged at most once
        a `REFUSED_LOG_PERIOD` per stream, and nothing else."""
        self.stats.frames_refused[why] += 1
        self.refused.warning(
            stream_name(*stream),
            f"refused a frame (open time {open_time}, event time {event_time}, our clock "
            f"{now_ms}): {DESCRIPTIONS[why]}",
        )

    def skip(self, kind: str, detail: str) -> None:
        self.stats.malformed[kind] += 1
        self.bad.warning(kind, f"skipped a frame: {detail}")
