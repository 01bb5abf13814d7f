"""Counters the tasks bump on their hot paths; metrics and telemetry read them, never the reverse.

Plain integers, not Prometheus objects: an increment here is an attribute store, and the
exporter turns them into samples only when scraped.
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
    control_ignored: int = 0
    # Closed candles that can no longer be had (beyond BACKFILL_WINDOW, or absent from
    # history): each hole is also logged and reported in telemetry.
    candles_lost: int = 0
    holes: int = 0
    # Frames a replacement connection buffered and never published (it died first, or its
    # buffer overflowed); held candles shed during a long fill. Their gaps are filled.
    pending_dropped: int = 0
    held_evicted: int = 0
    fills_started: int = 0
    history_connections: int = 0
    history_errors: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    last_frame_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def unacknowledged(self) -> int:
        return self.candles_handed - self.candles_acknowledged

    def frame_age(self) -> float:
        return time.monotonic() - self.last_frame_at
