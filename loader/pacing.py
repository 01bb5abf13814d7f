"""Read pacing: a busy connection is read once per tick, every busy connection in one wake-up.

On this kind of machine a thread's wake-up costs far more than the frame it wakes for
(`docs/benchmarks.md`): 1,000 frames a second spread evenly, each read on its own, cost a
bare trio-websocket reader several times the CPU per frame it needs at full speed. So while
frames come less than a tick apart, the connection's next read waits for the next tick of a
grid shared by the whole process (multiples of `tick` on Trio's clock) and takes everything
that arrived meanwhile; every busy connection wakes on the same tick, and the sink hands
Kafka what they read as one batch. A connection whose frames come further apart than a tick
is read as each arrives, so a quiet feed pays no latency and no extra wake-up.

Over TLS the pacing sits under the TLS layer, on the socket: trio's `SSLStream` returns one
TLS record per `receive_some`, and Binance sends each message in a record of its own, so a
pacer above TLS would let a busy connection read one message per tick, far below what the
feed sends. On the socket, a tick's one read takes every byte that arrived, and the records
in it are decrypted and handed to the WebSocket layer without waiting again.

The cost is latency: at most one tick on a busy connection (`COALESCE_MS`; 0 turns pacing
off). Pings are answered by the same reads, a tick later at most.

`Pacer` decides, without I/O; `PacedStream` applies it to the stream under trio-websocket.
"""

from __future__ import annotations

import math

import trio
import trio_websocket


class Pacer:
    """When a connection should read next, from when its reads ended and how long they
    waited for data.

    Busy means a read found data waiting (a wait under a quarter tick), or ended less than a
    tick after the one before it. A full read buffer means more is waiting: read again at
    once.
    """

    __slots__ = ("busy", "full", "last_end", "tick")

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.busy = False
        self.full = False
        self.last_end = -math.inf

    def read_at(self, now: float) -> float:
        """The time to start the next read (`now`: at once)."""
        if not self.busy or self.full or self.tick <= 0:
            return now
        return max(now, math.ceil(now / self.tick) * self.tick)

    def read(self, started: float, ended: float, *, full: bool) -> None:
        """A read that began waiting at `started` returned at `ended`."""
        waited = ended - started
        self.busy = waited < self.tick / 4 or ended - self.last_end < self.tick
        self.full = full
        self.last_end = ended


# What one read of the socket takes at most when its caller names no size (trio's
# `SSLStream` does not): a read that fills it leaves more waiting.
READ_SIZE = 64 * 1024


class PacedStream(trio.abc.Stream):
    """`stream` with its reads paced by a `Pacer`; everything else passes through."""

    def __init__(self, stream: trio.abc.Stream, tick: float) -> None:
        self.stream = stream
        self.pacer = Pacer(tick)
        # Reads, and those that waited for a tick: the share shows pacing at work.
        self.reads = 0
        self.paced = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        pacer = self.pacer
        started = trio.current_time()
        at = pacer.read_at(started)
        if at > started:
            self.paced += 1
            await trio.sleep_until(at)
            started = trio.current_time()
        size = max_bytes or READ_SIZE
        data = await self.stream.receive_some(size)
        self.reads += 1
        full = len(data) >= size
        pacer.read(started, trio.current_time(), full=full)
        return data

    @property
    def socket(self) -> trio.socket.SocketType:
        """The socket, which trio-websocket looks for under an `SSLStream` (for logs)."""
        if isinstance(self.stream, trio.SocketStream):
            return self.stream.socket
        raise AttributeError("socket")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.stream.aclose()


def pace(ws: trio_websocket.WebSocketConnection, tick: float) -> PacedStream | None:
    """Pace `ws`'s reads of its socket from now on (none when `tick` is 0).

    trio-websocket opens its stream itself and offers no hook to wrap it, but its reader
    task looks up `_stream` for every read, and `SSLStream` its `transport_stream`;
    trio-websocket is pinned (uv.lock), and `tests/test_pacing.py` fails if either stops
    reading through the attribute.
    """
    if tick <= 0:
        return None
    stream = ws._stream
    if isinstance(stream, trio.SSLStream):
        paced = PacedStream(stream.transport_stream, tick)
        stream.transport_stream = paced
    else:
        paced = PacedStream(stream, tick)
        ws._stream = paced
    return paced
