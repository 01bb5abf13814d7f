"""The independent consumer: what Kafka holds, seen from a process of its own.

Two modes, both on every partition of one topic, with no consumer group:

``records``  reads every record from the beginning and notes, per poll, the wall-clock time
             (``time.time_ns()``) at which it got them, and the record's CreateTime (ms, set by the
             producer in ``send``): ``[[key, open_time, recv_ns, create_ms], ...]``.
``offsets``  samples the sum of the end offsets every ``--every`` seconds:
             ``[[time_ns, records], ...]`` — throughput without reading (cheap on 2 cores).

It prints ``ready`` once positioned, ``first <time_ns>`` when it first sees a record, and
obeys stdin: ``finish`` (read up to the end offsets of that moment, write ``--out``, print
``done <count>`` and exit). EOF on stdin or SIGTERM ends it without writing.

    python -m bench.consumer records --bootstrap 127.0.0.1:19092 --topic t --out r.json
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import Any

import msgspec
from kafka import KafkaConsumer, TopicPartition

POLL_MS = 20


class _OpenTime(msgspec.Struct):
    open_time: int


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("records", "offsets"))
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--out", required=True, help="where `finish` writes the JSON result")
    p.add_argument("--every", type=float, default=0.05, help="offsets: sampling period, s")
    return p.parse_args()


def _commands(finish: threading.Event) -> None:
    for line in sys.stdin:
        if line.strip() == "finish":
            finish.set()
    os.kill(os.getpid(), signal.SIGTERM)  # the orchestrator is gone: so are we


def _assign(consumer: KafkaConsumer, topic: str) -> list[Any]:
    deadline = time.monotonic() + 30
    while not (partitions := consumer.partitions_for_topic(topic)):
        if time.monotonic() > deadline:
            raise SystemExit(f"consumer: topic {topic!r} does not exist")
        time.sleep(0.05)
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    for tp in tps:
        consumer.position(tp)  # resolve now, not on the first poll
    return tps


def _records(consumer: KafkaConsumer, tps: list[Any], finish: threading.Event) -> list[Any]:
    decode = msgspec.json.Decoder(_OpenTime).decode
    rows: list[tuple[str, int, int, int]] = []
    ends: dict[Any, int] | None = None
    while True:
        if ends is None and finish.is_set():
            ends = consumer.end_offsets(tps)
        if ends is not None and all(consumer.position(tp) >= ends[tp] for tp in tps):
            return rows
        batches = consumer.poll(timeout_ms=POLL_MS)
        now = time.time_ns()
        for records in batches.values():
            if not rows and records:
                print(f"first {now}", flush=True)
            for r in records:
                rows.append((r.key.decode(), decode(r.value).open_time, now, r.timestamp))


def _offsets(
    consumer: KafkaConsumer, tps: list[Any], finish: threading.Event, every: float
) -> list[Any]:
    rows: list[tuple[int, int]] = []
    seen = False
    next_at = time.monotonic()
    while not finish.is_set():
        now = time.time_ns()
        total = sum(consumer.end_offsets(tps).values())
        rows.append((now, total))
        if total and not seen:
            seen = True
            print(f"first {now}", flush=True)
        next_at += every
        finish.wait(max(0.0, next_at - time.monotonic()))
    return rows


def main() -> int:
    args = _args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    finish = threading.Event()
    threading.Thread(target=_commands, args=(finish,), daemon=True).start()
    consumer = KafkaConsumer(
        bootstrap_servers=args.bootstrap,
        group_id=None,
        enable_auto_commit=False,
        # Answer as soon as one record is there: the fetch wait must not count as latency.
        fetch_min_bytes=1,
        fetch_max_wait_ms=100,
        max_poll_records=10_000,
    )
    try:
        tps = _assign(consumer, args.topic)
        print("ready", flush=True)
        if args.mode == "records":
            rows = _records(consumer, tps, finish)
        else:
            rows = _offsets(consumer, tps, finish, args.every)
        with open(args.out, "wb") as out:
            out.write(msgspec.json.encode(rows))
        print(f"done {len(rows)}", flush=True)
    finally:
        consumer.close(autocommit=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
