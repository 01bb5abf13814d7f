"""The worker: Binance -> channel -> Kafka, with control and telemetry beside it, in one nursery.

`run` is the embeddable entry point: `worker = await nursery.start(run, settings)` in a caller's
nursery, then `worker.stop()` (or a stop command on the control topic) ends it gracefully.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from functools import partial

import trio

from loader.control import watch_control
from loader.errors import FatalError
from loader.kafka import KafkaFailure, aclose, describe, open_producer
from loader.metrics import Metrics, serve_metrics
from loader.resume import resume_points
from loader.schema import Candle, Status
from loader.settings import Settings
from loader.sink import KafkaSink
from loader.source import Source
from loader.stats import Stats
from loader.telemetry import Telemetry

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: the terminal telemetry status, its sentence, and the exit code."""

    status: Status
    message: str
    records_written: int
    exit_code: int


class Worker:
    """Handle to a running worker: its counters, and `stop()`."""

    def __init__(self, settings: Settings, sink: KafkaSink, metrics: Metrics) -> None:
        self.settings = settings
        self.sink = sink
        self.stats = sink.stats
        self.metrics = metrics
        self.scope = trio.CancelScope()
        self.stopped: tuple[Status, str] | None = None
        self.outcome: Outcome | None = None
        # The bound port when METRICS_PORT is set (0 there picks a free one).
        self.metrics_port: int | None = None
        self.source: Source | None = None
        self._done = trio.Event()
        self._stop_requested = trio.Event()

    @property
    def records_written(self) -> int:
        return self.sink.records_written

    def stop(self, reason: str = "stopped", status: Status = "interrupted") -> None:
        """End the run gracefully: fills in progress finish (bounded), then the reader stops
        and what was received is delivered."""
        if self.stopped is None:
            self.stopped = (status, reason)
        if self.source is None or self.source.backfiller.active == 0:
            self.scope.cancel()
        else:
            self._stop_requested.set()

    async def _stop_after_fills(self) -> None:
        await self._stop_requested.wait()
        if self.source is not None:
            with trio.move_on_after(self.settings.stop_grace / 2):
                await self.source.backfiller.idle()
        self.scope.cancel()

    async def wait_written(self, count: int) -> None:
        """Return once Kafka acknowledged at least `count` candles; raise if the run ends
        first, so a waiting test or harness fails instead of hanging."""
        while self.records_written < count:
            if self.outcome is not None:
                raise RuntimeError(
                    f"the run ended after {self.records_written} of {count} candles: "
                    f"{self.outcome.message}"
                )
            await self.sink.progressed()

    async def finished(self) -> Outcome:
        """Wait until the run has ended (telemetry sent, Kafka closed) and say how."""
        await self._done.wait()
        assert self.outcome is not None
        return self.outcome

    def progress(self) -> str:
        return (
            f"{self.records_written} candles written to {self.settings.kafka_topic} "
            f"from {len(self.settings.streams)} stream(s)"
        )


async def run(
    settings: Settings,
    *,
    task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
) -> Outcome:
    """Run until stopped, `STOP_AT`, or a fatal error; return how it ended.

    A run that fails before it is ready (Kafka unreachable, credentials refused) raises
    `FatalError` instead: there is no worker to hand out. Its `error` telemetry was sent if
    Kafka could be reached. One stopped before it was ready still reports ready, then ends.
    """
    try:
        producer = await trio.to_thread.run_sync(
            lambda: open_producer(settings.kafka, delivery_timeout=settings.delivery_timeout)
        )
    except KafkaFailure as exc:
        raise FatalError(str(exc)) from exc
    candles_in, candles_out = trio.open_memory_channel[Candle](settings.channel_size)
    stats = Stats()
    metrics = Metrics(stats, lambda: candles_out.statistics().current_buffer_used)
    sink = KafkaSink(producer, settings.kafka_topic, stats, metrics.delivery_latency.observe)
    worker = Worker(settings, sink, metrics)
    ready = False

    def started() -> None:
        nonlocal ready
        ready = True
        task_status.started(worker)

    try:
        outcome = await _run(worker, candles_in, candles_out, started)
    finally:
        await aclose(producer)
    if not ready:
        if outcome.status == "error":
            raise FatalError(outcome.message, outcome.exit_code)
        started()
    worker.outcome = outcome
    worker._done.set()
    sink.wake()
    return outcome


