"""The test broker itself: both listeners carry records, SASL_SSL refuses strangers.

kafka-python 3.0.12 never raises the cause of a failed bootstrap: KafkaProducer
retries until bootstrap_timeout_ms and then raises KafkaTimeoutError("Unable to
bootstrap from ..."); the cause is only logged (logger kafka.net.manager). So
these tests assert on that exception, on the logged cause, and on the broker's
own answer seen through the small stdlib client of kafka/broker.py.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError
from kafka_broker import BROKER_SCRIPT, LISTENERS, KafkaBroker, Listener, load_broker_module
from timing import scaled

BOOTSTRAP_TIMEOUT_MS = 2500
# kafka-python's (logged) reason for giving up on a bootstrap connection.
BOOTSTRAP_FAILURE = "Bootstrap connection to bootstrap-0 failed: "
SASL_FAILED = "[Error 58] SaslAuthenticationFailedError"


broker_py = load_broker_module()


def host_port(bootstrap: str) -> tuple[str, int]:
    host, _, port = bootstrap.rpartition(":")
    return host, int(port)


def unable_to_bootstrap(bootstrap: str) -> str:
    """The whole message of the KafkaTimeoutError that kafka-python ends a failed bootstrap with."""
    return f"^KafkaTimeoutError: Unable to bootstrap from {re.escape(bootstrap)}$"


def bootstrap_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage().split(BOOTSTRAP_FAILURE, 1)[1]
        for record in caplog.records
        if record.name == "kafka.net.manager" and BOOTSTRAP_FAILURE in record.getMessage()
    ]


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A freshly made CA that signed nothing the broker presents."""
    cert, _key = broker_py.make_ca(tmp_path / "other-ca", "not the broker's CA")
    return Path(cert)


@pytest.mark.parametrize("listener", LISTENERS)
def test_round_trip(kafka: KafkaBroker, listener: Listener) -> None:
    topic = kafka.new_topic(f"round-trip-{listener}", partitions=2)
    sent = [(f"key-{i % 3}".encode(), f"value-{i}".encode()) for i in range(20)]

    producer = KafkaProducer(**kafka.producer_config(listener))
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in sent]
        producer.flush(timeout=30)
        metadata = [future.get(timeout=30) for future in futures]
    finally:
        producer.close(timeout=10)
    assert {m.topic for m in metadata} == {topic}

    records = kafka.read_all(topic, expected=len(sent), listener=listener)
    assert sorted((r.key, r.value) for r in records) == sorted(sent)
    # The same key lands in one partition, in the order it was sent.
    for key in {key for key, _ in sent}:
        in_order = [r.value for r in records if r.key == key]
        assert in_order == [value for k, value in sent if k == key]
        assert len({r.partition for r in records if r.key == key}) == 1

    # acks=all with idempotence: the broker keeps state for our producer id on the
    # partitions it wrote to (a non-idempotent producer has none, producer id -1).
    admin = KafkaAdminClient(**kafka.client_config(listener))
    try:
        partitions = [TopicPartition(topic, p) for p in sorted({r.partition for r in records})]
        states = admin.describe_producers(partitions)
    finally:
        admin.close()
    for partition in partitions:
        producers = states[partition].active_producers
        assert len(producers) == 1
        assert producers[0].producer_id >= 0


def test_read_all_reads_to_the_end_without_expected(kafka: KafkaBroker) -> None:
    topic = kafka.new_topic("read-all")
    assert kafka.read_all(topic, timeout=10) == []
    producer = KafkaProducer(**kafka.producer_config("plaintext"))
    try:
        for i in range(5):
            producer.send(topic, value=b"%d" % i)
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)
    assert [r.value for r in kafka.read_all(topic)] == [b"0", b"1", b"2", b"3", b"4"]
    with pytest.raises(TimeoutError, match=r"read 5 records .* \(6 expected\)"):
        kafka.read_all(topic, expected=6, timeout=1)


def test_new_topic_names_are_unique_and_safe(kafka: KafkaBroker) -> None:
    first = kafka.new_topic("test_x[plaintext]")
    second = kafka.new_topic("test_x[plaintext]")
    assert first != second
    assert first.startswith("test_x-plaintext-")


