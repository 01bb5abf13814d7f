"""The benchmark's parties as processes: emulator, consumer and worker, with their protocols."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client.parser import text_string_to_metric_families

from bench.kafka_tools import Kafka, Topics
from bench.procs import Child, Procs
from bench.results import Lifecycle, WorkerView

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def symbols(streams: int) -> list[str]:
    return [f"SYM{i}USDT" for i in range(streams)]


def combined_url(base: str, streams: int) -> str:
    names = "/".join(f"{s.lower()}@kline_1m" for s in symbols(streams))
    return f"{base}/stream?streams={names}"


class Emulator:
    """``bench.emulator`` in its own process: over wss:// as Binance serves (a CA of its own,
    trusted by the clients given ``env``), or with ``tls=False`` over plain ws://."""

    def __init__(self, procs: Procs, name: str, *args: str, tls: bool = True) -> None:
        folder = procs.logs / f"{name}-tls"
        tls_args = ("--tls", str(folder)) if tls else ()
        self.child = procs.python(name, "bench.emulator", *args, *tls_args, talk=True)
        self.url = self.child.readline(START_TIMEOUT)
        if not self.url.startswith("wss://" if tls else "ws://"):
            raise RuntimeError(f"{name} did not start: {self.url!r}")
        self.tls = tls
        # What a client process needs to trust it: OpenSSL's default store, which the
        # worker's default context (loader/tls.py) and trio-websocket's read.
        self.env = {"SSL_CERT_FILE": str(folder / "ca.pem")} if tls else {}

    def rate(self, rate: float | str) -> None:
        self.child.send(f"rate {rate}")

    def send_times(self, path: Path) -> dict[tuple[str, int], int]:
        """Every closing frame's send time, keyed by (stream name, open time)."""
        self.child.send(f"dump {path}")
        self.child.expect("dumped", 60)
        rows = msgspec.json.decode(path.read_bytes(), type=list[tuple[str, int, int]])
        return {(stream, open_time): ns for stream, open_time, ns in rows}

    def end(self) -> None:
        self.child.end()


class Consumer:
    """``bench.consumer`` in its own process, positioned on ``topic`` before it returns."""

    def __init__(self, procs: Procs, name: str, mode: str, bootstrap: str, topic: str) -> None:
        self.out = procs.logs / f"{name}.json"
        self.child = procs.python(
            name, "bench.consumer", mode, "--bootstrap", bootstrap, "--topic", topic,
            "--out", str(self.out), talk=True,
        )  # fmt: skip
        self.child.expect("ready", START_TIMEOUT)

    def first(self, timeout: float = START_TIMEOUT) -> int:
        """time_ns at which the consumer first saw a record."""
        return int(self.child.expect("first", timeout))

    def finish(self) -> list[Any]:
        """Read to the end offsets of now, then the rows (see ``bench.consumer``)."""
        self.child.send("finish")
        self.child.expect("done", 120)
        self.child.end()
        rows: list[Any] = msgspec.json.decode(self.out.read_bytes())
        return rows


