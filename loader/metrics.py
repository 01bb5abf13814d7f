"""Prometheus metrics and `/healthz`, served from a thread when METRICS_PORT is set.

Counters live as plain integers in `Stats` (cheap on the hot path); a collector turns them into
samples at scrape time. The delivery-latency histogram is prometheus-client's own, observed once
per acknowledged batch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loader.stats import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One worker's registry: its counters, gauges and the delivery-latency histogram."""

    def __init__(self, stats: Stats, channel_depth: Callable[[], int]) -> None:
        self.stats = stats
        self.channel_depth = channel_depth
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StatsCollector(self))
        self.delivery_latency = Histogram(
            "loader_kafka_delivery_seconds",
            "Time from handing a batch to kafka-python to Kafka acknowledging all of it.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class _StatsCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        s = self.metrics.stats
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
            "history_connections", "WebSocket API connections opened.", s.history_connections
        )
        history = CounterMetricFamily(
            "loader_history_errors", "History requests that failed, by cause.", labels=["cause"]
        )
        for cause, count in sorted(s.history_errors.items()):
            history.add_metric([cause], count)
        yield history
        malformed = CounterMetricFamily(
            "loader_malformed_frames", "Frames skipped, by kind.", labels=["kind"]
        )
        for kind, count in sorted(s.malformed.items()):
            malformed.add_metric([kind], count)
        yield malformed
        reconnects = CounterMetricFamily(
            "loader_reconnects", "Binance connections replaced, by reason.", labels=["reason"]
        )
        for reason, count in sorted(s.reconnects.items()):
            reconnects.add_metric([reason], count)
        yield reconnects
        yield GaugeMetricFamily(
            "loader_last_frame_age_seconds", "Seconds since the last frame.", value=s.frame_age()
        )
        yield GaugeMetricFamily(
            "loader_channel_depth",
            "Candles waiting in the channel for the Kafka sink.",
            value=self.metrics.channel_depth(),
        )


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(f"loader_{name}", documentation, value=value)


def healthy(stats: Stats, timeout: float) -> tuple[bool, str]:
    """Unhealthy when no frame arrived, or Kafka acknowledged nothing pending, for `timeout`."""
    age = stats.frame_age()
    if age > timeout:
        return False, f"no frame from Binance for {age:.0f} s"
    stuck = time.monotonic() - stats.last_ack_at
    if stats.unacknowledged and stuck > timeout:
        return False, f"{stats.unacknowledged} candles unacknowledged for {stuck:.0f} s"
    return True, "ok"


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
        host, port, _app(metrics, health_timeout), handler_class=_QuietHandler
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
