"""What a broker is started with: the SCRAM password, server.properties, log4j2, the JVM's
options, and the storage formatted once."""

from __future__ import annotations

import base64
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
    NODE_ID,
    SCRAM_MECHANISM,
    STORAGE_TOOL_CLASS,
    USERNAME,
    BrokerError,
    Layout,
    log,
)


def ensure_password(layout: Layout) -> str:
    """The SCRAM password of USERNAME: made once, kept in the cache folder (mode 600)."""
    try:
        return layout.password_file.read_text().strip()
    except FileNotFoundError:
        pass
    if (layout.data / "meta.properties").exists():
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


def server_properties(layout: Layout) -> str:
    p, s, c = layout.plaintext_port, layout.sasl_ssl_port, layout.controller_port
    settings = {
        # KRaft combined mode: one process is the broker and the only controller.
        "process.roles": "broker,controller",
        "node.id": NODE_ID,
        "controller.quorum.voters": f"{NODE_ID}@{HOST}:{c}",
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
        # One node, fast tests.
        "log.dirs": layout.data,
        "num.partitions": 1,
        "default.replication.factor": 1,
        "min.insync.replicas": 1,
        "auto.create.topics.enable": "true",
        "offsets.topic.replication.factor": 1,
        "offsets.topic.num.partitions": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "transaction.state.log.num.partitions": 1,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        "group.initial.rebalance.delay.ms": 0,
        "num.network.threads": 2,
        "num.io.threads": 4,
    }
    lines = ["# Written by kafka/broker.py on every `up`; edits here are lost."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def log4j2_properties(layout: Layout) -> str:
    return f"""\
# Written by kafka/broker.py on every `up`; edits here are lost.
status = warn
name = local-kafka
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = {layout.server_log}
appender.file.filePattern = {layout.logs}/server.log.%i
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
    layout.config.mkdir(parents=True, exist_ok=True)
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.server_properties.write_text(server_properties(layout))
    layout.log4j2_properties.write_text(log4j2_properties(layout))


def jvm_options(layout: Layout) -> list[str]:
    return [
        *shlex.split(layout.heap_opts),
        *shlex.split(layout.jvm_opts),
        "-XX:+ExitOnOutOfMemoryError",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={layout.log4j2_properties}",
        f"-Dkafka.logs.dir={layout.logs}",
    ]


def random_cluster_id() -> str:
    """A Kafka Uuid as text: 16 random bytes, URL-safe base64, no padding."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def format_storage(layout: Layout, password: str) -> None:
    """Format data/ once, with the SCRAM credential of USERNAME in the metadata log."""
    if (layout.data / "meta.properties").exists():
        return
    log(f"formatting {layout.data} (user {USERNAME!r}, {SCRAM_MECHANISM})")
    shutil.rmtree(layout.data, ignore_errors=True)
    command = [
        java_command(),
        *jvm_options(layout),
        "-cp",
        classpath(layout),
        STORAGE_TOOL_CLASS,
        "format",
        "--config",
        str(layout.server_properties),
        "--cluster-id",
        random_cluster_id(),
        "--add-scram",
        f"{SCRAM_MECHANISM}=[name={USERNAME},password={password}]",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise BrokerError(f"formatting the storage failed ({result.returncode})")
