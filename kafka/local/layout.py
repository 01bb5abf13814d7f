"""Where a local Kafka lives (its cache folder, ports, JVM settings) and what every part shares:
the constants, the error meant for the person at the command line, the log line, the lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

KAFKA_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = KAFKA_DIR.parent
POM = KAFKA_DIR / "pom.xml"
JARS_LOCK = KAFKA_DIR / "jars.lock"
MAVEN_CENTRAL = "https://repo1.maven.org/maven2"
MIN_JAVA = 17

HOST = "127.0.0.1"
NODE_ID = 1
USERNAME = "loader"
SCRAM_MECHANISM = "SCRAM-SHA-512"
DEFAULT_HEAP = "-Xms256m -Xmx512m"
# A broker for tests and development on a small machine: one GC thread and the quick JIT only,
# so its threads leave the cores to what is being tested.
DEFAULT_JVM_OPTS = "-XX:+UseSerialGC -XX:TieredStopAtLevel=1 -XX:CICompilerCount=1 -Xss512k"
DEFAULT_START_TIMEOUT = 180.0
STOP_TIMEOUT = 60.0
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL_CLASS = "kafka.tools.StorageTool"


class BrokerError(Exception):
    """A failure with a message meant for the person running the command."""


class Layout:
    """Where everything lives, and the settings taken from the environment."""

    def __init__(self) -> None:
        home = os.environ.get("LOADER_KAFKA_HOME")
        self.home = Path(home).resolve() if home else REPO_ROOT / ".cache" / "kafka"
        self.libs = self.home / "libs"
        self.libs_stamp = self.libs / ".pom.sha256"
        self.tls = self.home / "tls"
        self.ca_pem = self.tls / "ca.pem"
        self.ca_key = self.tls / "ca.key"
        self.server_pem = self.tls / "server.pem"
        self.password_file = self.home / "scram-password"
        self.config = self.home / "config"
        self.server_properties = self.config / "server.properties"
        self.log4j2_properties = self.config / "log4j2.properties"
        self.data = self.home / "data"
        self.logs = self.home / "logs"
        self.server_log = self.logs / "server.log"
        self.stdout_log = self.logs / "stdout.log"
        self.pid_file = self.home / "broker.pid"
        self.lock_file = self.home / "broker.lock"
        self.plaintext_port = _port("LOADER_KAFKA_PLAINTEXT_PORT", 19092)
        self.sasl_ssl_port = _port("LOADER_KAFKA_SASL_SSL_PORT", 19093)
        self.controller_port = _port("LOADER_KAFKA_CONTROLLER_PORT", 19094)
        self.heap_opts = os.environ.get("LOADER_KAFKA_HEAP_OPTS", DEFAULT_HEAP)
        self.jvm_opts = os.environ.get("LOADER_KAFKA_JVM_OPTS", DEFAULT_JVM_OPTS)
        self.maven = os.environ.get("LOADER_MAVEN_REPOSITORY", MAVEN_CENTRAL).rstrip("/")
        self.start_timeout = float(
            os.environ.get("LOADER_KAFKA_START_TIMEOUT", DEFAULT_START_TIMEOUT)
        )

    @property
    def plaintext_bootstrap(self) -> str:
        return f"{HOST}:{self.plaintext_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"{HOST}:{self.sasl_ssl_port}"


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        port = int(raw)
    except ValueError:
        raise BrokerError(f"{name}={raw!r} is not a port number") from None
    if not 0 < port < 65536:
        raise BrokerError(f"{name}={raw!r} is not a port number")
    return port


def log(message: str) -> None:
    print(f"kafka: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Serialise up/down/wipe of one cache folder (two `up`s at once start one JVM)."""
    layout.home.mkdir(parents=True, exist_ok=True)
    with layout.lock_file.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
