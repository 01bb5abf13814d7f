"""One client connection: handshake, reading, writing, pings, limits and injected faults.

The connection speaks WebSocket through wsproto for the opening handshake and for parsing
the client's (masked) frames; everything the server sends goes through one writer task that
joins whatever is queued into a single ``send_all``, so a burst of frames costs one system
call. Control frames and replies share that queue, which keeps them ordered with the data.
"""

from __future__ import annotations

import itertools
import math
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from loader.testing import faults, wire
from loader.testing.config import EmulatorConfig
from loader.testing.limits import IpLimits, Refusal
from loader.testing.publisher import Publisher, Signal
from loader.testing.records import HeldStream
from loader.testing.replay import (
    RecordedFrame,
    Recording,
    replay,
    replay_frames,
    requested_streams,
    split_frames,
)
from loader.testing.streams import StreamKey, handle_control, parse_kline_stream
from loader.testing.wsapi import CONNECT_WEIGHT, ApiSession, WsApi

__all__ = ["Connection", "ConnectionInfo", "ConnectionKind", "Hub"]

#: ``"stream"``: market streams (``/ws``, ``/stream``); ``"api"``: ``/ws-api/v3``;
#: ``"replay"``: a recorded session (on its recorded path, or some of its streams).
ConnectionKind = Literal["stream", "api", "replay"]

WS_API_PATH = "/ws-api/v3"
_TIME_UNITS = {"MILLISECOND": False, "millisecond": False, "MICROSECOND": True, "microsecond": True}


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A snapshot of one open connection, for tests and fault targeting."""

    id: int
    kind: ConnectionKind
    #: Request path with its query, as the client sent them (``/stream?streams=...``).
    path: str
    #: Stream names subscribed, in order (as the client spelled them).
    subscriptions: tuple[str, ...]
    #: Whether payloads are wrapped as ``{"stream":..,"data":..}``.
    combined: bool
    stalled: bool
    #: Server pings answered with a matching pong so far: the client's keepalive at work.
    pongs: int = 0
    #: Times in microseconds (``timeUnit=MICROSECOND`` in the URL).
    micros: bool = False


def _json_rejection(
    status: int, retry_after: int | None, body: bytes
) -> tuple[RejectConnection, bytes]:
    headers = [(b"Content-Type", b"application/json;charset=UTF-8")]
    if retry_after is not None:
        headers.insert(0, (b"Retry-After", str(retry_after).encode()))
    return RejectConnection(status_code=status, headers=headers, has_body=True), body


class Hub:
    """What every connection of one emulator shares."""

    def __init__(
        self,
        config: EmulatorConfig,
        publisher: Publisher,
        recordings: Sequence[Recording],
    ) -> None:
        self.config = config
        self.publisher = publisher
        self.limits = IpLimits(
            config.api_weight_limit,
            config.max_connection_attempts,
            config.connection_attempts_window,
            config.ban_seconds,
        )
        self.wsapi = WsApi(publisher, self.limits)
        # By recorded path and query; of two recordings on one path, the first loaded.
        self.recordings: dict[str, Recording] = {}
        for recording in recordings:
            self.recordings.setdefault(recording.target, recording)
        # In load order, for connections that ask for some of a recording's streams.
        self._by_streams = [(frozenset(r.streams), r) for r in recordings if r.streams]
        self._split: dict[int, tuple[RecordedFrame, ...]] = {}
        self.connections: dict[int, Connection] = {}
        self.changed = Signal()
        self.handshakes = 0
        # Market-stream and replay handshakes only: the WebSocket API's are not reconnects.
        self.stream_handshakes = 0
        self.refused = 0
        # Opening handshakes received (any path, refused or not), and WebSocket API
        # connections accepted: what a storm of reconnects or backfills shows up in.
        self.connection_attempts = 0
        self.api_connections = 0
        self._ids = itertools.count(1)
        # (status, Retry-After seconds, how many more handshakes to refuse)
        self._refusal: tuple[int, int, int] | None = None

    def recording_for(self, streams: Sequence[str]) -> Recording | None:
        """The first loaded recording that carries every one of ``streams`` (not none)."""
        wanted = set(streams)
        if not wanted:
            return None
        return next((r for names, r in self._by_streams if wanted <= names), None)

    def recorded_frames(self, recording: Recording) -> tuple[RecordedFrame, ...]:
        """``recording``'s frames split by stream (worked out once, when first asked for)."""
        key = id(recording)
        if key not in self._split:
            self._split[key] = split_frames(recording)
        return self._split[key]

    def next_id(self) -> int:
        """A fresh connection id."""
        return next(self._ids)

    def refuse(self, count: int, status: int, retry_after: int) -> None:
        """Refuse the next ``count`` handshakes with ``status`` and ``Retry-After``."""
        self._refusal = (status, retry_after, count) if count > 0 else None

    def take_refusal(self) -> tuple[int, int] | None:
        """Consume one pending refusal, if any: ``(status, retry_after)``."""
        if self._refusal is None:
            return None
        status, retry_after, left = self._refusal
        self._refusal = (status, retry_after, left - 1) if left > 1 else None
        return status, retry_after


