"""``just bench``: the worker end to end, against the emulator and the real local Kafka.

Starts the local broker if needed (``kafka/broker.py up``), then, each party in a process of
its own (emulator, worker, an independent consumer, the baselines):

1. idle: one stream at Binance's pace — resident memory and CPU at rest, then a stop;
2. freshness: one worker on ``--streams`` streams while the firehose steps through
   ``--rates`` (all closing frames): emulator send -> consumer read, per candle;
   then the bare trio-websocket reader alone at those of them with a CPU target (its floor);
3. start/stop: ``--lifecycle-runs`` workers, spawn -> first candle in Kafka, stop command ->
   exit, delivered count checked against the `interrupted` telemetry;
4. the two baselines (bare trio-websocket reader, bare kafka-python producer), then the worker
   at the firehose's full speed — throughput from end offsets, CPU per candle, memory — and,
   with ``--profile``, py-spy samples of it; then, for comparison only, the bare reader and
   the worker at full speed over plain ws:// (``--no-plain``: not).

The emulator serves wss:// as Binance does (a CA of its own per emulator, which the worker
and the bare reader trust through ``SSL_CERT_FILE``), one TLS record per message. Workers run
with ``METRICS_PORT`` (their per-thread CPU, read at each window's start and end) and
``KAFKA_CLIENT_METRICS=1`` (kafka-python's records per request and request rate; a few µs
per record; ``--no-client-metrics``: off).

Prints the table, saves the raw results in ``--out`` and (unless ``--no-docs``) writes
``docs/benchmarks.md`` and ``docs/freshness.png``. Every process it starts is ended, also on
failure or Ctrl-C.

    uv run python -m bench.run                 # what `just bench` runs
    uv run python -m bench.run --window 5 --warmup 2 --lifecycle-runs 1 --no-docs   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import sys
import time
from importlib.metadata import version
from pathlib import Path
from types import FrameType

import kafka.record.util as kafka_crc

from bench import report
from bench.kafka_tools import Broker, Kafka, local_broker
from bench.parties import Emulator
from bench.procs import REPO_ROOT, Procs
from bench.results import Machine, Run
from bench.scenarios import (
    Bench,
    baselines,
    cadence,
    freshness,
    idle,
    lifecycles,
    reader_baseline,
    save,
    soak,
    throughput,
)

PHASES = ("idle", "freshness", "lifecycle", "baselines", "throughput", "cadence", "soak")


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0].strip("`: ")
    )
    p.add_argument("--streams", type=int, default=1000, help="synthetic symbols, INTERVAL=1m")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds before each window")
    p.add_argument("--window", type=float, default=12.0, help="seconds each window measures")
    p.add_argument(
        "--rates",
        default="100,1000,5000",
        help="freshness: firehose frames/s, comma-separated",
    )
    p.add_argument("--lifecycle-runs", type=int, default=3, help="start/stop repetitions")
    p.add_argument("--lifecycle-rate", type=float, default=1000.0, help="their frames/s")
    p.add_argument(
        "--profile", type=float, default=8.0, help="seconds of py-spy at full load (0: none)"
    )
    p.add_argument(
        "--cadence",
        default="1m:60,1s:20",
        help="the emulator's cadence at Binance's pace: interval:window seconds, comma-separated",
    )
    p.add_argument("--soak", type=float, default=30.0, help="minutes of the soak (0: none)")
    p.add_argument("--soak-rate", type=float, default=600.0, help="its candles/s")
    p.add_argument(
        "--only",
        default=",".join(PHASES),
        help=f"which parts, comma-separated, of: {','.join(PHASES)}",
    )
    p.add_argument(
        "--no-plain",
        action="store_true",
        help="skip the comparison over plain ws:// (bare reader, worker at full speed)",
    )
    p.add_argument(
        "--no-client-metrics",
        action="store_true",
        help="workers without kafka-python's sensors (no records per request then)",
    )
    p.add_argument("--out", type=Path, default=None, help="logs and raw data (.cache/bench/...)")
    p.add_argument("--docs", type=Path, default=REPO_ROOT / "docs", help="where to write")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    return p.parse_args(argv)


def _machine(broker: Broker) -> Machine:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    uname = os.uname()
    # What kafka.record.util.calc_crc32c actually calls (bound as its default argument).
    bound = kafka_crc.calc_crc32c.__defaults__[0]
    crc = (
        f"the `crc32c` C extension {version('crc32c')} (kafka.record.util.calc_crc32c)"
        if kafka_crc.crc32c_c is not None and bound is kafka_crc.crc32c_c
        else "pure Python: the `crc32c` package is not in use"
    )
    return Machine(
        cores=os.cpu_count() or 0,
        cpu_model=model,
        memory_gib=round(mem_kib / 2**20, 1),
        kernel=f"{uname.sysname} {uname.release} {uname.machine}",
        python=sys.version.split()[0],
        kafka_python=version("kafka-python"),
        trio=version("trio"),
        trio_websocket=version("trio-websocket"),
        msgspec=version("msgspec"),
        crc32c=crc,
        kafka=broker.version,
        load_before=os.getloadavg(),
    )


def _command(argv: list[str] | None) -> str:
    """How this run was started, with the broker settings from the environment, if any (not
    its folder: a path of this machine, which says nothing to a reader elsewhere)."""
    args = sys.argv[1:] if argv is None else argv
    command = os.environ.get("BENCH_COMMAND", "").strip() or shlex.join(
        ["uv", "run", "python", "-m", "bench.run", *args]
    )
    env = [f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items())
           if k.startswith("LOADER_KAFKA_") and k != "LOADER_KAFKA_HOME"]  # fmt: skip
    return " ".join([*env, command])


def _parts(bench: Bench, run: Run, only: set[str], args: argparse.Namespace,
           rates: list[float]) -> None:  # fmt: skip
    """Each part asked for, in order; the saved results grow as they go."""
    partial = bench.out / "results.json"
    if "idle" in only:
        run.idle, idle_life = idle(bench)
        run.lifecycles.append(idle_life)
    if only & {"freshness", "lifecycle", "baselines"}:
        emulator = Emulator(bench.procs, "emulator-paced", "--synthetic", str(bench.streams),
                            "--rate", str(rates[0]), "--record-send-times")  # fmt: skip
        if "freshness" in only:
            run.phases, fresh_life = freshness(bench, emulator, rates,
                                               profile_seconds=args.profile)  # fmt: skip
            run.lifecycles.append(fresh_life)
        if "baselines" in only:
            # The floor of a read at the rates with a CPU target: the bare reader, paced.
            for rate in sorted(set(rates) & set(report.CPU_TARGETS)):
                run.ws_paced[rate] = reader_baseline(bench, emulator, rate)
        if "lifecycle" in only:
            run.lifecycles += lifecycles(bench, emulator, args.lifecycle_runs,
                                         args.lifecycle_rate)  # fmt: skip
        emulator.end()
        save(partial, run)
    if only & {"baselines", "throughput"}:
        emulator = Emulator(bench.procs, "emulator-max", "--synthetic", str(bench.streams),
                            "--rate", "max")  # fmt: skip
        if "baselines" in only:
            run.ws, run.kafka = baselines(bench, emulator)
        if "throughput" in only:
            run.throughput, max_life, run.profile = throughput(
                bench, emulator, profile_seconds=args.profile
            )
            run.lifecycles.append(max_life)
        emulator.end()
        save(partial, run)
        if not args.no_plain:
            _plain(bench, run, only)
            save(partial, run)
    if "cadence" in only:
        for spec in args.cadence.split(","):
            interval, _, window = spec.partition(":")
            run.cadences.append(
                cadence(bench, interval, float(window or 60), profile_seconds=args.profile)
            )
            save(partial, run)
    if "soak" in only and args.soak > 0:
        run.soak = soak(bench, args.soak * 60, args.soak_rate)
        save(partial, run)


def _plain(bench: Bench, run: Run, only: set[str]) -> None:
    """The comparison row: the bare reader and the worker at full speed over plain ws://."""
    emulator = Emulator(bench.procs, "emulator-max-plain", "--synthetic", str(bench.streams),
                        "--rate", "max", tls=False)  # fmt: skip
    try:
        if "baselines" in only:
            run.ws_plain = reader_baseline(bench, emulator)
        if "throughput" in only:
            run.throughput_plain, plain_life, _ = throughput(bench, emulator)
            run.lifecycles.append(plain_life)
    finally:
        emulator.end()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through Procs, which ends every child


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    began = time.monotonic()
    started = dt.datetime.now(dt.UTC)
    out = args.out or REPO_ROOT / ".cache" / "bench" / started.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    print(f"bench: starting the local Kafka broker if needed; logs and data in {out}", flush=True)
    broker = local_broker()
    machine = _machine(broker)
    kafka = Kafka(broker)
    only = set(args.only.split(","))
    if unknown := only - set(PHASES):
        raise SystemExit(f"bench: unknown parts {sorted(unknown)}; known: {', '.join(PHASES)}")
    run = Run(
        command=_command(argv),
        started=started.isoformat(timespec="seconds"),
        seconds=0.0,
        machine=machine,
        settings={
            "streams": args.streams,
            "warmup": args.warmup,
            "window": args.window,
            "rates": args.rates,
            "lifecycle_rate": args.lifecycle_rate,
            "cadence": args.cadence,
            "soak_minutes": args.soak,
            "soak_rate": args.soak_rate,
            "binance": "wss:// (the emulator's own CA), one TLS record per message",
            "kafka_client_metrics": int(not args.no_client_metrics),
        },
    )
    try:
        with Procs(out, pycache=REPO_ROOT / ".cache" / "bench" / "pycache") as procs:
            bench = Bench(procs, kafka, args.streams, args.warmup, args.window, out,
                          client_metrics=not args.no_client_metrics)  # fmt: skip
            _parts(bench, run, only, args, rates)
    finally:
        kafka.close()
    run.seconds = time.monotonic() - began
    save(out / "results.json", run)
    print(report.table(run))
    if not args.no_docs:
        report.write(run, args.docs)
        print(f"bench: wrote {args.docs / 'benchmarks.md'} and {args.docs / 'freshness.png'}")
    print(f"bench: done in {run.seconds:.0f} s; raw data in {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been ended", file=sys.stderr)
        sys.exit(130)
