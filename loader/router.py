"""Every candle on its way into the channel: the stream's guard decides, gaps go to the
backfiller, holes are counted and reported.

The reader of the current connection calls `kline` for each frame; a fill calls
`publish_filled` for each candle from history and then `release` for what the reader held
meanwhile. Exactly one of them publishes a stream's closed candles at a time: while a fill is
in progress the guard holds that stream's live candles, so each stream stays in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio

from loader.binance import BadFrame, Kline, KlineEvent, KlineUpdateEvent, RecordEncoder, stream_name
from loader.guard import Gap, StreamGuard
from loader.intervals import count_between
from loader.logs import ThrottledLog
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
    ) -> None:
        self.settings = settings
        self.candles = candles
        self.stats = stats
        self.on_hole = on_hole
        resume = resume or {}
        self.window_ms = int(settings.backfill_window * 1000)
        self.guards: dict[Stream, Guard] = {}
        for stream in settings.streams if streams is None else streams:
            self.add(stream, resume.get(stream, -1))
        self.all_candles = settings.all_candles
        # Each candle's Kafka record, built once here: value bytes, key cached per stream.
        self.encode = RecordEncoder(with_state=settings.all_candles)
        # The latest event time seen: Binance's clock, as far as we know it.
        self.latest_event_ms = 0
        self._watch_ms = NEVER
        self._watch = trio.Event()
        self.bad = ThrottledLog(log)
        # Guards whose next candle is being sent, under backpressure, right now, each with
        # the event set once that send has ended (the candle in the channel, or cancelled).
        self.sending: dict[Guard, trio.Event] = {}
        # Set by the backfiller when it runs: starts the fill of one gap.
        self.fill: Callable[[Stream, Guard, Gap], None] | None = None

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
        if k.open_time > guard.next_open:
            missing = count_between(k.interval, guard.next_open, k.open_time)
            self.hole(stream, guard.next_open, k.open_time, missing, "history lacks")
        if await self.publish(guard, k):
            self.stats.candles_backfilled += 1

    def gap(self, stream: Stream, guard: Guard, gap: Gap) -> None:
        if gap.lost:
            self.hole(stream, gap.first_missing, gap.start, gap.lost, "beyond BACKFILL_WINDOW")
        if gap.fetch:
            if self.fill is None:
                raise RuntimeError("a gap to fill, and no backfiller running")
            self.stats.fills_started += 1
            self.fill(stream, guard, gap)

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

    def skip(self, kind: str, detail: str) -> None:
        self.stats.malformed[kind] += 1
        self.bad.warning(kind, f"skipped a frame: {detail}")
