"""The Kafka sink: records from the channel to Kafka, counted only once Kafka acknowledged them.

kafka-python is blocking, so it is called from one long-lived sender thread, fed batches through
a queue: a hand-off costs one thread wake-up and no wake-back, where a `trio.to_thread` call per
batch cost two. The Trio side gathers records for at most `linger` seconds before handing them
over, so at a few hundred records a second several share one hand-off, one produce request and
one acknowledgement. kafka-python's futures settle in its own I/O thread and wake Trio once per
batch. Batches are pipelined (several in flight) and settled strictly in order, so the
acknowledged count is always a prefix of what was sent; one thread sending them in queue order
keeps each stream's records in order.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from kafka import KafkaProducer
from kafka.partitioner.default import murmur2

from loader.kafka import KafkaFailure, describe
from loader.schema import Record
from loader.stats import Stats

log = logging.getLogger(__name__)

MAX_BATCH = 2048
MAX_IN_FLIGHT = 8
# How long the first record of a batch waits for others. Each batch costs a thread wake-up, a
# produce request and an acknowledgement whatever its size; at 1,000 records a second 5 ms
# makes batches of about five, for 2.5 ms of added latency on average (see docs/benchmarks.md).
LINGER = 0.005


class DeliveryFailed(KafkaFailure):
    """A record was finally refused or timed out: never a log line, always the run's end."""


class Pending:
    """Records handed to kafka-python together; `done` is set once every one has settled."""

    __slots__ = ("_lock", "_remaining", "_token", "count", "done", "error", "sent_at")

    def __init__(self, count: int, token: trio.lowlevel.TrioToken) -> None:
        self._lock = threading.Lock()
        self._token = token
        self._remaining = self.count = count
        self.sent_at = time.monotonic()
        self.error: BaseException | None = None
        self.done = trio.Event()
        if not count:
            self.done.set()

    def watch(self, futures: Sequence[Any]) -> None:
        """Settle as these futures do (each a record of the batch, in any thread)."""
        for future in futures:
            future.add_both(self._settle)

    def abandon(self, count: int, error: BaseException) -> None:
        """`count` records of the batch never reached kafka-python: they failed with `error`."""
        self._settle(error, count)

    def _settle(self, result: object, count: int = 1) -> None:
        # Runs in kafka-python's I/O thread (or the sending thread, if already settled).
        with self._lock:
            if isinstance(result, BaseException) and self.error is None:
                self.error = result
            self._remaining -= count
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
        linger: float = LINGER,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.stats = stats
        self.observe_latency = observe_latency
        self.on_acknowledged = on_acknowledged
        self.linger = linger
        self._unacked: collections.deque[Pending] = collections.deque()
        self._partitions: dict[bytes, int] = {}
        self._queue: queue.SimpleQueue[tuple[list[Record], Pending] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    async def run(
        self,
        records: trio.MemoryReceiveChannel[Record],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send what arrives on `records` until it closes; raise `DeliveryFailed` on a refusal."""
        token = trio.lowlevel.current_trio_token()
        in_flight_send, in_flight = trio.open_memory_channel[Pending](MAX_IN_FLIGHT)
        self._thread = threading.Thread(target=self._sender, name="loader-kafka-sender",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._settle_in_order, in_flight)
                task_status.started()
                async with in_flight_send:
                    async for first in records:
                        batch = [first, *_drain(records, MAX_BATCH - 1)]
                        try:
                            if len(batch) < MAX_BATCH and self.linger > 0:
                                await self._linger(records, batch)
                        finally:
                            # Handed over even when a stop cancels the linger; registered
                            # before the next await, so drain() accounts for it.
                            pending = Pending(len(batch), token)
                            self._unacked.append(pending)
                            self._queue.put((batch, pending))
                        await in_flight_send.send(pending)
        finally:
            # The thread ends once it has handed over everything queued before this.
            self._queue.put(None)

    async def _linger(
        self, records: trio.MemoryReceiveChannel[Record], batch: list[Record]
    ) -> None:
        """Add what arrives within `linger` of now (one timer per batch, not per record)."""
        with trio.move_on_after(self.linger):
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(await records.receive())
                except trio.EndOfChannel:
                    return
                batch += _drain(records, MAX_BATCH - len(batch))

    async def drain(self, records: trio.MemoryReceiveChannel[Record], deadline: float) -> None:
        """After the tasks are gone: send what is still queued, settle all by `deadline`."""
        with trio.CancelScope(deadline=deadline, shield=True) as scope:
            token = trio.lowlevel.current_trio_token()
            if self._thread is not None:
                # What the sender thread still holds goes first: per-stream order.
                await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
            while batch := _drain(records, MAX_BATCH):
                pending = Pending(len(batch), token)
                self._unacked.append(pending)
                await trio.to_thread.run_sync(self._hand, batch, pending)
            while self._unacked:
                await self._unacked[0].done.wait()
                self._account(self._unacked[0])
        if scope.cancelled_caught:
            lost = sum(p.count for p in self._unacked) + records.statistics().current_buffer_used
            raise DeliveryFailed(f"{lost} candles were not acknowledged within the stop grace")

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record (telemetry) and wait until Kafka acknowledged it."""
        pending = Pending(1, trio.lowlevel.current_trio_token())

        def send() -> None:
            pending.watch([self.producer.send(topic, value=value, key=key)])

        await trio.to_thread.run_sync(send)
        await pending.done.wait()
        if pending.error is not None:
            raise DeliveryFailed(f"Kafka refused a record for {topic}: {describe(pending.error)}")

    def _sender(self) -> None:
        """The sender thread: hands each queued batch to kafka-python, in queue order."""
        get = self._queue.get
        while (item := get()) is not None:
            self._hand(*item)

    def _hand(self, batch: list[Record], pending: Pending) -> None:
        send, topic, partitions = self.producer.send, self.topic, self._partitions
        futures = []
        try:
            for key, value in batch:
                partition = partitions.get(key)
                if partition is None:
                    partition = partitions[key] = self._partition_of(key)
                futures.append(send(topic, value=value, key=key, partition=partition))
        except Exception as exc:
            failure = DeliveryFailed(f"cannot hand candles to Kafka: {describe(exc)}")
            failure.__cause__ = exc
            pending.abandon(len(batch) - len(futures), failure)
        pending.watch(futures)
        self.stats.candles_handed += len(futures)

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


def _drain(channel: trio.MemoryReceiveChannel[Record], limit: int) -> list[Record]:
    items: list[Record] = []
    while len(items) < limit:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    return items
