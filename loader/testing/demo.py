"""`just run`: the worker on a local default, with the candles shown as Kafka receives them.

Without `BINANCE_WS_URL` it starts the emulator in-process (a 1m candle every second), over
wss as Binance serves it, with a CA made for the run that this process alone trusts, and
points the worker at it; every other variable keeps its usual meaning, with defaults filled in
for a local run. The worker itself runs exactly as in a pod (`loader.cli.serve`): Ctrl-C stops
it gracefully.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import sys
import tempfile
import time
from collections.abc import Mapping

import msgspec
import trio
import trustme  # a dev dependency: `just run` has it; nothing the image runs imports this
from kafka import KafkaConsumer, TopicPartition

from loader import logs
from loader.cli import serve
from loader.kafka import open_consumer
from loader.settings import ConfigError, Settings, load_settings
from loader.testing.config import EmulatorConfig
from loader.testing.server import serve_emulator

LOCAL_DEFAULTS = {
    "QUEUE_ID": "local-demo",
    "SYMBOL": "BTCUSDT,ETHUSDT",
    "INTERVAL": "1m",
    "TELEMETRY_PRODUCER_ID": "just-run",
    "TELEMETRY_INTERVAL": "5",
}
SPEED = 60.0  # a 1m candle every second


class _Shown(msgspec.Struct):
    open_time: int
    open: float
    close: float
    volume: float
    number_of_trades: int
    symbol: str
    interval: str


def _watch(settings: Settings, stop: trio.Event) -> None:
    """Blocking: print each candle as it lands in Kafka, until `stop` is set."""
    consumer: KafkaConsumer = open_consumer(settings.kafka, timeout=30.0)
    decode = msgspec.json.Decoder(_Shown).decode
    try:
        # The topic appears with the first candle the worker writes.
        while not (partitions := consumer.partitions_for_topic(settings.kafka_topic)):
            if stop.is_set():
                return
            time.sleep(0.2)
        tps = [TopicPartition(settings.kafka_topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_end(*tps)
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=200).values():
                for record in records:
                    c = decode(record.value)
                    opened = dt.datetime.fromtimestamp(c.open_time / 1000, dt.UTC)
                    print(
                        f"  kafka <- {c.symbol:<9} {c.interval:<3} {opened:%H:%M} "
                        f"open {c.open:<12} close {c.close:<12} volume {c.volume:<14} "
                        f"trades {c.number_of_trades}",
                        flush=True,
                    )
    finally:
        consumer.close(autocommit=False, timeout_ms=2000)


def _trusted_server_context() -> ssl.SSLContext:
    """A server context whose certificate this process trusts from now on: a CA made for
    the run, put in OpenSSL's default trust store (`SSL_CERT_FILE`), which the worker's
    TLS context reads."""
    ca = trustme.CA()
    with tempfile.NamedTemporaryFile(prefix="emulator-ca-", suffix=".pem", delete=False) as ca_file:
        ca_file.write(ca.cert_pem.bytes())
    os.environ["SSL_CERT_FILE"] = ca_file.name
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


async def main(env: Mapping[str, str]) -> int:
    async with trio.open_nursery() as nursery:
        # The emulator's market runs 60x fast from now: a fresh topic per run keeps a second
        # run from resuming after the first one's (future) candles.
        topic = f"candles-local-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
        env = {**LOCAL_DEFAULTS, "KAFKA_TOPIC": topic, **env}
        if not env.get("BINANCE_WS_URL"):
            config = EmulatorConfig(speed=SPEED, seed=1, ssl_context=_trusted_server_context())
            emulator = await nursery.start(serve_emulator, config)
            env["BINANCE_WS_URL"] = emulator.raw_url()
            env["BINANCE_API_URL"] = emulator.ws_api_url
            print(f"Binance emulator at {emulator.url} (1 market minute per second)")
        try:
            settings = load_settings(env)
        except ConfigError as exc:
            print(f"loader-ws-candles: {exc}", file=sys.stderr)
            return 2
        logs.configure(settings.log_format, {"queue_id": settings.queue_id})
        print(
            f"Streaming {', '.join(settings.stream_names)} into {settings.kafka_topic} "
            f"at {settings.kafka.bootstrap_servers}; telemetry on {settings.queue_events_topic}.\n"
            f"Look with: just kafka-tool console-consumer --bootstrap-server "
            f"{settings.kafka.bootstrap_servers} --topic {settings.kafka_topic} --from-beginning"
            f" (or --topic {settings.queue_events_topic}). Ctrl-C stops gracefully.",
            flush=True,
        )
        stop = trio.Event()
        nursery.start_soon(
            lambda: trio.to_thread.run_sync(_watch, settings, stop, abandon_on_cancel=True)
        )
        code = await serve(settings)
        stop.set()
        nursery.cancel_scope.cancel()
    return code


if __name__ == "__main__":
    sys.exit(trio.run(main, dict(os.environ)))
