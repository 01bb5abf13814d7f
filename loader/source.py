"""The Binance source: kline frames off the WebSocket, candles into the channel.

The reader never waits on Kafka: it only waits on the bounded channel, and trio-websocket answers
Binance's pings from its own reader task, which keeps running while ours drains its queue.
Each stream's order is guarded here, so a candle is never published twice nor out of order,
whatever the connections underneath do.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Final

import trio
import trio_websocket

from loader.binance import (
    BadFrame,
    FrameDecoder,
    KlineEvent,
    ServerShutdown,
    stream_path,
    to_candle,
)
from loader.schema import Candle
from loader.settings import Settings
from loader.stats import Stats

log = logging.getLogger(__name__)

# trio-websocket closes the connection past this; smaller odd frames are skipped and counted.
HARD_FRAME_LIMIT: Final = 4 * 1024 * 1024


class StreamGuard:
    """Per-stream publishing state: what was last published decides what may follow."""

    __slots__ = ("last_closed", "last_update")

    def __init__(self, last_closed: int = -1) -> None:
        self.last_closed = last_closed  # open time of the last closed candle published
        self.last_update = -1  # event time of the last in-progress update published


class ThrottledLog:
    """Logs the first occurrence of each kind, then at most once per `period` with a count."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        self._logger = logger
        self._period = period
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now < self._next.get(kind, 0.0):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._next[kind] = now + self._period
        skipped = self._suppressed.pop(kind, 0)
        suffix = f" ({skipped} more like it since the last report)" if skipped else ""
        self._logger.warning("%s: %s%s", kind, message, suffix)


class Publisher:
    """Turns kline events into candles on the channel, in order and without repeats."""

    def __init__(
        self,
        settings: Settings,
        candles: trio.MemorySendChannel[Candle],
        stats: Stats,
    ) -> None:
        self.all_candles = settings.all_candles
        self.candles = candles
        self.stats = stats
        self.guards = {(s, i): StreamGuard() for s, i in settings.streams}
        self.bad = ThrottledLog(log)

    async def kline(self, event: KlineEvent) -> None:
        k = event.kline
        guard = self.guards.get((k.symbol, k.interval))
        if guard is None:
            self.skip("unexpected_stream", f"{k.symbol} {k.interval} was not asked for")
            return
        if k.is_closed:
            self.stats.candles_received += 1
            if k.open_time <= guard.last_closed:
                self.stats.duplicates_dropped += 1
                return
            candle = self.candle(event)
            if candle is None:
                return
            guard.last_closed = k.open_time
        else:
            if not self.all_candles:
                return
            if k.open_time <= guard.last_closed or event.event_time <= guard.last_update:
                self.stats.duplicates_dropped += 1
                return
            candle = self.candle(event)
            if candle is None:
                return
            guard.last_update = event.event_time
        await self.candles.send(candle)
        self.stats.candles_published += 1

    def candle(self, event: KlineEvent) -> Candle | None:
        try:
            return to_candle(event.kline, with_state=self.all_candles)
        except BadFrame as bad:
            self.skip(bad.kind, str(bad))
            return None

    def skip(self, kind: str, detail: str) -> None:
        self.stats.malformed[kind] += 1
        self.bad.warning(kind, f"skipped a frame: {detail}")


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(
        self, base: float = 1.0, cap: float = 30.0, rng: Callable[[], float] = random.random
    ):
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * 2.0**self.attempt) * self.rng()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def read_binance(
    settings: Settings,
    candles: trio.MemorySendChannel[Candle],
    stats: Stats,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Stream every configured kline stream over one connection into `candles`, reconnecting."""
    names = list(settings.stream_names)
    url = settings.binance_ws_url.rstrip("/").removesuffix("/ws").removesuffix("/stream")
    url += stream_path(names)
    publisher = Publisher(settings, candles, stats)
    decoder = FrameDecoder(combined=len(names) > 1)
    backoff = Backoff()
    started = False
    async with candles:
        while True:
            try:
                async with trio_websocket.open_websocket_url(
                    url,
                    message_queue_size=64,
                    max_message_size=HARD_FRAME_LIMIT,
                    receive_buffer_size=64 * 1024,
                    connect_timeout=10,
                    disconnect_timeout=2,
                ) as ws:
                    log.info("connected to %s", url)
                    if not started:
                        task_status.started()
                        started = True
                    while True:
                        frame = await ws.get_message()
                        stats.frames_received += 1
                        stats.last_frame_at = time.monotonic()
                        backoff.reset()
                        try:
                            event = decoder.decode(frame)
                        except BadFrame as bad:
                            publisher.skip(bad.kind, str(bad))
                            continue
                        if isinstance(event, ServerShutdown):
                            log.info("Binance announced a server shutdown")
                            continue
                        await publisher.kline(event)
            except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
                reason = type(exc).__name__
                stats.reconnects[reason] += 1
                delay = backoff.next()
                log.warning("Binance connection lost (%s); reconnecting in %.1f s", exc, delay)
                await trio.sleep(delay)
