"""Who sends which kline frame when: the market clock, and the benchmark firehose.

Both publishers keep the subscriptions (series -> connections), encode each frame once and
hand the framed bytes to every subscriber. They also answer "what has the market published"
(closed candles and the one in progress), which the history method and the test helpers use,
so the stream, the history and the ground truth cannot disagree.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Protocol

import trio
import trio.lowlevel

from loader.testing import intervals as iv
from loader.testing import wire
from loader.testing.market import Kline, Market
from loader.testing.streams import StreamKey, stream_name

# Catching up more market time than this is a clock jump (`advance`), published condensed.
_JUMP_MS = 256_000

__all__ = [
    "ClockPublisher",
    "FirehoseConfig",
    "FirehosePublisher",
    "MarketClock",
    "Publisher",
    "Signal",
    "Subscriber",
]


class Signal:
    """A broadcast "something changed": waiters re-check their condition after each notify."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        """Wake every current waiter."""
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        """Sleep until the next :meth:`notify`."""
        await self._event.wait()


class Subscriber(Protocol):
    """A connection as the publishers see it."""

    combined: bool
    #: Times in microseconds (``timeUnit=MICROSECOND`` in the connection URL).
    micros: bool

    def push_kline(self, raw: bytes, wrapped: bytes) -> None:
        """Queue one framed kline; ``wrapped`` is the combined-stream form (may be empty)."""
        ...

    def buffered(self) -> int:
        """Bytes queued and not yet written to the socket."""
        ...

    async def wait_buffered_below(self, limit: int) -> None:
        """Return once fewer than ``limit`` bytes are queued (or the connection is gone)."""
        ...


class MarketClock:
    """Market time: ``start_ms`` at creation, then ``speed`` market ms per real ms."""

    def __init__(self, start_ms: int, speed: float) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.start_ms = start_ms
        self.speed = speed
        self._t0 = trio.current_time()

    def now_ms(self) -> int:
        """The current market time, epoch ms."""
        return self.start_ms + int((trio.current_time() - self._t0) * 1000.0 * self.speed)

    def deadline(self, market_ms: int) -> float:
        """The Trio clock time at which the market reaches ``market_ms``."""
        return self._t0 + (market_ms - self.start_ms) / (1000.0 * self.speed)

    def advance(self, market_ms: int) -> None:
        """Jump ``market_ms`` ahead at once (never back): weeks and months in a test."""
        if market_ms < 0:
            raise ValueError("the market clock does not go back")
        self._t0 -= market_ms / (1000.0 * self.speed)


@dataclass(frozen=True, slots=True, kw_only=True)
class FirehoseConfig:
    """A paced flood of kline frames for benchmarks, instead of the market clock.

    Each subscribed series advances one frame at a time, round-robin over all subscribed
    series, at ``rate`` frames per second in total (counting one frame per subscriber), or
    as fast as the clients read when ``rate`` is ``None``. Each candle takes
    ``round(1 / close_ratio)`` frames: with ``close_ratio=1.0`` every frame is a closing
    (``"x": true``) frame of a new candle, with ``0.25`` three updates precede each close.

    In this mode ``"E"`` is the wall-clock time (``time.time_ns() // 1_000_000``) at which
    the frame was built, so a consumer can compute freshness end to end; candle times still
    come from the deterministic market, advancing far faster than real time. With
    ``record_send_times`` the emulator also keeps, for each closing frame, the
    ``time.time_ns()`` at which it was queued, keyed by ``(stream name, candle open time)``.
    """

    rate: float | None = None
    close_ratio: float = 1.0
    record_send_times: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.close_ratio <= 1:
            raise ValueError("close_ratio must be in (0, 1]")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive or None")


class _Publisher:
    def __init__(self, market: Market) -> None:
        self.market = market
        self.subs: dict[StreamKey, dict[Subscriber, None]] = {}
        self.subscriptions_changed = Signal()
        self.progress = Signal()
        # b'{"stream":"<name>","data":' per series, built once
        self._prefixes: dict[StreamKey, bytes] = {}

    def add(self, key: StreamKey, conn: Subscriber) -> None:
        """Start sending ``key``'s frames to ``conn``."""
        self.subs.setdefault(key, {})[conn] = None
        self.subscriptions_changed.notify()

    def remove(self, key: StreamKey, conn: Subscriber) -> None:
        """Stop sending ``key``'s frames to ``conn``."""
        conns = self.subs.get(key)
        if conns is not None:
            conns.pop(conn, None)
            if not conns:
                del self.subs[key]
            self.subscriptions_changed.notify()

    def _fan_out(
        self, key: StreamKey, event_time: int, kline: Kline, conns: dict[Subscriber, None]
    ) -> None:
        # The hot path of the firehose: each form is encoded and framed at most once per frame.
        raw = wire.kline_payload(event_time, kline)
        framed = wrapped = b""
        in_micros: list[Subscriber] | None = None
        for conn in conns:
            if conn.micros:
                if in_micros is None:
                    in_micros = []
                in_micros.append(conn)
            elif conn.combined:
                if not wrapped:
                    prefix = self._prefixes.get(key) or self._prefix(key)
                    wrapped = wire.text_frame(prefix + raw + b"}")
                conn.push_kline(framed, wrapped)
            else:
                if not framed:
                    framed = wire.text_frame(raw)
                conn.push_kline(framed, wrapped)
        if in_micros:
            raw = wire.kline_payload_us(event_time, kline)
            framed = wrapped = b""
            for conn in in_micros:
                if conn.combined:
                    wrapped = wrapped or wire.text_frame(self._prefix(key) + raw + b"}")
                else:
                    framed = framed or wire.text_frame(raw)
                conn.push_kline(framed, wrapped)

    def _prefix(self, key: StreamKey) -> bytes:
        prefix = self._prefixes.get(key)
        if prefix is None:
            prefix = self._prefixes[key] = wire.combined(stream_name(key), b"")[:-1]
        return prefix


class Publisher(Protocol):
    """What both publishers offer to connections, the history method and the handle."""

    market: Market
    progress: Signal

    def add(self, key: StreamKey, conn: Subscriber) -> None: ...

    def remove(self, key: StreamKey, conn: Subscriber) -> None: ...

    def closed_count(self, key: StreamKey) -> int:
        """How many candles of ``key``, from candle 0, have been published closed."""
        ...

    def in_progress(self, key: StreamKey) -> tuple[int, int] | None:
        """``(index, ms of trading shown)`` of the published open candle, if any."""
        ...

    async def wait_closed(self, key: StreamKey, count: int) -> None:
        """Return once ``count`` candles of ``key`` are closed and their frames queued."""
        ...

    def now_ms(self) -> int:
        """The time to put in events that are not klines (``serverShutdown`` etc.)."""
        ...

    async def run(self) -> None:
        """Publish until cancelled."""
        ...


class ClockPublisher(_Publisher):
    """Publishes on the market clock, as Binance does.

    For a candle of a series with update period ``P`` (1000 ms for ``1s``, else 2000 ms) the
    state "as of" each market instant ``a`` that is a multiple of ``P`` is sent at
    ``a + phase + close_lag_ms``, with that as ``"E"``. When ``a`` is a candle boundary the
    frame is the closing (``"x": true``) frame of the candle that just ended; otherwise it is
    an update of the current candle (so ``1s`` series only ever send closing frames, and a
    ``1m`` candle gets 29 updates and one close).

    ``phase`` is 0 unless ``spread``: then each series has its own, a stable hash of its
    stream name in steps of 10 ms within its period, so thousands of series do not all send
    in the same instant (Binance's frames for different symbols are not aligned either).
    With ``updates=False`` only closing frames are sent. Symbols with a listing schedule
    (``Market.windows``) send the frames as of ``listed < a <= delisted`` only.
    """

    def __init__(
        self,
        market: Market,
        clock: MarketClock,
        close_lag_ms: int,
        *,
        spread: bool = False,
        updates: bool = True,
        record_send_times: bool = False,
    ) -> None:
        super().__init__(market)
        #: With ``record_send_times``: ``time.time_ns()`` at which each closing frame was
        #: queued, keyed by ``(stream name, candle open time)`` (freshness benchmarks).
        self.send_times: dict[tuple[str, int], int] | None = {} if record_send_times else None
        self.clock = clock
        self.lag = close_lag_ms
        self.spread = spread
        self.updates = updates
        self._grain = 10 if spread else 1000
        self._phases: dict[StreamKey, int] = {}
        # Subscribed series by due instant within their period: (phase of 1s, phase of the
        # others) -> series; a tick looks up only the series due then.
        self._due_1s: dict[int, dict[StreamKey, None]] = {}
        self._due_2s: dict[int, dict[StreamKey, None]] = {}
        self._cursor = self._due_now()

    def now_ms(self) -> int:
        return self.clock.now_ms()

    def phase(self, key: StreamKey) -> int:
        """Market ms between an as-of instant of ``key`` and its frame (before the lag)."""
        if not self.spread:
            return 0
        phase = self._phases.get(key)
        if phase is None:
            slots = iv.update_period_ms(key[1]) // self._grain
            phase = zlib.crc32(stream_name(key).encode()) % slots * self._grain
            self._phases[key] = phase
        return phase

    def add(self, key: StreamKey, conn: Subscriber) -> None:
        if not self.subs:
            # Nobody missed the instants that passed while idle; those after this first
            # subscription are due, even if this task runs only after the clock moved on.
            self._cursor = self._due_now()
        if key not in self.subs:
            due = self._due_1s if key[1] == "1s" else self._due_2s
            due.setdefault(self.phase(key), {})[key] = None
        super().add(key, conn)

    def advance(self, market_ms: int) -> None:
        """Jump the market clock; the instants skipped are published at once, condensed
        (every closing frame, then the latest update of each series)."""
        self.clock.advance(market_ms)
        self.subscriptions_changed.notify()

    def remove(self, key: StreamKey, conn: Subscriber) -> None:
        super().remove(key, conn)
        if key not in self.subs:
            due = self._due_1s if key[1] == "1s" else self._due_2s
            phase = self.phase(key)
            keys = due.get(phase)
            if keys is not None:
                keys.pop(key, None)
                if not keys:
                    del due[phase]

    def _due_now(self) -> int:
        return (self.clock.now_ms() - self.lag) // self._grain * self._grain

    def _as_of(self, key: StreamKey) -> int:
        """The last as-of instant of ``key`` whose frame is due, clamped to its delisting."""
        period = iv.update_period_ms(key[1])
        a = (self.clock.now_ms() - self.lag - self.phase(key)) // period * period
        window = self.market.windows.get(key[0])
        return a if window is None else min(a, window[1])

    def closed_count(self, key: StreamKey) -> int:
        return max(0, self.market.index_at(key[1], self._as_of(key)))

    def in_progress(self, key: StreamKey) -> tuple[int, int] | None:
        interval = key[1]
        a = self._as_of(key)
        index = self.market.index_at(interval, a)
        if index < self.market.first_index(key[0], interval):
            return None
        shown = a - self.market.open_time(interval, index)
        window = self.market.windows.get(key[0])
        if window is not None and (a <= window[0] or (a == window[1] and shown == 0)):
            return None  # not listed yet, or delisted as this candle opened
        return index, shown

    async def wait_closed(self, key: StreamKey, count: int) -> None:
        closes_at = self.market.open_time(key[1], count)
        due = closes_at + self.phase(key)
        await trio.sleep_until(self.clock.deadline(due + self.lag))
        while self._cursor < due and key in self.subs:
            await self.progress.wait()

    async def run(self) -> None:
        grain = self._grain
        while True:
            if not self.subs:
                self._cursor = self._due_now()
                self.progress.notify()
                await self.subscriptions_changed.wait()
                continue
            nxt = self._next_due()
            with trio.move_on_at(self.clock.deadline(nxt + self.lag)) as scope:
                await self.subscriptions_changed.wait()
            if not scope.cancelled_caught:
                continue  # the subscriptions changed: the next due instant may have too
            # The deadline has passed, so ``nxt`` is due even if float rounding says not.
            upto = max(self._due_now(), nxt)
            if upto - nxt > _JUMP_MS:
                # A clock jump: closing frames are what matters, and there may be millions
                # of skipped update instants.
                self._publish_jump(nxt, upto)
                self._cursor = upto
                self.progress.notify()
                continue
            done = 0
            for t in range(nxt, upto + 1, grain):
                done += self._publish(t)
                self._cursor = t
                if done >= 2048:
                    # Catching up, or a burst of thousands of series: let others run.
                    done = 0
                    self.progress.notify()
                    await trio.lowlevel.checkpoint()
            self.progress.notify()

    def _publish_jump(self, first: int, last: int) -> None:
        """Every closing frame due in ``[first, last]``, then each series' latest update."""
        market = self.market
        for key, conns in list(self.subs.items()):
            symbol, interval = key
            phase = self.phase(key)
            low, high = first - phase, last - phase  # as-of instants of this series
            window = market.windows.get(symbol)
            listed, delisted = window if window is not None else (-(1 << 62), 1 << 62)
            index = max(1, market.index_at(interval, low))
            if market.open_time(interval, index) < low:
                index += 1
            while (opened := market.open_time(interval, index)) <= high:
                if listed < opened <= delisted:
                    kline = market.kline(symbol, interval, index - 1)
                    self._fan_out(key, opened + phase + self.lag, kline, conns)
                index += 1
            period = iv.update_period_ms(interval)
            a = high // period * period
            index = market.index_at(interval, a)
            opened = market.open_time(interval, index)
            if self.updates and a >= low and index >= 0 and a != opened and listed < a <= delisted:
                kline = market.kline(symbol, interval, index, a - opened)
                self._fan_out(key, a + phase + self.lag, kline, conns)

    def _next_due(self) -> int:
        """The first instant after the cursor at which some series is due."""
        if not self.spread:
            step = 1000 if self._due_1s else 2000
            return (self._cursor // step + 1) * step
        t = self._cursor + self._grain
        for _ in range(2000 // self._grain):
            if t % 1000 in self._due_1s or t % 2000 in self._due_2s:
                return t
            t += self._grain
        return t

    def _publish(self, t: int) -> int:
        """Send what is due at ``t`` (before the lag); returns how many series sent."""
        sent = 0
        keys = self._due_1s.get(t % 1000)
        if keys:
            sent += self._publish_keys(t, list(keys))
        keys = self._due_2s.get(t % 2000)
        if keys:
            sent += self._publish_keys(t, list(keys))
        return sent

    def _publish_keys(self, t: int, keys: list[StreamKey]) -> int:
        market = self.market
        windows = market.windows
        subs = self.subs
        updates = self.updates
        event_time = t + self.lag
        sent = 0
        for key in keys:
            conns = subs.get(key)
            if not conns:
                continue
            symbol, interval = key
            a = t - self.phase(key) if self.spread else t
            window = windows.get(symbol) if windows else None
            if window is not None and not window[0] < a <= window[1]:
                continue
            index = market.index_at(interval, a)
            opened = market.open_time(interval, index)
            if a == opened:
                if index <= 0:
                    continue  # the candle before the market opened does not exist
                kline = market.kline(symbol, interval, index - 1)
                if self.send_times is not None:
                    self.send_times[(stream_name(key), kline.open_time)] = time.time_ns()
            else:
                if index < 0 or not updates:
                    continue
                kline = market.kline(symbol, interval, index, a - opened)
            self._fan_out(key, event_time, kline, conns)
            sent += 1
        return sent


class FirehosePublisher(_Publisher):
    """Publishes as a paced flood for benchmarks; see :class:`FirehoseConfig`."""

    _BATCH = 256
    _HIGH_WATER = 256 * 1024

    def __init__(self, market: Market, config: FirehoseConfig) -> None:
        super().__init__(market)
        self.config = config
        self.frames_per_candle = max(1, round(1 / config.close_ratio))
        self.steps: dict[StreamKey, int] = {}
        self.send_times: dict[tuple[str, int], int] = {}
        self.frames_sent = 0
        self._rate = config.rate
        self._t0 = trio.current_time()
        self._paced = 0
        self._rr = 0

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def set_rate(self, rate: float | None) -> None:
        """Change the total rate (frames per second; ``None``: as fast as possible)."""
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive or None")
        self._rate = rate
        self._t0 = trio.current_time()
        self._paced = 0

    def closed_count(self, key: StreamKey) -> int:
        return self.steps.get(key, 0) // self.frames_per_candle

    def in_progress(self, key: StreamKey) -> tuple[int, int] | None:
        index, j = divmod(self.steps.get(key, 0), self.frames_per_candle)
        if j == 0:
            return None
        opened = self.market.open_time(key[1], index)
        length = iv.next_open(key[1], opened) - opened
        return index, length * j // self.frames_per_candle

    async def wait_closed(self, key: StreamKey, count: int) -> None:
        while self.closed_count(key) < count:
            await self.progress.wait()

    async def run(self) -> None:
        while True:
            if not self.subs:
                await self.subscriptions_changed.wait()
                continue
            budget = self._BATCH
            rate = self._rate
            if rate is not None:
                now = trio.current_time()
                allowed = int((now - self._t0) * rate) - self._paced
                if allowed <= 0:
                    await trio.sleep_until(self._t0 + (self._paced + 1) / rate)
                    continue
                if allowed > rate / 4 + self._BATCH:
                    # Fell far behind (a slow reader): don't make up for it in one burst.
                    self._t0 = now - self._paced / rate
                    allowed = self._BATCH
                budget = min(allowed, 4 * self._BATCH)
            touched = self._emit(budget)
            self._paced += budget
            self.progress.notify()
            for conn in touched:
                if conn.buffered() > self._HIGH_WATER:
                    await conn.wait_buffered_below(self._HIGH_WATER)
            await trio.lowlevel.checkpoint()

    def _emit(self, budget: int) -> list[Subscriber]:
        market = self.market
        per_candle = self.frames_per_candle
        record = self.config.record_send_times
        keys = list(self.subs)
        touched: dict[Subscriber, None] = {}
        delivered = 0
        while delivered < budget:
            key = keys[self._rr % len(keys)]
            self._rr += 1
            conns = self.subs.get(key)
            if not conns:
                continue
            symbol, interval = key
            step = self.steps.get(key, 0)
            self.steps[key] = step + 1
            index, j = divmod(step, per_candle)
            if j + 1 == per_candle:
                kline = market.kline(symbol, interval, index)
            else:
                opened = market.open_time(interval, index)
                length = iv.next_open(interval, opened) - opened
                kline = market.kline(symbol, interval, index, length * (j + 1) // per_candle)
            sent_ns = time.time_ns()
            self._fan_out(key, sent_ns // 1_000_000, kline, conns)
            if record and kline.closed:
                self.send_times[(stream_name(key), kline.open_time)] = sent_ns
            delivered += len(conns)
            touched.update(conns)
        self.frames_sent += delivered
        return list(touched)
