"""Where each stream left off: the last closed candle already in `KAFKA_TOPIC`.

A restarted or evicted Job resumes after it, so it neither repeats nor skips. The topic is read
backwards from its end in chunks, and no further back than the backfill window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from kafka import KafkaConsumer, TopicPartition

from loader.kafka import CLOSE_TIMEOUT, offsets_since, open_consumer
from loader.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 2000
POLL_MS = 500


class _Published(msgspec.Struct):
    open_time: int
    is_closed: bool = True


def last_closed(
    consumer: KafkaConsumer, topic: str, keys: Iterable[bytes], not_before_ms: int
) -> dict[bytes, int]:
    """Blocking: open time of the newest closed candle per key, for the keys found."""
    wanted = set(keys)
    found: dict[bytes, int] = {}
    decode = msgspec.json.Decoder(_Published).decode
    for tp, (floor, end) in offsets_since(consumer, topic, not_before_ms).items():
        upper = end
        while upper > floor and not wanted <= found.keys():
            lower = max(floor, upper - CHUNK)
            for record in _read(consumer, tp, lower, upper):
                if record.key not in wanted:
                    continue
                try:
                    candle = decode(record.value)
                except msgspec.DecodeError:
                    continue
                if candle.is_closed and candle.open_time > found.get(record.key, -1):
                    found[record.key] = candle.open_time
            upper = lower
    return found


def _read(consumer: KafkaConsumer, tp: TopicPartition, lower: int, upper: int) -> list[Any]:
    consumer.assign([tp])
    consumer.seek(tp, lower)
    records: list[Any] = []
    deadline = time.monotonic() + 30
    while consumer.position(tp) < upper:
        if time.monotonic() > deadline:
            raise TimeoutError(f"reading {tp.topic}[{tp.partition}] {lower}..{upper} timed out")
        batch = consumer.poll(timeout_ms=POLL_MS, max_records=CHUNK)
        records.extend(r for r in batch.get(tp, []) if r.offset < upper)
    return records


def resume_points(settings: Settings) -> dict[tuple[str, str], int]:
    """Blocking: the last closed candle's open time per (SYMBOL, interval) found in the topic."""
    keys = {f"{s}-{i}".encode(): (s, i) for s, i in settings.streams}
    not_before_ms = int((time.time() - settings.backfill_window) * 1000)
    consumer = open_consumer(settings.kafka, timeout=30.0)
    try:
        found = last_closed(consumer, settings.kafka_topic, keys, not_before_ms)
    finally:
        consumer.close(autocommit=False, timeout_ms=int(CLOSE_TIMEOUT * 1000))
    return {keys[key]: open_time for key, open_time in found.items()}
