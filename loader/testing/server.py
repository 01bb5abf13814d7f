"""Running the emulator: ``serve_emulator`` for ``nursery.start``, and the handle it returns."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from urllib.parse import quote

import trio

from loader.testing import faults
from loader.testing.config import EmulatorConfig
from loader.testing.connection import WS_API_PATH, Connection, ConnectionInfo, Hub
from loader.testing.intervals import is_interval
from loader.testing.market import Kline, Market
from loader.testing.publisher import (
    ClockPublisher,
    FirehosePublisher,
    MarketClock,
    Publisher,
)
from loader.testing.records import HeldStream
from loader.testing.replay import Recording

__all__ = ["Emulator", "open_emulator", "serve_emulator"]


class Emulator:
    """A running emulator: its address, the market's ground truth, and fault injection.

    Obtained from ``await nursery.start(serve_emulator, config)``, from
    ``async with open_emulator(config)``, or from the ``binance_emulator`` pytest fixture.
    Fault methods act on every open market-stream and replay connection unless
    ``conn_ids`` names some (any kind, see :attr:`connections`), and return how many
    connections they touched.
    """

    def __init__(self, config: EmulatorConfig, hub: Hub, host: str, port: int) -> None:
        self.config = config
        self._hub = hub
        self.host = host
        self.port = port
        scheme = "ws" if config.ssl_context is None else "wss"
        self.url = f"{scheme}://{host}:{port}"
        """Base URL, e.g. ``ws://127.0.0.1:40123`` (``wss://`` with ``config.ssl_context``)."""

    # -- addresses ------------------------------------------------------------------------

    def raw_url(self, stream: str | None = None) -> str:
        """A raw-stream URL: ``/ws/<stream>``, or bare ``/ws`` for live ``SUBSCRIBE``."""
        return f"{self.url}/ws/{stream}" if stream else f"{self.url}/ws"

    def stream_url(self, streams: str | Iterable[str]) -> str:
        """A combined-stream URL: ``/stream?streams=a/b/c``."""
        names = [streams] if isinstance(streams, str) else list(streams)
        return f"{self.url}/stream?streams={quote('/'.join(names), safe='@/')}"

    @property
    def ws_api_url(self) -> str:
        """The WebSocket API URL (``/ws-api/v3``), where ``klines`` serves history."""
        return self.url + WS_API_PATH

    def replay_url(self, recording: Recording) -> str:
        """Where ``recording`` (one of ``config.recordings``) is served."""
        return self.url + recording.target

    # -- ground truth ---------------------------------------------------------------------

    @property
    def market(self) -> Market:
        """The deterministic market behind every frame."""
        return self._hub.publisher.market

    def market_time_ms(self) -> int:
        """Market time now (wall-clock time in firehose mode)."""
        return self._hub.publisher.now_ms()

    def advance(self, market_ms: int) -> None:
        """Jump the market clock ``market_ms`` ahead (not in firehose mode): the candles
        that close meanwhile are published at once, so tests of weekly and monthly candles
        take seconds. Connection timers (pings, lifetimes) are real time and do not jump."""
        publisher = self._hub.publisher
        if not isinstance(publisher, ClockPublisher):
            raise RuntimeError("advance() needs the market clock (not firehose mode)")
        publisher.advance(market_ms)

    def advance_to(self, market_ms: int) -> None:
        """Jump the market clock to ``market_ms`` (no-op if it is there already)."""
        self.advance(max(0, market_ms - self.market_time_ms()))

    def _key(self, symbol: str, interval: str) -> tuple[str, str]:
        if not self.market.has_symbol(symbol):
            raise ValueError(f"unknown symbol {symbol!r}; known: {self.market.symbols}")
        if not is_interval(interval):
            raise ValueError(f"unknown interval {interval!r}")
        return symbol, interval

    def closed_klines(
        self,
        symbol: str,
        interval: str,
        start_ms: int | None = None,
        end_ms: int | None = None,
    ) -> list[Kline]:
        """The closed candles the market has published, with the values streams sent.

        ``start_ms``/``end_ms`` filter on open time (inclusive). Candle 0 is the one
        containing the market's start. A candle counts as published once its closing frame
        is due (``close_lag_ms`` after its end, in market time), whether or not any client
        subscribed; in firehose mode once its closing frame was emitted.
        """
        key = self._key(symbol, interval)
        market = self.market
        stop = self._hub.publisher.closed_count(key)
        first = market.first_index(symbol, interval)
        if start_ms is not None:
            first = max(first, market.index_at(interval, start_ms))
            if first < stop and market.open_time(interval, first) < start_ms:
                first += 1
        if end_ms is not None:
            stop = min(stop, market.index_at(interval, end_ms) + 1)
        return market.klines(symbol, interval, first, stop)

    async def wait_closed(self, symbol: str, interval: str, count: int = 1) -> list[Kline]:
        """Wait until ``count`` candles (from candle 0) have closed; return all closed ones.

        When it returns, the closing frames are queued on every subscribed connection (the
        client may still be reading them).
        """
        key = self._key(symbol, interval)
        await self._hub.publisher.wait_closed(key, count)
        return self.closed_klines(symbol, interval)

    # -- connections ----------------------------------------------------------------------

    @property
    def connections(self) -> tuple[ConnectionInfo, ...]:
        """The open connections (handshake completed), oldest first."""
        return tuple(c.info() for c in self._hub.connections.values())

    @property
    def handshakes(self) -> int:
        """WebSocket handshakes accepted so far."""
        return self._hub.handshakes

    @property
    def stream_handshakes(self) -> int:
        """Handshakes of market-stream and replay connections (not the WebSocket API's)."""
        return self._hub.stream_handshakes

    @property
    def refused(self) -> int:
        """Handshakes refused by :meth:`refuse_handshakes` so far."""
        return self._hub.refused

    @property
    def connection_attempts(self) -> int:
        """Opening handshakes received so far, on any path, accepted or refused."""
        return self._hub.connection_attempts

    @property
    def api_connections(self) -> int:
        """WebSocket API (``/ws-api/v3``) connections accepted so far."""
        return self._hub.api_connections

    @property
    def rate_limited(self) -> int:
        """Requests and handshakes refused so far for exceeding a per-IP limit (429, 418)."""
        return self._hub.limits.refusals

    @property
    def request_weight(self) -> int:
        """WebSocket API request weight used in the current minute (all IPs together)."""
        return self._hub.limits.total_weight()

    async def wait_for(self, predicate: Callable[[Emulator], bool]) -> None:
        """Wait until ``predicate(self)`` holds; re-checked on every connection change
        (opened, closed, subscribed, stalled, refused) and every ping answered."""
        while not predicate(self):
            await self._hub.changed.wait()

    async def wait_connections(self, n: int = 1, *, kind: str | None = "stream") -> None:
        """Wait until at least ``n`` connections (of ``kind``; ``None``: any) are open."""
        await self.wait_for(
            lambda e: sum(1 for c in e.connections if kind is None or c.kind == kind) >= n
        )

    async def wait_handshakes(self, n: int) -> None:
        """Wait until ``n`` handshakes in total have been accepted (reconnects count)."""
        await self.wait_for(lambda e: e.handshakes >= n)

    def _targets(self, conn_ids: Iterable[int] | None) -> list[Connection]:
        conns = self._hub.connections
        if conn_ids is None:
            return [c for c in conns.values() if c.kind != "api"]
        return [conns[i] for i in conn_ids if i in conns]

    # -- faults ---------------------------------------------------------------------------

    def drop(self, conn_ids: Iterable[int] | None = None, *, reset: bool = False) -> int:
        """Drop TCP connections with no close frame (``reset=True``: with an RST)."""
        targets = self._targets(conn_ids)
        for c in targets:
            c.drop(reset=reset)
        return len(targets)

    def stall(self, seconds: float | None = None, conn_ids: Iterable[int] | None = None) -> int:
        """Freeze connections: socket open, nothing sent, pings unanswered, input unread.

        Frames published meanwhile are lost. Ends after ``seconds``, on :meth:`resume`, or
        when the client gives up.
        """
        targets = self._targets(conn_ids)
        for c in targets:
            c.stall(seconds)
        return len(targets)

    def resume(self, conn_ids: Iterable[int] | None = None) -> int:
        """End stalls."""
        targets = self._targets(conn_ids)
        for c in targets:
            c.resume()
        return len(targets)

    def send_invalid_json(self, conn_ids: Iterable[int] | None = None) -> int:
        """Send a text frame that is not valid JSON."""
        return self._push(conn_ids, faults.invalid_json_frame())

    def send_binary(self, conn_ids: Iterable[int] | None = None) -> int:
        """Send a binary frame."""
        return self._push(conn_ids, faults.binary_frame())

    def send_oversized(
        self, size: int = faults.DEFAULT_OVERSIZE, conn_ids: Iterable[int] | None = None
    ) -> int:
        """Send a valid JSON event of ``size`` bytes (default 1 MiB + 1)."""
        payload = faults.oversized_payload(size, self.market_time_ms())
        return self._event(conn_ids, payload)

    def send_unknown_event(self, conn_ids: Iterable[int] | None = None) -> int:
        """Send a well-formed event of an unknown type (``"e":"futureEvent"``)."""
        return self._event(conn_ids, faults.unknown_event_payload(self.market_time_ms()))

    def send_event(
        self, payload: bytes, stream: str | None = None, conn_ids: Iterable[int] | None = None
    ) -> int:
        """Send ``payload``, any JSON event (a hand-made kline dated ten years ahead, say),
        as the next frame of the market-stream connections carrying ``stream`` (all of them
        without it), wrapped under ``stream`` on combined ones; it is not part of the market
        (``closed_klines`` knows nothing of it)."""
        targets = self._targets(conn_ids)
        if stream is not None:
            targets = [c for c in targets if stream in c.list_subscriptions()]
        for c in targets:
            c.push_event(payload, stream or c.first_stream())
        return len(targets)

    def _push(self, conn_ids: Iterable[int] | None, frame: bytes) -> int:
        targets = self._targets(conn_ids)
        for c in targets:
            c.push_frame(frame)
        return len(targets)

    def _event(self, conn_ids: Iterable[int] | None, payload: bytes) -> int:
        targets = self._targets(conn_ids)
        for c in targets:
            c.push_event(payload, c.first_stream())
        return len(targets)

    def refuse_handshakes(self, count: int = 1, *, status: int = 429, retry_after: int = 1) -> None:
        """Refuse the next ``count`` handshakes with HTTP ``status`` (429 or 418).

        The response carries ``Retry-After: <retry_after>`` and Binance's -1003 JSON body.
        ``count=0`` cancels pending refusals.
        """
        self._hub.refuse(count, status, retry_after)

    def shutdown(self, grace: float = 1.0, conn_ids: Iterable[int] | None = None) -> int:
        """Send ``serverShutdown`` (wrapped on combined streams), close ``grace`` s later."""
        targets = self._targets(conn_ids)
        now = self.market_time_ms()
        for c in targets:
            c.shutdown(grace, now)
        return len(targets)

    def rotate(self, conn_ids: Iterable[int] | None = None) -> int:
        """Close connections as at the 24-hour mark."""
        targets = self._targets(conn_ids)
        for c in targets:
            c.rotate()
        return len(targets)

    # -- firehose -------------------------------------------------------------------------

    def _firehose(self) -> FirehosePublisher:
        publisher = self._hub.publisher
        if not isinstance(publisher, FirehosePublisher):
            raise RuntimeError("the emulator is not in firehose mode (config.firehose)")
        return publisher

    def set_firehose_rate(self, rate: float | None) -> None:
        """Change the firehose's total frames per second (``None``: as fast as possible)."""
        self._firehose().set_rate(rate)

    @property
    def send_times(self) -> dict[tuple[str, int], int]:
        """With ``record_send_times`` (firehose or market clock): ``time.time_ns()`` at which
        each closing frame was queued, keyed by ``(stream name, candle open time)``."""
        publisher = self._hub.publisher
        if isinstance(publisher, ClockPublisher):
            if publisher.send_times is None:
                raise RuntimeError("the emulator is not recording (config.record_send_times)")
            return publisher.send_times
        return self._firehose().send_times

    @property
    def frames_sent(self) -> int:
        """Firehose: kline frames emitted so far (one per subscriber)."""
        return self._firehose().frames_sent


