"""The measurements, each a function of a ``Bench`` (processes, Kafka, durations)."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from bench import profile
from bench.kafka_tools import Kafka, Topics
from bench.parties import (
    Consumer,
    Emulator,
    Worker,
    combined_url,
    settle,
    symbols,
    window_view,
)
from bench.procs import Procs, system_cpu, usage
from bench.results import (
    Baseline,
    Cadence,
    Idle,
    Lifecycle,
    Phase,
    Profile,
    Soak,
    SoakSample,
    Throughput,
    WorkerView,
)


@dataclass
class Bench:
    procs: Procs
    kafka: Kafka
    streams: int  # synthetic symbols on the combined connection, INTERVAL=1m
    warmup: float  # seconds before each window
    window: float  # seconds measured
    out: Path  # logs and raw data of this run
    # Workers run with kafka-python's sensors on (KAFKA_CLIENT_METRICS=1): records per
    # request, request rate. A measuring run's cost: a few µs per record.
    client_metrics: bool = True

    def worker(self, label: str, emulator: Emulator, streams: list[str], topics: Topics,
               *, interval: str = "1m") -> Worker:  # fmt: skip
        return Worker(self.procs, self.kafka, label, emulator, streams, topics,
                      interval=interval, client_metrics=self.client_metrics)  # fmt: skip

    def log(self, message: str) -> None:
        print(f"bench: {message}", flush=True)


# --------------------------------------------------------------------------- baselines


def baselines(bench: Bench, emulator: Emulator) -> tuple[Baseline, Baseline]:
    """A bare trio-websocket reader on the firehose, then a bare kafka-python producer."""
    ws = reader_baseline(bench, emulator)
    timing = ["--warmup", str(bench.warmup), "--seconds", str(bench.window)]
    topics = bench.kafka.topics("baseline")
    bench.log("baseline: bare kafka-python producer (worker settings), acks=all, idempotent")
    kafka = _baseline(
        bench, "baseline-kafka", "kafka", "--bootstrap", bench.kafka.broker.bootstrap,
        "--topic", topics.candles, "--streams", str(bench.streams), *timing,
    )  # fmt: skip
    return ws, kafka


def reader_baseline(bench: Bench, emulator: Emulator, rate: float | None = None) -> Baseline:
    """A bare trio-websocket reader on the firehose, over the emulator's scheme and trust;
    at ``rate`` frames/s (spread evenly) when given, else as fast as it reads."""
    timing = ["--warmup", str(bench.warmup), "--seconds", str(bench.window)]
    url = combined_url(emulator.url, bench.streams)
    scheme = "wss" if emulator.tls else "plain ws"
    pace = "firehose max" if rate is None else f"{rate:,.0f} frames/s"
    bench.log(f"baseline: bare trio-websocket reader over {scheme}, {bench.streams} streams, "
              f"{pace}")  # fmt: skip
    name = "baseline-ws" + ("" if emulator.tls else "-plain") + (f"-{rate:.0f}" if rate else "")
    if rate is not None:
        emulator.rate(rate)
    return _baseline(bench, name, "ws", "--url", url, *timing, env=emulator.env)


def _baseline(bench: Bench, name: str, *args: str, env: dict[str, str] | None = None) -> Baseline:
    child = bench.procs.python(name, "bench.baselines", *args, env=env, talk=True)
    line = child.readline(bench.warmup + bench.window + 120)
    bench.procs.forget(child)
    return msgspec.json.decode(line, type=Baseline)


# --------------------------------------------------------------------------- throughput


def throughput(
    bench: Bench, emulator: Emulator, *, profile_seconds: float = 0.0
) -> tuple[Throughput, Lifecycle, Profile | None]:
    """The worker on the firehose at full speed; end offsets sampled by the consumer."""
    kafka = bench.kafka
    plain = "" if emulator.tls else "-plain"
    topics = kafka.topics(f"throughput{plain}")
    offsets = Consumer(bench.procs, f"consumer-throughput{plain}", "offsets",
                       kafka.broker.bootstrap, topics.candles)  # fmt: skip
    scheme = "wss" if emulator.tls else "plain ws (comparison)"
    bench.log(f"throughput: worker on {bench.streams} streams over {scheme}, firehose max")
    worker = bench.worker(f"max-load{plain}", emulator, symbols(bench.streams), topics)
    worker.result.first_ns = offsets.first()
    settle(bench.warmup)
    procs = {"worker": worker.pid, "emulator": emulator.child.pid, "broker": kafka.broker.pid}
    before = {name: usage(pid) for name, pid in procs.items()}
    scrape0, machine0, w0 = worker.scrape(), system_cpu(), time.time_ns()
    peak_rss = _watch_rss(worker.pid, bench.window)
    after = {name: usage(pid) for name, pid in procs.items()}
    scrape1, machine1, w1 = worker.scrape(), system_cpu(), time.time_ns()
    prof = _profile(bench, worker.pid, profile_seconds, "full-speed")
    bench.log("throughput: stop command under full load")
    lifecycle = worker.stop()
    samples = offsets.finish()
    records = _interpolate(samples, w1) - _interpolate(samples, w0)
    result = Throughput(
        streams=bench.streams,
        window=(w1 - w0) / 1e9,
        records=round(records),
        worker_cpu=after["worker"].cpu - before["worker"].cpu,
        emulator_cpu=after["emulator"].cpu - before["emulator"].cpu,
        broker_cpu=after["broker"].cpu - before["broker"].cpu,
        machine_cpu=machine1 - machine0,
        rss_kib=peak_rss,
        hwm_kib=after["worker"].hwm_kib,
        plain=not emulator.tls,
        view=window_view(scrape0, scrape1),
    )
    return result, lifecycle, prof


def _profile(bench: Bench, pid: int, seconds: float, label: str) -> Profile | None:
    """py-spy samples of the worker for ``seconds`` (none when 0), after a measured window:
    sampling pauses the process, so it must not overlap one."""
    if seconds <= 0:
        return None
    bench.log(f"{label}: profiling the worker with py-spy for {seconds:.0f} s")
    try:
        return profile.record(pid, seconds, bench.out / f"profile-{label}")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        bench.log(f"{label}: no profile ({exc})")
        return None


def _watch_rss(pid: int, seconds: float) -> int:
    """Sleep ``seconds``, sampling VmRSS every 0.25 s; the largest sample."""
    peak = 0
    steps = max(1, round(seconds / 0.25))
    for _ in range(steps):
        settle(seconds / steps)
        peak = max(peak, usage(pid).rss_kib)
    return peak


def _interpolate(samples: list[Any], at_ns: int) -> float:
    """End-offset total at ``at_ns``, linear between the two samples around it."""
    prev = samples[0]
    for sample in samples:
        if sample[0] >= at_ns:
            t0, n0 = prev
            t1, n1 = sample
            return float(n1) if t1 == t0 else n0 + (n1 - n0) * (at_ns - t0) / (t1 - t0)
        prev = sample
    return float(samples[-1][1])


# --------------------------------------------------------------------------- freshness


def freshness(
    bench: Bench, emulator: Emulator, rates: list[float], *, profile_seconds: float = 0.0
) -> tuple[list[Phase], Lifecycle]:
    """One worker, the firehose stepped through ``rates``; every candle timed end to end."""
    kafka = bench.kafka
    topics = kafka.topics("freshness")
    consumer = Consumer(bench.procs, "consumer-freshness", "records", kafka.broker.bootstrap,
                        topics.candles)  # fmt: skip
    emulator.rate(rates[0])
    worker = bench.worker("freshness", emulator, symbols(bench.streams), topics)
    worker.result.first_ns = consumer.first()
    procs = {"worker": worker.pid, "consumer": consumer.child.pid,
             "emulator": emulator.child.pid, "broker": kafka.broker.pid}  # fmt: skip
    windows: list[tuple[float, int, int, dict[str, float], Profile | None, WorkerView]] = []
    for rate in rates:
        bench.log(f"freshness: {rate:,.0f} frames/s, all closing")
        emulator.rate(rate)
        settle(bench.warmup)
        scrape0 = worker.scrape()
        before, machine0, w0 = _usages(procs), system_cpu(), time.time_ns()
        settle(bench.window)
        after, machine1, w1 = _usages(procs), system_cpu(), time.time_ns()
        view = window_view(scrape0, worker.scrape())
        cpu = {name: after[name] - before[name] for name in procs}
        prof = _profile(bench, worker.pid, profile_seconds, f"freshness-{rate:.0f}")
        windows.append((rate, w0, w1, cpu | {"machine": machine1 - machine0}, prof, view))
    # Back to a trickle so what the last window sent is through before the stop.
    emulator.rate(rates[0])
    settle(2.0)
    lifecycle = worker.stop()
    rows = consumer.finish()
    sent = emulator.send_times(bench.out / "send-times.json")
    seen: dict[tuple[str, int], tuple[int, int]] = {}
    for key, open_time, recv_ns, create_ms in rows:
        symbol, interval = key.rsplit("-", 1)
        seen.setdefault((f"{symbol.lower()}@kline_{interval}", open_time), (recv_ns, create_ms))
    phases = []
    for rate, w0, w1, cpu, prof, view in windows:
        in_window = sorted((ns, k) for k, ns in sent.items() if w0 <= ns < w1)
        timed = [(ns, seen[k]) for ns, k in in_window if k in seen]
        phases.append(
            Phase(
                rate=rate,
                window=(w1 - w0) / 1e9,
                sent=len(in_window),
                latencies_ms=[(recv - ns) / 1e6 for ns, (recv, _) in timed],
                sent_at=[(ns - w0) / 1e9 for ns, _ in timed],
                to_send_ms=[create - ns / 1e6 for ns, (_, create) in timed],
                worker_cpu=cpu["worker"],
                consumer_cpu=cpu["consumer"],
                emulator_cpu=cpu["emulator"],
                broker_cpu=cpu["broker"],
                machine_cpu=cpu["machine"],
                profile=prof,
                view=view,
            )
        )
    return phases, lifecycle


def _usages(pids: dict[str, int]) -> dict[str, float]:
    return {name: usage(pid).cpu for name, pid in pids.items()}


# --------------------------------------------------------------------------- start and stop


def lifecycles(bench: Bench, emulator: Emulator, runs: int, rate: float) -> list[Lifecycle]:
    """Start a worker, wait for its first candle in Kafka, run a while under load, stop it."""
    emulator.rate(rate)
    results = []
    for i in range(1, runs + 1):
        bench.log(f"start/stop {i}/{runs}: {bench.streams} streams, {rate:,.0f} frames/s")
        topics = bench.kafka.topics("lifecycle")
        consumer = Consumer(bench.procs, f"consumer-lifecycle-{i}", "records",
                            bench.kafka.broker.bootstrap, topics.candles)  # fmt: skip
        worker = bench.worker(f"lifecycle-{i}", emulator, symbols(bench.streams), topics)
        worker.result.first_ns = consumer.first()
        settle(2.0)
        results.append(worker.stop())
        consumer.child.end()
    return results


def idle(bench: Bench) -> tuple[Idle, Lifecycle]:
    """One stream at Binance's own pace (an update every 2 s): memory and CPU at rest."""
    bench.log("idle: 1 stream (BTCUSDT 1m) at the market clock's pace")
    emulator = Emulator(bench.procs, "emulator-idle", "--clock")
    try:
        topics = bench.kafka.topics("idle")
        worker = bench.worker("idle", emulator, ["BTCUSDT"], topics)
        worker.wait_started()
        settle(bench.warmup)
        u0 = usage(worker.pid)
        settle(bench.window / 2)
        u1 = usage(worker.pid)
        result = Idle(
            rss_kib=u1.rss_kib, hwm_kib=u1.hwm_kib, cpu_share=(u1.cpu - u0.cpu) / (u1.at - u0.at)
        )
        return result, worker.stop()
    finally:
        emulator.end()


