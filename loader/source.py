"""The Binance source: kline frames off the WebSocket, candles into the channel, without gaps.

Layout: the current connection's reader task decodes each frame and publishes it itself (no
hop through another task: the hot path is one task), applying each stream's order guard and
filling gaps from the history API; trio-websocket's own reader task answers Binance's pings
meanwhile. A supervisor replaces connections that die, stall, reach their lifetime or
announce a server shutdown, opening the new one before closing the old: until it is promoted
the new one only buffers, so exactly one task publishes at a time, and the guard drops what
the overlap repeats.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Final

import trio
import trio_websocket

from loader.binance import (
    BadFrame,
    FrameDecoder,
    Kline,
    KlineEvent,
    RecordEncoder,
    ServerShutdown,
    next_open_time,
    stream_name,
    stream_path,
)
from loader.errors import FatalError
from loader.history import History, HistoryError
from loader.logs import ThrottledLog
from loader.schema import Record
from loader.settings import Settings
from loader.stats import Stats

log = logging.getLogger(__name__)

# trio-websocket closes the connection past this; smaller odd frames are skipped and counted.
HARD_FRAME_LIMIT: Final = 4 * 1024 * 1024
BACKFILL_ATTEMPTS: Final = 3
PING_TIMEOUT: Final = 5.0
# A replacement's frames buffered before its switch; more (a slow switch) are shed, and the
# gap they leave is filled from history.
PENDING_LIMIT: Final = 10_000

Stream = tuple[str, str]  # (SYMBOL, interval)
# What a history request raises when Binance cannot be asked (as opposed to answering no).
HISTORY_UNREACHABLE: Final = (
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
    OSError,
    trio.TooSlowError,
)


class Backoff:
    """Capped exponential backoff with full jitter, plus a cap on attempts per minute."""

    def __init__(
        self,
        per_minute: int,
        base: float = 1.0,
        cap: float = 30.0,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0
        self._recent: collections.deque[float] = collections.deque(maxlen=per_minute)

    async def turn(self) -> None:
        """Wait until one more attempt fits in the per-minute budget, and take it: this holds
        for reconnects after a healthy connection died, too, not only after failures."""
        if len(self._recent) == self._recent.maxlen:
            await trio.sleep_until(self._recent[0] + 60.0)
        self._recent.append(trio.current_time())

    def failed(self, at_least: float = 0.0) -> float:
        """Seconds to wait after a failed attempt (at least `at_least`, e.g. Retry-After)."""
        jittered = min(self.cap, self.base * 2.0**self.attempt) * self.rng()
        self.attempt += 1
        return max(jittered, at_least)

    def reset(self) -> None:
        self.attempt = 0


class Guard:
    """One stream's publishing state: what was published decides what may follow."""

    __slots__ = ("last_closed", "last_update", "next_open", "seen")

    def __init__(self, last_closed: int = -1, interval: str = "1m") -> None:
        self.last_closed = -1  # open time of the last closed candle published
        self.next_open = -1  # when that candle's successor opens: a gap if a later one comes
        self.last_update = -1  # event time of the last in-progress update published
        self.seen = -math.inf  # trio time of the last frame for this stream
        if last_closed >= 0:
            self.closed(last_closed, interval)

    def closed(self, open_time: int, interval: str) -> None:
        """The closed candle opening at `open_time` is published (or already in Kafka)."""
        self.last_closed = open_time
        self.next_open = next_open_time(open_time, interval)


