"""Telemetry: what the queue manager sees of this worker on `QUEUE_EVENTS_TOPIC`."""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import trio

from loader.kafka import describe, surely_not_written
from loader.schema import Status, TelemetryEvent
from loader.settings import Settings
from loader.shards import producer_name

log = logging.getLogger(__name__)

TERMINAL_TIMEOUT = 5.0
# Notices waiting to be told one by one; more, while telemetry catches up, are summarised.
NOTICE_QUEUE = 64
HOLE = "hole: "


Publish = Callable[[str, bytes, bytes], Awaitable[None]]


class Telemetry:
    """Sends `started`, periodic `loading`, and exactly one terminal event, whose `finished`
    says whether the outcome is final (nothing will retry or restart the work)."""

    def __init__(
        self,
        settings: Settings,
        records_written: Callable[[], int],
        publish: Publish,
        fallback: Publish | None = None,
    ) -> None:
        self.settings = settings
        self.records_written = records_written
        self.publish = publish
        # For the terminal event when `publish` failed without writing it: an idempotent
        # producer that met a fatal error refuses everything after it, telemetry included,
        # yet the failure must be told. Not after a failure that may have written it.
        self.fallback = fallback
        self.sent_terminal = False
        # The `symbol` field: set by the worker once it knows its streams.
        self.describe_symbols: Callable[[], str] = self._named
        self.producer = producer_name(
            settings.telemetry_producer_id, settings.shard_index, settings.shard_count
        )
        self._encode = msgspec.json.Encoder().encode

    def event(self, status: Status, message: str, *, final: bool = False) -> TelemetryEvent:
        s = self.settings
        return TelemetryEvent(
            queue_id=s.queue_id,
            symbol=self.describe_symbols(),
            type=s.type,
            status=status,
            message=message,
            records_written=self.records_written(),
            finished=final,
            producer=self.producer,
            timestamp=time.time(),
        )

    def _named(self) -> str:
        s = self.settings
        if s.selection.dynamic:
            return s.selection.describe()
        return ",".join(s.symbols)

    async def send(self, status: Status, message: str, *, final: bool = False) -> None:
        """Send and wait for Kafka's acknowledgement; a refusal raises."""
        if status in ("interrupted", "error", "finished"):
            if self.sent_terminal:
                raise RuntimeError("a terminal telemetry event was already sent")
            self.sent_terminal = True
        await self._send_by(self.publish, status, message, final)

    async def _send_by(self, publish: Publish, status: Status, message: str, final: bool) -> None:
        event = self.event(status, message, final=final)
        await publish(
            self.settings.queue_events_topic, self.settings.queue_id.encode(), self._encode(event)
        )
        log.info("telemetry %s: %s", status, message)

    async def report_progress(self, describe_progress: Callable[[], str]) -> None:
        """`loading` every TELEMETRY_INTERVAL seconds with the acknowledged count. Each is made
        and handed to Kafka on time, not after the previous one's acknowledgement: a slow or
        failing-over Kafka delays their arrival, never their timestamps' interval (a queue
        manager must not take a slow broker for a dead pod). A refusal still raises."""
        async with trio.open_nursery() as nursery:
            due = trio.current_time()
            while True:
                due += self.settings.telemetry_interval
                await trio.sleep_until(due)
                nursery.start_soon(self.send, "loading", describe_progress())

    async def final(self, status: Status, message: str, final: bool, *, deadline: float) -> bool:
        """The terminal event, shielded (it must go out even while cancelled) and bounded by
        `deadline` (trio time) and TERMINAL_TIMEOUT."""
        deadline = min(deadline, trio.current_time() + TERMINAL_TIMEOUT)
        with trio.CancelScope(shield=True), trio.move_on_at(deadline) as scope:
            try:
                await self.send(status, message, final=final)
            except Exception as exc:
                if self.fallback is None:
                    log.error("could not send the %s telemetry event: %s", status, describe(exc))
                    return False
                if not surely_not_written(exc):
                    # It may be in the topic with its acknowledgement lost: sent again, the
                    # queue manager would read two terminal events. At most once.
                    log.error("the %s telemetry event may not have been delivered (%s); not "
                              "sent again", status, describe(exc))  # fmt: skip
                    return False
                log.warning("the %s telemetry event goes by a new producer: %s", status,
                            describe(exc))  # fmt: skip
                try:
                    await self._send_by(self.fallback, status, message, final)
                except Exception as again:
                    log.error("could not send the %s telemetry event: %s", status,
                              describe(again))  # fmt: skip
                    return False
        if scope.cancelled_caught:
            log.error("the %s telemetry event was not acknowledged in time", status)
            return False
        return True


@dataclasses.dataclass
class _Summary:
    count: int
    first: str
    last: str


class Notices:
    """Holes, dropped symbols, listings and delistings on their way to `loading` events.

    Up to `limit` wait to be told one by one. Past that (a flood, faster than Kafka takes
    telemetry), the rest are summarised until the queue is told: one event per kind (holes,
    whose message starts with `hole: `, and the others) with how many there were and the first
    and the last of them. None is dropped, and every one is in the log as well."""

    def __init__(self, limit: int = NOTICE_QUEUE) -> None:
        self.limit = limit
        self._queue: collections.deque[str] = collections.deque()
        # Summaries by kind: a hole or not.
        self._more: dict[bool, _Summary] = {}
        self._ready = trio.Event()

    def offer(self, message: str) -> None:
        """Queue a notice (never blocks: called from the reader's path)."""
        if self._more or len(self._queue) >= self.limit:
            # Once summarising, every later notice joins the summary, which is told after the
            # queue: the events stay in the order the notices came.
            hole = message.startswith(HOLE)
            summary = self._more.setdefault(hole, _Summary(0, message, message))
            summary.count += 1
            summary.last = message
        else:
            self._queue.append(message)
        self._ready.set()

    def _next(self) -> str | None:
        if self._queue:
            return self._queue.popleft()
        for hole in (True, False):
            if (summary := self._more.pop(hole, None)) is not None:
                count, first, last = summary.count, summary.first, summary.last
                if hole:
                    first, last = first.removeprefix(HOLE), last.removeprefix(HOLE)
                    what = f"{HOLE}{count} more holes"
                else:
                    what = f"{count} more notices"
                span = f"[{first}]" if count == 1 else f"from [{first}] to [{last}]"
                return f"{what} not told one by one (each is in the log): {span}"
        return None

    async def report(self, send: Callable[[str], Awaitable[None]]) -> None:
        """Tell each notice, or summary, in turn as `send` takes them; until cancelled."""
        while True:
            message = self._next()
            if message is None:
                self._ready = trio.Event()
                await self._ready.wait()
                continue
            await send(message)