# --------------------------------------------------------------------------- cadence


def cadence(bench: Bench, interval: str, window: float, *, profile_seconds: float = 0.0) -> Cadence:
    """``bench.streams`` streams of ``interval`` on the emulator's market clock at Binance's
    pace: every stream's frame comes at the same instants (a burst every 2 s for 1m, in-progress
    updates included, which CANDLES=closed drops; every second for 1s, all closing)."""
    bench.log(f"cadence: {bench.streams} streams of {interval} at Binance's pace, {window:.0f} s")
    emulator = Emulator(bench.procs, f"emulator-clock-{interval}", "--clock",
                        "--synthetic", str(bench.streams))  # fmt: skip
    try:
        topics = bench.kafka.topics(f"cadence-{interval}")
        worker = bench.worker(f"cadence-{interval}", emulator, symbols(bench.streams), topics,
                              interval=interval)  # fmt: skip
        worker.wait_started()
        settle(bench.warmup)
        procs = {"worker": worker.pid, "emulator": emulator.child.pid,
                 "broker": bench.kafka.broker.pid}  # fmt: skip
        s0, u0, machine0 = worker.scrape(), _usages(procs), system_cpu()
        t0 = time.monotonic()
        settle(window)
        s1, u1, machine1 = worker.scrape(), _usages(procs), system_cpu()
        t1 = time.monotonic()
        c0, c1 = s0.counters, s1.counters
        used = {name: u1[name] - u0[name] for name in procs}
        result = Cadence(
            interval=interval,
            streams=bench.streams,
            window=t1 - t0,
            worker_cpu=used["worker"],
            frames=round(c1["frames_received"] - c0["frames_received"]),
            candles=round(c1["candles_acknowledged"] - c0["candles_acknowledged"]),
            others_cpu=machine1 - machine0 - sum(used.values()),
            rss_kib=usage(worker.pid).rss_kib,
            view=window_view(s0, s1),
            profile=_profile(bench, worker.pid, profile_seconds, f"cadence-{interval}"),
        )
        worker.stop()
        return result
    finally:
        emulator.end()


