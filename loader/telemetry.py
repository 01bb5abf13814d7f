"""Telemetry: what the queue manager sees of this worker on `QUEUE_EVENTS_TOPIC`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import trio

from loader.kafka import describe
from loader.schema import Status, TelemetryEvent
from loader.settings import Settings
from loader.sink import KafkaSink

log = logging.getLogger(__name__)

TERMINAL_TIMEOUT = 5.0


class Telemetry:
    """Sends `started`, periodic `loading`, and exactly one terminal event."""

    def __init__(self, settings: Settings, sink: KafkaSink) -> None:
        self.settings = settings
        self.sink = sink
        self.sent_terminal = False
        self._encode = msgspec.json.Encoder().encode

    def event(self, status: Status, message: str) -> TelemetryEvent:
        s = self.settings
        return TelemetryEvent(
            queue_id=s.queue_id,
            symbol=",".join(s.symbols),
            type=s.type,
            status=status,
            message=message,
            records_written=self.sink.records_written,
            finished=status == "finished",
            producer=s.telemetry_producer_id,
            timestamp=time.time(),
        )

    async def send(self, status: Status, message: str) -> None:
        """Send and wait for Kafka's acknowledgement; a refusal raises."""
        if status in ("interrupted", "error", "finished"):
            if self.sent_terminal:
                raise RuntimeError("a terminal telemetry event was already sent")
            self.sent_terminal = True
        event = self.event(status, message)
        await self.sink.publish(
            self.settings.queue_events_topic, self.settings.queue_id.encode(), self._encode(event)
        )
        log.info("telemetry %s: %s", status, message)

    async def report_progress(self, describe_progress: Callable[[], str]) -> None:
        """`loading` every TELEMETRY_INTERVAL seconds with the acknowledged count."""
        while True:
            await trio.sleep(self.settings.telemetry_interval)
            await self.send("loading", describe_progress())

    async def final(self, status: Status, message: str) -> bool:
        """The terminal event, bounded and shielded: it must go out even while cancelled."""
        with trio.CancelScope(shield=True), trio.move_on_after(TERMINAL_TIMEOUT) as scope:
            try:
                await self.send(status, message)
            except Exception as exc:
                log.error("could not send the %s telemetry event: %s", status, describe(exc))
                return False
        if scope.cancelled_caught:
            log.error("the %s telemetry event was not acknowledged in time", status)
            return False
        return True