class Worker:
    """``python -m loader`` in its own process, on fresh topics."""

    def __init__(
        self,
        procs: Procs,
        kafka: Kafka,
        label: str,
        emulator: Emulator,
        streams: list[str],
        topics: Topics,
        *,
        interval: str = "1m",
        metrics: bool = True,
        client_metrics: bool = False,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        emulator_url = emulator.url
        # Its own counters and per-thread CPU, read over /metrics (a free port picked here).
        self.metrics_port = free_port() if metrics else None
        env = {
            **emulator.env,
            "QUEUE_ID": topics.queue_id,
            "SYMBOL": ",".join(streams),
            "INTERVAL": interval,
            "KAFKA_TOPIC": topics.candles,
            "TELEMETRY_PRODUCER_ID": "bench",
            "KAFKA_BOOTSTRAP_SERVERS": kafka.broker.bootstrap,
            "BINANCE_WS_URL": f"{emulator_url}/ws",
            "BINANCE_API_URL": f"{emulator_url}/ws-api/v3",
            "QUEUE_CONTROL_TOPIC": topics.control,
            "QUEUE_EVENTS_TOPIC": topics.events,
            "LOG_FORMAT": "json",
        }
        if self.metrics_port is not None:
            env["METRICS_PORT"] = str(self.metrics_port)
        if client_metrics:
            env["KAFKA_CLIENT_METRICS"] = "1"  # a measuring run: kafka-python's sensors on
        self.child: Child = procs.python(f"worker-{label}", "loader", env=env)
        self.result = Lifecycle(label=label, spawned_ns=self.child.spawned_ns)

    @property
    def pid(self) -> int:
        return self.child.pid

    def stop(self) -> Lifecycle:
        """Produce the stop command, time the exit, and check everything was delivered."""
        r = self.result
        r.stop_sent_ns, r.stop_acked_ns = self.kafka.send_stop(self.topics)
        r.exit_code, r.exited_ns = self.child.wait_exit(STOP_TIMEOUT)
        events = self.kafka.events(self.topics)
        started = [e for e in events if e.status == "started"]
        if started:
            r.started_ns = int(started[0].timestamp * 1e9)
        if events:
            r.final_status = events[-1].status
            r.records_written = events[-1].records_written
        r.records_in_kafka = self.kafka.count(self.topics.candles)
        return r

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        self.kafka.wait_event(self.topics, "started", timeout)

    def counters(self) -> dict[str, float]:
        """The worker's own counters and gauges from /metrics, by name (`loader_` cut off)."""
        return self.scrape().counters

    def scrape(self) -> Scrape:
        if self.metrics_port is None:
            raise RuntimeError("this worker was started without metrics")
        return scrape(self.metrics_port)


class Scrape(msgspec.Struct):
    """A worker's /metrics, read: unlabelled counters and gauges by name (`loader_` and
    `_total` cut off), CPU seconds per thread by thread name, kafka-python's sensors."""

    counters: dict[str, float]
    threads: dict[str, float]
    kafka_client: dict[str, float]


def thread_group(name: str) -> str:
    """A worker thread's name -> what it is (Trio's pool threads are renamed as they go)."""
    if name == "MainThread":
        return "Trio (MainThread: the tasks, TLS, decoding)"
    if name == "loader-kafka-sender":
        return "sink's sender thread (producer.send)"
    if name.endswith("-network-thread"):
        return "kafka-python's network thread"
    if name.startswith("kafka-io"):
        return "kafka-python's I/O thread (kafka-io)"
    if " from " in name or name.startswith("Trio"):
        return "Trio's worker threads (trio.to_thread: control watcher...)"
    if name == "metrics" or "process_request_thread" in name:
        return "/metrics server"
    return name


def window_view(start: Scrape, end: Scrape) -> WorkerView:
    """Per thread group, CPU seconds between two scrapes (a thread born since counts from
    zero; one that ended since is left out); kafka-python's sensors as of the end."""
    threads: dict[str, float] = {}
    for name, seconds in end.threads.items():
        group = thread_group(name)
        threads[group] = threads.get(group, 0.0) + seconds - start.threads.get(name, 0.0)
    return WorkerView(threads=threads, kafka_client=dict(end.kafka_client))


def scrape(port: int) -> Scrape:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    found = Scrape({}, {}, {})
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("loader_"):
                continue
            if not sample.labels:
                name = sample.name.removeprefix("loader_").removesuffix("_total")
                found.counters[name] = sample.value
            elif sample.name == "loader_thread_cpu_seconds":
                found.threads[sample.labels["thread"]] = sample.value
            elif sample.name == "loader_kafka_client":
                found.kafka_client[sample.labels["name"]] = sample.value
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settle(seconds: float) -> None:
    """Let a run reach its steady state (or let a window pass)."""
    time.sleep(seconds)