# --------------------------------------------------------------------------- soak


def soak(bench: Bench, seconds: float, rate: float, every: float = 5.0) -> Soak:
    """One worker on the firehose at ``rate`` frames/s (all closing, spread evenly) for
    ``seconds``, resident memory sampled every ``every`` s; written out as it goes."""
    bench.log(f"soak: {bench.streams} streams, {rate:,.0f} candles/s for {seconds / 60:.0f} min")
    emulator = Emulator(bench.procs, "emulator-soak", "--synthetic", str(bench.streams),
                        "--rate", str(rate))  # fmt: skip
    try:
        topics = bench.kafka.topics("soak")
        worker = bench.worker("soak", emulator, symbols(bench.streams), topics)
        worker.wait_started()
        result = Soak(streams=bench.streams, rate=rate, seconds=seconds, samples=[])
        spawned = worker.child.spawned_ns / 1e9
        end = time.monotonic() + seconds
        progress = bench.out / "soak.json"
        while time.monotonic() < end:
            settle(every)
            u = usage(worker.pid)
            acknowledged = round(worker.counters()["candles_acknowledged"])
            at = time.time() - spawned
            result.samples.append(SoakSample(at, u.rss_kib, u.cpu, acknowledged))
            if len(result.samples) % 12 == 0:
                save(progress, result)
                last = result.samples[-1]
                bench.log(f"soak: {at / 60:.1f} min, RSS {last.rss_kib / 1024:.1f} MiB, "
                          f"{acknowledged:,} candles")  # fmt: skip
        result.lifecycle = worker.stop()
        save(progress, result)
        return result
    finally:
        emulator.end()


def save(path: Path, value: Any) -> None:
    path.write_text(json.dumps(msgspec.to_builtins(value), indent=1))
