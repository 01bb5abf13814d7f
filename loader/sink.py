"""The Kafka sink: candles from the channel to Kafka, counted only once Kafka acknowledged them.

kafka-python is blocking, so each batch is handed to it in one `trio.to_thread` call; its
futures settle in kafka-python's own I/O thread and wake Trio once per batch. Batches are
pipelined (several in flight) and settled strictly in order, so the acknowledged count is always
a prefix of what was sent.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import trio
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from loader.kafka import KafkaFailure, describe
from loader.schema import Candle
from loader.stats import Stats

log = logging.getLogger(__name__)

MAX_BATCH = 2048
MAX_IN_FLIGHT = 8


class DeliveryFailed(KafkaFailure):
    """A record was finally refused or timed out: never a log line, always the run's end."""


class Pending:
    """Records handed to kafka-python together; `done` is set once every one has settled."""

    __slots__ = ("_lock", "_remaining", "_token", "count", "done", "error", "sent_at")

    def __init__(self, futures: Sequence[Any], token: trio.lowlevel.TrioToken) -> None:
        self._lock = threading.Lock()
        self._token = token
        self._remaining = self.count = len(futures)
        self.sent_at = time.monotonic()
        self.error: BaseException | None = None
        self.done = trio.Event()
        if not futures:
            self.done.set()
        for future in futures:
            future.add_both(self._settle)

    def _settle(self, result: object) -> None:
        # Runs in kafka-python's I/O thread (or the sending thread, if already settled).
        with self._lock:
            if isinstance(result, BaseException) and self.error is None:
                self.error = result
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._token.run_sync_soon(self.done.set)


class KafkaSink:
    """Owns one producer; `run` is the sender task, `publish` sends one record and awaits it."""

    def __init__(
        self,
        producer: KafkaProducer,
        topic: str,
        stats: Stats,
        observe_latency: Callable[[float], object] = lambda _: None,
        *,
        on_acknowledged: Callable[[], None] = lambda: None,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.stats = stats
        self.observe_latency = observe_latency
        self.on_acknowledged = on_acknowledged
        self._unacked: collections.deque[Pending] = collections.deque()
        self._encode = msgspec.json.Encoder().encode
        self._partitions: dict[bytes, int] = {}

    async def run(
        self,
        candles: trio.MemoryReceiveChannel[Candle],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send what arrives on `candles` until it closes; raise `DeliveryFailed` on a refusal."""
        token = trio.lowlevel.current_trio_token()
        in_flight_send, in_flight = trio.open_memory_channel[Pending](MAX_IN_FLIGHT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._settle_in_order, in_flight)
            task_status.started()
            async with in_flight_send:
                async for first in candles:
                    batch = [first, *_drain(candles, MAX_BATCH - 1)]
                    pending = await trio.to_thread.run_sync(self._send, batch, token)
                    await in_flight_send.send(pending)

    async def drain(self, candles: trio.MemoryReceiveChannel[Candle], deadline: float) -> None:
        """After the tasks are gone: send what is still queued, settle all by `deadline`."""
        with trio.CancelScope(deadline=deadline, shield=True) as scope:
            token = trio.lowlevel.current_trio_token()
            while batch := _drain(candles, MAX_BATCH):
                await trio.to_thread.run_sync(self._send, batch, token)
            while self._unacked:
                await self._unacked[0].done.wait()
                self._account(self._unacked[0])
        if scope.cancelled_caught:
            lost = sum(p.count for p in self._unacked) + candles.statistics().current_buffer_used
            raise DeliveryFailed(f"{lost} candles were not acknowledged within the stop grace")

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record (telemetry) and wait until Kafka acknowledged it."""
        token = trio.lowlevel.current_trio_token()

        def send() -> Pending:
            return Pending([self.producer.send(topic, value=value, key=key)], token)

        pending = await trio.to_thread.run_sync(send)
        await pending.done.wait()
        if pending.error is not None:
            raise DeliveryFailed(f"Kafka refused a record for {topic}: {describe(pending.error)}")

    def _send(self, batch: list[Candle], token: trio.lowlevel.TrioToken) -> Pending:
        # Worker thread. Registering the batch here, not in Trio, keeps it accounted for even
        # when the awaiting task is cancelled while this thread runs.
        send, topic, encode, partitions = (
            self.producer.send,
            self.topic,
            self._encode,
            self._partitions,
        )
        try:
            futures = []
            for c in batch:
                key = c.key
                partition = partitions.get(key)
                if partition is None:
                    partition = partitions[key] = self._partition_of(key)
                futures.append(send(topic, value=encode(c), key=key, partition=partition))
        except Exception as exc:
            raise DeliveryFailed(f"cannot hand candles to Kafka: {describe(exc)}") from exc
        pending = Pending(futures, token)
        self._unacked.append(pending)
        self.stats.candles_handed += pending.count
        return pending

    def _partition_of(self, key: bytes) -> int:
        """kafka-python's default partitioner (murmur2, as Java's), once per stream: it costs
        microseconds per record, and a stream stays on its partition even if more are added."""
        partitions = sorted(self.producer.partitions_for(self.topic))
        return int(partitions[(murmur2(key) & 0x7FFFFFFF) % len(partitions)])

    async def _settle_in_order(self, in_flight: trio.MemoryReceiveChannel[Pending]) -> None:
        async with in_flight:
            async for pending in in_flight:
                await pending.done.wait()
                # drain() may have settled it already, after a cancelled run.
                if self._unacked and self._unacked[0] is pending:
                    self._account(pending)

    def _account(self, pending: Pending) -> None:
        self._unacked.popleft()
        if pending.error is not None:
            raise DeliveryFailed(
                f"Kafka did not acknowledge candles for {self.topic}: {describe(pending.error)}"
            )
        self.stats.candles_acknowledged += pending.count
        self.stats.last_ack_at = now = time.monotonic()
        self.observe_latency(now - pending.sent_at)
        self.on_acknowledged()


def _drain(channel: trio.MemoryReceiveChannel[Candle], limit: int) -> list[Candle]:
    items: list[Candle] = []
    while len(items) < limit:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    return items