def _publisher(config: EmulatorConfig) -> Publisher:
    start_ms = config.resolved_start_ms()
    market = Market(
        config.symbols,
        seed=config.seed,
        start_ms=start_ms,
        empty_ratio=config.empty_candle_ratio,
        listings=() if config.firehose is not None else config.listings,
    )
    if config.firehose is not None:
        return FirehosePublisher(market, config.firehose)
    return ClockPublisher(
        market,
        MarketClock(start_ms, config.speed),
        config.close_lag_ms,
        spread=config.spread_updates,
        updates=config.intermediate_updates,
        record_send_times=config.record_send_times,
    )


async def serve_emulator(
    config: EmulatorConfig | None = None,
    *,
    task_status: trio.TaskStatus[Emulator] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run an emulator until cancelled; ``nursery.start`` returns its :class:`Emulator`.

    ::

        async with trio.open_nursery() as nursery:
            emulator = await nursery.start(serve_emulator, EmulatorConfig(speed=600))
            ...
            nursery.cancel_scope.cancel()
    """
    config = config or EmulatorConfig()
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    host, port = listeners[0].socket.getsockname()[:2]
    publisher = _publisher(config)
    hub = Hub(config, publisher, config.recordings)
    emulator = Emulator(config, hub, host, port)

    async def handle(stream: trio.SocketStream) -> None:
        if config.ssl_context is None:
            await Connection(hub, stream).run()
        else:
            # The TLS handshake runs on the first read, inside the WebSocket handshake's
            # timeout; a client that rejects the certificate is a client that went away.
            records = HeldStream(stream)
            tls = trio.SSLStream(records, config.ssl_context, server_side=True)
            await Connection(hub, tls, records).run()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publisher.run)
        if config.faults:
            nursery.start_soon(faults.run_schedule, emulator, config.faults)
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started(emulator)


@asynccontextmanager
async def open_emulator(config: EmulatorConfig | None = None) -> AsyncIterator[Emulator]:
    """``async with open_emulator(config) as emulator:`` runs one for the block's duration."""
    async with trio.open_nursery() as nursery:
        emulator: Emulator = await nursery.start(serve_emulator, config)
        yield emulator
        nursery.cancel_scope.cancel()
