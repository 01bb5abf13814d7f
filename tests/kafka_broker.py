"""The Kafka broker that tests run against, and helpers to use it with kafka-python.

The session fixture ``kafka`` (tests/conftest.py) hands tests a ``KafkaBroker``:

* an external broker when ``LOADER_TEST_KAFKA_BOOTSTRAP`` is set, described by
  ``LOADER_TEST_KAFKA_SASL_SSL_BOOTSTRAP``, ``LOADER_TEST_KAFKA_USERNAME``,
  ``LOADER_TEST_KAFKA_PASSWORD`` and ``LOADER_TEST_KAFKA_CA_PATH`` (all five
  required; ``python3 kafka/broker.py env`` prints them for the local broker).
  The tests never start or stop it.
* otherwise the local broker of ``kafka/broker.py``: started by ``up`` (a no-op
  when it already runs), and stopped at the end of the session only if this
  session was the one that started it. Before each test it is probed, and
  restarted if it does not answer, so one broken test cannot fail the rest.

Tests that stop, restart or freeze a broker use ``private_broker``: a broker of their own,
in its own folder on free ports, so their failure cannot reach the shared one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord
from timing import scaled

REPO_ROOT = Path(__file__).resolve().parents[1]
BROKER_SCRIPT = REPO_ROOT / "kafka" / "broker.py"

Listener = Literal["plaintext", "sasl_ssl"]
LISTENERS: tuple[Listener, ...] = ("plaintext", "sasl_ssl")

ENV_PLAINTEXT = "LOADER_TEST_KAFKA_BOOTSTRAP"
ENV_SASL_SSL = "LOADER_TEST_KAFKA_SASL_SSL_BOOTSTRAP"
ENV_USERNAME = "LOADER_TEST_KAFKA_USERNAME"
ENV_PASSWORD = "LOADER_TEST_KAFKA_PASSWORD"
ENV_CA_PATH = "LOADER_TEST_KAFKA_CA_PATH"
ENV_NAMES = (ENV_PLAINTEXT, ENV_SASL_SSL, ENV_USERNAME, ENV_PASSWORD, ENV_CA_PATH)

SASL_MECHANISM = "SCRAM-SHA-512"
_TOPIC_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class KafkaBroker:
    """Where the test broker listens and how to log in to it."""

    plaintext: str
    """Bootstrap address of the PLAINTEXT listener, e.g. "127.0.0.1:19092"."""
    sasl_ssl: str
    """Bootstrap address of the SASL_SSL (SCRAM-SHA-512) listener, e.g. "127.0.0.1:19093"."""
    username: str
    password: str = field(repr=False)
    ca_path: str
    """PEM file of the CA that signed the SASL_SSL listener's certificate."""
    env: Mapping[str, str] = field(default_factory=dict, repr=False)
    """The LOADER_KAFKA_* variables that make kafka/broker.py act on this broker (a private
    one's folder and ports); empty for the shared broker."""

    def bootstrap(self, listener: Listener) -> str:
        return self.plaintext if listener == "plaintext" else self.sasl_ssl

    def client_config(self, listener: Listener = "plaintext") -> dict[str, Any]:
        """Connection settings for any kafka-python client (producer, consumer, admin)."""
        if listener == "plaintext":
            return {"bootstrap_servers": self.plaintext, "security_protocol": "PLAINTEXT"}
        return {
            "bootstrap_servers": self.sasl_ssl,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": SASL_MECHANISM,
            "sasl_plain_username": self.username,
            "sasl_plain_password": self.password,
            "ssl_cafile": self.ca_path,
            "ssl_check_hostname": True,
        }

    def producer_config(self, listener: Listener = "plaintext") -> dict[str, Any]:
        """KafkaProducer settings: the connection, acks=all and idempotence."""
        return {**self.client_config(listener), "acks": "all", "enable_idempotence": True}

    def consumer_config(self, listener: Listener = "plaintext") -> dict[str, Any]:
        """KafkaConsumer settings: the connection, from the earliest offset, no auto-commit."""
        return {
            **self.client_config(listener),
            "auto_offset_reset": "earliest",
            "enable_auto_commit": False,
        }

    def new_topic(self, prefix: str, partitions: int = 1) -> str:
        """Create a topic named after prefix plus a unique suffix; return once it has leaders.

        The replication factor is the broker's default (1 on the local broker).
        """
        safe = _TOPIC_UNSAFE.sub("-", prefix).strip("-.") or "test"
        name = f"{safe[:200]}-{uuid.uuid4().hex[:12]}"
        admin = KafkaAdminClient(**self.client_config("plaintext"))
        try:
            admin.create_topics({name: {"num_partitions": partitions}}, wait_for_metadata=True)
        finally:
            admin.close()
        return name

    def read_all(
        self,
        topic: str,
        *,
        expected: int | None = None,
        timeout: float | None = None,
        listener: Listener = "plaintext",
    ) -> list[ConsumerRecord]:
        """Every record of topic, ordered by (partition, offset); no consumer group.

        With expected=None: the records up to the end offsets at the time of the
        call. With expected=N: poll until at least N records arrived, then read on
        to the end offsets of that moment, so that surplus records (duplicates)
        are returned too. Raises TimeoutError when that takes longer than timeout.
        """
        timeout = scaled(30.0) if timeout is None else timeout
        deadline = time.monotonic() + timeout
        consumer = KafkaConsumer(**{**self.consumer_config(listener), "group_id": None})
        try:
            partitions = _partitions(consumer, topic, deadline)
            assigned = [TopicPartition(topic, p) for p in sorted(partitions)]
            consumer.assign(assigned)
            consumer.seek_to_beginning(*assigned)
            ends: dict[Any, int] | None = None
            if expected is None:
                ends = consumer.end_offsets(assigned)
            records: list[ConsumerRecord] = []
            while True:
                if ends is None and expected is not None and len(records) >= expected:
                    ends = consumer.end_offsets(assigned)
                if ends is not None and all(consumer.position(tp) >= ends[tp] for tp in assigned):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    wanted = f"{expected} expected" if expected is not None else f"ends {ends}"
                    raise TimeoutError(
                        f"read {len(records)} records from {topic!r} in {timeout}s ({wanted})"
                    )
                batches = consumer.poll(timeout_ms=int(min(remaining, 0.5) * 1000) + 1)
                for batch in batches.values():
                    records.extend(batch)
        finally:
            consumer.close()
        return sorted(records, key=lambda record: (record.partition, record.offset))


