"""The control watcher: a stop command for our queue id on `QUEUE_CONTROL_TOPIC` ends the run.

There is no consumer group and nothing is committed: the Job is stateless, so the topic is read
from `control_lookback` ago, far enough back that a stop sent before this pod started (or
before a retried pod came back) still counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import trio
from kafka import KafkaConsumer, TopicPartition

from loader.kafka import aclose, open_consumer
from loader.logs import ThrottledLog
from loader.schema import ControlCommand
from loader.settings import Settings
from loader.stats import Stats

log = logging.getLogger(__name__)

POLL_MS = 200
TOPIC_RETRY = 2.0


def _assign(consumer: KafkaConsumer, topic: str, since_ms: int) -> bool:
    """Blocking: assign every partition of `topic`, positioned at `since_ms`."""
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        return False
    tps = [TopicPartition(topic, p) for p in sorted(partitions)]
    consumer.assign(tps)
    found = consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    ends = consumer.end_offsets(tps)
    for tp in tps:
        hit = found.get(tp)
        consumer.seek(tp, hit.offset if hit is not None else ends[tp])
    return True


async def watch_control(
    settings: Settings,
    stop: Callable[[str], None],
    stats: Stats,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report ready once positioned; call `stop` on the first stop command for our queue."""
    consumer = await trio.to_thread.run_sync(lambda: open_consumer(settings.kafka, timeout=30.0))
    decode = msgspec.json.Decoder(ControlCommand).decode
    bad = ThrottledLog(log)
    try:
        since_ms = int((time.time() - settings.control_lookback) * 1000)
        topic = settings.queue_control_topic
        # Readiness waits for the positioning when the topic exists; when it does not yet, a
        # stop published later is still read, from the lookback, once it appears.
        if await trio.to_thread.run_sync(_assign, consumer, topic, since_ms):
            task_status.started()
        else:
            task_status.started()
            log.warning("control topic %r does not exist yet; watching for it", topic)
            while True:
                await trio.sleep(TOPIC_RETRY)
                if await trio.to_thread.run_sync(_assign, consumer, topic, since_ms):
                    break
        while True:
            batches = await trio.to_thread.run_sync(lambda: consumer.poll(timeout_ms=POLL_MS))
            for records in batches.values():
                for record in records:
                    try:
                        command = decode(record.value)
                    except (msgspec.DecodeError, TypeError):
                        stats.control_ignored += 1
                        bad.warning("control_malformed", f"ignored {record.value!r:.200}")
                        continue
                    if command.queue_id != settings.queue_id:
                        continue
                    if command.command == "stop":
                        log.info("stop command received for queue %s", settings.queue_id)
                        stop("stopped by a stop command")
                        return
                    stats.control_ignored += 1
                    bad.warning("control_unknown", f"ignored command {command.command!r}")
    finally:
        await aclose(consumer)
