"""Telemetry: what the queue manager sees of this worker on `QUEUE_EVENTS_TOPIC`.

The contract (README, "Telemetry contract"): `started` comes first in every run that reaches
Kafka, even one stopped at once; `finished` is true only on an event after which the Job is done
with this workflow (exit 0 completes it, exit 2 fails it for good); an ending the Job will retry
(exit 1, or 143 on SIGTERM) says so in its message and leaves `finished` false, so the queue
manager can act on that one field.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

import msgspec
import trio

from loader.kafka import close, describe, open_producer
from loader.schema import Status, TelemetryEvent
from loader.settings import Settings
from loader.sink import DeliveryFailed, KafkaSink

log = logging.getLogger(__name__)

TERMINAL_TIMEOUT = 5.0
# Exit codes after which the Job runs no new pod for this workflow: 0 completes it, 2 fails it
# (podFailurePolicy). After any other the Job starts a new pod, which resumes from the topic.
FINAL_EXIT_CODES: Final = frozenset({0, 2})


class Telemetry:
    """Sends `started`, periodic `loading`, and exactly one terminal event."""

    def __init__(self, settings: Settings, sink: KafkaSink) -> None:
        self.settings = settings
        self.sink = sink
        self.sent_started = False
        self.sent_terminal = False
        self._encode = msgspec.json.Encoder().encode

    def event(self, status: Status, message: str, *, finished: bool = False) -> TelemetryEvent:
        s = self.settings
        return TelemetryEvent(
            queue_id=s.queue_id,
            symbol=",".join(s.symbols),
            type=s.type,
            status=status,
            message=message,
            records_written=self.sink.records_written,
            finished=finished,
            producer=s.telemetry_producer_id,
            timestamp=time.time(),
        )

    async def send(self, status: Status, message: str, *, finished: bool = False) -> None:
        """Send and wait for Kafka's acknowledgement; a refusal raises."""
        if status in ("interrupted", "error", "finished"):
            if self.sent_terminal:
                raise RuntimeError("a terminal telemetry event was already sent")
            self.sent_terminal = True
        event = self.event(status, message, finished=finished)
        await self.sink.publish(
            self.settings.queue_events_topic, self.settings.queue_id.encode(), self._encode(event)
        )
        log.info("telemetry %s: %s", status, message)

    async def start(self) -> None:
        """`started`, once. Shielded: a stop arriving meanwhile must not leave it unknown
        whether it went out (the terminal event would then send a second one)."""
        if self.sent_started:
            return
        with trio.CancelScope(shield=True), trio.fail_after(TERMINAL_TIMEOUT):
            await self.send("started", f"started streaming {_streams(self.settings)}")
        self.sent_started = True

    async def report_progress(self, describe_progress: Callable[[], str]) -> None:
        """`loading` every TELEMETRY_INTERVAL seconds with the acknowledged count."""
        while True:
            await trio.sleep(self.settings.telemetry_interval)
            await self.send("loading", describe_progress())

    async def final(self, status: Status, message: str, exit_code: int = 0) -> bool:
        """The terminal event, after `started` if that has not gone out yet (a run stopped
        before it was ready); bounded and shielded: it must go out even while cancelled."""
        finished = exit_code in FINAL_EXIT_CODES
        if not finished:
            message += f"; exit {exit_code}: the Job will retry, resuming from the topic"
        refused: DeliveryFailed | None = None
        with trio.CancelScope(shield=True):
            with trio.move_on_after(TERMINAL_TIMEOUT) as scope:
                try:
                    await self.start()
                    await self.send(status, message, finished=finished)
                except DeliveryFailed as exc:
                    refused = exc
                except Exception as exc:
                    log.error("could not send the %s telemetry event: %s", status, describe(exc))
                    return False
            if refused is not None:
                return await self._send_alone(status, message, finished, refused)
        if scope.cancelled_caught:
            log.error("the %s telemetry event was not acknowledged in time", status)
            return False
        return True

    async def _send_alone(
        self, status: Status, message: str, finished: bool, refused: DeliveryFailed
    ) -> bool:
        """The terminal event through a producer of its own. kafka-python's idempotent
        producer refuses every record after a fatal error on any one (a candle too large for
        the topic, say): the run's end would go unreported, and the queue manager would wait
        for an event that never comes. Kafka answered, so a fresh producer connects at once."""
        log.warning("the producer refuses records (%s); sending the %s event alone", refused,
                    status)  # fmt: skip
        events = [self.event(status, message, finished=finished)]
        if not self.sent_started:
            events.insert(0, self.event("started", f"started streaming {_streams(self.settings)}"))
        values = [self._encode(e) for e in events]
        topic, key = self.settings.queue_events_topic, self.settings.queue_id.encode()

        def send() -> None:
            producer = open_producer(self.settings.kafka, delivery_timeout=TERMINAL_TIMEOUT)
            try:
                for value in values:
                    producer.send(topic, value=value, key=key).get(timeout=TERMINAL_TIMEOUT)
            finally:
                close(producer)

        try:
            await trio.to_thread.run_sync(send)
        except Exception as exc:
            log.error("could not send the %s telemetry event: %s", status, describe(exc))
            return False
        self.sent_started = True
        log.info("telemetry %s: %s", status, message)
        return True


def _streams(settings: Settings) -> str:
    names = settings.stream_names
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{shown} into {settings.kafka_topic}"
