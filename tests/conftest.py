"""Session fixtures shared by the whole test suite."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka_broker import (
    KafkaBroker,
    broker_from_env,
    local_broker_running,
    private_broker,
    serves,
    start_local_broker,
    stop_local_broker,
)

# The emulator over wss:// (fixtures `wss_ca`, `wss`).
pytest_plugins = ["wss"]


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests (`@pytest.mark.anyio`) run on Trio, like the service."""
    return "trio"


@pytest.fixture(scope="session")
def shared_kafka() -> Iterator[KafkaBroker]:
    """The session's broker (see tests/kafka_broker.py).

    LOADER_TEST_KAFKA_BOOTSTRAP and friends name an external broker, used as it is.
    Otherwise the local broker of kafka/broker.py: started if it is not running, and then
    stopped again when the session ends; one that was running already (`just test` starts it
    first) is left running.
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


@pytest.fixture
def kafka(shared_kafka: KafkaBroker) -> KafkaBroker:
    """The shared broker, checked before each test: a local one that stopped answering is
    restarted, and if that fails this test fails saying so, instead of every later test
    failing on its own timeout."""
    if serves(shared_kafka) or broker_from_env(os.environ) is not None:
        return shared_kafka
    try:
        start_local_broker()
    except RuntimeError as exc:
        pytest.fail(f"the shared Kafka broker does not answer and could not be restarted: {exc}")
    return shared_kafka


@pytest.fixture
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of this test's own (own folder, free ports), for tests that stop, restart or
    freeze it: whatever they do to it cannot reach the shared broker."""
    home: Path = tmp_path_factory.mktemp("kafka")
    with private_broker(home) as broker:
        yield broker