class Connection:
    """Serves one accepted TCP connection until either side ends it."""

    def __init__(
        self,
        hub: Hub,
        stream: trio.SocketStream | trio.SSLStream[HeldStream],
        records: HeldStream | None = None,
    ) -> None:
        self.hub = hub
        self.config = hub.config
        self.id = hub.next_id()
        self.kind: ConnectionKind = "stream"
        self.target = ""
        self.combined = False
        self.micros = False
        self.session: ApiSession | None = None
        self._stream = stream
        # Over wss: the socket under the TLS stream, which sends a record per message.
        self._records = records
        transport = getattr(stream, "transport_stream", stream)
        try:
            self.ip = str(transport.socket.getpeername()[0])
        except (OSError, AttributeError):
            self.ip = "unknown"
        self._ws = WSConnection(ConnectionType.SERVER)
        self._subs: dict[str, StreamKey | None] = {}
        self._recording: Recording | None = None
        # Replaying some of a recording's streams: its frames, filtered by subscription.
        self._recorded: tuple[RecordedFrame, ...] | None = None
        self._nursery: trio.Nursery | None = None
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._sending = False
        self._wake = Signal()
        self._writer_idle = False
        self._sent = Signal()
        self._pings: deque[tuple[bytes, float]] = deque()
        self._pings_changed = Signal()
        self._pongs = 0
        self._incoming: deque[float] = deque()
        self._stalled = False
        self._unstalled = Signal()
        self._closing = False
        self._dead = False
        self._reset = False
        self._peer_closed = trio.Event()

    # -- snapshot -------------------------------------------------------------------------

    def info(self) -> ConnectionInfo:
        """What a test may want to know about this connection."""
        return ConnectionInfo(
            self.id,
            self.kind,
            self.target,
            tuple(self._subs),
            self.combined,
            self._stalled,
            self._pongs,
            self.micros,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Handshake, then serve until closed, dropped or cancelled."""
        try:
            if await self._handshake():
                self.hub.connections[self.id] = self
                self.hub.handshakes += 1
                self.hub.stream_handshakes += self.kind != "api"
                self.hub.api_connections += self.kind == "api"
                self.hub.changed.notify()
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._reader)
                    nursery.start_soon(self._writer)
                    nursery.start_soon(self._pinger)
                    nursery.start_soon(self._pong_watchdog)
                    nursery.start_soon(self._lifetime)
                    if self._recording is not None:
                        nursery.start_soon(self._replay, self._recording)
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away (from any task of the nursery); nothing to tell it
        finally:
            self._dead = True
            self._sent.notify()
            for key in self._subs.values():
                if key is not None and self.kind == "stream":
                    self.hub.publisher.remove(key, self)
            if self.hub.connections.pop(self.id, None) is not None:
                self.hub.changed.notify()
            if self._reset:
                # SO_LINGER with a zero timeout turns close() into a TCP reset.
                tcp = self._stream if self._records is None else self._records.stream
                assert isinstance(tcp, trio.SocketStream)
                tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(self._stream)

    def _terminate(self) -> None:
        self._dead = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _handshake(self) -> bool:
        request = None
        with trio.move_on_after(self.config.handshake_timeout):
            while request is None:
                data = await self._stream.receive_some(65536)
                if not data:
                    return False
                try:
                    self._ws.receive_data(bytes(data))
                except RemoteProtocolError as exc:
                    hint = exc.event_hint
                    await self._reject(hint if isinstance(hint, RejectConnection) else None)
                    return False
                for event in self._ws.events():
                    if isinstance(event, Request):
                        request = event
                        break
        if request is None:
            return False
        self.target = request.target
        rejection = self._admit(request.target)
        if rejection is not None:
            await self._reject(*rejection)
            return False
        await self._stream.send_all(self._ws.send(AcceptConnection()))
        return True

    def _admit(self, target: str) -> tuple[RejectConnection, bytes] | None:
        """Route the request, or say how to refuse it (per-IP limits, faults, bad URL)."""
        hub = self.hub
        hub.connection_attempts += 1
        service = "api" if urlsplit(target).path == WS_API_PATH else "stream"
        limited = hub.limits.attempt(self.ip, service)
        if limited is not None:
            return self._limited(limited)
        refusal = hub.take_refusal()
        if refusal is not None:
            status, retry_after = refusal
            hub.refused += 1
            hub.changed.notify()
            until = hub.publisher.now_ms() + retry_after * 1000
            return _json_rejection(status, retry_after, faults.refusal_body(status, until))
        query = parse_qs(urlsplit(target).query)
        units = query.get("timeUnit")
        if units is not None and units[-1] not in _TIME_UNITS:
            # Binance's -1194; that it refuses the handshake with it is a guess.
            body = wire.encode(
                {
                    "code": -1194,
                    "msg": "Invalid value for time unit; expected either MICROSECOND "
                    "or MILLISECOND.",
                }
            )
            return _json_rejection(400, None, body)
        self.micros = units is not None and _TIME_UNITS[units[-1]]
        if not self._route(target):
            return RejectConnection(status_code=404), b""
        if self.kind == "api":
            show = query.get("returnRateLimits")
            self.session = ApiSession(
                ip=self.ip, micros=self.micros, rate_limits=not show or show[-1] != "false"
            )
            limited = hub.limits.charge(self.ip, CONNECT_WEIGHT)
            if limited is not None:
                return self._limited(limited)
        return None

    def _limited(self, refusal: Refusal) -> tuple[RejectConnection, bytes]:
        """The refusal of a handshake over a per-IP limit, as Binance words it."""
        self.hub.changed.notify()
        until = self.hub.publisher.now_ms() + int(refusal.retry_after * 1000) + 1
        body = wire.encode({"code": -1003, "msg": refusal.message(until)})
        return _json_rejection(refusal.status, math.ceil(refusal.retry_after), body)

    async def _reject(self, event: RejectConnection | None, body: bytes = b"") -> None:
        if event is None:
            event = RejectConnection(status_code=400)
        try:
            data = self._ws.send(event)
            if event.has_body:
                data += self._ws.send(RejectData(data=body))
        except LocalProtocolError:
            return
        await self._stream.send_all(data)

    def _route(self, target: str) -> bool:
        recording = self.hub.recordings.get(target)
        if recording is not None:
            self.kind = "replay"
            self._recording = recording
            self.combined = urlsplit(target).path.startswith("/stream")
            return True
        if urlsplit(target).path == WS_API_PATH:
            self.kind = "api"
            return True
        requested = requested_streams(target)
        if requested is None:
            return False
        self.combined = urlsplit(target).path.startswith("/stream")
        # Streams beyond the per-connection cap are ignored (Binance's answer is not known).
        names = requested[: self.config.max_streams_per_connection]
        recording = self.hub.recording_for(names)
        if recording is not None:
            # Every stream asked for was recorded: serve the recording, filtered to them.
            self.kind = "replay"
            self._recording = recording
            self._recorded = self.hub.recorded_frames(recording)
        self._add_streams(names)
        return True

    # -- subscriptions (streams.ControlTarget) --------------------------------------------

    def _add_streams(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._subs:
                continue
            key = parse_kline_stream(name, self.hub.publisher.market.has_symbol)
            self._subs[name] = key
            if key is not None and self.kind == "stream":
                self.hub.publisher.add(key, self)
        self.hub.changed.notify()

    def list_subscriptions(self) -> list[str]:
        """Stream names in subscription order."""
        return list(self._subs)

    def subscribe(self, names: Sequence[str]) -> bool:
        """Add streams, unless that would exceed the per-connection cap."""
        new = {n for n in names if n not in self._subs}
        if len(self._subs) + len(new) > self.config.max_streams_per_connection:
            return False
        self._add_streams(names)
        return True

    def unsubscribe(self, names: Sequence[str]) -> None:
        """Remove streams; unknown names are ignored."""
        for name in names:
            if name in self._subs:
                key = self._subs.pop(name)
                if key is not None and self.kind == "stream":
                    self.hub.publisher.remove(key, self)
        self.hub.changed.notify()

    # -- sending --------------------------------------------------------------------------

    def _enqueue(self, data: bytes, *, control: bool = False) -> None:
        if self._dead or self._stalled:
            return
        if self._closing and not control:
            return
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes > self.config.max_send_buffer:
            # A consumer this far behind is cut off, as a slow consumer.
            self._terminate()
            return
        if self._writer_idle:
            self._writer_idle = False
            self._wake.notify()

    def push_kline(self, raw: bytes, wrapped: bytes) -> None:
        """Queue a framed kline (publisher side)."""
        self._enqueue(wrapped if self.combined else raw)

    def push_frame(self, data: bytes) -> None:
        """Queue an already framed message."""
        self._enqueue(data)

    def push_event(self, payload: bytes, stream: str) -> None:
        """Queue a JSON event, wrapped for combined streams under ``stream``."""
        if self.kind == "api":
            payload = b'{"event":' + payload + b"}"
        elif self.combined:
            payload = wire.combined(stream, payload)
        self._enqueue(wire.text_frame(payload))

    def buffered(self) -> int:
        """Bytes queued for the socket."""
        return self._out_bytes

    async def wait_buffered_below(self, limit: int) -> None:
        """Return once fewer than ``limit`` bytes are queued, or the connection is gone."""
        while self._out_bytes >= limit and not self._dead:
            await self._sent.wait()

    async def _writer(self) -> None:
        while True:
            while not self._out or self._stalled:
                self._writer_idle = True
                await self._wake.wait()
            batch = self._out
            self._out = []
            self._out_bytes = 0
            self._sending = True
            try:
                await self._send(batch)
            finally:
                self._sending = False
            self._sent.notify()

    async def _send(self, batch: list[bytes]) -> None:
        if self._records is None:
            await self._stream.send_all(b"".join(batch))
            return
        # Each message in a TLS record of its own, as Binance sends them; one write for all.
        self._records.hold()
        for message in batch:
            await self._stream.send_all(message)
        await self._records.release()

    # -- receiving ------------------------------------------------------------------------

    async def _reader(self) -> None:
        ws = self._ws
        parts: list[str] = []
        while True:
            data = await self._stream.receive_some(65536)
            while self._stalled:
                # Stalled: what arrives is left unread until the stall ends.
                await self._unstalled.wait()
            if not data:
                self._peer_closed.set()
                if not self._closing:
                    self._terminate()
                return
            if ws.state is ConnectionState.CLOSED:
                continue
            try:
                ws.receive_data(bytes(data))
                for event in ws.events():
                    self._on_event(event, parts)
            except (RemoteProtocolError, LocalProtocolError):
                self._terminate()
                return

    def _on_event(self, event: object, parts: list[str]) -> None:
        ws = self._ws
        if isinstance(event, TextMessage):
            parts.append(event.data)
            if event.message_finished:
                text = "".join(parts)
                parts.clear()
                if self._count_incoming():
                    self._on_text(text)
        elif isinstance(event, BytesMessage):
            if event.message_finished:
                self._count_incoming()
        elif isinstance(event, Ping):
            if self._count_incoming() and ws.state is ConnectionState.OPEN:
                self._enqueue(ws.send(event.response()), control=True)
        elif isinstance(event, Pong):
            if self._count_incoming():
                self._on_pong(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            self._on_close(event)

    def _count_incoming(self) -> bool:
        limit = self.config.max_incoming_per_second
        if limit is None or self.kind == "api" or self._closing:
            return not self._closing
        now = trio.current_time()
        window = self._incoming
        window.append(now)
        while window[0] <= now - 1.0:
            window.popleft()
        if len(window) > limit:
            # Binance: "A connection that goes beyond the limit will be disconnected".
            self.close(1008, "Too many requests")
            return False
        return True

    def _on_text(self, text: str) -> None:
        if self.kind == "api":
            session = self.session or ApiSession(ip=self.ip)
            self._enqueue(wire.text_frame(self.hub.wsapi.handle(text, session)))
            if session.banned:
                # "An automated IP ban and you will be disconnected"; the code is a guess.
                self.close(1008, "IP banned")
            return
        self._enqueue(wire.text_frame(handle_control(text, self)))

    def _on_pong(self, payload: bytes) -> None:
        for i, (sent, _) in enumerate(self._pings):
            if sent == payload:
                for _ in range(i + 1):
                    self._pings.popleft()
                self._pongs += 1
                self._pings_changed.notify()
                self.hub.changed.notify()
                return
        # An unsolicited pong is allowed but does not keep the connection alive.

    def _on_close(self, event: CloseConnection) -> None:
        self._peer_closed.set()
        if self._closing:
            return  # the client answered our close
        self._closing = True
        if self._ws.state is ConnectionState.REMOTE_CLOSING:
            self._enqueue(self._ws.send(event.response()), control=True)
        self._start(self._finish_close)

    # -- timers ---------------------------------------------------------------------------

    async def _pinger(self) -> None:
        for n in itertools.count(1):
            await trio.sleep(self.config.ping_interval)
            if self._stalled or self._closing:
                continue
            payload = str(n).encode()
            self._pings.append((payload, trio.current_time()))
            self._enqueue(wire.frame(wire.OP_PING, payload), control=True)
            self._pings_changed.notify()

    async def _pong_watchdog(self) -> None:
        while True:
            if not self._pings or self._stalled or self._closing:
                await self._pings_changed.wait()
                continue
            deadline = self._pings[0][1] + self.config.pong_timeout
            with trio.move_on_at(deadline) as scope:
                await self._pings_changed.wait()
            if scope.cancelled_caught and self._pings and not self._stalled:
                # Close code and reason are not documented; 1008 is a guess.
                self.close(1008, "Pong timeout")
                return

    async def _lifetime(self) -> None:
        await trio.sleep(self.config.max_lifetime)
        self.rotate()

    async def _replay(self, recording: Recording) -> None:
        # After the last frame the connection stays open and silent (pings go on).
        if self._recorded is None:
            await replay(recording, self.push_frame, self.config.replay_speed)
        else:
            await replay_frames(
                self._recorded,
                recording.connected_at,
                self._push_recorded,
                self.config.replay_speed,
            )

    def _push_recorded(self, frame: RecordedFrame) -> None:
        """Queue a recorded frame if its stream is subscribed, shaped as Binance sends it:
        on combined connections the recorded wrapper as is, on raw ones the bare event."""
        if frame.stream is None or frame.stream not in self._subs:
            return
        if not self.combined:
            data = frame.payload.encode()
        elif frame.wrapped:
            data = frame.text.encode()
        else:
            data = wire.combined(frame.stream, frame.payload.encode())
        self._enqueue(wire.text_frame(data))

    # -- closing and faults ---------------------------------------------------------------

    def _start(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        if self._nursery is not None and not self._dead:
            self._nursery.start_soon(fn, *args)

    def close(self, code: int, reason: str) -> None:
        """Send a close frame, wait (bounded) for the client's, then hang up."""
        if self._closing or self._dead:
            return
        if self._stalled:
            self.resume()
        self._closing = True
        if self._ws.state is ConnectionState.OPEN:
            self._enqueue(self._ws.send(CloseConnection(code, reason)), control=True)
        self._start(self._finish_close)

    async def _finish_close(self) -> None:
        while (self._out or self._sending) and not self._dead:
            await self._sent.wait()
        with trio.move_on_after(self.config.close_timeout):
            await self._peer_closed.wait()
        self._terminate()

    def drop(self, *, reset: bool = False) -> None:
        """Hang up without a close frame (``reset``: with a TCP RST instead of a FIN)."""
        self._reset = reset
        self._terminate()

    def stall(self, seconds: float | None) -> None:
        """Freeze: nothing sent (data is discarded), nothing read, no pings, no pongs."""
        self._stalled = True
        self._pings_changed.notify()
        self.hub.changed.notify()
        if seconds is not None:
            self._start(self._resume_after, seconds)

    async def _resume_after(self, seconds: float) -> None:
        await trio.sleep(seconds)
        self.resume()

    def resume(self) -> None:
        """End a stall; pings sent before it are forgotten."""
        if not self._stalled:
            return
        self._stalled = False
        self._pings.clear()
        self._unstalled.notify()
        self._writer_idle = False
        self._wake.notify()
        self._pings_changed.notify()
        self.hub.changed.notify()

    def shutdown(self, grace: float, event_time: int) -> None:
        """Send ``serverShutdown``, then close (1001) after ``grace`` seconds."""
        self.push_event(faults.shutdown_payload(event_time), "serverShutdown")
        self._start(self._close_after, grace)

    async def _close_after(self, grace: float) -> None:
        await trio.sleep(grace)
        # Going Away (1001) for a server shutting down is a guess; Binance does not say.
        self.close(1001, "Server shutdown")

    def rotate(self) -> None:
        """Close as at the 24-hour mark."""
        # The close code at the 24-hour mark is not documented; 1000 is a guess.
        self.close(1000, "Connection lifetime exceeded")

    def first_stream(self) -> str:
        """A stream name to wrap injected events under on combined connections."""
        return next(iter(self._subs), "btcusdt@kline_1m")
