"""kafka-python clients configured from settings: security, timeouts, and their safe closing."""

from __future__ import annotations

import collections
import contextlib
import logging
import ssl
from collections.abc import Iterable, Iterator
from typing import Any

import trio
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    SaslAuthenticationFailedError,
)

from loader.settings import KafkaSettings

log = logging.getLogger(__name__)

# kafka-python's close()/flush() wait forever without one; Job termination must not.
CLOSE_TIMEOUT = 5.0
# The longest a send waits for its topic's metadata (kafka-python's `max_block_ms`), and the
# start's check that every topic exists. Asking for a missing topic lets a broker that creates
# topics on first use create it, which takes well under this; past it, the topic is missing.
# The topics' metadata is held from the start on, so later sends do not wait for it.
METADATA_TIMEOUT = 10.0
# Bootstrap attempts cut during the SASL login, in a row, taken for a refused password: one
# could be a broker restarting; three in a second are not.
CUT_LOGINS = 3
# The longest wait before reconnecting to a broker that failed (see client_config).
RECONNECT_BACKOFF_MAX_MS = 1000


class KafkaFailure(Exception):
    """Kafka refused or could not be reached: the run ends with `error` and exit code 1."""


class NotSent(KafkaFailure):
    """kafka-python did not take the record (`send` raised): it was certainly not written."""


class MissingTopics(KafkaFailure):
    """Topics Kafka neither has nor creates: the run cannot start (a configuration error)."""


def surely_not_written(exc: BaseException) -> bool:
    """Whether a failed send proves its record was not written: kafka-python never took it,
    or Kafka refused it (a non-retriable error). A timeout or a lost connection proves
    nothing: the record may be in the topic with its acknowledgement lost."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, NotSent):
            return True
        if isinstance(cause, KafkaError):
            return not cause.retriable
        cause = cause.__cause__
    return False


def client_config(
    kafka: KafkaSettings, *, timeout: float, request_timeout: float = 30.0
) -> dict[str, Any]:
    """Connection settings shared by producer and consumer.

    A user means SASL_SSL; `ca_path` means TLS verified against that CA, hostname included.
    """
    config: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers.split(","),
        "security_protocol": kafka.security_protocol,
        "bootstrap_timeout_ms": int(timeout * 1000),
        "request_timeout_ms": int(min(timeout, request_timeout) * 1000),
        # kafka-python doubles the wait before reconnecting to a broker with each failure, up
        # to this (its default, 30 s; Java's client: 1 s). A broker that was down a while (a
        # restart, a kill) is then not tried again for up to 30 s after it is back, and when
        # it leads a partition again (the controller moves leaders back to their preferred
        # replica), writes to that partition wait as long: seconds of stall for nothing.
        "reconnect_backoff_max_ms": RECONNECT_BACKOFF_MAX_MS,
    }
    if kafka.security_protocol != "PLAINTEXT":
        config["ssl_check_hostname"] = True
        if kafka.ca_path is not None:
            config["ssl_cafile"] = str(kafka.ca_path)
    if kafka.user is not None and kafka.password is not None:
        config["sasl_mechanism"] = kafka.sasl_mechanism
        config["sasl_plain_username"] = kafka.user
        config["sasl_plain_password"] = kafka.password.reveal()
    return config


def describe(exc: BaseException) -> str:
    """kafka-python's exceptions often stringify to their bare class name; say more."""
    text = str(exc)
    name = type(exc).__name__
    if not text or text == name:
        return name
    return text if text.startswith(name) else f"{name}: {text}"


class _Hopeless(Exception):
    """Raised into kafka-python's bootstrap loop to end it: retrying cannot help."""


class _Causes(logging.Handler):
    """kafka-python logs why a bootstrap failed (bad password, unknown CA) but raises only a
    timeout; its last words on the matter make the error say why.

    It also retries a refused login or an untrusted certificate until its bootstrap timeout
    (up to a minute), though the same password and CA file are refused every time: the first
    such failure of the bootstrap loop ends it, named. (The Job's next pod may still succeed:
    it reads the Secrets again, which Strimzi may have renewed meanwhile.)"""

    # Most telling first: a refused login or certificate beats a plain connection failure.
    MARKERS = ("Authentication", "SSL", "Handshake", "refused", "Connection failed")

    def __init__(self, kafka: KafkaSettings) -> None:
        super().__init__(logging.WARNING)
        self.kafka = kafka
        self.messages: collections.deque[str] = collections.deque(maxlen=50)
        self.hopeless: str | None = None
        # Consecutive bootstrap attempts the broker hung up on in the middle of the login.
        self.cut_logins = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        hopeless = _hopeless(record, self.kafka)
        # The bootstrap loop logs each failed attempt before its next one.
        attempt = record.name == "kafka.net.manager" and record.funcName == "_do_bootstrap"
        if attempt and hopeless is None and (failure := _exception(record)) is not None:
            self.cut_logins = self.cut_logins + 1 if _cut_during_login(failure) else 0
            if self.cut_logins >= CUT_LOGINS:
                hopeless = (
                    f"Kafka closed the connection during the login of user {self.kafka.user!r} "
                    f"({self.kafka.sasl_mechanism}) {self.cut_logins} times in a row: most "
                    "likely a wrong user name or password (kafka-python loses the broker's "
                    "reply when the close comes with it)"
                )
        if hopeless is not None:
            self.hopeless = hopeless
            if attempt:
                raise _Hopeless(hopeless)  # raised from the log call, it ends the loop

    def explain(self) -> str:
        if self.hopeless is not None:
            return f": {self.hopeless}"
        for marker in self.MARKERS:
            for message in reversed(self.messages):
                if marker in message:
                    return f" (kafka-python reported: {message})"
        return ""


