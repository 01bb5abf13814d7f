"""The Kafka sink: records from the channel to Kafka, counted only once Kafka acknowledged them.

kafka-python is blocking, so it is called from one long-lived sender thread, fed batches through
a queue: a hand-off costs that thread one wake-up and Trio none. Batches are pipelined and
settled strictly in order, so the acknowledged count is always a prefix of what was sent; the
one thread sending them in queue order keeps each stream's records in order.

Every produce request costs kafka-python's threads up to a millisecond of CPU however few
records it carries, so records are gathered, Nagle-style: while a batch is in flight the next
one waits for its acknowledgement, so batches grow with the rate, each waiting about one round
trip (at most `ACK_HOLD`); with nothing in flight a lone record waits for a second one (at most
`MAX_HOLD`). Never past `HOLD_LIMIT` records; the timer bounding a wait rarely fires at a
steady rate.

An acknowledgement wakes Trio only when something waits for it (a batch held back, a full
pipeline, the drain at the end) or it is a failure; otherwise it is counted with the next
batch's hand-off, or at the latest `ACK_TICK` after it was sent. At a trickle that saves the
Trio thread one of its two wake-ups per candle.
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from kafka import KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2

from loader.kafka import KafkaFailure, NotSent, describe
from loader.schema import Record
from loader.stats import Stats

log = logging.getLogger(__name__)

MAX_BATCH = 2048
MAX_IN_FLIGHT = 8
# A batch this large goes out even while others are in flight: at full speed the pipeline,
# not the round trip, sets the pace.
HOLD_LIMIT = 256
# A lone record waits (at most MAX_HOLD) for a second one: at 100 records a second, spread
# evenly, that halves the produce requests (each costs kafka-python's threads about a
# millisecond of CPU there) for 10 ms more latency on every other record.
MIN_BATCH = 2
# The longest a lone record waits for a second one.
MAX_HOLD = 0.015
# The longest a batch waits for the acknowledgement in flight: about a round trip on a quiet
# broker; a slow one then gets the next batch pipelined rather than every record delayed.
ACK_HOLD = 0.005
# The longest an acknowledgement nobody waits for goes uncounted.
ACK_TICK = 0.050
# A batch Kafka has not acknowledged after this long is logged (a warning naming the
# partitions it waits on and their leaders) and counted; looked at every SLOW_CHECK.
SLOW_WRITE = 5.0
SLOW_CHECK = 1.0


class DeliveryFailed(KafkaFailure):
    """A record was finally refused or timed out: never a log line, always the run's end."""


