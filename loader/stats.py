"""Counters the tasks bump on their hot paths; metrics and telemetry read them, never the reverse.

Plain integers, not Prometheus objects: an increment here is an attribute store, and the
exporter turns them into samples only when scraped. Only Trio tasks write them (one exception,
`candles_handed`, is one integer the sending thread owns), so a copy taken on the Trio thread
(`snapshot`) is consistent and safe to read from any other thread.
"""

from __future__ import annotations

import collections
import dataclasses
import time


@dataclasses.dataclass
class Stats:
    frames_received: int = 0
    candles_received: int = 0
    candles_published: int = 0
    candles_backfilled: int = 0
    # Handed is bumped only by the sending thread, acknowledged only by Trio: no shared write.
    candles_handed: int = 0
    candles_acknowledged: int = 0
    last_ack_at: float = dataclasses.field(default_factory=time.monotonic)
    duplicates_dropped: int = 0
    # In-progress updates not published because the pipeline was full (CANDLES=all).
    updates_shed: int = 0
    malformed: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    reconnects: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    # Kline frames the door refused (loader/plausibility.py), by reason.
    frames_refused: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    control_ignored: int = 0
    # Closed candles that can no longer be had (beyond BACKFILL_WINDOW, or absent from
    # history): each hole is also logged and reported in telemetry.
    candles_lost: int = 0
    holes: int = 0
    # Symbols Binance does not know, dropped (their streams with them); the rest go on.
    symbols_dropped: int = 0
    # Frames a replacement connection buffered and never published (it died first, or its
    # buffer overflowed); held candles shed during a long fill. Their gaps are filled.
    pending_dropped: int = 0
    held_evicted: int = 0
    # Batches Kafka took longer than sink.SLOW_WRITE to acknowledge (each logged), and when
    # the oldest unacknowledged batch was handed to kafka-python (None: none waits).
    slow_writes: int = 0
    kafka_waiting_since: float | None = None
    fills_started: int = 0
    history_connections: int = 0
    history_errors: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    last_frame_at: float = dataclasses.field(default_factory=time.monotonic)
    # When the Binance connection last answered a ping of ours: life without data, which is
    # all a symbol that does not trade shows.
    last_alive_at: float = dataclasses.field(default_factory=time.monotonic)
    # When the first connection to Binance was attempted: liveness counts from there, not
    # from the process's start, so a slow start (Kafka, the resume scan, exchangeInfo
    # retries) is not taken for a dead connection. None until then.
    connecting_since: float | None = None

    def connecting(self) -> None:
        """The first connection attempt is about to be made (later calls change nothing)."""
        if self.connecting_since is None:
            self.connecting_since = time.monotonic()

    @property
    def unacknowledged(self) -> int:
        return self.candles_handed - self.candles_acknowledged

    def frame_age(self) -> float:
        return time.monotonic() - self.last_frame_at

    def alive_age(self) -> float:
        """Seconds since the connection last showed life (a frame or an answered ping), or
        since the first connection attempt; 0 before it."""
        if self.connecting_since is None:
            return 0.0
        return time.monotonic() - max(self.last_frame_at, self.last_alive_at, self.connecting_since)

    def stuck_age(self) -> float:
        """Seconds Kafka has acknowledged nothing, counted as `alive_age` is: candles are
        handed to Kafka only once Binance is connected."""
        if self.connecting_since is None:
            return 0.0
        return time.monotonic() - max(self.last_ack_at, self.connecting_since)

    def kafka_wait(self) -> float:
        """Seconds the oldest unacknowledged batch has waited for Kafka; 0 when none waits."""
        since = self.kafka_waiting_since
        return 0.0 if since is None else time.monotonic() - since

    def ack_age(self) -> float:
        """Seconds since Kafka last acknowledged a candle: how stale the topic is."""
        return time.monotonic() - self.last_ack_at

    def snapshot(self) -> StatsSnapshot:
        """A copy of every value at one instant. Call it on the Trio thread: the Counters gain
        keys there, and iterating one from another thread meanwhile can fail."""
        return StatsSnapshot(
            frames_received=self.frames_received,
            candles_received=self.candles_received,
            candles_published=self.candles_published,
            candles_backfilled=self.candles_backfilled,
            candles_acknowledged=self.candles_acknowledged,
            duplicates_dropped=self.duplicates_dropped,
            updates_shed=self.updates_shed,
            control_ignored=self.control_ignored,
            malformed=dict(self.malformed),
            reconnects=dict(self.reconnects),
            frames_refused=dict(self.frames_refused),
            candles_lost=self.candles_lost,
            holes=self.holes,
            symbols_dropped=self.symbols_dropped,
            pending_dropped=self.pending_dropped,
            held_evicted=self.held_evicted,
            slow_writes=self.slow_writes,
            kafka_wait=self.kafka_wait(),
            fills_started=self.fills_started,
            history_connections=self.history_connections,
            history_errors=dict(self.history_errors),
            frame_age=self.frame_age(),
            alive_age=self.alive_age(),
            ack_age=self.ack_age(),
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatsSnapshot:
    """`Stats` frozen at one instant, ages already computed."""

    frames_received: int
    candles_received: int
    candles_published: int
    candles_backfilled: int
    candles_acknowledged: int
    duplicates_dropped: int
    updates_shed: int
    control_ignored: int
    malformed: dict[str, int]
    reconnects: dict[str, int]
    frames_refused: dict[str, int]
    candles_lost: int
    holes: int
    symbols_dropped: int
    pending_dropped: int
    held_evicted: int
    slow_writes: int
    kafka_wait: float
    fills_started: int
    history_connections: int
    history_errors: dict[str, int]
    frame_age: float
    alive_age: float
    ack_age: float
