"""What a broker is started with: the SCRAM password, server.properties, log4j2, the JVM's
options, and the storage formatted once."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from .jars import classpath, java_command
from .layout import (
    HOST,
    SCRAM_MECHANISM,
    STORAGE_TOOL_CLASS,
    USERNAME,
    BrokerError,
    Layout,
    Node,
    log,
)


def ensure_password(layout: Layout) -> str:
    """The SCRAM password of USERNAME: made once, kept in the cache folder (mode 600)."""
    try:
        return layout.password_file.read_text().strip()
    except FileNotFoundError:
        pass
    if any((node.data / "meta.properties").exists() for node in layout.nodes):
        raise BrokerError(
            f"{layout.password_file} is gone but the storage was formatted with a password "
            f"in it: run `{Path(sys.argv[0]).name} wipe` to format it anew"
        )
    password = secrets.token_urlsafe(24)
    layout.home.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(password + "\n")
    return password


def read_password(layout: Layout) -> str:
    try:
        return layout.password_file.read_text().strip()
    except FileNotFoundError:
        raise BrokerError(
            f"no password yet in {layout.password_file}: run `broker.py up` first"
        ) from None


def server_properties(layout: Layout, node: Node) -> str:
    p, s, c = node.ports
    # One node: one replica of everything. A cluster: as in production (Strimzi, three
    # brokers), three replicas and two in sync for an acks=all write to succeed.
    replicas = min(len(layout.nodes), 3)
    min_isr = 2 if replicas >= 3 else 1
    settings = {
        # KRaft combined mode: every node is a broker and one of the controllers (the only
        # one of a single-node Kafka), the voters fixed here rather than added at run time.
        "process.roles": "broker,controller",
        "node.id": node.id,
        "controller.quorum.voters": ",".join(
            f"{voter.id}@{HOST}:{voter.controller_port}" for voter in layout.nodes
        ),
        "controller.listener.names": "CONTROLLER",
        "listeners": f"PLAINTEXT://{HOST}:{p},SASL_SSL://{HOST}:{s},CONTROLLER://{HOST}:{c}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{p},SASL_SSL://{HOST}:{s}",
        "listener.security.protocol.map": (
            "PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT"
        ),
        "inter.broker.listener.name": "PLAINTEXT",
        # SASL_SSL: SCRAM-SHA-512 users live in the metadata log (`format --add-scram`);
        # the login module needs no options on a listener that no broker logs in to.
        "sasl.enabled.mechanisms": SCRAM_MECHANISM,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": (
            "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        ),
        "listener.name.sasl_ssl.ssl.keystore.type": "PEM",
        "listener.name.sasl_ssl.ssl.keystore.location": layout.server_pem,
        "listener.name.sasl_ssl.ssl.client.auth": "none",
        # Small internal topics, fast tests.
        "log.dirs": node.data,
        "num.partitions": 1,
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "auto.create.topics.enable": layout.auto_create_topics,
        "offsets.topic.replication.factor": replicas,
        "offsets.topic.num.partitions": 1,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "transaction.state.log.num.partitions": 1,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        "group.initial.rebalance.delay.ms": 0,
        "num.network.threads": 2,
        "num.io.threads": 4,
    }
    lines = ["# Written by kafka/broker.py on every `up`; edits here are lost."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def log4j2_properties(node: Node) -> str:
    return f"""\
# Written by kafka/broker.py on every `up`; edits here are lost.
status = warn
name = local-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {node.server_log}
appender.file.filePattern = {node.logs}/server.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
logger.stateChange.name = state.change.logger
logger.stateChange.level = WARN
"""


def write_config(layout: Layout) -> None:
    if layout.cluster:
        layout.topology_file.write_text(f"{len(layout.nodes)}\n")
    else:
        layout.topology_file.unlink(missing_ok=True)
    for node in layout.nodes:
        node.config.mkdir(parents=True, exist_ok=True)
        node.logs.mkdir(parents=True, exist_ok=True)
        node.server_properties.write_text(server_properties(layout, node))
        node.log4j2_properties.write_text(log4j2_properties(node))


def jvm_options(layout: Layout, node: Node) -> list[str]:
    return [
        *shlex.split(layout.heap_opts),
        *shlex.split(layout.jvm_opts),
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={node.log4j2_properties}",
        f"-Dkafka.logs.dir={node.logs}",
    ]


def random_cluster_id() -> str:
    """A Kafka Uuid as text: 16 random bytes, URL-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def cluster_id_of(layout: Layout) -> str | None:
    """The cluster id a node's storage was formatted with (the first formatted node's)."""
    for node in layout.nodes:
        with contextlib.suppress(FileNotFoundError):
            for line in (node.data / "meta.properties").read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip() == "cluster.id":
                    return value.strip()
    return None


def format_storage(layout: Layout, password: str) -> None:
    """Format each node's data/ once, all with one cluster id and the SCRAM credential of
    USERNAME in the metadata log."""
    cluster_id = cluster_id_of(layout) or random_cluster_id()
    for node in layout.nodes:
        _format_node(layout, node, password, cluster_id)


def _format_node(layout: Layout, node: Node, password: str, cluster_id: str) -> None:
    if (node.data / "meta.properties").exists():
        return
    log(f"formatting {node.data} (user {USERNAME!r}, {SCRAM_MECHANISM})")
    shutil.rmtree(node.data, ignore_errors=True)
    command = [
        java_command(),
        *jvm_options(layout, node),
        "-cp",
        classpath(layout),
        STORAGE_TOOL_CLASS,
        "format",
        "--config",
        str(node.server_properties),
        "--cluster-id",
        cluster_id,
        "--add-scram",
        f"{SCRAM_MECHANISM}=[name={USERNAME},password={password}]",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise BrokerError(f"formatting the storage failed ({result.returncode})")
