"""The worker: Binance -> channel -> Kafka, with control and telemetry beside it, in one nursery.

`run` is the embeddable entry point: `worker = await nursery.start(run, settings)` in a caller's
nursery, then `worker.stop()` (or a stop command on the control topic) ends it gracefully.

Every run that reaches Kafka sends `started` first and exactly one terminal event last, whose
`finished` field says whether the outcome is final (see the README's telemetry table). From the
moment it is told to stop (a command, SIGTERM, a failure), a run ends within its shutdown
budget (`Settings.shutdown_budget`, from the pod's grace period), shared out as:

    deliver what was received   until the budget's end less TELEMETRY_RESERVE + CLOSE_RESERVE
                                (and at most STOP_GRACE)
    the terminal event          until the budget's end less CLOSE_RESERVE
    close the producer          what is left
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial

import trio
from kafka import KafkaProducer

from loader.binance import stream_name
from loader.control import watch_control
from loader.errors import FatalError
from loader.guard import Hole
from loader.kafka import (
    KafkaFailure,
    MissingTopics,
    aclose,
    check_topics,
    describe,
    open_producer,
    publish_once,
)
from loader.listings import initial_streams
from loader.metrics import Metrics, serve_metrics
from loader.resume import resume_points
from loader.schema import Record, Status
from loader.settings import Settings
from loader.shards import summary
from loader.sink import KafkaSink
from loader.source import Source
from loader.stats import Stats
from loader.telemetry import HOLE, Notices, Telemetry

log = logging.getLogger(__name__)

# Seconds of the shutdown budget kept for the terminal event, and for closing the producer.
TELEMETRY_RESERVE = 3.0
CLOSE_RESERVE = 2.0
# STOP_AT reached with candles missing that no retry can bring back (holes): final, failed.
HOLES_EXIT = 3
# Holes named in that terminal message; the rest are counted.
HOLES_LISTED = 20


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How a run ended: the terminal telemetry status, its sentence, the exit code, and whether
    it is final (`finished` in telemetry: no retry or restart will follow)."""

    status: Status
    message: str
    records_written: int
    exit_code: int
    final: bool = True


