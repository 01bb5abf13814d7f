"""The control watcher: a stop command for our queue id on `QUEUE_CONTROL_TOPIC` ends the run.

There is no consumer group and nothing is committed: the Job is stateless, so the topic is read
from `control_lookback` ago, far enough back that a stop sent before this pod started (or
before a retried pod came back) still counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import msgspec
import trio
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from loader.kafka import aclose, offsets_since, open_consumer
from loader.logs import ThrottledLog
from loader.schema import ControlCommand
from loader.settings import Settings
from loader.stats import Stats

log = logging.getLogger(__name__)
T = TypeVar("T")

# Each poll costs the consumer about a millisecond of Python; at 200 ms it was over half of an
# idle worker's CPU. A stop command still ends a poll at once (the broker answers a fetch as
# soon as a record arrives); only a stop from elsewhere (SIGTERM, STOP_AT) waits for the poll
# in progress, at most this long, within a shutdown budget of seconds.
POLL_MS = 1000
# A poll stuck on a dead broker holds up the end of the run until this expires.
REQUEST_TIMEOUT = 3.0
TOPIC_RETRY = 2.0
CLOSE_TIMEOUT = 1.0


def _assign(consumer: KafkaConsumer, topic: str, since_ms: int) -> bool:
    """Blocking: assign every partition of `topic`, positioned at `since_ms`."""
    spans = offsets_since(consumer, topic, since_ms)
    if not spans:
        return False
    consumer.assign(list(spans))
    for tp, (first, _end) in spans.items():
        consumer.seek(tp, first)
    return True


async def _retrying(bad: ThrottledLog, fn: Callable[..., T], *args: object) -> T:
    """Run blocking `fn` in a thread until Kafka answers: a broker restart is not a reason
    to stop watching, and a lasting outage ends the run through the sink's delivery timeout."""
    while True:
        try:
            # Abandoned on cancellation: kafka-python's metadata wait has no timeout, and a
            # thread stuck on a frozen broker must not hold the run past its shutdown budget.
            return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except KafkaError as exc:
            bad.warning("control_unavailable", f"control topic unreadable ({exc}); retrying")
        await trio.sleep(TOPIC_RETRY)


async def watch_control(
    settings: Settings,
    stop: Callable[[str], None],
    stats: Stats,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Report ready once positioned; call `stop` on the first stop command for our queue."""
    # Abandoned on cancellation: a stop must not wait out the bootstrap's 30 s (what it
    # leaves behind is closed with the process).
    consumer = await trio.to_thread.run_sync(
        lambda: open_consumer(
            settings.kafka, timeout=30.0, request_timeout=REQUEST_TIMEOUT, fetch_max_wait_ms=POLL_MS
        ),
        abandon_on_cancel=True,
    )
    decode = msgspec.json.Decoder(ControlCommand).decode
    bad = ThrottledLog(log)
    try:
        since_ms = int((time.time() - settings.control_lookback) * 1000)
        topic = settings.queue_control_topic
        # Readiness waits for the positioning when the topic exists; when it does not yet, a
        # stop published later is still read, from the lookback, once it appears.
        positioned = await _retrying(bad, _assign, consumer, topic, since_ms)
        task_status.started()
        if not positioned:
            log.warning("control topic %r does not exist yet; watching for it", topic)
        while not positioned:
            await trio.sleep(TOPIC_RETRY)
            positioned = await _retrying(bad, _assign, consumer, topic, since_ms)
        while True:
            batches = await _retrying(bad, lambda: consumer.poll(timeout_ms=POLL_MS))
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
        # It commits nothing, so closing is only sockets: a second, not the shutdown budget.
        await aclose(consumer, seconds=CLOSE_TIMEOUT)
