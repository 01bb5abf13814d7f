"""The commands of kafka/broker.py: up, down, wipe, status, env, tool, lock-jars."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable

from .config import ensure_password, format_storage, read_password, write_config
from .jars import cmd_lock_jars, fetch_jars
from .layout import HOST, USERNAME, BrokerError, Layout, locked, log
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
