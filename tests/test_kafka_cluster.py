"""The local Kafka's cluster mode (`kafka/broker.py up --nodes 3`): three KRaft nodes, each broker
and controller, replication factor 3 and min.insync.replicas=2, SASL_SSL on every node; one node
stopped, killed and started again; `down` leaves no process and no port behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer
from kafka.admin import ConfigFilterType, ConfigResource, ConfigResourceType
from kafka_broker import (
    KafkaBroker,
    KafkaCluster,
    load_broker_module,
    private_cluster,
    processes_of,
    run_broker_script,
)
from timing import scaled

broker_py = load_broker_module()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with private_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def broker_config(broker: KafkaBroker, node: int) -> dict[str, str]:
    admin = KafkaAdminClient(**broker.client_config("plaintext"))
    try:
        resource = ConfigResource(ConfigResourceType.BROKER, str(node))
        result = admin.describe_configs([resource], config_filter=ConfigFilterType.ALL)
    finally:
        admin.close()
    # {resource type: {resource name: {key: {"value": ..., ...}}}}
    (by_name,) = result.values()
    return {key: entry["value"] for key, entry in by_name[str(node)].items()}


def produce_one(broker: KafkaBroker, bootstrap: str, topic: str, value: bytes) -> None:
    """One acks=all record through the SASL_SSL listener at `bootstrap` alone."""
    config = {**broker.producer_config("sasl_ssl"), "bootstrap_servers": bootstrap}
    producer = KafkaProducer(**config)
    try:
        producer.send(topic, value).get(timeout=scaled(30.0))
    finally:
        producer.close()


def test_three_nodes_with_three_replicas_and_two_in_sync_over_sasl_ssl_on_each(
    cluster: KafkaCluster,
) -> None:
    status = cluster.status()
    assert [(node["node"], node["running"]) for node in status["nodes"]] == [
        (1, True),
        (2, True),
        (3, True),
    ]
    assert {node["cluster_id"] for node in status["nodes"]} == {status["cluster_id"]}
    assert all(node["brokers"] == [1, 2, 3] for node in status["nodes"])
    for node in cluster.nodes:
        config = broker_config(cluster.broker, node)
        assert config["min.insync.replicas"] == "2"
        assert config["default.replication.factor"] == "3"
        assert config["process.roles"] == "broker,controller"
    topic = cluster.broker.new_topic("cluster-replicas")
    state = cluster.partition(topic)
    assert sorted(state.replicas) == [1, 2, 3]
    cluster.wait_full_isr(topic)
    sasl_ssl = cluster.broker.sasl_ssl.split(",")
    assert len(sasl_ssl) == 3
    for n, bootstrap in enumerate(sasl_ssl):
        produce_one(cluster.broker, bootstrap, topic, f"via node {n + 1}".encode())
    values = [record.value for record in cluster.broker.read_all(topic, expected=3)]
    assert values == [b"via node 1", b"via node 2", b"via node 3"]


def test_a_killed_leader_is_replaced_and_its_node_rejoins_the_isr(cluster: KafkaCluster) -> None:
    topic = cluster.broker.new_topic("cluster-kill")
    cluster.wait_full_isr(topic)
    leader = cluster.partition(topic).leader
    cluster.kill(leader)
    assert cluster.pid_or_none(leader) is None
    # Without the leader, the two others elect a new one, and acks=all still succeeds (2 >= 2).
    survivor = next(node for node in cluster.nodes if node != leader)
    produce_one(cluster.broker, cluster.broker.sasl_ssl.split(",")[survivor - 1], topic, b"x")
    assert cluster.partition(topic).leader not in {leader, -1}
    cluster.start()
    cluster.wait_full_isr(topic)


def test_a_stopped_node_is_gone_and_starts_again(cluster: KafkaCluster) -> None:
    cluster.stop(2)
    assert cluster.pid_or_none(2) is None
    assert not any(broker_py.port_taken(int(a.rpartition(":")[2])) for a in [cluster.plaintext(2)])
    cluster.start()
    assert cluster.pid_or_none(2) is not None


def test_down_leaves_no_process_and_no_port(cluster: KafkaCluster) -> None:
    """Last in this module: it stops the module's cluster."""
    pids = [cluster.pid(node) for node in cluster.nodes]
    assert len(set(pids)) == 3
    ports = [
        int(address.rpartition(":")[2])
        for bootstrap in (cluster.broker.plaintext, cluster.broker.sasl_ssl)
        for address in bootstrap.split(",")
    ]
    run_broker_script("down", env=cluster.broker.env)
    home = Path(cluster.broker.env["LOADER_KAFKA_HOME"])
    assert processes_of(home) == []
    assert [port for port in ports if broker_py.port_taken(port)] == []
    assert list(home.glob("node-*/broker.pid")) == []
    assert cluster.status()["running"] is False
