"""The ceilings of the stack, each in a process of its own; prints one JSON line.

``ws``     a bare trio-websocket receive loop (the worker's connection options) on the
           emulator's firehose: frames per second, nothing decoded. Over wss:// (as Binance
           serves) when the URL says so, trusting what ``SSL_CERT_FILE`` names, as the worker.
``kafka``  a bare kafka-python producer loop with the worker's exact client settings
           (``loader.kafka.open_producer``: acks=all, idempotent, linger 0, 256 KiB batches,
           no metrics) sending pre-encoded candles exactly like the worker's as fast as it
           can: records acknowledged per second, the tail ``flush`` included.

Both report CPU seconds of their whole process (all threads) over the timed part.

    SSL_CERT_FILE=ca.pem python -m bench.baselines ws --url wss://127.0.0.1:PORT/stream?streams=...
    python -m bench.baselines kafka --bootstrap 127.0.0.1:19092 --topic t --seconds 10
"""

from __future__ import annotations

import argparse
import sys
import time

import msgspec
import trio
import trio_websocket
from kafka import KafkaConsumer, TopicPartition

from loader.binance import FrameDecoder, KlineEvent, to_candle
from loader.kafka import open_producer
from loader.settings import KafkaSettings
from loader.source import open_market_connection
from loader.testing import KlineEvent as WireEvent
from loader.testing import Market


class Result(msgspec.Struct):
    count: int
    seconds: float
    cpu: float  # process CPU seconds over `seconds`
    value_bytes: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("ws", "kafka"))
    p.add_argument("--seconds", type=float, default=10.0, help="timed part")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed part before it")
    p.add_argument("--url", help="ws: the combined-stream URL")
    p.add_argument("--bootstrap", help="kafka: PLAINTEXT bootstrap address")
    p.add_argument("--topic", help="kafka: an existing topic")
    p.add_argument("--streams", type=int, default=1000, help="kafka: distinct keys")
    return p.parse_args()


async def _ws(url: str, warmup: float, seconds: float) -> Result:
    measured: list[Result] = []
    try:
        async with open_market_connection(url, None) as ws:  # wss: the default context
            with trio.move_on_after(warmup):
                while True:
                    await ws.get_message()
            count = 0
            cpu0, t0 = time.process_time(), time.perf_counter()
            with trio.move_on_after(seconds):
                while True:
                    await ws.get_message()
                    count += 1
            measured.append(Result(count, time.perf_counter() - t0, time.process_time() - cpu0))
    except trio_websocket.DisconnectionTimeout:
        # Over wss the close handshake queues behind the firehose's records: what was read
        # before it counts all the same.
        if not measured:
            raise
    return measured[0]


def candle_values(streams: int) -> list[tuple[bytes, bytes]]:
    """(key, value) of one closed candle per stream, made as the worker makes them: the
    emulator's wire bytes, decoded by the worker's decoder, encoded as the sink does."""
    symbols = [f"SYM{i}USDT" for i in range(streams)]
    market = Market(symbols, seed=0, start_ms=time.time_ns() // 60_000_000_000 * 60_000)
    decoder = FrameDecoder(combined=False)
    encode = msgspec.json.Encoder().encode
    out: list[tuple[bytes, bytes]] = []
    for symbol in symbols:
        kline = market.kline(symbol, "1m", 0)
        event = decoder.decode(msgspec.json.encode(WireEvent("kline", 0, symbol, kline)).decode())
        assert isinstance(event, KlineEvent)
        candle = to_candle(event.kline)
        out.append((candle.key, encode(candle)))
    return out


def _kafka(bootstrap: str, topic: str, streams: int, warmup: float, seconds: float) -> Result:
    values = candle_values(streams)
    producer = open_producer(KafkaSettings(bootstrap_servers=bootstrap), delivery_timeout=120.0)
    send, n = producer.send, len(values)
    try:
        sent = 0
        for deadline, timed in ((warmup, False), (seconds, True)):
            if timed:
                cpu0, t0, sent0 = time.process_time(), time.perf_counter(), sent
            end = time.perf_counter() + deadline
            while time.perf_counter() < end:
                for _ in range(256):
                    key, value = values[sent % n]
                    send(topic, value=value, key=key)
                    sent += 1
            producer.flush(timeout=60)
        result = Result(
            sent - sent0,
            time.perf_counter() - t0,
            time.process_time() - cpu0,
            sum(len(v) for _, v in values) // n,
        )
    finally:
        producer.close(timeout=10)
    acknowledged = _records_in(bootstrap, topic)
    if acknowledged != sent:
        raise SystemExit(f"kafka baseline: sent {sent} records, the topic holds {acknowledged}")
    return result


def _records_in(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        tps = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        ends = consumer.end_offsets(tps)
        starts = consumer.beginning_offsets(tps)
        return sum(ends[tp] - starts[tp] for tp in tps)
    finally:
        consumer.close(autocommit=False)


def main() -> int:
    args = _args()
    if args.kind == "ws":
        result = trio.run(_ws, args.url, args.warmup, args.seconds)
    else:
        result = _kafka(args.bootstrap, args.topic, args.streams, args.warmup, args.seconds)
    print(msgspec.json.encode(result).decode(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
