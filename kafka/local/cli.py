"""The commands of kafka/broker.py: up, down, wipe, status, env, tool, lock-jars."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable

from .config import ensure_password, format_storage, read_password, write_config
from .jars import cmd_lock_jars, fetch_jars
from .layout import HOST, USERNAME, BrokerError, Layout, Node, locked, log
from .process import (
    _reaped_within,
    alive,
    brokers_of,
    read_pid,
    running_pid,
    start,
    stop,
    terminate,
    wait_ready,
    write_pid,
)
from .protocol import ProtocolError, probe_local, probe_plaintext, probe_sasl_ssl
from .tls import ensure_certificates
from .tools import TOOLS, cmd_tool


def cmd_up(layout: Layout) -> int:
    """Start the nodes of `layout` that do not run, then wait until every node serves."""
    with locked(layout):
        recorded = Layout()
        if len(recorded.nodes) != len(layout.nodes) and any(map(_runs, recorded.nodes)):
            raise BrokerError(
                f"a {len(recorded.nodes)}-node Kafka runs from {layout.home}: stop it first "
                f"(`just kafka-down`), or ask for --nodes {len(recorded.nodes)}"
            )
        password = ensure_password(layout)
        waits: list[tuple[Node, Callable[[], bool], int]] = []
        missing = []
        for node in layout.nodes:
            pid = running_pid(node) or adopt(layout, node, password)
            if pid is None:
                missing.append(node)
            else:
                pid_and_start = read_pid(node)
                assert pid_and_start is not None
                waits.append((node, lambda known=pid_and_start: alive(*known), pid))
        began = time.monotonic()
        deadline = began + layout.start_timeout
        if not missing:
            for node, is_running, pid in waits:
                wait_ready(layout, node, password, deadline, is_running=is_running, pid=pid)
            pids = ", ".join(str(pid) for _node, _is_running, pid in waits)
            log(f"already running (pid {pids})")
            return 0
        fetch_jars(layout)
        ensure_certificates(layout)
        write_config(layout)
        format_storage(layout, password)
        processes: list[tuple[Node, subprocess.Popen[bytes]]] = []
        try:
            for node in missing:
                process = start(layout, node)
                processes.append((node, process))
                # The child just started is judged by its Popen handle, never by /proc: its
                # command line is empty until it has exec'd.
                waits.append((node, lambda child=process: child.poll() is None, process.pid))
                log(f"started {node.name}, pid {process.pid} (log: {node.server_log})")
            log("waiting for every node's listeners")
            deadline = time.monotonic() + layout.start_timeout
            for node, is_running, pid in sorted(waits, key=lambda wait: wait[0].id):
                wait_ready(layout, node, password, deadline, is_running=is_running, pid=pid)
        except BaseException:
            # Their whole groups go, and are reaped, before their pid files do: no orphan.
            for node, process in processes:
                terminate(process.pid, None, _reaped_within(process))
                node.pid_file.unlink(missing_ok=True)
            raise
        log(
            f"ready in {time.monotonic() - began:.1f}s: PLAINTEXT {layout.plaintext_bootstrap}, "
            f"SASL_SSL {layout.sasl_ssl_bootstrap} (CA {layout.ca_pem})"
        )
        return 0


def _runs(node: Node) -> bool:
    return running_pid(node) is not None or bool(brokers_of(node))


def adopt(layout: Layout, node: Node, password: str) -> int | None:
    """A broker of this node that runs without its pid file: keep it if it serves (and write
    its pid file), stop it if it does not. Its pid when one was adopted."""
    orphans = brokers_of(node)
    if not orphans:
        return None
    if len(orphans) == 1:
        try:
            probe_local(layout, node, password)
        except (OSError, ProtocolError):
            pass
        else:
            write_pid(node, orphans[0])
            log(f"adopted the running {node.broker[4:]} (pid {orphans[0]}), which had no pid file")
            return orphans[0]
    log(f"stopping {len(orphans)} JVM(s) of {node.broker} that run without a pid file")
    stop([node])
    return None


def cmd_down(layout: Layout, node_id: int | None) -> int:
    """Stop every node (or only `node_id`, with SIGTERM as Kubernetes would)."""
    with locked(layout):
        if not stop(layout.nodes if node_id is None else [layout.node(node_id)]):
            log("not running")
    return 0


def cmd_wipe(layout: Layout) -> int:
    with locked(layout):
        stop(layout.nodes)
        single = Layout(1).nodes[0]
        for path in (single.data, single.logs, single.config, *layout.home.glob("node-*")):
            shutil.rmtree(path, ignore_errors=True)
        layout.topology_file.unlink(missing_ok=True)
        log(f"wiped the data, logs and config under {layout.home} (kept jars, TLS, password)")
    return 0


def node_report(layout: Layout, node: Node) -> dict[str, object]:
    """Whether the node runs, and what each of its listeners answers."""
    pid = running_pid(node)
    report: dict[str, object] = {"node": node.id, "running": pid is not None, "pid": pid}
    if pid is None:
        return report
    try:
        cluster_id, brokers = probe_plaintext(HOST, node.plaintext_port)
        report["cluster_id"] = cluster_id
        report["brokers"] = sorted(broker[0] for broker in brokers)
        report["plaintext"] = "ready"
    except (OSError, ProtocolError) as error:
        report["plaintext"] = f"{type(error).__name__}: {error}"
    try:
        probe_sasl_ssl(
            HOST, node.sasl_ssl_port, str(layout.ca_pem), USERNAME, read_password(layout)
        )
        report["sasl_ssl"] = "ready"
    except (OSError, ProtocolError, BrokerError) as error:
        report["sasl_ssl"] = f"{type(error).__name__}: {error}"
    return report


def cmd_status(layout: Layout, as_json: bool) -> int:
    """Exit 0 when every node runs and both its listeners answer, 3 when none runs, else 1.
    Top-level pid, plaintext and sasl_ssl are the first running node's (all a single node
    has); `nodes` has each node's."""
    nodes = [node_report(layout, node) for node in layout.nodes]
    running = [report for report in nodes if report["running"]]
    first = running[0] if running else {}
    report: dict[str, object] = {
        "running": bool(running),
        "pid": first.get("pid"),
        "home": str(layout.home),
        **{key: first[key] for key in ("cluster_id", "plaintext", "sasl_ssl") if key in first},
        "nodes": nodes,
    }
    ready = len(running) == len(nodes) and all(
        node["plaintext"] == node["sasl_ssl"] == "ready" for node in nodes
    )
    if as_json:
        print(json.dumps(report))
    elif not running:
        print(f"not running ({layout.home})")
    else:
        what = f"{len(nodes)} nodes" if layout.cluster else "running"
        print(f"{what}, cluster {first.get('cluster_id')}")
        for node, node_state in zip(layout.nodes, nodes, strict=True):
            indent = "  " if layout.cluster else ""
            if layout.cluster:
                state = f"pid {node_state['pid']}" if node_state["running"] else "not running"
                print(f"  {node.name}: {state}")
            if node_state["running"]:
                print(
                    f"{indent}  PLAINTEXT {node.plaintext_bootstrap}: {node_state['plaintext']}\n"
                    f"{indent}  SASL_SSL  {node.sasl_ssl_bootstrap}: {node_state['sasl_ssl']}\n"
                    f"{indent}  logs      {node.server_log}"
                )
    if not running:
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="broker.py",
        description="Run the local Kafka (KRaft: one node, or a cluster) for development and "
        "tests.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="fetch, format and start the broker; wait until ready")
    up.add_argument(
        "--nodes",
        type=int,
        help="how many KRaft nodes (each broker and controller): 1 (the default), or 3 for a "
        "cluster with three replicas and min.insync.replicas=2; default: as last started",
    )
    down = commands.add_parser("down", help="stop the broker and wait for it to exit")
    down.add_argument("--node", type=int, help="stop only this node of a cluster (SIGTERM)")
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
        "down": lambda layout: cmd_down(layout, args.node),
        "wipe": cmd_wipe,
        "status": lambda layout: cmd_status(layout, args.json),
        "env": lambda layout: cmd_env(layout, args.json),
        "tool": lambda layout: cmd_tool(layout, args.name, args.args),
        "lock-jars": cmd_lock_jars,
    }
    try:
        layout = Layout(args.nodes if args.command == "up" else None)
        return commands_by_name[args.command](layout)
    except BrokerError as error:
        log(f"error: {error}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
