"""Telemetry's notices and terminal event, with plain values and kafka-python's own exceptions.

Notices past the queue are summarised, never dropped. The terminal event goes at most once:
the fallback producer sends it only when the first send's failure proves it was not written
(kafka-python never took it, or Kafka refused it), never after a timeout, which may have
written it with its acknowledgement lost."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from loader.kafka import NotSent
from loader.settings import load_settings
from loader.sink import DeliveryFailed
from loader.telemetry import Notices, Telemetry

pytestmark = pytest.mark.anyio

SETTINGS = load_settings(
    {"QUEUE_ID": "q", "SYMBOL": "BTCUSDT", "KAFKA_TOPIC": "t", "TELEMETRY_PRODUCER_ID": "p"}
)


async def _terminal(failure: Exception, *, written: bool) -> list[tuple[str, bytes]]:
    """The events in the topic after a terminal event whose first send failed with
    `failure` (having written it or not) and whose fallback works."""
    topic: list[tuple[str, bytes]] = []

    async def publish(_topic: str, _key: bytes, value: bytes) -> None:
        if written:
            topic.append(("primary", value))
        raise failure

    async def fallback(_topic: str, _key: bytes, value: bytes) -> None:
        topic.append(("fallback", value))

    telemetry = Telemetry(SETTINGS, lambda: 0, publish, fallback)
    await telemetry.final("error", "failed", False, deadline=trio.current_time() + 3)
    return topic


def _delivery_failed(cause: BaseException) -> DeliveryFailed:
    try:
        raise DeliveryFailed(f"Kafka refused a record for queue-events: {cause}") from cause
    except DeliveryFailed as failure:
        return failure


async def test_a_delivery_timeout_that_did_deliver_is_not_sent_again() -> None:
    events = await _terminal(_delivery_failed(KafkaTimeoutError("batch expired")), written=True)
    assert [who for who, _ in events] == ["primary"]


async def test_a_record_kafka_refused_goes_by_the_fallback_producer() -> None:
    events = await _terminal(_delivery_failed(MessageSizeTooLargeError()), written=False)
    assert [who for who, _ in events] == ["fallback"]


async def test_a_record_kafka_python_never_took_goes_by_the_fallback_producer() -> None:
    try:
        raise NotSent("cannot hand a record to Kafka") from KafkaTimeoutError("no metadata")
    except NotSent as failure:
        events = await _terminal(failure, written=False)
    assert [who for who, _ in events] == ["fallback"]


async def _flood(notices: Notices, messages: list[str]) -> list[str]:
    """What `report` tells of `messages` offered all at once while it waits for Kafka on the
    first: the reporter takes the first, and the rest come while its send is held."""
    told: list[str] = []
    held = trio.Event()

    async def send(message: str) -> None:
        told.append(message)
        if len(told) == 1:
            await held.wait()  # Kafka slower than the flood

    async with trio.open_nursery() as nursery:
        nursery.start_soon(notices.report, send)
        notices.offer(messages[0])
        await trio.testing.wait_all_tasks_blocked()
        for message in messages[1:]:
            notices.offer(message)
        held.set()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    return told


async def test_hole_notices_beyond_the_queue_are_summarised_never_dropped() -> None:
    holes = [f"hole: {n} closed candles of s{n}@kline_1m lost" for n in range(101)]
    told = await _flood(Notices(limit=64), holes)
    # The first (taken at once) and the 64 queued one by one, then one summary of the 36 more.
    assert told[:65] == holes[:65]
    assert told[65:] == [
        "hole: 36 more holes not told one by one (each is in the log): from "
        f"[{holes[65].removeprefix('hole: ')}] to [{holes[100].removeprefix('hole: ')}]"
    ]
    assert all(message.startswith("hole: ") for message in told)


async def test_a_summary_keeps_holes_and_other_notices_apart_and_in_order() -> None:
    messages = ["hole: a", "hole: b", "hole: c", "listed: X (1 stream(s) subscribed)", "hole: d"]
    told = await _flood(Notices(limit=1), messages)
    assert told == [
        "hole: a",
        "hole: b",
        "hole: 2 more holes not told one by one (each is in the log): from [c] to [d]",
        "1 more notices not told one by one (each is in the log): "
        "[listed: X (1 stream(s) subscribed)]",
    ]
    # Told, the queue takes notices one by one again.
    notices = Notices(limit=1)
    assert await _flood(notices, ["hole: a", "hole: b"]) == ["hole: a", "hole: b"]
