"""Where each stream left off: the last closed candle already in `KAFKA_TOPIC`.

A restarted or evicted Job resumes after it, so it neither repeats nor skips. Each partition
is read backwards from its end in chunks until every stream's key is found, and no further
back than each stream needs: `BACKFILL_WINDOW` plus two of its intervals (a weekly stream's
last candle may have been written days ago; a 1s stream's a moment ago). A resume point older
than the window is still a resume point: the hole after it is reported, not skipped in
silence. The scan is bounded in time and stops within a poll (half a second) when asked to.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from loader.intervals import length_ms
from loader.kafka import CLOSE_TIMEOUT, offsets_since, open_consumer
from loader.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 2000
POLL_MS = 200
SCAN_TIMEOUT = 60.0


class ResumeCancelled(Exception):
    """The run was stopped while the topic was being read."""


class _Published(msgspec.Struct):
    open_time: int
    is_closed: bool = True


def last_closed(
    consumer: KafkaConsumer,
    topic: str,
    floors: Mapping[bytes, int],
    *,
    stop: threading.Event | None = None,
    timeout: float = SCAN_TIMEOUT,
) -> dict[bytes, int]:
    """Blocking: open time of the newest closed candle per key, for the keys found; a key is
    looked for down to its floor (a record timestamp, epoch ms)."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    found: dict[bytes, int] = {}
    decode = msgspec.json.Decoder(_Published).decode
    lowest = min(floors.values(), default=0)
    offsets = offsets_since(consumer, topic, lowest)
    # Each key lives on one partition (the default partitioner, as the sink uses): a
    # partition is read only as deep as its own keys need.
    tps = sorted(offsets, key=lambda tp: tp.partition)
    home = {key: tps[(murmur2(key) & 0x7FFFFFFF) % len(tps)] for key in floors} if tps else {}
    for tp, (floor, end) in offsets.items():
        upper = end
        while upper > floor:
            missing = [k for k in floors if k not in found and home[k] == tp]
            if not missing:
                break
            lower = max(floor, upper - CHUNK)
            try:
                records = _read(consumer, tp, lower, upper, stop=stop, deadline=deadline)
            except TimeoutError:
                # Failing would fail every retry the same way: the streams not found start
                # from their first candle, and say so.
                lost = [k.decode() for k in floors if k not in found]
                log.error(
                    "no resume point found within %.0f s for %d streams (%s); they start from "
                    "their first candle, and what they missed before it is not filled",
                    timeout, len(lost), ", ".join(lost[:5]),
                )  # fmt: skip
                return found
            for record in records:
                if record.key not in floors:
                    continue
                try:
                    candle = decode(record.value)
                except msgspec.DecodeError:
                    continue
                if candle.is_closed and candle.open_time > found.get(record.key, -1):
                    found[record.key] = candle.open_time
            upper = lower
            # Deeper than any stream still missing needs: the rest of this partition is
            # too old to resume from.
            oldest = min((r.timestamp for r in records), default=None)
            if oldest is not None and all(oldest < floors[k] for k in missing):
                break
    return found


def _read(
    consumer: KafkaConsumer,
    tp: TopicPartition,
    lower: int,
    upper: int,
    *,
    stop: threading.Event,
    deadline: float,
) -> list[Any]:
    consumer.assign([tp])
    consumer.seek(tp, lower)
    records: list[Any] = []
    while consumer.position(tp) < upper:
        if stop.is_set():
            raise ResumeCancelled("stopped while reading the resume points")
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading the resume points of {tp.topic} timed out")
        batch = consumer.poll(timeout_ms=POLL_MS, max_records=CHUNK)
        records.extend(r for r in batch.get(tp, []) if r.offset < upper)
    return records


def resume_points(
    settings: Settings,
    stop: threading.Event | None = None,
    *,
    streams: Iterable[tuple[str, str]] | None = None,
) -> dict[tuple[str, str], int]:
    """Blocking: the last closed candle's open time per (SYMBOL, interval) found in the topic
    (of `streams`, by default the named ones)."""
    wanted = settings.streams if streams is None else streams
    keys = {f"{s}-{i}".encode(): (s, i) for s, i in wanted}
    now_ms = int(time.time() * 1000)
    window_ms = int(settings.backfill_window * 1000)
    floors = {key: now_ms - window_ms - 2 * length_ms(i) for key, (_, i) in keys.items()}
    consumer = open_consumer(settings.kafka, timeout=30.0)
    log.info("reading %s back to where %d streams left off", settings.kafka_topic, len(keys))
    try:
        found = last_closed(consumer, settings.kafka_topic, floors, stop=stop)
    finally:
        consumer.close(autocommit=False, timeout_ms=int(CLOSE_TIMEOUT * 1000))
    log.info("resuming %d of %d streams from the topic", len(found), len(keys))
    return {keys[key]: open_time for key, open_time in found.items()}
