"""Kafka's own command-line tools, run from the broker's jars."""

from __future__ import annotations

import subprocess

from .jars import classpath, fetch_jars, java_command
from .layout import KAFKA_DIR, Layout

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