def test_sasl_ssl_rejects_a_wrong_password(
    kafka: KafkaBroker, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = host_port(kafka.sasl_ssl)

    # The broker's answer: SaslAuthenticate error 58, SASL_AUTHENTICATION_FAILED.
    with pytest.raises(broker_py.SaslAuthenticationFailed) as failure:
        broker_py.probe_sasl_ssl(host, port, kafka.ca_path, kafka.username, "not-the-password")
    assert failure.value.error_code == 58
    assert failure.value.message == (
        "Authentication failed during authentication due to invalid credentials "
        "with SASL mechanism SCRAM-SHA-512"
    )
    # ... and the right password is let in by the same client.
    _cluster_id, brokers = broker_py.probe_sasl_ssl(
        host, port, kafka.ca_path, kafka.username, kafka.password
    )
    assert brokers

    # What kafka-python makes of it.
    config = {
        **kafka.producer_config("sasl_ssl"),
        "sasl_plain_password": "not-the-password",
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
    }
    with (
        caplog.at_level(logging.WARNING, logger="kafka"),
        pytest.raises(KafkaTimeoutError, match=unable_to_bootstrap(kafka.sasl_ssl)),
    ):
        KafkaProducer(**config)
    failures = bootstrap_failures(caplog)
    assert failures
    # TLS was fine every time; it is the login that fails. kafka-python 3.0.12
    # drops a response that arrives in the same read as the broker's close, so
    # an attempt may log only "socket disconnected" instead of error 58 (on a
    # busy machine, every attempt may); and the last attempt gets only what is
    # left of the bootstrap timeout, so it may time out first (seen: the request,
    # or the SASL exchange as a whole).
    *earlier, last = failures
    for reason in earlier:
        assert reason.startswith((SASL_FAILED, "KafkaConnectionError: socket disconnected")), reason
    assert last.startswith((SASL_FAILED, "KafkaConnectionError: socket disconnected")) or (
        "timed out" in last
    ), last


def test_sasl_ssl_rejects_an_unknown_ca(
    kafka: KafkaBroker, other_ca: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = host_port(kafka.sasl_ssl)

    context = ssl.create_default_context(cafile=str(other_ca))
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"),
    ):
        context.wrap_socket(raw, server_hostname=host)

    config = {
        **kafka.producer_config("sasl_ssl"),
        "ssl_cafile": str(other_ca),
        "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
    }
    with (
        caplog.at_level(logging.WARNING, logger="kafka"),
        pytest.raises(KafkaTimeoutError, match=unable_to_bootstrap(kafka.sasl_ssl)),
    ):
        KafkaProducer(**config)
    failures = bootstrap_failures(caplog)
    assert failures
    # Each attempt fails verifying the certificate; the last one may run out of the
    # bootstrap timeout first, as in the wrong-password test.
    *earlier, last = failures
    verify_failed = "KafkaConnectionError: Handshake failed: [SSL: CERTIFICATE_VERIFY_FAILED]"
    for reason in earlier:
        assert reason.startswith(verify_failed), reason
    assert last.startswith(verify_failed) or "timed out" in last, last


def kafka_tool(name: str, *args: str, stdin: str | None = None) -> str:
    """Run one of Kafka's own command-line tools (`broker.py tool`): a client that shares no
    code with kafka-python or with this project."""
    result = subprocess.run(
        [sys.executable, str(BROKER_SCRIPT), "tool", name, "--", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=scaled(120),
        check=False,
    )
    assert result.returncode == 0, f"kafka {name} failed ({result.returncode}):\n{result.stderr}"
    return result.stdout


def test_kafka_tools_list_the_broker(kafka: KafkaBroker) -> None:
    listing = kafka_tool("broker-api-versions", "--bootstrap-server", kafka.plaintext)
    assert listing.startswith(f"{kafka.plaintext} (id: 1 rack: null isFenced: false) -> (")
    assert "Produce(0)" in listing


@pytest.mark.parametrize("listener", LISTENERS)
def test_kafka_tools_round_trip(kafka: KafkaBroker, listener: Listener, tmp_path: Path) -> None:
    """Kafka's console producer and consumer, on each listener (SCRAM and TLS included),
    read back what they wrote: the independent client agrees with the broker."""
    topic = kafka.new_topic(f"tools-{listener}")
    config = tmp_path / "client.properties"
    if listener == "plaintext":
        config.write_text("security.protocol=PLAINTEXT\n")
    else:
        config.write_text(
            "security.protocol=SASL_SSL\n"
            "sasl.mechanism=SCRAM-SHA-512\n"
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{kafka.username}" password="{kafka.password}";\n'
            "ssl.truststore.type=PEM\n"
            f"ssl.truststore.location={kafka.ca_path}\n"
        )
    bootstrap = kafka.bootstrap(listener)
    lines = [f"line-{i}" for i in range(5)]
    kafka_tool(
        "console-producer", "--bootstrap-server", bootstrap, "--topic", topic,
        "--command-config", str(config), stdin="\n".join(lines) + "\n",
    )  # fmt: skip
    read = kafka_tool(
        "console-consumer", "--bootstrap-server", bootstrap, "--topic", topic,
        "--command-config", str(config), "--from-beginning", "--max-messages", str(len(lines)),
        "--timeout-ms", str(int(scaled(60_000))),
    )  # fmt: skip
    assert read.splitlines() == lines


@pytest.mark.anyio
async def test_the_broker_from_trio(kafka: KafkaBroker) -> None:
    """The session fixture works from async tests, with the blocking client in a thread."""
    topic = await trio.to_thread.run_sync(kafka.new_topic, "from-trio")

    def produce_one() -> None:
        producer = KafkaProducer(**kafka.producer_config("sasl_ssl"))
        try:
            producer.send(topic, value=b"hello from trio").get(timeout=30)
        finally:
            producer.close(timeout=10)

    with trio.fail_after(60):
        await trio.to_thread.run_sync(produce_one)
        records = await trio.to_thread.run_sync(lambda: kafka.read_all(topic, expected=1))
    assert [r.value for r in records] == [b"hello from trio"]