class Worker:
    """Handle to a run: its counters, and `stop()`. Made by `run`, or by a caller that needs to
    stop the run before it is ready (pass it to `run` as `worker=`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.sink: KafkaSink | None = None
        self.metrics: Metrics | None = None
        self.scope = trio.CancelScope()
        # (status, reason, final, exit code) of the first stop asked for.
        self.stopped: tuple[Status, str, bool, int] | None = None
        self.outcome: Outcome | None = None
        # The bound port when METRICS_PORT is set (0 there picks a free one).
        self.metrics_port: int | None = None
        self.source: Source | None = None
        self._stop_at: float | None = None  # trio time the stop was asked for
        self._bootstrap: trio.CancelScope | None = None
        self._progress = trio.Event()
        self._done = trio.Event()
        self._stop_requested = trio.Event()

    @property
    def records_written(self) -> int:
        """Candles Kafka acknowledged: what telemetry reports."""
        return self.stats.candles_acknowledged

    def stop(self, reason: str = "stopped", status: Status = "interrupted", *,
             final: bool = True, exit_code: int = 0) -> None:  # fmt: skip
        """End the run gracefully: fills in progress finish (bounded), then the reader stops,
        what was received is delivered, and the terminal event says `reason`. `final=False`
        when something will start the work again (a signal from Kubernetes, exit 143: the
        Job retries)."""
        if self.stopped is None:
            self.stopped = (status, reason, final, exit_code)
        self.shutdown_deadline()
        filling = self.source is not None and self.source.backfiller.active > 0
        if filling and not self._stop_requested.is_set():
            self._stop_requested.set()  # `_stop_after_fills` cancels once they are done
            return
        self._cancel()

    async def _stop_after_fills(self) -> None:
        await self._stop_requested.wait()
        if self.source is not None:
            # A share of the shutdown budget: delivery and the terminal event need the rest.
            left = self.shutdown_deadline() - trio.current_time()
            with trio.move_on_after(min(self.settings.stop_grace / 2, left / 3)):
                await self.source.backfiller.idle()
        self._cancel()

    def _cancel(self) -> None:
        self.scope.cancel()
        if self._bootstrap is not None:
            # A stop while Kafka is still being reached waits for it, within the budget, so the
            # run can still say `started` and how it ended.
            self._bootstrap.deadline = self.shutdown_deadline() - TELEMETRY_RESERVE * 2

    def shutdown_deadline(self) -> float:
        """The trio time by which the run must have ended, counted from the first stop (or
        failure, or cancellation: the first call)."""
        if self._stop_at is None:
            self._stop_at = trio.current_time()
        return self._stop_at + self.settings.shutdown_budget

    async def wait_written(self, count: int) -> None:
        """Return once Kafka acknowledged at least `count` candles; raise if the run ends
        first, so a waiting test or harness fails instead of hanging."""
        while self.records_written < count:
            if self.outcome is not None:
                raise RuntimeError(
                    f"the run ended after {self.records_written} of {count} candles: "
                    f"{self.outcome.message}"
                )
            await self._progress.wait()

    def wake(self) -> None:
        """Wake `wait_written`: candles were acknowledged, or the run ended."""
        self._progress.set()
        self._progress = trio.Event()

    async def finished(self) -> Outcome:
        """Wait until the run has ended (telemetry sent, Kafka closed) and say how."""
        await self._done.wait()
        assert self.outcome is not None
        return self.outcome

    def progress(self) -> str:
        return (
            f"{self.records_written} candles written to {self.settings.kafka_topic} "
            f"from {len(self.source.streams if self.source else self.settings.streams)} stream(s)"
        )


async def run(
    settings: Settings,
    *,
    worker: Worker | None = None,
    task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED,
) -> Outcome:
    """Run until stopped, `STOP_AT`, or a fatal error; return how it ended.

    A run that fails before it is ready (Kafka unreachable, credentials refused) raises
    `FatalError` instead: there is no worker to hand out. Its `error` telemetry was sent if
    Kafka could be reached. One stopped before it was ready still reports ready, then ends.
    """
    worker = worker or Worker(settings)
    producer = await _bootstrap(worker)
    candles_in, candles_out = trio.open_memory_channel[Record](settings.channel_size)
    worker.metrics = Metrics(
        worker.stats,
        lambda: candles_out.statistics().current_buffer_used,
        intervals=settings.intervals,
        kafka_client=producer.metrics if settings.kafka.client_metrics else None,
    )
    sink = worker.sink = KafkaSink(
        producer, settings.kafka_topic, worker.stats, worker.metrics.delivery_latency.observe,
        on_acknowledged=worker.wake,
    )  # fmt: skip
    ready = False

    def started() -> None:
        nonlocal ready
        ready = True
        task_status.started(worker)

    try:
        outcome = await _run(worker, sink, candles_in, candles_out, started)
    finally:
        timeout = max(0.5, worker.shutdown_deadline() - trio.current_time())
        await aclose(producer, seconds=timeout)
    if not ready:
        if outcome.status == "error":
            raise FatalError(outcome.message, outcome.exit_code)
        started()
    worker.outcome = outcome
    worker._done.set()
    worker.wake()
    return outcome


async def _bootstrap(worker: Worker) -> KafkaProducer:
    """Reach Kafka. A stop meanwhile lets it finish within the shutdown budget (so the run can
    still report); past that, or when the caller cancels, the attempt is abandoned."""
    settings = worker.settings
    with trio.CancelScope() as scope:
        worker._bootstrap = scope
        if worker.stopped is not None:
            scope.deadline = worker.shutdown_deadline() - TELEMETRY_RESERVE * 2
        try:
            producer = await trio.to_thread.run_sync(
                lambda: open_producer(settings.kafka, delivery_timeout=settings.delivery_timeout),
                abandon_on_cancel=True,
            )
        except KafkaFailure as exc:
            raise FatalError(str(exc)) from exc
        finally:
            worker._bootstrap = None
        try:
            # A misnamed topic is named now, not after a send has waited for it in vain.
            await check_topics(producer, (settings.kafka_topic, settings.queue_events_topic,
                                          settings.queue_control_topic))  # fmt: skip
        except MissingTopics as exc:
            await aclose(producer, seconds=1.0)
            # The same settings meet the same topics: a configuration error, not retried.
            raise FatalError(str(exc), exit_code=2) from exc
        except KafkaFailure as exc:
            await aclose(producer, seconds=1.0)
            raise FatalError(str(exc)) from exc
        except BaseException:
            await aclose(producer, seconds=1.0)
            raise
        return producer
    raise FatalError("stopped before Kafka could be reached")


async def _run(
    worker: Worker,
    sink: KafkaSink,
    candles_in: trio.MemorySendChannel[Record],
    candles_out: trio.MemoryReceiveChannel[Record],
    started: Callable[[], None],
) -> Outcome:
    """`started`, then the nursery (sink, control, source, telemetry); then drain and the
    terminal event, within the shutdown budget."""
    settings = worker.settings
    telemetry = Telemetry(
        settings, lambda: worker.records_written, sink.publish, partial(_publish_once, settings)
    )
    failure: BaseException | None = None
    try:
        # First in every run, a run stopped at once included: shielded, and bounded.
        with trio.CancelScope(shield=True), trio.fail_after(TELEMETRY_RESERVE * 2):
            await telemetry.send("started", f"starting {_streams(settings, settings.streams)}")
        with worker.scope:
            async with trio.open_nursery() as nursery:
                if settings.metrics_port is not None:
                    assert worker.metrics is not None
                    worker.metrics_port = await nursery.start(
                        partial(serve_metrics, worker.metrics, settings.metrics_port,
                                health_timeout=settings.health_timeout)
                    )  # fmt: skip
                await nursery.start(sink.run, candles_out)
                nursery.start_soon(worker._stop_after_fills)
                await nursery.start(watch_control, settings, worker.stop, worker.stats)
                streams, listing = await initial_streams(settings, worker.stats)
                stop_reading = threading.Event()
                try:
                    resume = await trio.to_thread.run_sync(
                        partial(resume_points, settings, stop_reading, streams=streams),
                        abandon_on_cancel=True,
                    )
                finally:
                    stop_reading.set()  # a stop during the scan ends the thread's reading too
                notices = Notices()
                source = Source(
                    settings, candles_in, worker.stats, resume=resume.points, streams=streams,
                    resume_unknown=resume.unknown,
                    on_hole=lambda message: notices.offer(f"{HOLE}{message}"),
                    listing=listing, on_notice=notices.offer,
                )  # fmt: skip
                await nursery.start(source.run)
                worker.source = source
                telemetry.describe_symbols = partial(_symbols, settings, source)
                log.info("streaming %s", _streams(settings, source.streams))
                nursery.start_soon(telemetry.report_progress, worker.progress)
                nursery.start_soon(notices.report, partial(telemetry.send, "loading"))
                if settings.stop_at is not None:
                    nursery.start_soon(_stop_at, worker, source, settings.stop_at)
                started()
    except Exception as exc:
        failure = _first_failure(exc)
    finally:
        # Runs on stop, on failure and on outside cancellation alike: deliver what was received.
        deadline = worker.shutdown_deadline()
        if not isinstance(failure, KafkaFailure):
            drain_until = min(
                trio.current_time() + settings.stop_grace,
                deadline - TELEMETRY_RESERVE - CLOSE_RESERVE,
            )
            try:
                await sink.drain(candles_out, drain_until)
            except KafkaFailure as exc:
                if failure is not None:
                    log.error("after the failure, delivery failed too: %s", exc)
                failure = failure or exc
        outcome = _outcome(worker, failure)
        if failure is not None:
            log.error("run failed: %s", outcome.message, exc_info=failure)
        await telemetry.final(outcome.status, outcome.message, outcome.final,
                              deadline=deadline - CLOSE_RESERVE)  # fmt: skip
    return outcome


async def _publish_once(settings: Settings, topic: str, key: bytes, value: bytes) -> None:
    """A record by a producer of its own (the caller bounds the time; past it, abandoned)."""
    await trio.to_thread.run_sync(
        partial(publish_once, settings.kafka, topic, key, value, TELEMETRY_RESERVE),
        abandon_on_cancel=True,
    )


def _outcome(worker: Worker, failure: BaseException | None) -> Outcome:
    written = worker.records_written
    if failure is not None:
        code = failure.exit_code if isinstance(failure, FatalError) else 1
        final = code != 1
        message = f"failed after {written} candles: {describe(failure)}{_then(final, code)}"
        return Outcome("error", message, written, code, final)
    status, reason, final, code = worker.stopped or (
        "interrupted",
        "cancelled by the caller",
        True,
        0,
    )
    message = f"{reason}; {written} candles written{_then(final, code)}"
    return Outcome(status, message, written, code, final)


def _then(final: bool, code: int) -> str:
    """What the terminal message ends with: whether, and how, the work goes on."""
    if not final:
        return f"; exit {code}: the Job will retry, resuming from the topic"
    return f"; exit {code}: retrying cannot help" if code else ""


def _holes(holes: dict[tuple[str, str], tuple[list[Hole], int]]) -> str:
    """`holes: BTCUSDT-1m 1700000000000..1700000059999 (1 candles), ...`: each hole from its
    first candle's open time to its last one's close time."""
    named: list[str] = []
    total = 0
    for (symbol, interval), (kept, more) in holes.items():
        key = f"{symbol}-{interval}"
        for hole in kept:
            if not hole.unknown:
                total += hole.count
                named.append(f"{key} {hole.first}..{hole.end - 1} ({hole.count} candles)")
            elif hole.end >= 0:
                named.append(f"{key} ..{hole.end - 1} (resume point lost: how many unknown)")
            else:
                named.append(f"{key} (resume point lost, and not heard from since)")
        if more:
            named.append(f"{key} {more} later hole(s)")
    listed = ", ".join(named[:HOLES_LISTED])
    if len(named) > HOLES_LISTED:
        listed += f" and {len(named) - HOLES_LISTED} more"
    return f"holes: {listed} ({total} candles known missing in {len(holes)} stream(s))"


def _first_failure(exc: BaseException) -> BaseException:
    """The first real error out of a (nested) exception group, for one clear message."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _streams(settings: Settings, streams: Sequence[tuple[str, str]]) -> str:
    if settings.selection.dynamic and not streams:
        what = f"{settings.selection.describe()} x {','.join(settings.intervals)}"
        return f"{what} into {settings.kafka_topic}"
    names = [stream_name(*s) for s in streams]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return f"{shown} into {settings.kafka_topic}"