def _exception(record: logging.LogRecord) -> BaseException | None:
    args = record.args if isinstance(record.args, tuple) else ()
    return next((a for a in args if isinstance(a, BaseException)), None)


def _cut_during_login(exc: BaseException) -> bool:
    """Whether the connection broke while kafka-python was in its SASL login. The broker
    answers a wrong password with an error and closes the connection; kafka-python 3.0.12
    drops that reply when both arrive in one read, and reports only a disconnect."""
    if not isinstance(exc, KafkaConnectionError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "_sasl_authenticate":
            return True
        frame = frame.tb_next
    return False


def _hopeless(record: logging.LogRecord, kafka: KafkaSettings) -> str | None:
    """The cause, in one line, when a logged failure is one that retrying cannot fix."""
    args = record.args if isinstance(record.args, tuple) else ()
    for arg in args:
        seen: set[int] = set()
        exc: BaseException | None = arg if isinstance(arg, BaseException) else None
        while exc is not None and id(exc) not in seen:
            seen.add(id(exc))
            if isinstance(exc, SaslAuthenticationFailedError):
                return (
                    f"Kafka refused the login of user {kafka.user!r} ({kafka.sasl_mechanism}): "
                    "wrong user name or password"
                )
            if isinstance(exc, ssl.SSLCertVerificationError):
                trusted = f"CA_PATH={kafka.ca_path}" if kafka.ca_path else "the system's CAs"
                return (
                    "the Kafka broker's TLS certificate is not trusted "
                    f"({exc.verify_message or exc.reason}; checked against {trusted})"
                )
            exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _failure_cause(what: str, kafka: KafkaSettings) -> Iterator[None]:
    causes = _Causes(kafka)
    logger = logging.getLogger("kafka")
    logger.addHandler(causes)
    try:
        yield
    except Exception as exc:
        detail = "" if isinstance(exc, _Hopeless) else f": {describe(exc)}"
        raise KafkaFailure(
            f"cannot open a Kafka {what} to {kafka.bootstrap_servers} "
            f"({kafka.security_protocol}){detail}{causes.explain()}"
        ) from exc
    finally:
        logger.removeHandler(causes)


def open_producer(kafka: KafkaSettings, *, delivery_timeout: float) -> KafkaProducer:
    """Blocking: connects (bootstrap) so a wrong address or password fails here, clearly."""
    with _failure_cause("producer", kafka):
        return KafkaProducer(
            # kafka-python insists on delivery > linger + request timeout: retries fit in it.
            **client_config(
                kafka,
                timeout=min(delivery_timeout, 60.0),
                request_timeout=min(30.0, delivery_timeout / 2),
            ),
            acks="all",
            enable_idempotence=True,
            # Ordered per partition under retries, as the idempotent producer allows.
            max_in_flight_requests_per_connection=5,
            delivery_timeout_ms=int(delivery_timeout * 1000),
            max_block_ms=int(min(delivery_timeout, METADATA_TIMEOUT) * 1000),
            # The sink gathers records on the Trio side (sink.LINGER) and hands them over in
            # one go, so each hand-off already makes one produce request: a linger here would
            # only add a timer wake-up of kafka-python's thread per batch.
            linger_ms=0,
            batch_size=256 * 1024,
            # Sensor bookkeeping costs several microseconds per record; Prometheus covers it.
            # A measuring run turns it on, averaged over the last 5 to 10 s (two 5 s samples)
            # so a benchmark window reads its own load rather than the minute before.
            metrics_enabled=kafka.client_metrics,
            metrics_sample_window_ms=5000,
            metrics_num_samples=2,
        )


class _Unknown(logging.Handler):
    """The topics Kafka answered a metadata request about with "no such topic":
    kafka-python logs that answer but raises only a timeout, the same as for no answer."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.topics: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "Topic %s not found in cluster metadata" and isinstance(
            record.args, tuple
        ):
            self.topics.add(str(record.args[0]))


async def check_topics(producer: KafkaProducer, topics: Iterable[str]) -> None:
    """Each topic's metadata, all asked at once, each within `max_block_ms`. Raise
    `MissingTopics` naming those Kafka said it has not got (nor created on being asked),
    `KafkaFailure` when it did not answer in time (that may pass: a retry may do)."""
    failed: dict[str, str] = {}
    unknown = _Unknown()
    logger = logging.getLogger("kafka.cluster")

    async def check(topic: str) -> None:
        try:
            # Abandoned on cancellation: the wait is kafka-python's, bounded by max_block_ms.
            await trio.to_thread.run_sync(producer.partitions_for, topic, abandon_on_cancel=True)
        except KafkaError as exc:
            failed[topic] = describe(exc)

    logger.addHandler(unknown)
    try:
        async with trio.open_nursery() as nursery:
            for topic in dict.fromkeys(topics):
                nursery.start_soon(check, topic)
    finally:
        logger.removeHandler(unknown)
    if missing := [topic for topic in failed if topic in unknown.topics]:
        seconds = producer.config["max_block_ms"] / 1000
        raise MissingTopics(
            f"Kafka has no topic {', '.join(map(repr, missing))} and did not create it within "
            f"{seconds:.0f} s (it does not create topics on first use): create it, or correct "
            "KAFKA_TOPIC, QUEUE_EVENTS_TOPIC or QUEUE_CONTROL_TOPIC"
        )
    if failed:
        named = "; ".join(f"{topic!r}: {why}" for topic, why in failed.items())
        raise KafkaFailure(f"cannot read the metadata of Kafka topic(s) {named}")


def publish_once(
    kafka: KafkaSettings, topic: str, key: bytes, value: bytes, seconds: float
) -> None:
    """Blocking: one record through a producer of its own, acknowledged, within `seconds`."""
    with _failure_cause("producer", kafka):
        producer = KafkaProducer(
            **client_config(kafka, timeout=seconds, request_timeout=seconds),
            acks="all",
            max_block_ms=int(seconds * 1000),
            metrics_enabled=False,
        )
    try:
        producer.send(topic, value=value, key=key).get(timeout=seconds)
    finally:
        _close(producer, 0.5)


def open_consumer(
    kafka: KafkaSettings,
    *,
    timeout: float,
    request_timeout: float = 30.0,
    fetch_max_wait_ms: int = 500,
) -> KafkaConsumer:
    """A group-less consumer: the Job is stateless and commits nothing.

    `request_timeout` bounds each blocking call, so a thread stuck on a dead broker returns
    (and lets the run end) that soon. `fetch_max_wait_ms`: how long the broker holds a fetch
    while nothing is new (each empty answer costs a wake-up).
    """
    with _failure_cause("consumer", kafka):
        return KafkaConsumer(
            **client_config(kafka, timeout=timeout, request_timeout=request_timeout),
            group_id=None,
            enable_auto_commit=False,
            metrics_enabled=False,
            fetch_max_wait_ms=fetch_max_wait_ms,
        )


def offsets_since(
    consumer: KafkaConsumer, topic: str, since_ms: int
) -> dict[TopicPartition, tuple[int, int]]:
    """Blocking: per partition of `topic`, the first offset at or after `since_ms` (the end,
    when nothing is that recent) and the end offset; empty when the topic has no partitions."""
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
    if not tps:
        return {}
    ends = consumer.end_offsets(tps)
    found = consumer.offsets_for_times(dict.fromkeys(tps, since_ms))
    return {
        tp: (hit.offset if (hit := found.get(tp)) is not None else ends[tp], ends[tp]) for tp in tps
    }


async def aclose(client: KafkaProducer | KafkaConsumer, seconds: float = CLOSE_TIMEOUT) -> None:
    """Close in a thread, within `seconds`, even when the caller is being cancelled. A close
    that overruns (a thread of the client stuck on a frozen broker) is left to the process's
    exit rather than holding up the end of the run."""
    with trio.CancelScope(shield=True), trio.move_on_after(seconds + 1.0) as overrun:
        try:
            await trio.to_thread.run_sync(_close, client, seconds, abandon_on_cancel=True)
        except Exception:
            log.exception("closing the Kafka client failed")
    if overrun.cancelled_caught:
        log.warning("closing the Kafka client did not end within %.1f s; left behind", seconds)


def _close(client: KafkaProducer | KafkaConsumer, timeout: float) -> None:
    if isinstance(client, KafkaProducer):
        try:
            client.close(timeout=timeout)
        except KafkaTimeoutError:
            # close() flushes first and, when Kafka is gone, gives up before stopping its
            # sender thread (and would try again from __del__). What is unsent was already
            # reported as not acknowledged: stop without the flush.
            client.flush = lambda timeout=None: None
            client.close(timeout=0)
    else:
        client.close(autocommit=False, timeout_ms=int(timeout * 1000))
