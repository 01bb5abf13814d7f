"""Where each stream left off: the last closed candle already in `KAFKA_TOPIC`.

A restarted or evicted Job resumes after it, so it neither repeats nor skips; a resume point
however old is still a resume point, and the hole after it beyond `BACKFILL_WINDOW` is reported,
not skipped in silence. Each partition is read backwards from its end, in chunks that grow as
the scan goes deeper, until every stream this run carries whose key lives there is found, or
down to the partition's first record (a stream never written starts from its first candle).

Each partition has its own budget, `PARTITION_BUDGET` seconds of reading, so one deep partition
cannot leave the others unread. A stream still not found when its partition's budget runs out
has an unknown resume point: it starts from its first candle, and is reported as a hole of
unknown size (an error log, a `hole:` telemetry event; a `STOP_AT` run over it does not end
`finished`). The scan stops within a poll (a fifth of a second) when asked to.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from kafka import KafkaConsumer, TopicPartition
from kafka.partitioner.default import murmur2

from loader.kafka import CLOSE_TIMEOUT, open_consumer
from loader.settings import Settings

log = logging.getLogger(__name__)

# Records of the first chunk read back from a partition's end; each deeper chunk is twice as
# long, up to MAX_CHUNK: the newest records find most streams at once, and a deep search reads
# big chunks, so it costs few seeks.
CHUNK = 2000
MAX_CHUNK = 128_000
POLL_MS = 200
# Seconds of reading each partition may take: about 2.5 million records of a stream not looked
# for (40,000 a second on a busy 2-core machine), the depth a stream never written costs.
PARTITION_BUDGET = 60.0


class ResumeCancelled(Exception):
    """The run was stopped while the topic was being read."""


class _Published(msgspec.Struct):
    open_time: int
    is_closed: bool = True


@dataclasses.dataclass(frozen=True)
class Found:
    """What the scan found: the newest closed candle's open time per key, and the keys whose
    partition's budget ran out before they were found (their resume point is unknown)."""

    points: dict[bytes, int]
    unknown: frozenset[bytes]


def last_closed(
    consumer: KafkaConsumer,
    topic: str,
    keys: Iterable[bytes],
    *,
    stop: threading.Event | None = None,
    budget: float = PARTITION_BUDGET,
) -> Found:
    """Blocking: open time of the newest closed candle per key, for the keys the topic holds;
    each partition is read back at most `budget` seconds."""
    stop = stop or threading.Event()
    found: dict[bytes, int] = {}
    unknown: set[bytes] = set()
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    keys = list(keys)
    if not tps or not keys:
        return Found(found, frozenset())
    # Each key lives on one partition (the default partitioner, as the sink uses): a
    # partition is read only as deep as its own keys need.
    homes: dict[TopicPartition, set[bytes]] = {}
    for key in keys:
        homes.setdefault(tps[(murmur2(key) & 0x7FFFFFFF) % len(tps)], set()).add(key)
    beginnings = consumer.beginning_offsets(list(homes))
    ends = consumer.end_offsets(list(homes))
    for tp, wanted in homes.items():
        floor, upper, chunk = beginnings[tp], ends[tp], CHUNK
        deadline = time.monotonic() + budget
        while upper > floor and (missing := wanted - found.keys()):
            lower = max(floor, upper - chunk)
            try:
                _read(consumer, tp, lower, upper, keys=missing, found=found, stop=stop,
                      deadline=deadline)  # fmt: skip
            except TimeoutError:
                unknown |= missing
                names = sorted(k.decode() for k in missing)
                shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" * (len(names) > 5))
                log.error(
                    "resume points of %d streams not found within %.0f s of reading partition "
                    "%d of %s back to offset %d (its first is %d): %s; they start from their "
                    "first candle, each after a hole of unknown size",
                    len(missing), budget, tp.partition, topic, lower, floor, shown,
                )  # fmt: skip
                break
            upper, chunk = lower, min(2 * chunk, MAX_CHUNK)
    return Found(found, frozenset(unknown))


def _read(
    consumer: KafkaConsumer,
    tp: TopicPartition,
    lower: int,
    upper: int,
    *,
    keys: set[bytes],
    found: dict[bytes, int],
    stop: threading.Event,
    deadline: float,
) -> None:
    """Read offsets `[lower, upper)` of `tp`, keeping in `found` the newest closed candle of
    each of `keys` (one poll's records in memory at a time)."""
    decode = msgspec.json.Decoder(_Published).decode
    consumer.assign([tp])
    consumer.seek(tp, lower)
    while consumer.position(tp) < upper:
        if stop.is_set():
            raise ResumeCancelled("stopped while reading the resume points")
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading the resume points of {tp.topic} timed out")
        batch: list[Any] = consumer.poll(timeout_ms=POLL_MS, max_records=CHUNK).get(tp, [])
        for record in batch:
            if record.offset >= upper or record.key not in keys:
                continue
            try:
                candle = decode(record.value)
            except msgspec.DecodeError:
                continue
            if candle.is_closed and candle.open_time > found.get(record.key, -1):
                found[record.key] = candle.open_time


@dataclasses.dataclass(frozen=True)
class Resume:
    """Per (SYMBOL, interval): the open time of its last closed candle in the topic; and the
    streams whose resume point could not be found within their partition's budget."""

    points: dict[tuple[str, str], int]
    unknown: tuple[tuple[str, str], ...] = ()


def resume_points(
    settings: Settings,
    stop: threading.Event | None = None,
    *,
    streams: Iterable[tuple[str, str]] | None = None,
    budget: float | None = None,
) -> Resume:
    """Blocking: where each of `streams` (by default the named ones) left off in the topic,
    reading each partition at most `budget` seconds (by default `PARTITION_BUDGET`)."""
    budget = PARTITION_BUDGET if budget is None else budget
    wanted = settings.streams if streams is None else streams
    keys = {f"{s}-{i}".encode(): (s, i) for s, i in wanted}
    consumer = open_consumer(settings.kafka, timeout=30.0)
    log.info("reading %s back to where %d streams left off", settings.kafka_topic, len(keys))
    try:
        found = last_closed(consumer, settings.kafka_topic, keys, stop=stop, budget=budget)
    finally:
        consumer.close(autocommit=False, timeout_ms=int(CLOSE_TIMEOUT * 1000))
    log.info("resuming %d of %d streams from the topic", len(found.points), len(keys))
    return Resume(
        {keys[key]: open_time for key, open_time in found.points.items()},
        tuple(keys[key] for key in keys if key in found.unknown),
    )
