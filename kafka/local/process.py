"""The broker's JVM: started in its own process group, known by pid and start time, waited
for until both listeners answer, stopped with its whole group."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .config import jvm_options
from .jars import classpath, java_command
from .layout import HOST, MAIN_CLASS, STOP_TIMEOUT, BrokerError, Layout, Node, log
from .protocol import ProtocolError, probe_local

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


def read_pid(node: Node) -> tuple[int, int | None] | None:
    """(pid, start time) from the pid file (start time None in an old one-field file)."""
    try:
        fields = node.pid_file.read_text().split()
        return int(fields[0]), (int(fields[1]) if len(fields) > 1 else None)
    except (FileNotFoundError, ValueError, IndexError):
        return None


def write_pid(node: Node, pid: int) -> None:
    node.pid_file.write_text(f"{pid} {start_time(pid) or 0}\n")


def running_pid(node: Node) -> int | None:
    """The broker of the pid file, while that very process runs."""
    recorded = read_pid(node)
    if recorded is not None and alive(*recorded):
        return recorded[0]
    return None


def brokers_of(node: Node) -> list[int]:
    """JVMs running kafka.Kafka with this node's config, found by their command line (a
    broker whose pid file is gone: killed `down`, deleted folder, older broker.py)."""
    wanted = {MAIN_CLASS.encode(), str(node.server_properties).encode()}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = set((proc / "cmdline").read_bytes().split(b"\0"))
        except OSError:
            continue
        if wanted <= cmdline and start_time(int(proc.name)) is not None:
            found.append(int(proc.name))
    return found


def port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def start(layout: Layout, node: Node) -> subprocess.Popen[bytes]:
    taken = [port for port in node.ports if port_taken(port)]
    if taken:
        raise BrokerError(
            f"port(s) {', '.join(map(str, taken))} on {HOST} are in use by another process "
            "(another checkout's broker? stop it with its own `kafka/broker.py down`), "
            "or choose others with LOADER_KAFKA_PLAINTEXT_PORT / LOADER_KAFKA_SASL_SSL_PORT / "
            "LOADER_KAFKA_CONTROLLER_PORT"
        )
    command = [
        os.environ.get("LOADER_KAFKA_JAVA") or java_command(),
        *jvm_options(layout, node),
        "-cp",
        classpath(layout),
        MAIN_CLASS,
        str(node.server_properties),
    ]
    with node.stdout_log.open("ab") as out:
        out.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting\n".encode())
        out.flush()
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=node.home,
            start_new_session=True,  # outlives this script and its terminal or CI step
            close_fds=True,
        )
    write_pid(node, process.pid)
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


def wait_ready(layout: Layout, node: Node, password: str, deadline: float, *,
               is_running: Callable[[], bool], pid: int) -> None:  # fmt: skip
    """Probe the node's listeners until both answer and list every node of the layout as a
    broker; `is_running` says whether the JVM lives. `deadline`: time.monotonic()'s."""
    last_error = "not asked yet"
    while time.monotonic() < deadline:
        if not is_running():
            sys.stderr.write(f"--- {node.stdout_log}\n{tail(node.stdout_log)}")
            sys.stderr.write(f"--- {node.server_log}\n{tail(node.server_log)}")
            raise BrokerError(
                f"{node.broker} (pid {pid}) exited while starting; see the logs above"
            )
        try:
            probe_local(layout, node, password)
        except (OSError, ProtocolError) as error:
            last_error = f"{type(error).__name__}: {error}"
            time.sleep(0.2)
            continue
        return
    raise BrokerError(
        f"{node.broker} (pid {pid}) is not ready after {layout.start_timeout:.0f}s "
        f"({last_error}); see {node.server_log}"
    )


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def terminate(pid: int, started: int | None, wait: Callable[[float], bool], *,
              signalled: bool = False) -> None:  # fmt: skip
    """SIGTERM the group led by `pid` (unless `signalled` already), SIGKILL it if it outlives
    STOP_TIMEOUT; `wait(t)` says whether the process is gone within t seconds."""
    if not signalled:
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


def wait_ports_free(node: Node, timeout: float = STOP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while taken := [port for port in node.ports if port_taken(port)]:
        if time.monotonic() > deadline:
            raise BrokerError(f"port(s) {taken} of {node.name} still in use after it stopped")
        time.sleep(0.1)


def stop(nodes: list[Node]) -> bool:
    """Stop the brokers of the nodes' pid files and any orphan of their folders; True if one
    ran. All are signalled before any is waited for: a cluster's node stopping alone would wait
    for a controller quorum that the others, stopping one by one, no longer make. A node's pid
    file goes only once its processes are gone and its ports are free."""
    targets: list[tuple[Node, int, int | None]] = []
    for node in nodes:
        recorded = read_pid(node)
        if recorded is not None and alive(*recorded):
            targets.append((node, *recorded))
        targets += [(node, pid, start_time(pid)) for pid in brokers_of(node)
                    if recorded is None or pid != recorded[0]]  # fmt: skip
    for node, pid, _started in targets:
        log(f"stopping {node.broker} (pid {pid})")
        _signal_group(pid, signal.SIGTERM)
    for _node, pid, started in targets:
        terminate(pid, started, _gone_within(pid, started), signalled=True)
    for node in {node.id: node for node, _pid, _started in targets}.values():
        wait_ports_free(node)
    for node in nodes:
        node.pid_file.unlink(missing_ok=True)
    return bool(targets)
