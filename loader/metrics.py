"""Prometheus metrics and `/healthz`, served from threads when METRICS_PORT is set.

Counters live as plain integers in `Stats` (cheap on the hot path); at scrape time the HTTP
thread asks the Trio thread for a snapshot of them, so it never iterates a Counter that a Trio
task is growing. Each request gets its own thread: a slow scrape never holds up `/healthz`,
which reads two timestamps and needs nothing from Trio. The delivery-latency histogram is
prometheus-client's own (thread-safe), observed once per acknowledged batch.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loader.intervals import next_open
from loader.stats import Stats, StatsSnapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One worker's registry: its counters, gauges and the delivery-latency histogram.

    Build it on the Trio thread that owns `stats`: scrapes from other threads are answered
    with snapshots taken there.
    """

    def __init__(
        self,
        stats: Stats,
        channel_depth: Callable[[], int],
        *,
        intervals: Iterable[str] = (),
        kafka_client: Callable[[], Mapping[str, Mapping[str, float]]] | None = None,
    ) -> None:
        self.stats = stats
        self.channel_depth = channel_depth
        # The shortest candle period: how often a closed candle is due, for freshness alerts.
        periods = [next_open(i, 0) / 1000 for i in intervals]
        self.shortest_interval = min(periods, default=0.0)
        try:
            self._owner: tuple[trio.lowlevel.TrioToken, int] | None = (
                trio.lowlevel.current_trio_token(),
                threading.get_ident(),
            )
        except RuntimeError:  # built outside Trio: nothing to hop to, read directly
            self._owner = None
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(self))
        self.registry.register(_ThreadCollector())
        if kafka_client is not None:
            self.registry.register(_KafkaClientCollector(kafka_client))
        self.delivery_latency = Histogram(
            "loader_kafka_delivery_seconds",
            "Time from handing a batch to kafka-python to Kafka acknowledging all of it.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def read(self) -> tuple[StatsSnapshot, int]:
        """The counters and the channel depth, taken on the Trio thread whatever the caller's."""
        owner = self._owner
        if owner is None or owner[1] == threading.get_ident():
            return self._read()
        return trio.from_thread.run_sync(self._read, trio_token=owner[0])

    def _read(self) -> tuple[StatsSnapshot, int]:
        return self.stats.snapshot(), self.channel_depth()


class _StatsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        s, depth = self.metrics.read()
        yield _counter(
            "candles_received", "Closed candles received from Binance.", s.candles_received
        )
        yield _counter(
            "candles_published", "Candles handed to the Kafka sink.", s.candles_published
        )
        yield _counter(
            "candles_backfilled", "Closed candles filled from history.", s.candles_backfilled
        )
        yield _counter(
            "candles_acknowledged", "Candles Kafka acknowledged.", s.candles_acknowledged
        )
        yield _counter("frames_received", "WebSocket frames received.", s.frames_received)
        yield _counter(
            "duplicates_dropped", "Repeated or stale klines dropped.", s.duplicates_dropped
        )
        yield _counter(
            "updates_shed", "In-progress updates shed under backpressure.", s.updates_shed
        )
        yield _counter(
            "candles_lost",
            "Closed candles that can no longer be had (beyond BACKFILL_WINDOW, or not in "
            "history): every one is also logged and told in telemetry.",
            s.candles_lost,
        )
        yield _counter("holes", "Gaps, each of one or more lost candles.", s.holes)
        yield _counter(
            "symbols_dropped",
            "Symbols Binance does not know, dropped with their streams (the others go on).",
            s.symbols_dropped,
        )
        yield _counter("fills", "Gaps filled from history (fills started).", s.fills_started)
        yield _counter(
            "pending_dropped",
            "Frames a replacement connection buffered and did not publish (their gaps are filled).",
            s.pending_dropped,
        )
        yield _counter(
            "held_evicted",
            "Live candles shed while their stream's gap was being filled (refilled).",
            s.held_evicted,
        )
        yield _counter(
            "kafka_slow_writes",
            "Batches of candles Kafka took more than 5 s to acknowledge (each logged, with "
            "the partitions and leaders it waited on).",
            s.slow_writes,
        )
        yield GaugeMetricFamily(
            "loader_kafka_wait_seconds",
            "Seconds the oldest unacknowledged batch has waited for Kafka (0: none waits).",
            value=s.kafka_wait,
        )
        yield _counter(
            "history_connections", "WebSocket API connections opened.", s.history_connections
        )
        yield _labelled(
            "history_errors", "History requests that failed, by cause.", "cause",
            s.history_errors,
        )  # fmt: skip
        yield _counter(
            "control_ignored", "Control messages ignored (malformed or another queue's).",
            s.control_ignored,
        )  # fmt: skip
        yield _labelled("malformed_frames", "Frames skipped, by kind.", "kind", s.malformed)
        yield _labelled(
            "frames_refused",
            "Kline frames refused as implausible against our clock (never published), by reason.",
            "reason",
            s.frames_refused,
        )
        yield _labelled(
            "reconnects", "Binance connections replaced, by reason.", "reason", s.reconnects
        )
        yield GaugeMetricFamily(
            "loader_last_frame_age_seconds", "Seconds since the last frame.", value=s.frame_age
        )
        yield GaugeMetricFamily(
            "loader_last_alive_age_seconds",
            "Seconds since the Binance connection last showed life: a frame or an answered ping.",
            value=s.alive_age,
        )
        yield GaugeMetricFamily(
            "loader_last_candle_age_seconds",
            "Seconds since Kafka last acknowledged a candle: the topic's freshness.",
            value=s.ack_age,
        )
        yield GaugeMetricFamily(
            "loader_shortest_interval_seconds",
            "Period of the shortest configured interval: a closed candle is due that often.",
            value=self.metrics.shortest_interval,
        )
        yield GaugeMetricFamily(
            "loader_channel_depth",
            "Candles waiting in the channel for the Kafka sink.",
            value=depth,
        )


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) of each live thread of this process, by thread name (those
    sharing a name summed), from `/proc/self/task/<tid>/stat`: empty where there is no /proc.

    By the kernel's thread id rather than a per-thread CPU clock of the `pthread_t`: a thread
    that ends meanwhile is a missing file here, not a clock of a freed thread."""
    found: collections.defaultdict[str, float] = collections.defaultdict(float)
    for thread in threading.enumerate():
        try:
            stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
        except OSError:
            continue  # ended since, or no /proc
        # The name may hold spaces and parentheses: the fields start after the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        found[thread.name] += (int(fields[11]) + int(fields[12])) / _TICKS
    return dict(found)


class _ThreadCollector(Collector):
    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "loader_thread_cpu_seconds",
            "CPU seconds used so far by each live thread, by thread name (MainThread: Trio; "
            "an ended thread's time leaves the sum).",
            labels=["thread"],
        )
        for name, seconds in sorted(thread_cpu().items()):
            family.add_metric([name], seconds)
        yield family


# kafka-python's producer sensors worth a benchmark's reading (KAFKA_CLIENT_METRICS=1).
KAFKA_CLIENT_METRICS = (
    "records-per-request-avg", "request-rate", "batch-size-avg", "record-send-rate",
    "request-latency-avg", "record-queue-time-avg", "requests-in-flight", "request-size-avg",
)  # fmt: skip


class _KafkaClientCollector(Collector):
    """kafka-python's own producer metrics, when a measuring run turned them on."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, float]]]) -> None:
        self.read = read

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "loader_kafka_client",
            "kafka-python's producer metrics (KAFKA_CLIENT_METRICS=1 only), each averaged or "
            "rated over its last 5 to 10 s, by kafka-python's name.",
            labels=["name"],
        )
        try:
            group = self.read().get("producer-metrics", {})
        except RuntimeError:  # its registry grew while read (a new topic's sensors): next time
            group = {}
        for name in KAFKA_CLIENT_METRICS:
            if name in group:
                family.add_metric([name], float(group[name]))
        yield family


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"loader_{name}", documentation, value=value)


