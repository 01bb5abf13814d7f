"""Two numbers of the history path (issue 11), against the local Kafka and the emulator:

* the worker's peak RSS while it fills a 24 h gap on a 1s stream (86,400 candles, 87
  pages), over its RSS when idle just before;
* the time `resume_points` takes for 1024 streams over a topic holding 24 h of 1m candles
  of each (1,474,560 records).

`uv run python -m bench.gaps [--skip-resume] [--no-docs]` with the local broker up (`just
kafka-up`; its ports from LOADER_KAFKA_PLAINTEXT_PORT); `just bench` runs it last and writes
its section of docs/benchmarks.md. The emulator runs in this process with its clock
frozen and moved by hand; the worker is a child process, so its memory is its own.
"""

from __future__ import annotations

import argparse
import os
import ssl
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import msgspec
import trio
import trustme
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import NewTopic

from bench.procs import REPO_ROOT
from bench.sections import write_section
from loader.intervals import candle_open
from loader.resume import resume_points
from loader.settings import load_settings
from loader.testing import EmulatorConfig, open_emulator

DAY_MS = 86_400_000


def bootstrap() -> str:
    return f"127.0.0.1:{os.environ.get('LOADER_KAFKA_PLAINTEXT_PORT', '19092')}"


def new_topic(name: str, partitions: int) -> str:
    topic = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap())
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()
    return topic


def candle(symbol: str, interval: str, open_time: int, length: int) -> bytes:
    return msgspec.json.encode({
        "open_time": open_time, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0,
        "volume": 0.0, "close_time": open_time + length - 1, "quote_asset_volume": 0.0,
        "number_of_trades": 0, "taker_buy_base_asset_volume": 0.0,
        "taker_buy_quote_asset_volume": 0.0, "symbol": symbol, "interval": interval,
    })  # fmt: skip


def produce(topic: str, records: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap(), linger_ms=50,
                             batch_size=512 * 1024, acks=1)  # fmt: skip
    try:
        for key, value in records:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=600)
    finally:
        producer.close(timeout=10)


def status_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def worker_env(topic: str, ws_url: str, api_url: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("KAFKA", "QUEUE", "SYMBOL", "INTERVAL", "BINANCE"))}  # fmt: skip
    return keep | {
        "QUEUE_ID": f"q-{topic}", "SYMBOL": "BTCUSDT", "INTERVAL": "1s", "KAFKA_TOPIC": topic,
        "TELEMETRY_PRODUCER_ID": "bench", "KAFKA_BOOTSTRAP_SERVERS": bootstrap(),
        "QUEUE_CONTROL_TOPIC": f"{topic}-control", "QUEUE_EVENTS_TOPIC": f"{topic}-events",
        "BINANCE_WS_URL": ws_url, "BINANCE_API_URL": api_url, "LOG_FORMAT": "json",
    }  # fmt: skip


async def gap_rss() -> tuple[int, int, float]:
    """(idle RSS KiB, peak RSS KiB, seconds to fill) for a 24 h gap on a 1s stream."""
    now = int(time.time() * 1000)
    start = candle_open("1s", now) - DAY_MS
    topic = new_topic("gap-1s", 1)
    # The topic says the stream left off 24 h ago.
    produce(topic, [(b"BTCUSDT-1s", candle("BTCUSDT", "1s", start, 1000))])
    config = EmulatorConfig(speed=1e-6, start_ms=start, ping_interval=5, pong_timeout=30)
    ca = trustme.CA()
    ca_file = Path(tempfile.mkdtemp(prefix="bench-gaps-tls-")) / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    # Over wss://, as Binance serves: a certificate of this CA, trusted by the worker only.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    async with open_emulator(config.replace(ssl_context=context)) as emulator:
        emulator.advance(DAY_MS)  # a day passes while no worker runs
        env = worker_env(topic, emulator.raw_url(), emulator.ws_api_url)
        env["SSL_CERT_FILE"] = str(ca_file)
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, cwd=REPO_ROOT,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            await emulator.wait_connections(1)
            await trio.sleep(1.0)  # settle: imports done, connected, idle
            idle = status_kib(process.pid, "VmRSS")
            began = trio.current_time()
            emulator.advance(1500)  # a closing frame: the gap is known
            consumer_count = 0
            with trio.fail_after(300):
                while consumer_count < DAY_MS // 1000:
                    await trio.sleep(0.5)
                    consumer_count = await trio.to_thread.run_sync(count, topic)
            took = trio.current_time() - began
            peak = status_kib(process.pid, "VmHWM")
        finally:
            process.terminate()
            await process.wait()
    return idle, peak, took


