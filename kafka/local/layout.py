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


PORT_VARIABLES = (
    ("LOADER_KAFKA_PLAINTEXT_PORT", 19092),
    ("LOADER_KAFKA_SASL_SSL_PORT", 19093),
    ("LOADER_KAFKA_CONTROLLER_PORT", 19094),
)
# A cluster's node n listens on node 1's ports + (n - 1) * NODE_PORT_STEP unless a port
# variable lists one port per node.
NODE_PORT_STEP = 10
MAX_NODES = 9


class Node:
    """One KRaft node (broker and controller in one JVM): its ports and its own files. The node
    of a single-node Kafka lives in the cache folder itself; a cluster's node n in node-<n>/."""

    def __init__(self, node_id: int, home: Path, ports: tuple[int, int, int], *,
                 single: bool) -> None:  # fmt: skip
        self.id = node_id
        # How messages name its JVM.
        self.broker = "the broker" if single else f"the broker of node {node_id}"
        self.home = home
        self.config = home / "config"
        self.server_properties = self.config / "server.properties"
        self.log4j2_properties = self.config / "log4j2.properties"
        self.data = home / "data"
        self.logs = home / "logs"
        self.server_log = self.logs / "server.log"
        self.stdout_log = self.logs / "stdout.log"
        self.pid_file = home / "broker.pid"
        self.plaintext_port, self.sasl_ssl_port, self.controller_port = ports

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.plaintext_port, self.sasl_ssl_port, self.controller_port

    @property
    def plaintext_bootstrap(self) -> str:
        return f"{HOST}:{self.plaintext_port}"

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return f"{HOST}:{self.sasl_ssl_port}"

    @property
    def name(self) -> str:
        return f"node {self.id}"


class Layout:
    """Where everything lives, and the settings taken from the environment. `nodes`: how many
    KRaft nodes; None takes the count the cache folder's running Kafka was started with."""

    def __init__(self, nodes: int | None = None) -> None:
        home = os.environ.get("LOADER_KAFKA_HOME")
        self.home = Path(home).resolve() if home else REPO_ROOT / ".cache" / "kafka"
        self.libs = self.home / "libs"
        self.libs_stamp = self.libs / ".pom.sha256"
        self.tls = self.home / "tls"
        self.ca_pem = self.tls / "ca.pem"
        self.ca_key = self.tls / "ca.key"
        self.server_pem = self.tls / "server.pem"
        self.password_file = self.home / "scram-password"
        self.lock_file = self.home / "broker.lock"
        self.topology_file = self.home / "nodes"
        count = self.recorded_nodes() if nodes is None else nodes
        if not 1 <= count <= MAX_NODES:
            raise BrokerError(f"--nodes {count}: a local Kafka has 1 to {MAX_NODES} nodes")
        columns = [_ports(name, default, count) for name, default in PORT_VARIABLES]
        self.nodes = [
            Node(
                n + 1,
                self.home if count == 1 else self.home / f"node-{n + 1}",
                ports,
                single=count == 1,
            )
            for n, ports in enumerate(zip(*columns, strict=True))
        ]
        self.heap_opts = os.environ.get("LOADER_KAFKA_HEAP_OPTS", DEFAULT_HEAP)
        self.jvm_opts = os.environ.get("LOADER_KAFKA_JVM_OPTS", DEFAULT_JVM_OPTS)
        auto_create = os.environ.get("LOADER_KAFKA_AUTO_CREATE_TOPICS", "true").strip().lower()
        if auto_create not in ("true", "false"):
            raise BrokerError(f"LOADER_KAFKA_AUTO_CREATE_TOPICS={auto_create!r}: true or false")
        self.auto_create_topics = auto_create
        self.maven = os.environ.get("LOADER_MAVEN_REPOSITORY", MAVEN_CENTRAL).rstrip("/")
        self.start_timeout = float(
            os.environ.get("LOADER_KAFKA_START_TIMEOUT", DEFAULT_START_TIMEOUT)
        )

    def recorded_nodes(self) -> int:
        """The node count `up` recorded (1 when none is recorded: the single-node Kafka)."""
        try:
            return int(self.topology_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return 1

    @property
    def cluster(self) -> bool:
        return len(self.nodes) > 1

    def node(self, node_id: int) -> Node:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise BrokerError(f"no node {node_id}: this Kafka has nodes 1 to {len(self.nodes)}")

    @property
    def plaintext_bootstrap(self) -> str:
        return ",".join(node.plaintext_bootstrap for node in self.nodes)

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return ",".join(node.sasl_ssl_bootstrap for node in self.nodes)


def _ports(name: str, default: int, count: int) -> list[int]:
    """One port per node from `name`: a port, or a comma-separated list of one per node (a
    single node takes the first); nodes past the list's end count on from its last port in
    steps of NODE_PORT_STEP."""
    raw = os.environ.get(name) or str(default)
    try:
        ports = [int(part) for part in raw.split(",")]
    except ValueError:
        raise BrokerError(f"{name}={raw!r} is not a port number (or a list of them)") from None
    if any(not 0 < port < 65536 for port in ports):
        raise BrokerError(f"{name}={raw!r} is not a port number (or a list of them)")
    while len(ports) < count:
        ports.append(ports[-1] + NODE_PORT_STEP)
    return ports[:count]


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