def _labelled(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    family = CounterMetricFamily(f"loader_{name}", documentation, labels=[label])
    for key, count in sorted(counts.items()):
        family.add_metric([key], count)
    return family


def healthy(stats: Stats, timeout: float) -> tuple[bool, str]:
    """Liveness: unhealthy when the Binance connection showed no life (no frame, no answered
    ping) for `timeout`, or Kafka acknowledged nothing pending for as long. A quiet stream on a
    live connection is healthy: stale data is the freshness metric's business, not a restart's.
    Reads only numbers the GIL makes atomic, so it never waits for the Trio thread."""
    age = stats.alive_age()
    if age > timeout:
        return False, f"no frame from Binance and no answered ping for {age:.0f} s"
    stuck = stats.stuck_age()
    if stats.unacknowledged and stuck > timeout:
        return False, f"{stats.unacknowledged} candles unacknowledged for {stuck:.0f} s"
    return True, "ok"


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    """One thread per request, so a slow scrape cannot hold up the kubelet's probe."""

    daemon_threads = True
    # Shutting down must not wait for a request stuck on a slow client.
    block_on_close = False


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the worker's own log lines."""


def _app(metrics: Metrics, health_timeout: float) -> Callable[..., Iterable[bytes]]:
    prometheus = make_wsgi_app(metrics.registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            ok, reason = healthy(metrics.stats, health_timeout)
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
            return [reason.encode() + b"\n"]
        # prometheus-client types its WSGI app loosely (Any); its result is the body.
        return prometheus(environ, start_response)  # type: ignore[no-any-return]

    return app


async def serve_metrics(
    metrics: Metrics,
    port: int,
    *,
    host: str = "0.0.0.0",  # noqa: S104 - the kubelet probes the pod IP
    health_timeout: float = 60.0,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve /metrics and /healthz until cancelled; reports the bound port."""
    server: WSGIServer = make_server(
        host,
        port,
        _app(metrics, health_timeout),
        server_class=_ThreadingServer,
        handler_class=_QuietHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    try:
        task_status.started(server.server_port)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_shutdown, server, thread)


def _shutdown(server: WSGIServer, thread: threading.Thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