def _partitions(consumer: Any, topic: str, deadline: float) -> set[int]:
    while True:
        partitions: set[int] = consumer.partitions_for_topic(topic)
        if partitions:
            return partitions
        if time.monotonic() >= deadline:
            raise TimeoutError(f"topic {topic!r} is unknown to the broker")
        time.sleep(0.1)  # polling metadata, with a deadline


# --------------------------------------------------------------------------- which broker


def broker_from_env(environ: Mapping[str, str]) -> KafkaBroker | None:
    """The external broker named by LOADER_TEST_KAFKA_*, or None when none is named."""
    if not environ.get(ENV_PLAINTEXT):
        return None
    missing = [name for name in ENV_NAMES if not environ.get(name)]
    if missing:
        raise RuntimeError(
            f"{ENV_PLAINTEXT} names an external Kafka broker, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not set; set all of {', '.join(ENV_NAMES)} "
            f"(`python3 kafka/broker.py env` prints them for the local broker)"
        )
    return KafkaBroker(
        plaintext=environ[ENV_PLAINTEXT],
        sasl_ssl=environ[ENV_SASL_SSL],
        username=environ[ENV_USERNAME],
        password=environ[ENV_PASSWORD],
        ca_path=environ[ENV_CA_PATH],
    )


def load_broker_module() -> ModuleType:
    """The local Kafka's package (kafka/local/, loaded the way kafka/broker.py loads it), for
    its probes and process helpers."""
    spec = importlib.util.spec_from_file_location("local_kafka_broker", BROKER_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    package: ModuleType = module.load_package()
    return package


def run_broker_script(
    *args: str, check: bool = True, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run kafka/broker.py with this interpreter (the project's, with its dev dependencies)."""
    result = subprocess.run(
        [sys.executable, str(BROKER_SCRIPT), *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        raise RuntimeError(
            f"kafka/broker.py {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout}{result.stderr}"
        )
    return result


def local_broker_running() -> bool:
    """Whether the local broker's JVM runs (ready or still starting)."""
    status = run_broker_script("status", "--json", check=False)
    return status.returncode != 3


def start_local_broker(env: Mapping[str, str] | None = None) -> KafkaBroker:
    """`broker.py up` (idempotent), then the broker that `broker.py env` describes."""
    run_broker_script("up", env=env)
    described = json.loads(run_broker_script("env", "--json", env=env).stdout)
    broker = broker_from_env(described)
    assert broker is not None
    return KafkaBroker(**{**broker.__dict__, "env": dict(env or {})})


def stop_local_broker(env: Mapping[str, str] | None = None) -> None:
    run_broker_script("down", env=env)


def serves(broker: KafkaBroker) -> bool:
    """A quick look (one metadata request on PLAINTEXT) at whether the broker answers (any
    node of a cluster)."""
    for address in broker.plaintext.split(","):
        host, _, port = address.rpartition(":")
        try:
            _BROKER_MODULE.probe_plaintext(host, int(port))
        except (OSError, _BROKER_MODULE.ProtocolError):
            continue
        return True
    return False


def free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def private_home(home: Path, nodes: int = 1, *, auto_create_topics: bool = True) -> dict[str, str]:
    """The LOADER_KAFKA_* variables for a broker (or cluster of `nodes`) of its own in `home`,
    on free ports, with the shared broker's jars lent to it (when they are fetched) so it costs
    no download."""
    home.mkdir(parents=True, exist_ok=True)
    if _BROKER_MODULE.jars_present(_BROKER_MODULE.Layout(1)):
        (home / "libs").symlink_to(_BROKER_MODULE.Layout(1).libs, target_is_directory=True)
    ports = free_ports(3 * nodes)
    plaintext, sasl_ssl, controller = (ports[kind::3] for kind in range(3))
    return {
        "LOADER_KAFKA_HOME": str(home),
        "LOADER_KAFKA_PLAINTEXT_PORT": ",".join(map(str, plaintext)),
        "LOADER_KAFKA_SASL_SSL_PORT": ",".join(map(str, sasl_ssl)),
        "LOADER_KAFKA_CONTROLLER_PORT": ",".join(map(str, controller)),
        "LOADER_KAFKA_AUTO_CREATE_TOPICS": "true" if auto_create_topics else "false",
    }


@contextlib.contextmanager
def private_broker(home: Path, *, auto_create_topics: bool = True) -> Iterator[KafkaBroker]:
    """A broker of the caller's own, in `home` on free ports; stopped (and checked gone)
    afterwards. Reuses the shared broker's jars, so it costs one JVM start."""
    env = private_home(home, auto_create_topics=auto_create_topics)
    broker = start_local_broker(env)
    try:
        yield broker
    finally:
        stop_local_broker(env)


@dataclass(frozen=True)
class PartitionState:
    leader: int
    """-1 while the partition has no leader."""
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


@dataclass(frozen=True)
class KafkaCluster:
    """A private KRaft cluster (each node broker and controller) and its nodes' lifecycle:
    stop one as Kubernetes does (SIGTERM, then wait), kill one (SIGKILL), start what is down."""

    broker: KafkaBroker
    """Bootstrap addresses list every node."""
    nodes: tuple[int, ...]

    def status(self) -> dict[str, Any]:
        result = run_broker_script("status", "--json", check=False, env=self.broker.env)
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def pid_or_none(self, node: int) -> int | None:
        for report in self.status()["nodes"]:
            if report["node"] == node and report["running"]:
                return int(report["pid"])
        return None

    def pid(self, node: int) -> int:
        pid = self.pid_or_none(node)
        if pid is None:
            raise RuntimeError(f"node {node} of the cluster at {self.broker.plaintext} is down")
        return pid

    def plaintext(self, node: int) -> str:
        return self.broker.plaintext.split(",")[self.nodes.index(node)]

    def stop(self, node: int) -> None:
        """SIGTERM the node (a controlled shutdown) and wait until it is gone."""
        run_broker_script("down", "--node", str(node), env=self.broker.env)

    def kill(self, node: int) -> None:
        """SIGKILL the node's JVM and wait until the process is gone."""
        pid = self.pid(node)
        started = _BROKER_MODULE.start_time(pid)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + scaled(10.0)
        while _BROKER_MODULE.alive(pid, started):
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {node} (pid {pid}) outlived SIGKILL")
            time.sleep(0.05)  # polling /proc for the exit of a process we do not parent

    def start(self) -> None:
        """Start every node that does not run; return once every node serves."""
        run_broker_script("up", env=self.broker.env)

    def partition(self, topic: str, partition: int = 0) -> PartitionState:
        """Leader, replicas and ISR of a partition, as the cluster's metadata says now."""
        admin = KafkaAdminClient(**self.broker.client_config("plaintext"))
        try:
            (described,) = admin.describe_topics([topic])
        finally:
            admin.close()
        for state in described["partitions"]:
            if state["partition_index"] == partition:
                return PartitionState(
                    leader=state["leader_id"],
                    replicas=tuple(state["replica_nodes"]),
                    isr=tuple(sorted(state["isr_nodes"])),
                )
        raise RuntimeError(f"{topic}-{partition} is not in the cluster's metadata")

    def active_controller(self) -> int:
        """The KRaft quorum's leader, as Kafka's own metadata-quorum tool reports it (the
        Metadata API names a random broker as "controller" under KRaft)."""
        for node in self.nodes:
            if self.pid_or_none(node) is None:
                continue
            result = run_broker_script(
                "tool", "metadata-quorum", "--bootstrap-server", self.plaintext(node),
                "describe", "--status", env=self.broker.env, check=False,
            )  # fmt: skip
            found = re.search(r"^LeaderId:\s+(\d+)$", result.stdout, re.MULTILINE)
            if found is not None:
                return int(found.group(1))
        raise RuntimeError(f"no node of the cluster at {self.broker.plaintext} names a leader")

    def elect_preferred_leaders(self, topic: str) -> None:
        """Move the leadership of each partition of `topic` back to its preferred replica (the
        first), as the controller's periodic rebalance does (leader.imbalance.check...)."""
        admin = KafkaAdminClient(**self.broker.client_config("plaintext"))
        try:
            admin.elect_leaders(0, [topic])  # 0: ElectionType.PREFERRED
        finally:
            admin.close()

    def wait_full_isr(self, topic: str, partition: int = 0, timeout: float | None = None) -> None:
        """Poll the metadata until every node is in the partition's ISR again."""
        deadline = time.monotonic() + (scaled(60.0) if timeout is None else timeout)
        while True:
            try:
                state = self.partition(topic, partition)
            except Exception:  # a node coming back: metadata may be unreachable for a moment
                state = None
            if state is not None and state.isr == tuple(sorted(self.nodes)):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{topic}-{partition}: ISR {state} is not full")
            time.sleep(0.2)  # polling the cluster's metadata, with a deadline


@contextlib.contextmanager
def private_cluster(home: Path, nodes: int = 3) -> Iterator[KafkaCluster]:
    """A cluster of the caller's own (replication factor 3 and min.insync.replicas=2 with three
    nodes), in `home` on free ports; every node stopped (and checked gone) afterwards."""
    env = private_home(home, nodes)
    run_broker_script("up", "--nodes", str(nodes), env=env)
    try:
        broker = start_local_broker(env)
        yield KafkaCluster(broker=broker, nodes=tuple(range(1, nodes + 1)))
    finally:
        stop_local_broker(env)


def processes_of(home: Path) -> list[int]:
    """Every process whose command line or environment mentions `home`: the wrapper, the
    JVM, anything they left."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        if int(proc.name) == os.getpid():
            continue
        try:
            text = (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in text and _BROKER_MODULE.start_time(int(proc.name)) is not None:
            found.append(int(proc.name))
    return found


def local_broker_pid(broker: KafkaBroker) -> int:
    """The broker's JVM, for tests that pause or restart a broker for real."""
    status = json.loads(run_broker_script("status", "--json", check=False, env=broker.env).stdout)
    if not status.get("running"):
        raise RuntimeError(f"the broker at {broker.plaintext} does not run")
    return int(status["pid"])


def wait_until_serving(broker: KafkaBroker, timeout: float | None = None) -> None:
    """After a pause or restart, a KRaft broker is fenced for a while and refuses to create
    topics; poll until it creates one again."""
    deadline = time.monotonic() + (scaled(60.0) if timeout is None else timeout)
    while True:
        try:
            broker.new_topic("serving-probe")
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        else:
            return


_BROKER_MODULE = load_broker_module()