class Pending:
    """Records handed to kafka-python together; `settled` once every one has, and then
    `on_settled` is called (in kafka-python's I/O thread, or the sending thread)."""

    __slots__ = (
        "_lock", "_on_settled", "_remaining", "acked_at", "batch", "count", "due", "error",
        "sent_at", "settled",
    )  # fmt: skip

    def __init__(
        self, count: int, on_settled: Callable[[Pending], object], due: float = math.inf
    ) -> None:
        self._lock = threading.Lock()
        self._on_settled = on_settled
        self._remaining = self.count = count
        self.sent_at = self.acked_at = time.monotonic()
        self.due = due  # trio time by which Trio counts it, woken or not
        self.error: BaseException | None = None
        self.settled = False
        self.batch: Sequence[Record] = ()  # what it carries, for a slow write's warning

    def watch(self, futures: Sequence[Any]) -> None:
        """Settle as these futures do (each a record of the batch, in any thread)."""
        for future in futures:
            future.add_both(self._settle)

    def abandon(self, count: int, error: BaseException) -> None:
        """`count` records of the batch never reached kafka-python: they failed with `error`."""
        self._settle(error, count)

    def _settle(self, result: object, count: int = 1) -> None:
        with self._lock:
            if isinstance(result, BaseException) and self.error is None:
                self.error = result
            self._remaining -= count
            last = self._remaining == 0
        if last:
            self.acked_at = time.monotonic()
            self.settled = True  # before the call: Trio reads it after raising its flag
            self._on_settled(self)


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
        hold: bool = True,
    ) -> None:
        self.producer = producer
        self.topic = topic
        self.stats = stats
        self.observe_latency = observe_latency
        self.on_acknowledged = on_acknowledged
        self.hold = hold
        self._unacked: collections.deque[Pending] = collections.deque()
        self._partitions: dict[bytes, int] = {}
        self._queue: queue.SimpleQueue[tuple[list[Record], Pending] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # Raised while a Trio task waits for an acknowledgement: only then does one wake it.
        self._waiting = 0
        self._acked = trio.Event()
        self._tick: trio.CancelScope | None = None

    async def run(
        self,
        records: trio.MemoryReceiveChannel[Record],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Send what arrives on `records` until it closes, and see it acknowledged; raise
        `DeliveryFailed` on a refusal."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._sender, name="loader-kafka-sender",
                                        daemon=True)  # fmt: skip
        self._thread.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._count_late_acks)
                nursery.start_soon(self._watch_slow_writes)
                task_status.started()
                async for first in records:
                    batch = [first, *_drain(records, MAX_BATCH - 1)]
                    try:
                        await self._hold(records, batch)
                    finally:
                        # Handed over even when a stop cancels the wait: drain() accounts for
                        # it.
                        self._hand_off(batch)
                    while len(self._unacked) >= MAX_IN_FLIGHT:
                        await self._wait_ack()
                while self._unacked:
                    await self._wait_ack()
                nursery.cancel_scope.cancel()
        finally:
            # The thread ends once it has handed over everything queued before this.
            self._queue.put(None)

    async def _hold(self, records: trio.MemoryReceiveChannel[Record], batch: list[Record]) -> None:
        """Let `batch` grow while a batch is in flight (until it is acknowledged, at most
        `ACK_HOLD`), or while it is a single record (until a second one comes, at most
        `MAX_HOLD`)."""
        if not self.hold:
            return
        start = trio.current_time()
        while len(batch) < HOLD_LIMIT:
            self._collect()
            now = trio.current_time()
            if self._unacked:
                if now >= start + ACK_HOLD:
                    return
                await self._wait_ack(start + ACK_HOLD)
            elif len(batch) < MIN_BATCH and now < start + MAX_HOLD:
                with trio.move_on_at(start + MAX_HOLD):
                    try:
                        batch.append(await records.receive())
                    except trio.EndOfChannel:
                        return
            else:
                return
            batch += _drain(records, MAX_BATCH - len(batch))

    def _hand_off(self, batch: list[Record]) -> None:
        pending = Pending(len(batch), self._on_settled, trio.current_time() + ACK_TICK)
        pending.batch = batch
        if not self._unacked:
            self.stats.kafka_waiting_since = pending.sent_at
        self._unacked.append(pending)
        self._queue.put((batch, pending))
        self._retick()

    def _on_settled(self, pending: Pending) -> None:
        # kafka-python's thread: wake Trio only if a task waits, or for a failure.
        if (self._waiting or pending.error is not None) and self._token is not None:
            self._token.run_sync_soon(self._acked.set)

    async def _wait_ack(self, deadline: float = math.inf) -> None:
        """Until an acknowledgement arrives (or `deadline`); count what has arrived."""
        self._waiting += 1
        try:
            if not (self._unacked and self._unacked[0].settled):
                with trio.move_on_at(deadline):
                    await self._acked.wait()
        finally:
            self._waiting -= 1
        if self._acked.is_set():
            self._acked = trio.Event()
        self._collect()

    async def _count_late_acks(self) -> None:
        """Count acknowledgements nobody waited for, at the latest `ACK_TICK` after sending
        (a timer armed only while something is unacknowledged, and moved as rarely as may
        be: each move of a Trio deadline is a heap entry to expire)."""
        while True:
            with trio.CancelScope() as self._tick:
                # Never in the past: a batch slower than ACK_TICK is looked at again every
                # ACK_TICK, not in a busy loop.
                self._tick.deadline = (
                    max(self._unacked[0].due, trio.current_time() + ACK_TICK)
                    if self._unacked
                    else math.inf
                )
                await self._acked.wait()
            if self._acked.is_set():
                self._acked = trio.Event()
            self._collect()

    async def _watch_slow_writes(self) -> None:
        """Every SLOW_CHECK: once the oldest unacknowledged batch has waited SLOW_WRITE, one
        warning (and one count) for that batch, and a line when Kafka acknowledges again.
        Nothing else says that Kafka holds the candles back: its client retries quietly until
        the delivery timeout."""
        slow: Pending | None = None
        while True:
            await trio.sleep(SLOW_CHECK)
            head = self._unacked[0] if self._unacked else None
            waited = (
                time.monotonic() - head.sent_at if head is not None and not head.settled else 0.0
            )
            if slow is not None and slow.settled:
                log.info("Kafka acknowledged the slow write after %.1f s",
                         slow.acked_at - slow.sent_at)  # fmt: skip
                slow = None
            if head is not None and waited >= SLOW_WRITE and slow is None:
                slow = head
                self.stats.slow_writes += 1
                log.warning("Kafka has not acknowledged %d candles for %.0f s; waiting on %s",
                            head.count, waited, self._waiting_on(head))  # fmt: skip

    def _waiting_on(self, pending: Pending) -> str:
        """The partitions of a batch and their leaders, as the producer's metadata has them.
        Never raises: a warning must not end the run."""
        partitions = sorted({p for key, _ in pending.batch if (p := self._partitions.get(key))
                             is not None})  # fmt: skip
        described = []
        for partition in partitions:
            try:
                where = self._leader_of(partition)
            except Exception as exc:  # kafka-python's internals moved: say so, go on
                where = f"leader not known: {describe(exc)}"
            described.append(f"{self.topic}-{partition} ({where})")
        return ", ".join(described) or f"{self.topic} (partitions not known yet)"

    def _leader_of(self, partition: int) -> str:
        metadata = self.producer._metadata  # kafka-python's ClusterMetadata: no public view
        leader = metadata.leader_for_partition(TopicPartition(self.topic, partition))
        broker = metadata.broker_metadata(leader) if leader not in (None, -1) else None
        if broker is None:
            return "no leader known"
        return f"leader broker {leader} at {broker.host}:{broker.port}"

    def _retick(self) -> None:
        """A first batch in flight arms the timer; later ones leave it (an early look at the
        head costs one wake-up and re-arms it)."""
        if self._tick is not None and self._tick.deadline == math.inf and self._unacked:
            self._tick.deadline = self._unacked[0].due

    def _collect(self) -> None:
        """Count, in order, every batch at the head that is settled."""
        unacked = self._unacked
        if not (unacked and unacked[0].settled):
            return
        while unacked and unacked[0].settled:
            self._account(unacked.popleft())
        self.stats.kafka_waiting_since = unacked[0].sent_at if unacked else None

    async def drain(self, records: trio.MemoryReceiveChannel[Record], deadline: float) -> None:
        """After the tasks are gone: send what is still queued, settle all by `deadline`."""
        self._waiting += 1  # from here on, every acknowledgement is awaited
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope(deadline=deadline, shield=True) as scope:
            if self._thread is not None:
                # What the sender thread still holds goes first: per-stream order.
                await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)
            while batch := _drain(records, MAX_BATCH):
                pending = Pending(len(batch), self._on_settled)
                if not self._unacked:
                    self.stats.kafka_waiting_since = pending.sent_at
                self._unacked.append(pending)
                # Abandoned at the deadline: a send may wait for metadata (max_block_ms).
                await trio.to_thread.run_sync(self._hand, batch, pending, abandon_on_cancel=True)
            while self._unacked:
                await self._wait_ack()
        if scope.cancelled_caught:
            lost = sum(p.count for p in self._unacked) + records.statistics().current_buffer_used
            raise DeliveryFailed(f"{lost} candles were not acknowledged within the stop grace")

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record (telemetry) and wait until Kafka acknowledged it."""
        token, done = trio.lowlevel.current_trio_token(), trio.Event()
        pending = Pending(1, lambda _: token.run_sync_soon(done.set))

        def send() -> None:
            try:
                future = self.producer.send(topic, value=value, key=key)
            except Exception as exc:
                raise NotSent(
                    f"cannot hand a record for {topic} to Kafka: {describe(exc)}"
                ) from exc
            pending.watch([future])

        # Abandoned when the caller's time is up: a send may wait for metadata (max_block_ms).
        await trio.to_thread.run_sync(send, abandon_on_cancel=True)
        await done.wait()
        if pending.error is not None:
            failure = DeliveryFailed(
                f"Kafka refused a record for {topic}: {describe(pending.error)}"
            )
            raise failure from pending.error

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

    def _account(self, pending: Pending) -> None:
        if pending.error is not None:
            raise DeliveryFailed(
                f"Kafka did not acknowledge candles for {self.topic}: {describe(pending.error)}"
            )
        self.stats.candles_acknowledged += pending.count
        self.stats.last_ack_at = pending.acked_at
        self.observe_latency(pending.acked_at - pending.sent_at)
        self.on_acknowledged()


def _drain(channel: trio.MemoryReceiveChannel[Record], limit: int) -> list[Record]:
    items: list[Record] = []
    while len(items) < limit:
        try:
            items.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            break
    return items