def count(topic: str) -> int:
    from kafka import KafkaConsumer, TopicPartition  # noqa: PLC0415

    consumer = KafkaConsumer(bootstrap_servers=bootstrap())
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(tps).values())
    finally:
        consumer.close()


def resume_time() -> tuple[int, float]:
    """(records, seconds) for resume_points over 1024 streams x 24 h of 1m candles."""
    topic = new_topic("resume", 4)
    streams = [(f"SYM{i}USDT", "1m") for i in range(1024)]
    last = candle_open("1m", int(time.time() * 1000)) - 60_000
    records = [
        (f"{s}-{i}".encode(), candle(s, i, t, 60_000))
        for t in range(last - DAY_MS + 60_000, last + 1, 60_000)
        for s, i in streams
    ]
    produce(topic, records)
    settings = load_settings({
        "QUEUE_ID": "bench", "SYMBOL": ",".join(s for s, _ in streams), "INTERVAL": "1m",
        "KAFKA_TOPIC": topic, "TELEMETRY_PRODUCER_ID": "bench",
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap(),
    })  # fmt: skip
    began = time.monotonic()
    found = resume_points(settings).points
    took = time.monotonic() - began
    assert len(found) == 1024, len(found)
    assert set(found.values()) == {last}
    return len(records), took


BEGIN = "<!-- bench-gaps:begin (generated by `just bench`, bench/gaps.py; edit outside) -->"
END = "<!-- bench-gaps:end -->"
GAP_TARGET_MIB = 20 * 1e6 / 2**20  # "at most 20 MB over idle"
RESUME_TARGET_S = 5.0


def section(gap: tuple[int, int, float], resume: tuple[int, float]) -> str:
    idle, peak, filled = gap
    records, took = resume
    grown = (peak - idle) / 1024

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return "\n".join(
        [
            "## The history path (issue 11)",
            "",
            f"Run {time.strftime('%Y-%m-%dT%H:%M:%S%z')} with `just bench` (bench/gaps.py): the "
            "emulator with its market clock moved by hand, over `wss://` as Binance serves, "
            "the worker as a child process, the local Kafka.",
            "",
            "| measure | result | target | verdict |",
            "|---|---|---|---|",
            f"| Peak RSS filling a 24 h gap on a 1s stream (86,400 candles, 87 pages) | "
            f"+{grown:.1f} MiB over {idle / 1024:.1f} MiB idle (filled in {filled:.1f} s) | "
            f"<= 20 MB over idle | {verdict(grown <= GAP_TARGET_MIB)} |",
            f"| Resume of 1024 streams over 24 h of 1m candles ({records:,} records) | "
            f"{took:.2f} s | <= {RESUME_TARGET_S:.0f} s | {verdict(took <= RESUME_TARGET_S)} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-gap", action="store_true")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs", help="where to write")
    # `just bench` hands every scenario its arguments; the others' are not ours.
    args, _ = parser.parse_known_args()
    gap: tuple[int, int, float] | None = None
    resume: tuple[int, float] | None = None
    if not args.skip_gap:
        gap = idle, peak, took = trio.run(gap_rss)
        print(f"24 h gap on a 1s stream: idle RSS {idle / 1024:.1f} MiB, peak {peak / 1024:.1f}"
              f" MiB (+{(peak - idle) / 1024:.1f} MiB), filled in {took:.1f} s")  # fmt: skip
    if not args.skip_resume:
        resume = n, took = resume_time()
        print(f"resume of 1024 streams over {n} records (24 h of 1m): {took:.2f} s")
    if gap is not None and resume is not None and not args.no_docs:
        write_section(args.docs / "benchmarks.md", BEGIN, END, section(gap, resume))


if __name__ == "__main__":
    main()
