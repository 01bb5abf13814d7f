"""TLS and login failures are named, and not retried as if the network had blinked: Binance
over wss:// with a certificate the worker does not trust, Kafka with a wrong password or CA."""

from __future__ import annotations

import os
import ssl
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trustme
from kafka_broker import KafkaBroker
from worker_tools import (
    env_without_kafka_vars,
    read_topic,
    running_worker,
    telemetry,
    worker_env,
    worker_settings,
)

from loader import FatalError, KafkaSettings, Secret, run
from loader.kafka import KafkaFailure, open_producer
from loader.testing import Emulator, EmulatorConfig, open_emulator
from loader.tls import TlsWatch

pytestmark = pytest.mark.anyio

# A failure that is retried lasts at least this long; one named at once ends well before.
BOOTSTRAP_TIMEOUT = 60.0


@pytest.fixture
def unknown_ca() -> trustme.CA:
    """A CA made for this test: no trust store in the world has it."""
    return trustme.CA()


@asynccontextmanager
async def tls_emulator(ca: trustme.CA) -> AsyncIterator[Emulator]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    async with open_emulator(EmulatorConfig(speed=600, seed=5, ssl_context=context)) as emulator:
        assert emulator.url.startswith("wss://")
        yield emulator


async def test_binance_over_tls_with_a_trusted_ca_delivers(
    kafka: KafkaBroker, unknown_ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recording TLS context verifies as the default one does: trusting the CA is enough."""
    ca_file = tmp_path / "ca.pem"
    unknown_ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # OpenSSL's default trust store
    topic = await trio.to_thread.run_sync(kafka.new_topic, "tls-trusted")
    async with (
        tls_emulator(unknown_ca) as emulator,
        running_worker(worker_settings(kafka, emulator, topic)) as worker,
    ):
        await worker.wait_written(2)
        worker.stop()
        outcome = await worker.finished()
    assert outcome.status == "interrupted"


async def test_an_untrusted_binance_certificate_ends_the_run_naming_it(
    kafka: KafkaBroker, unknown_ca: trustme.CA
) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "tls-untrusted")
    async with tls_emulator(unknown_ca) as emulator:
        settings = worker_settings(kafka, emulator, topic, CONNECTS_PER_MINUTE="60")
        started = trio.current_time()
        # Retried as a blip, it would go on for ever; trio-websocket gives up on the
        # handshake after its 10 s connect timeout, and then the run ends.
        with trio.fail_after(30), pytest.raises(FatalError) as raised:
            await run(settings)
        elapsed = trio.current_time() - started
    message = str(raised.value)
    assert raised.value.exit_code == 2, "the same image meets the same certificate: no retry"
    assert "certificate" in message
    assert "not trusted" in message
    assert "127.0.0.1" in message
    assert "\n" not in message
    assert elapsed < 25
    # Final: the Job will not retry (exit 2), and the queue manager is told so.
    events = telemetry(await read_topic(kafka, settings.queue_events_topic, expected=2))
    assert [(e["status"], e["finished"]) for e in events] == [("started", False), ("error", True)]
    assert "certificate" in events[-1]["message"]


async def test_an_untrusted_binance_certificate_exits_2_with_one_line(
    kafka: KafkaBroker, unknown_ca: trustme.CA
) -> None:
    async with tls_emulator(unknown_ca) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, "tls-process", LOG_FORMAT="text"
        )
        with trio.fail_after(40):
            done = await trio.run_process(
                [sys.executable, "-m", "loader"], env=env, capture_stdout=True,
                capture_stderr=True, check=False,
            )  # fmt: skip
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 2, out
    named = [line for line in out.splitlines() if "certificate" in line and "not trusted" in line]
    assert named, out
    assert "retrying in" not in out, "a certificate failure is not a blip to retry"


def _kafka_settings(kafka: KafkaBroker, *, password: str, ca_path: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=kafka.sasl_ssl,
        user=kafka.username,
        password=Secret(password),
        ca_path=Path(ca_path),
    )


def _open(settings: KafkaSettings) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(KafkaFailure) as raised:
        open_producer(settings, delivery_timeout=BOOTSTRAP_TIMEOUT)
    return str(raised.value), time.monotonic() - started


async def test_a_wrong_kafka_password_is_named_without_waiting_out_the_bootstrap(
    kafka: KafkaBroker,
) -> None:
    wrong = "definitely-wrong-pw"
    settings = _kafka_settings(kafka, password=wrong, ca_path=kafka.ca_path)
    message, elapsed = await trio.to_thread.run_sync(_open, settings)
    # Named either from the broker's reply or, when kafka-python loses that reply, from the
    # broker hanging up in the middle of the login, again and again.
    assert f"login of user {kafka.username!r}" in message
    assert "wrong user name or password" in message
    assert wrong not in message
    assert kafka.password not in message
    assert elapsed < BOOTSTRAP_TIMEOUT / 4, "the same password was tried again and again"


async def test_an_unknown_kafka_ca_is_named_without_waiting_out_the_bootstrap(
    kafka: KafkaBroker, unknown_ca: trustme.CA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "other-ca.pem"
    unknown_ca.cert_pem.write_to_path(str(ca_file))
    settings = _kafka_settings(kafka, password=kafka.password, ca_path=str(ca_file))
    message, elapsed = await trio.to_thread.run_sync(_open, settings)
    assert "TLS certificate is not trusted" in message
    assert str(ca_file) in message
    assert elapsed < BOOTSTRAP_TIMEOUT / 4


async def test_a_wrong_kafka_password_ends_the_process_at_once_naming_the_cause(
    kafka: KafkaBroker,
) -> None:
    """Exit 1: the Job's next pod reads the Secret again (Strimzi may have renewed it)."""
    async with open_emulator(EmulatorConfig(speed=600)) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, "never-written", listener="sasl_ssl",
            KAFKA_PASSWORD_PRODUCER="definitely-wrong-pw", KAFKA_DELIVERY_TIMEOUT="120",
            LOG_FORMAT="text",
        )  # fmt: skip
        started = trio.current_time()
        done = await trio.run_process(
            [sys.executable, "-m", "loader"], env=env, capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
        elapsed = trio.current_time() - started
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 1, out
    assert "wrong user name or password" in out
    assert "definitely-wrong-pw" not in out
    assert kafka.password not in out
    assert elapsed < 20, "the bootstrap waited out its timeout with a password refused at once"


def test_plain_ws_urls_get_no_tls_context() -> None:
    assert TlsWatch("ws://127.0.0.1:1/ws").context is None
    watch = TlsWatch("wss://stream.example:9443/ws")
    assert watch.context is not None
    assert watch.context.verify_mode == ssl.CERT_REQUIRED
    assert watch.context.check_hostname
    assert watch.untrusted() is None
