"""The Binance source: kline frames off the WebSocket, candles into the channel, without gaps.

Layout, the way the data flows: the current connection's reader task decodes each frame and
hands it to the router (`loader/router.py`) itself (no hop through another task: the hot path
is one task), whose per-stream guards (`loader/guard.py`) say what to publish and which gap to
fill; the backfiller (`loader/backfill.py`) fills gaps from the one history client
(`loader/history.py`) while the reader keeps reading, and trio-websocket's own reader task
answers Binance's pings meanwhile. A supervisor (`Source.run`) replaces connections that die,
stall, reach their lifetime or announce a server shutdown, opening the new one before closing
the old: until it is promoted the new one only buffers, so exactly one task publishes at a
time, and the guard drops what the overlap repeats. The symbol checker (`loader/symbols.py`)
tells a silent stream from an unknown symbol.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Final

import msgspec
import trio
import trio_websocket

from loader.backfill import Backfiller
from loader.backoff import Backoff, ConnectBudget
from loader.binance import (
    BadFrame,
    FrameDecoder,
    KlineEvent,
    KlineUpdateEvent,
    ServerShutdown,
    stream_name,
    stream_path,
)
from loader.errors import FatalError
from loader.guard import Hole
from loader.history import HistoryClient, HistoryError
from loader.intervals import candle_open
from loader.listings import Listing, follow_listings
from loader.pacing import pace
from loader.router import Router, Stream
from loader.schema import Record
from loader.settings import Settings
from loader.shards import ConnectionPlan, rotation_offsets, subscribe_schedule
from loader.stats import Stats
from loader.symbols import Symbols
from loader.tls import TlsWatch

__all__ = ["Backoff", "Lane", "Source"]

log = logging.getLogger(__name__)

# trio-websocket closes the connection past this; smaller odd frames are skipped and counted.
HARD_FRAME_LIMIT: Final = 4 * 1024 * 1024
PING_TIMEOUT: Final = 5.0
# A replacement's frames buffered before its switch; more (a slow switch) are shed, and the
# gap they leave is filled from history.
PENDING_LIMIT: Final = 10_000

# Streams named in a connection's URL; the rest go in SUBSCRIBE messages of this many.
URL_STREAMS: Final = 200
SUBSCRIBES_PER_SECOND: Final = 4
# Replies to SUBSCRIBE/UNSUBSCRIBE, told apart from market data by their first key.
_REPLIES: Final = ('{"result"', '{"error"')

# After STOP_AT, how long Binance's clock must be past a candle's close before history is
# asked for it: closing frames arrive up to a second or two late.
CLOSE_MARGIN_MS: Final = 5_000


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
        self.pending: collections.deque[KlineEvent | KlineUpdateEvent] = collections.deque(
            maxlen=PENDING_LIMIT
        )
        # Set while a replacement waits for a frame, so promotion can interrupt the wait.
        self.promotion: trio.CancelScope | None = None
        self.retire = trio.Event()
        self.reason = ""
        self.dead = False
        # SUBSCRIBE/UNSUBSCRIBE requests not answered yet; `settled` once the streams it
        # opened with are all subscribed (at once when the URL named them all).
        self.unanswered = 0
        self.settled = trio.Event()

    def retire_for(self, reason: str, *, dead: bool = False) -> None:
        if not self.retire.is_set():
            self.reason = reason
            self.retire.set()
        self.dead = self.dead or dead


class Lane:
    """One connection of the plan: its streams, and the connection carrying them, replaced
    (overlapping, on rotation) or reopened (when it dies) as long as the lane lives.

    The first `URL_STREAMS` streams go in the connection's URL, the rest (and any added
    later) in `SUBSCRIBE` messages at most `SUBSCRIBES_PER_SECOND` a second: Binance closes a
    connection that receives more than five messages a second, and refuses long URLs.
    """

    def __init__(self, source: Source, number: int, streams: list[str], rotate_after: float):
        self.source = source
        self.number = number
        self.streams = list(streams)
        self.rotate_after = rotate_after
        self.scope = trio.CancelScope()
        self.current: Connection | None = None
        # Connections of this lane that are open (the current one and a replacement).
        self.open: dict[Connection, trio.MemorySendChannel[tuple[str, list[str]]]] = {}
        self._requests = itertools.count(1)

    def subscribe(self, names: list[str]) -> None:
        """Carry more streams: every open connection of the lane subscribes them."""
        self.streams.extend(names)
        self._send("SUBSCRIBE", names)

    def unsubscribe(self, names: list[str]) -> None:
        gone = set(names)
        self.streams = [s for s in self.streams if s not in gone]
        self._send("UNSUBSCRIBE", names)

    def _send(self, method: str, names: list[str]) -> None:
        for conn, outbox in self.open.items():
            for _, chunk in subscribe_schedule(names, per_message=URL_STREAMS):
                conn.unanswered += 1
                outbox.send_nowait((method, chunk))

    def close(self) -> None:
        self.scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report ready, and keep a live connection until the lane is closed."""
        source = self.source
        with self.scope:
            async with trio.open_nursery() as nursery:
                self.current = await self._connect(nursery)
                # Ready once Binance confirmed every stream: a stream subscribed later would
                # miss what is published meanwhile (its gap is filled, but later).
                with trio.move_on_after(source.settings.stall_timeout):
                    await self.current.settled.wait()
                task_status.started()
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
                    log.info("rotating Binance connection %d (%s)", old.number, old.reason)
                    replacement = await self._connect(nursery)
                    with trio.move_on_after(source.settings.stall_timeout):
                        await replacement.settled.wait()
                        await replacement.first_frame.wait()
                    self.current = replacement
                    if replacement.promotion is not None:
                        replacement.promotion.cancel()
                    old.scope.cancel()

    async def _connect(self, nursery: trio.Nursery) -> Connection:
        """Open a connection, retrying with backoff; a 429/418 waits at least its Retry-After."""
        source = self.source
        retry_after = 0.0
        while True:
            await source.backoff.turn()
            try:
                conn: Connection = await nursery.start(self._connection)
            except trio_websocket.ConnectionRejected as exc:
                retry_after = _retry_after(exc)
                reason = f"rejected_{exc.status_code}"
            except (trio_websocket.HandshakeError, OSError) as exc:
                if (untrusted := source.tls.untrusted()) is not None:
                    # Every retry would meet the same certificate: not a network blip.
                    raise FatalError(f"cannot connect to Binance: {untrusted}", 2) from exc
                reason = type(exc).__name__
            else:
                return conn
            source.stats.reconnects[reason] += 1
            delay = source.backoff.failed(at_least=retry_after)
            log.warning("cannot connect to Binance (%s); retrying in %.1f s", reason, delay)
            await trio.sleep(delay)

    async def _connection(
        self, *, task_status: trio.TaskStatus[Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        source = self.source
        conn = Connection(next(source.numbers))
        streams = list(self.streams)
        path = stream_path(streams[:URL_STREAMS]) if streams else "/ws"
        decoder = FrameDecoder(
            combined=path.startswith("/stream"), updates=self.source.settings.all_candles
        )
        outbox, requests = trio.open_memory_channel[tuple[str, list[str]]](math.inf)
        with conn.scope:
            async with open_market_connection(source.base + path, source.tls.context) as ws:
                pace(ws, source.settings.coalesce)
                conn.connected_at = trio.current_time()
                # The streams not in the URL, and any the lane adds from now on.
                self.open[conn] = outbox
                for _, chunk in subscribe_schedule(streams[URL_STREAMS:], per_message=URL_STREAMS):
                    conn.unanswered += 1
                    outbox.send_nowait(("SUBSCRIBE", chunk))
                if not conn.unanswered:
                    conn.settled.set()
                if self.current is None:
                    self.current = conn
                log.info("connected to Binance (connection %d)", conn.number)
                task_status.started(conn)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._watch, ws, conn)
                        nursery.start_soon(self._requests_out, ws, requests)
                        try:
                            await self._read(ws, conn, decoder)
                        except trio_websocket.ConnectionClosed as exc:
                            source.stats.reconnects["closed"] += 1
                            log.warning("Binance closed connection %d: %s", conn.number, exc)
                        conn.retire_for("closed", dead=True)
                        nursery.cancel_scope.cancel()
                finally:
                    del self.open[conn]
        if conn is not self.current and conn.pending:
            # A replacement that died before its promotion: the connection that stays
            # current carries these candles, and any gap they leave is filled from history.
            source.stats.pending_dropped += len(conn.pending)
            conn.pending.clear()

    async def _requests_out(
        self,
        ws: trio_websocket.WebSocketConnection,
        requests: trio.MemoryReceiveChannel[tuple[str, list[str]]],
    ) -> None:
        """SUBSCRIBE/UNSUBSCRIBE, paced: pongs count among Binance's five a second too."""
        async for method, names in requests:
            request = {"method": method, "params": names, "id": next(self._requests)}
            try:
                await ws.send_message(msgspec.json.encode(request).decode())
            except trio_websocket.ConnectionClosed:
                return  # the reader sees it too, and retires the connection
            await trio.sleep(1 / SUBSCRIBES_PER_SECOND)

    async def _read(
        self, ws: trio_websocket.WebSocketConnection, conn: Connection, decoder: FrameDecoder
    ) -> None:
        source = self.source
        decode, stats, route = decoder.decode, source.stats, source.router.kline
        all_candles = source.settings.all_candles
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
            if isinstance(frame, str) and frame.startswith(_REPLIES):
                self._reply(conn, frame)
                continue
            stats.frames_received += 1
            stats.last_frame_at = time.monotonic()
            try:
                event = decode(frame)
            except BadFrame as bad:
                source.router.skip(bad.kind, str(bad))
                continue
            if not conn.first_frame.is_set():
                conn.first_frame.set()
                source.backoff.reset()
            if isinstance(event, ServerShutdown):
                stats.reconnects["server_shutdown"] += 1
                conn.retire_for("server shutdown")
                continue
            if conn is not self.current:
                # Updates only tell the open time, which the current connection tells too.
                if event.kline.is_closed or all_candles:
                    if len(conn.pending) == PENDING_LIMIT:
                        stats.pending_dropped += 1
                    conn.pending.append(event)
                continue
            if conn.pending:
                await self._publish_pending(conn)
            await route(event)

    def _reply(self, conn: Connection, frame: str) -> None:
        """A reply to SUBSCRIBE/UNSUBSCRIBE: success is silent; a refusal leaves streams
        unsubscribed, so the connection is replaced (its successor subscribes them anew)."""
        conn.unanswered -= 1
        if conn.unanswered <= 0:
            conn.settled.set()
        if frame.startswith('{"error"'):
            self.source.stats.reconnects["subscribe_refused"] += 1
            log.error("Binance refused a subscription on connection %d: %s", conn.number, frame)
            conn.retire_for("subscription refused", dead=True)

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
            await self.source.router.kline(conn.pending.popleft())

    async def _watch(self, ws: trio_websocket.WebSocketConnection, conn: Connection) -> None:
        """Retire a connection that is dead, or that reached its lifetime.

        Silence alone is not death: a quiet symbol sends nothing until it trades, and Binance
        does not always ping on time. After `stall_timeout` of silence a ping of our own
        decides: answered, the connection lives on; not answered in time, it is replaced.
        """
        stats = self.source.stats
        timeout = self.source.settings.stall_timeout
        retire_at = conn.connected_at + self.rotate_after
        while True:
            await trio.sleep(min(timeout / 4, max(0.0, retire_at - trio.current_time())))
            now = trio.current_time()
            if now >= retire_at:
                stats.reconnects["lifetime"] += 1
                conn.retire_for("lifetime")
                retire_at = math.inf
            if conn.reading and now - conn.idle_since > timeout:
                with trio.move_on_after(min(timeout, PING_TIMEOUT)):
                    try:
                        await ws.ping()
                    except trio_websocket.ConnectionClosed:
                        return  # the reader sees it too, and retires the connection
                    conn.idle_since = trio.current_time()
                    stats.last_alive_at = time.monotonic()
                    continue
                stats.reconnects["stalled"] += 1
                log.warning("Binance went silent and did not answer a ping; reconnecting")
                conn.retire_for("stalled", dead=True)
                return


class Source:
    """Reads this shard's streams, over as many connections as `STREAMS_PER_CONNECTION`
    needs, into `candles`; with `SYMBOL` wildcards it follows listings and delistings."""

    symbols: Symbols

    def __init__(
        self,
        settings: Settings,
        candles: trio.MemorySendChannel[Record],
        stats: Stats,
        *,
        resume: dict[Stream, int] | None = None,
        on_hole: Callable[[str], object] = lambda _: None,
        streams: Sequence[Stream] | None = None,
        listing: Listing | None = None,
        on_notice: Callable[[str], object] = lambda _: None,
        resume_unknown: Sequence[Stream] = (),
    ) -> None:
        self.settings = settings
        self.candles = candles
        self.stats = stats
        self.streams: list[Stream] = list(settings.streams if streams is None else streams)
        self.plan = ConnectionPlan.initial(
            [stream_name(*s) for s in self.streams], settings.streams_per_connection
        )
        # Connection openings share one per-IP budget with the history API: enough for
        # every lane to open and then reopen once more within a minute (a drop of them all),
        # within Binance's 300 attempts per 5 minutes.
        lanes = len(self.plan.connections)
        per_minute = max(settings.connects_per_minute, min(60, 3 * lanes + 2))
        budget = ConnectBudget(per_minute)
        self.backoff = Backoff(budget=budget)
        self.history = HistoryClient(settings.binance_api_url, Backoff(budget=budget), stats)

        # The router needs the backfiller, which drops unknown symbols through `symbols`,
        # which needs the router: the drop is looked up when a fill hears -1121.
        def drop(symbol: str, error: HistoryError) -> None:
            self.symbols.drop(symbol, error)

        self.backfiller = Backfiller(self.history, stats, drop)
        self.router = Router(
            settings, candles, stats, resume=resume, on_hole=on_hole, streams=self.streams,
            resume_unknown=resume_unknown, fills=self.backfiller,
        )  # fmt: skip
        self.guards = self.router.guards
        self.symbols = Symbols(self.router, stats, on_notice)
        self.base = settings.binance_ws_url.rstrip("/").removesuffix("/ws").removesuffix("/stream")
        self.tls = TlsWatch(self.base)
        self.numbers = itertools.count(1)
        self.lanes: dict[int, Lane] = {}
        self.listing = listing
        self.on_notice = on_notice
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every lane, report ready, and keep them until cancelled."""
        async with self.candles, trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.history.run)
            await nursery.start(self.backfiller.run)
            offsets = rotation_offsets(len(self.plan.connections), self.settings.rotate_after)
            self.stats.connecting()  # liveness counts from here (`/healthz`)
            # All at once (within the connection budget): each takes a second or so of
            # SUBSCRIBE messages, and ready means every stream subscribed.
            async with trio.open_nursery() as opening:
                for (number, names), rotate_after in zip(
                    self.plan.connections.items(), offsets, strict=True
                ):
                    opening.start_soon(self._open_lane, number, names, rotate_after)
            task_status.started()
            await nursery.start(self.symbols.check, self.history, self.settings.stall_timeout)
            if self.listing is not None:
                await nursery.start(follow_listings, self, self.listing)

    async def _open_lane(self, number: int, names: list[str], rotate_after: float) -> None:
        assert self._nursery is not None
        lane = Lane(self, number, names, rotate_after)
        self.lanes[number] = lane
        await self._nursery.start(lane.run)

    async def add_streams(self, starts: dict[Stream, int]) -> None:
        """Carry new streams, each from the candle opening at its start (-1: the first seen).
        Placed where there is room, else on new connections; no other stream moves."""
        for stream, first_open in starts.items():
            if stream not in self.guards:
                self.router.add(stream, first_open=first_open)
                self.streams.append(stream)
        names = [stream_name(*s) for s in starts]
        for number, added in self.plan.add(names).items():
            lane = self.lanes.get(number)
            if lane is not None:
                lane.subscribe(added)
            else:
                await self._open_lane(number, added, self.settings.rotate_after)

    def remove_streams(self, streams: Sequence[Stream]) -> None:
        """Stop carrying streams (delisted); a connection left without any is closed."""
        gone = set(streams)
        for stream in streams:
            self.router.remove(stream)
        self.streams = [s for s in self.streams if s not in gone]
        names = [stream_name(*s) for s in streams]
        for number, removed in self.plan.remove(names).items():
            lane = self.lanes[number]
            if number in self.plan.connections:
                lane.unsubscribe(removed)
            else:
                del self.lanes[number]
                lane.close()

    def lagging(self, stop_ms: int) -> list[Stream]:
        """Streams not yet published up to every candle closing at or before `stop_ms`
        (a stream never heard from has nothing to publish)."""
        return [
            s
            for s, g in self.guards.items()
            if g.next_open >= 0 and not g.reached(candle_open(s[1], stop_ms + 1))
        ]

    def holes(self, stop_ms: int) -> dict[Stream, tuple[list[Hole], int]]:
        """Per stream with any: its holes among the candles closing at or before `stop_ms`,
        and how many more holes it had that were not kept (see `StreamGuard.holes_more`)."""
        found: dict[Stream, tuple[list[Hole], int]] = {}
        for stream, guard in self.guards.items():
            if kept := guard.holes_before(candle_open(stream[1], stop_ms + 1)):
                found[stream] = (kept, guard.holes_more)
        return found

    async def complete_until(self, stop_ms: int, within: float) -> list[Stream]:
        """Wait (at most `within` s) until every candle closing at or before `stop_ms` is
        published; a stream the live feed does not bring there by half of it is filled from
        history once Binance's clock is past. Returns the streams still short."""
        deadline = trio.current_time() + within
        ask_at = trio.current_time() + within / 2
        asked: set[Stream] = set()
        while lagging := self.lagging(stop_ms):
            now = trio.current_time()
            if now >= deadline:
                return lagging
            if now >= ask_at:
                for stream in lagging:
                    boundary = candle_open(stream[1], stop_ms + 1)
                    # Binance's clock as its frames last told it, or ours if the feed is
                    # dead: either says whether the candles have closed by now.
                    binance_now = max(self.router.latest_event_ms, int(time.time() * 1000))
                    late = binance_now >= boundary + CLOSE_MARGIN_MS
                    if (
                        stream not in asked
                        and late
                        and self.router.fill_to(stream, boundary, binance_now)
                    ):
                        asked.add(stream)
            # Progress comes from the reader and the fills; a short poll keeps this apart
            # from the hot path.
            await trio.sleep(0.05)
        return []


def open_market_connection(
    url: str, ssl_context: ssl.SSLContext | None
) -> AbstractAsyncContextManager[trio_websocket.WebSocketConnection]:
    """A market-stream connection with the worker's options (`just bench`'s bare reader opens
    its own with this too, so that the floor it measures is the same connection)."""
    return trio_websocket.open_websocket_url(
        url,
        ssl_context=ssl_context,
        message_queue_size=256,
        max_message_size=HARD_FRAME_LIMIT,
        receive_buffer_size=64 * 1024,
        connect_timeout=10,
        disconnect_timeout=2,
    )


def _retry_after(exc: trio_websocket.ConnectionRejected) -> float:
    for name, value in exc.headers or ():
        if name.lower() == b"retry-after":
            try:
                return float(value)
            except ValueError:
                return 0.0
    return 0.0