class Connection:
    """One WebSocket; `retire` is set when it should be replaced, with `reason` saying why."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.scope = trio.CancelScope()
        self.connected_at = trio.current_time()
        # Silence counts only while the reader waits on the socket, not while the channel
        # holds it back: backpressure from Kafka is not a dead connection.
        self.reading = False
        self.idle_since = self.connected_at
        self.first_frame = trio.Event()
        # Frames a replacement reads before it is promoted to publish them.
        self.pending: collections.deque[KlineEvent] = collections.deque(maxlen=PENDING_LIMIT)
        # Set while a replacement waits for a frame, so promotion can interrupt the wait.
        self.promotion: trio.CancelScope | None = None
        self.retire = trio.Event()
        self.reason = ""
        self.dead = False

    def retire_for(self, reason: str, *, dead: bool = False) -> None:
        if not self.retire.is_set():
            self.reason = reason
            self.retire.set()
        self.dead = self.dead or dead


class Source:
    """Reads every configured stream over one connection (at a time) into `candles`."""

    def __init__(
        self,
        settings: Settings,
        candles: trio.MemorySendChannel[Record],
        stats: Stats,
        *,
        resume: dict[Stream, int] | None = None,
        history: History | None = None,
    ) -> None:
        self.settings = settings
        self.candles = candles
        self.stats = stats
        self.history = history or History(settings.binance_api_url)
        resume = resume or {}
        self.guards = {s: Guard(resume.get(s, -1), s[1]) for s in settings.streams}
        names = list(settings.stream_names)
        base = settings.binance_ws_url.rstrip("/").removesuffix("/ws").removesuffix("/stream")
        self.url = base + stream_path(names)
        self.decoder = FrameDecoder(combined=len(names) > 1, updates=settings.all_candles)
        self.encode = RecordEncoder(with_state=settings.all_candles)
        self.backoff = Backoff(settings.connects_per_minute)
        self.bad = ThrottledLog(log)
        self.valid_symbols: set[str] = set()
        self._numbers = itertools.count(1)
        self.current: Connection | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report ready, and keep a live connection until cancelled."""
        async with self.candles, trio.open_nursery() as nursery:
            self.current = await self._connect(nursery)
            task_status.started()
            nursery.start_soon(self._watch_symbols)
            while True:
                old = self.current
                await old.retire.wait()
                if old.dead:
                    old.scope.cancel()
                    # Nothing to overlap with: the next connection publishes at once.
                    self.current = None
                    self.current = await self._connect(nursery)
                    continue
                # Rotation: the old connection keeps publishing until the new one delivers.
                log.info("rotating the Binance connection (%s)", old.reason)
                replacement = await self._connect(nursery)
                with trio.move_on_after(self.settings.stall_timeout):
                    await replacement.first_frame.wait()
                self.current = replacement
                if replacement.promotion is not None:
                    replacement.promotion.cancel()
                old.scope.cancel()

    async def _connect(self, nursery: trio.Nursery) -> Connection:
        """Open a connection, retrying with backoff; a 429/418 waits at least its Retry-After."""
        retry_after = 0.0
        while True:
            await self.backoff.turn()
            try:
                conn: Connection = await nursery.start(self._connection)
            except trio_websocket.ConnectionRejected as exc:
                retry_after = _retry_after(exc)
                reason = f"rejected_{exc.status_code}"
            except (trio_websocket.HandshakeError, OSError) as exc:
                reason = type(exc).__name__
            else:
                return conn
            self.stats.reconnects[reason] += 1
            delay = self.backoff.failed(at_least=retry_after)
            log.warning("cannot connect to Binance (%s); retrying in %.1f s", reason, delay)
            await trio.sleep(delay)

    async def _connection(
        self, *, task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        conn = Connection(next(self._numbers))
        with conn.scope:
            async with trio_websocket.open_websocket_url(
                self.url,
                message_queue_size=256,
                max_message_size=HARD_FRAME_LIMIT,
                receive_buffer_size=64 * 1024,
                connect_timeout=10,
                disconnect_timeout=2,
            ) as ws:
                conn.connected_at = trio.current_time()
                if self.current is None:
                    self.current = conn
                log.info("connected to Binance (connection %d)", conn.number)
                task_status.started(conn)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watch, ws, conn)
                    try:
                        await self._read(ws, conn)
                    except trio_websocket.ConnectionClosed as exc:
                        self.stats.reconnects["closed"] += 1
                        log.warning("Binance closed connection %d: %s", conn.number, exc)
                    conn.retire_for("closed", dead=True)
                    nursery.cancel_scope.cancel()

    async def _read(self, ws: trio_websocket.WebSocketConnection, conn: Connection) -> None:
        decode, stats, guards = self.decoder.decode, self.stats, self.guards
        all_candles = self.settings.all_candles
        while True:
            conn.reading, conn.idle_since = True, trio.current_time()
            if conn is self.current:
                frame = await ws.get_message()
            else:
                received = await self._read_until_promoted(ws, conn)
                if received is None:
                    continue
                frame = received
            conn.reading = False
            stats.frames_received += 1
            stats.last_frame_at = time.monotonic()
            try:
                event = decode(frame)
            except BadFrame as bad:
                self.skip(bad.kind, str(bad))
                continue
            if not conn.first_frame.is_set():
                conn.first_frame.set()
                self.backoff.reset()
            if isinstance(event, ServerShutdown):
                self.stats.reconnects["server_shutdown"] += 1
                conn.retire_for("server shutdown")
                continue
            # An update only looked at, not decoded (CANDLES=closed), is handled as one.
            k = event.kline if isinstance(event, KlineEvent) else event
            if not k.is_closed:
                guard = guards.get((k.symbol, k.interval))
                if guard is not None:
                    guard.seen = conn.idle_since
                if not all_candles:
                    continue
            assert isinstance(event, KlineEvent)  # decoded in full unless CANDLES=closed
            if conn is not self.current:
                conn.pending.append(event)
                continue
            await self._publish_pending(conn)
            await self.kline(event)

    async def _read_until_promoted(
        self, ws: trio_websocket.WebSocketConnection, conn: Connection
    ) -> str | bytes | None:
        """A replacement's read: promotion interrupts it (None), so what it buffered is
        published at once rather than with the next frame, which a quiet stream may not send
        for a long while. Receiving from trio-websocket's queue is safe to cancel."""
        try:
            with trio.CancelScope() as conn.promotion:
                return await ws.get_message()
        finally:
            conn.promotion = None
        conn.reading = False
        await self._publish_pending(conn)
        return None

    async def _publish_pending(self, conn: Connection) -> None:
        while conn.pending:
            await self.kline(conn.pending.popleft())

    async def _watch(self, ws: trio_websocket.WebSocketConnection, conn: Connection) -> None:
        """Retire a connection that is dead, or that reached its lifetime.

        Silence alone is not death: a quiet symbol sends nothing until it trades, and Binance
        does not always ping on time. After `stall_timeout` of silence a ping of our own
        decides: answered, the connection lives on; not answered in time, it is replaced.
        """
        timeout = self.settings.stall_timeout
        retire_at = conn.connected_at + self.settings.rotate_after
        while True:
            await trio.sleep(min(timeout / 4, max(0.0, retire_at - trio.current_time())))
            now = trio.current_time()
            if now >= retire_at:
                self.stats.reconnects["lifetime"] += 1
                conn.retire_for("lifetime")
                retire_at = math.inf
            if conn.reading and now - conn.idle_since > timeout:
                with trio.move_on_after(min(timeout, PING_TIMEOUT)):
                    try:
                        await ws.ping()
                    except trio_websocket.ConnectionClosed:
                        return  # the reader sees it too, and retires the connection
                    conn.idle_since = trio.current_time()
                    continue
                self.stats.reconnects["stalled"] += 1
                log.warning("Binance went silent and did not answer a ping; reconnecting")
                conn.retire_for("stalled", dead=True)
                return

    async def kline(self, event: KlineEvent) -> None:
        """Publish one kline event if it moves its stream forward, filling any gap first."""
        k = event.kline
        guard = self.guards.get((k.symbol, k.interval))
        if guard is None:
            self.skip("unexpected_stream", f"{k.symbol} {k.interval} was not asked for")
            return
        guard.seen = trio.current_time()
        if k.open_time > guard.next_open >= 0:
            await self._backfill(guard, k)
        if k.is_closed:
            self.stats.candles_received += 1
            if k.open_time <= guard.last_closed:
                self.stats.duplicates_dropped += 1
                return
        elif not self.settings.all_candles:
            return
        elif k.open_time <= guard.last_closed or event.event_time <= guard.last_update:
            self.stats.duplicates_dropped += 1
            return
        try:
            candle = self.encode(k)
        except BadFrame as bad:
            self.skip(bad.kind, str(bad))
            return
        # The guard moves only once the candle is in the channel: a send cancelled by a
        # rotation leaves it to the replacement connection (or the backfill).
        if k.is_closed:
            try:
                self.candles.send_nowait(candle)  # the usual case: no trip through the scheduler
            except trio.WouldBlock:
                await self.candles.send(candle)
            guard.closed(k.open_time, k.interval)
        else:
            # An update is superseded by the next one: under backpressure it is shed, so the
            # reader keeps reading and trio-websocket keeps answering pings.
            try:
                self.candles.send_nowait(candle)
            except trio.WouldBlock:
                self.stats.updates_shed += 1
                return
            guard.last_update = event.event_time
        self.stats.candles_published += 1

    async def _backfill(self, guard: Guard, k: Kline) -> None:
        """Publish the closed candles between the last published one and `k`, oldest first."""
        start = guard.next_open
        floor = k.open_time - int(self.settings.backfill_window * 1000)
        fields = {"stream": stream_name(k.symbol, k.interval), "gap_start": start}
        if start < floor:
            log.warning("gap reaches back beyond BACKFILL_WINDOW; filling from %d", floor,
                        extra=fields)  # fmt: skip
            start = floor
        missing = await self._fetch(k.symbol, k.interval, start, k.open_time - 1)
        log.info(
            "backfilled %d closed candles", len(missing), extra=fields | {"gap_end": k.open_time}
        )
        for kline in missing:
            if kline.open_time <= guard.last_closed:
                continue
            await self.candles.send(self.encode(kline))
            guard.closed(kline.open_time, kline.interval)
            self.stats.candles_published += 1
            self.stats.candles_backfilled += 1

    async def _fetch(self, symbol: str, interval: str, start: int, end: int) -> list[Kline]:
        for attempt in range(1, BACKFILL_ATTEMPTS + 1):
            try:
                return await self.history.closed_klines(symbol, interval, start, end)
            except (HistoryError, *HISTORY_UNREACHABLE) as exc:
                if attempt == BACKFILL_ATTEMPTS:
                    # A gap that cannot be filled must not pass silently: the Job's retry
                    # resumes from the topic and tries again.
                    raise FatalError(f"cannot backfill {symbol} {interval}: {exc}") from exc
                log.warning("backfill of %s %s failed (%s); retrying", symbol, interval, exc)
                await trio.sleep(2.0**attempt)
        raise AssertionError("unreachable")

    async def _watch_symbols(self) -> None:
        while True:
            await trio.sleep(self.settings.stall_timeout)
            await self._check_silent_symbols()

    async def _check_silent_symbols(self) -> None:
        """Binance answers an unknown symbol with silence; ask the history API to tell apart."""
        now = trio.current_time()
        for (symbol, interval), guard in self.guards.items():
            if symbol in self.valid_symbols or now - guard.seen < self.settings.stall_timeout:
                continue
            try:
                await self.history.check_symbol(symbol, interval)
            except HistoryError as exc:
                if exc.invalid_symbol:
                    raise FatalError(
                        f"Binance does not know symbol {symbol} ({exc.msg})", exit_code=2
                    ) from exc
                log.warning("cannot check symbol %s: %s", symbol, exc)
            except HISTORY_UNREACHABLE as exc:
                log.warning("cannot check symbol %s: %s", symbol, exc)
            else:
                self.valid_symbols.add(symbol)

    def skip(self, kind: str, detail: str) -> None:
        self.stats.malformed[kind] += 1
        self.bad.warning(kind, f"skipped a frame: {detail}")


def _retry_after(exc: trio_websocket.ConnectionRejected) -> float:
    for name, value in exc.headers or ():
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
