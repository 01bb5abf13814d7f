"""The terminal event goes at most once: the fallback producer sends it only when the first
send's failure proves it was not written (kafka-python never took it, or Kafka refused it),
never after a timeout, which may have written it with its acknowledgement lost. The
exceptions are kafka-python's own, as the sink raises them."""

from __future__ import annotations

import pytest
import trio
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from loader.kafka import NotSent
from loader.settings import load_settings
from loader.sink import DeliveryFailed
from loader.telemetry import Telemetry

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