async def _run(
    worker: Worker,
    candles_in: trio.MemorySendChannel[Candle],
    candles_out: trio.MemoryReceiveChannel[Candle],
    started: Callable[[], None],
) -> Outcome:
    """The nursery: sink, control, source, telemetry; then drain and the terminal event."""
    settings, sink = worker.settings, worker.sink
    telemetry = Telemetry(settings, sink)
    failure: BaseException | None = None
    try:
        with worker.scope:
            async with trio.open_nursery() as nursery:
                if settings.metrics_port is not None:
                    worker.metrics_port = await nursery.start(
                        partial(serve_metrics, worker.metrics, settings.metrics_port,
                                health_timeout=settings.health_timeout)
                    )  # fmt: skip
                await nursery.start(sink.run, candles_out)
                nursery.start_soon(worker._stop_after_fills)
                await nursery.start(watch_control, settings, worker.stop, worker.stats)
                stop_reading = threading.Event()
                try:
                    resume = await trio.to_thread.run_sync(
                        resume_points, settings, stop_reading, abandon_on_cancel=True
                    )
                finally:
                    stop_reading.set()  # a stop during the scan ends the thread's reading too
                holes_in, holes_out = trio.open_memory_channel[str](64)
                source = Source(
                    settings, candles_in, worker.stats, resume=resume,
                    on_hole=lambda message: _offer(holes_in, message),
                )  # fmt: skip
                await nursery.start(source.run)
                worker.source = source
                await telemetry.send("started", f"started streaming {_streams(settings)}")
                nursery.start_soon(telemetry.report_progress, worker.progress)
                nursery.start_soon(_report_holes, telemetry, holes_out)
                if settings.stop_at is not None:
                    nursery.start_soon(_stop_at, worker, source, settings.stop_at)
                started()
    except Exception as exc:
        failure = _first_failure(exc)
    finally:
        # Runs on stop, on failure and on outside cancellation alike: deliver what was received.
        if not isinstance(failure, KafkaFailure):
            try:
                await sink.drain(candles_out, trio.current_time() + settings.stop_grace)
            except KafkaFailure as exc:
                if failure is not None:
                    log.error("after the failure, delivery failed too: %s", exc)
                failure = failure or exc
        outcome = _outcome(worker, failure)
        if failure is not None:
            log.error("run failed: %s", outcome.message, exc_info=failure)
        await telemetry.final(outcome.status, outcome.message)
    return outcome


def _outcome(worker: Worker, failure: BaseException | None) -> Outcome:
    written = worker.records_written
    if failure is not None:
        code = failure.exit_code if isinstance(failure, FatalError) else 1
        return Outcome(
            "error", f"failed after {written} candles: {describe(failure)}", written, code
        )
    status, reason = worker.stopped or ("interrupted", "cancelled by the caller")
    return Outcome(status, f"{reason}; {written} candles written", written, int(status == "error"))


def _first_failure(exc: BaseException) -> BaseException:
    """The first real error out of a (nested) exception group, for one clear message."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _streams(settings: Settings) -> str:
    names = settings.stream_names
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{shown} into {settings.kafka_topic}"


def _offer(channel: trio.MemorySendChannel[str], message: str) -> None:
    # The hole is logged and counted already; telemetry of a flood of them may be shed.
    try:
        channel.send_nowait(message)
    except trio.WouldBlock:
        log.warning("hole not reported in telemetry (too many at once): %s", message)


async def _report_holes(telemetry: Telemetry, holes: trio.MemoryReceiveChannel[str]) -> None:
    async for message in holes:
        await telemetry.send("loading", f"hole: {message}")


async def _stop_at(worker: Worker, source: Source, stop_at: float) -> None:
    """`finished` means every candle closing at or before STOP_AT is in Kafka: once the
    moment has come (by our clock or by Binance's, whichever says so first), wait, bounded,
    for the last candles to close and for any fill, then stop."""
    stop_ms = int(stop_at * 1000)
    with trio.move_on_at(trio.current_time() + max(0.0, stop_at - time.time())):
        await source.router.wait_event_time(stop_ms)
    short = await source.complete_until(stop_ms, worker.settings.stop_grace)
    if short:
        names = ", ".join(f"{s} {i}" for s, i in short[:5])
        worker.stop(
            f"reached STOP_AT, but {len(short)} stream(s) lack candles closing before it ({names})",
            status="error",
        )
        return
    worker.stop("reached STOP_AT", status="finished")