def _symbols(settings: Settings, source: Source) -> str:
    """Telemetry's `symbol`: the named symbols, or a summary of a run over many."""
    symbols = len({s for s, _ in source.streams})
    return summary(settings.selection, symbols, settings.intervals, len(source.streams))


async def _stop_at(worker: Worker, source: Source, stop_at: float) -> None:
    """`finished` means every candle closing at or before STOP_AT is in Kafka: once the
    moment has come (by our clock or by Binance's, whichever says so first), wait, bounded,
    for the last candles to close and for any fill, then stop."""
    stop_ms = int(stop_at * 1000)
    if stop_at <= time.time():
        # Valid (a retried pod gets the STOP_AT its first pod had), but worth a word.
        log.warning(
            "STOP_AT %s is past already: completing the streams the topic holds up to it, then "
            "finishing", dt.datetime.fromtimestamp(stop_at, dt.UTC).isoformat()
        )  # fmt: skip
    with trio.move_on_at(trio.current_time() + max(0.0, stop_at - time.time())):
        await source.router.wait_event_time(stop_ms)
    short = await source.complete_until(stop_ms, worker.settings.stop_grace)
    if holes := source.holes(stop_ms):
        # A retry would resume after the last candle in Kafka, past the holes, and could end
        # `finished` over them: this run's outcome is final.
        also = f"; {len(short)} stream(s) also lack their last candles" if short else ""
        worker.stop(
            f"{_holes(holes)}; reached STOP_AT with these candles missing for good{also}",
            status="error",
            final=True,
            exit_code=HOLES_EXIT,
        )
        return
    if short:
        names = ", ".join(f"{s} {i}" for s, i in short[:5])
        worker.stop(
            f"reached STOP_AT, but {len(short)} stream(s) lack candles closing before it ({names})",
            status="error",
            final=False,
            exit_code=1,
        )
        return
    worker.stop("reached STOP_AT", status="finished")
