"""Session fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from kafka_broker import (
    KafkaBroker,
    broker_from_env,
    local_broker_running,
    start_local_broker,
    stop_local_broker,
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`@pytest.mark.anyio`) run on Trio, like the service."""
    return "trio"


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    """The Kafka broker for this test session (see tests/kafka_broker.py).

    LOADER_TEST_KAFKA_BOOTSTRAP and friends name an external broker, used as it
    is. Otherwise the local broker of kafka/broker.py: started if it is not
    running, and then stopped again when the session ends; one that was running
    already (`just test` starts it first) is left running.
    """
    external = broker_from_env(os.environ)
    if external is not None:
        yield external
        return
    started_here = not local_broker_running()
    broker = start_local_broker()
    try:
        yield broker
    finally:
        if started_here:
            stop_local_broker()
