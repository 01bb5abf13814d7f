"""kafka/broker.py's process lifecycle: a broker is never judged by a command line that is not
there yet, a failed start leaves no process behind, and `down` finds what `up` started.

The JVM is started through a wrapper that hides its arguments and waits before it execs:
for that while, /proc/<pid>/cmdline names no broker (as right after any fork), which is the
window where an earlier broker.py declared its own child dead and orphaned it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka_broker import load_broker_module, private_home, processes_of, run_broker_script

broker_py = load_broker_module()

WRAPPER = """\
import os, sys, time
if sys.argv[1:2] != ["--exec"]:
    # Re-exec without the JVM's arguments, so nothing in /proc names a broker yet.
    os.environ["WRAPPED_ARGS"] = "\\x1f".join(sys.argv[1:])
    os.execv(sys.executable, [sys.executable, __file__, "--exec"])
time.sleep(float(os.environ["WRAPPER_DELAY"]))
if os.environ.get("WRAPPER_FAIL"):
    sys.exit(3)
args = os.environ.pop("WRAPPED_ARGS").split("\\x1f")
os.execv(os.environ["WRAPPER_JAVA"], [os.environ["WRAPPER_JAVA"], *args])
"""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def env(home: Path) -> Iterator[dict[str, str]]:
    """kafka/broker.py on `home` and free ports, its java behind the slow wrapper."""
    values = private_home(home)
    wrapper = home / "slow-java"
    wrapper.write_text(f"#!{sys.executable}\n{WRAPPER}")
    wrapper.chmod(0o755)
    values |= {
        "LOADER_KAFKA_JAVA": str(wrapper),
        "WRAPPER_JAVA": broker_py.java_command(),
        "WRAPPER_DELAY": "2",
    }
    yield values
    run_broker_script("down", env=values, check=False)


def assert_nothing_left(home: Path, env: dict[str, str]) -> None:
    layout_ports = [int(env[name]) for name in env if name.endswith("_PORT")]
    assert processes_of(home) == []
    assert [port for port in layout_ports if broker_py.port_taken(port)] == []
    assert not (home / "broker.pid").exists()


def test_up_waits_through_the_window_and_down_stops_everything(
    home: Path, env: dict[str, str]
) -> None:
    up = run_broker_script("up", env=env, check=False)
    assert up.returncode == 0, up.stderr
    pid = int((home / "broker.pid").read_text().split()[0])
    # The pid file names the JVM itself (the wrapper exec'd into it), with its start time.
    assert b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert (home / "broker.pid").read_text().split()[1] == str(broker_py.start_time(pid))
    status = run_broker_script("status", env=env, check=False)
    assert status.returncode == 0, status.stdout + status.stderr

    down = run_broker_script("down", env=env, check=False)
    assert down.returncode == 0, down.stderr
    assert_nothing_left(home, env)


def test_a_start_that_times_out_leaves_no_orphan(home: Path, env: dict[str, str]) -> None:
    # Ready would take the wrapper's 3 s plus the JVM's start; the limit is 1 s.
    env |= {"WRAPPER_DELAY": "3", "LOADER_KAFKA_START_TIMEOUT": "1"}
    up = run_broker_script("up", env=env, check=False)
    assert up.returncode == 1
    assert "is not ready after 1s" in up.stderr
    assert_nothing_left(home, env)


def test_a_child_that_exits_while_starting_is_reported(home: Path, env: dict[str, str]) -> None:
    env |= {"WRAPPER_DELAY": "0.5", "WRAPPER_FAIL": "1"}
    up = run_broker_script("up", env=env, check=False)
    assert up.returncode == 1
    assert "exited while starting" in up.stderr
    assert_nothing_left(home, env)


def test_a_broker_without_its_pid_file_is_adopted_and_stopped(
    home: Path, env: dict[str, str]
) -> None:
    env["WRAPPER_DELAY"] = "0"
    run_broker_script("up", env=env)
    pid = int((home / "broker.pid").read_text().split()[0])
    (home / "broker.pid").unlink()

    up = run_broker_script("up", env=env, check=False)
    assert up.returncode == 0, up.stderr
    assert "adopted the running broker" in up.stderr
    assert int((home / "broker.pid").read_text().split()[0]) == pid

    (home / "broker.pid").unlink()
    down = run_broker_script("down", env=env, check=False)
    assert down.returncode == 0, down.stderr
    assert f"stopping the broker (pid {pid})" in down.stderr
    assert_nothing_left(home, env)


def test_the_old_judgement_by_command_line_fails_in_the_window(home: Path) -> None:
    """What the lifecycle must not do: right after Popen, the child's command line does not
    name the program it is about to become."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], env={"WRAPPER_DELAY": "0"}
    )
    try:
        # A wrapper between fork and exec: the pid lives, its start time is known, and its
        # command line is no evidence either way.
        assert broker_py.start_time(child.pid) is not None
        assert broker_py.alive(child.pid, broker_py.start_time(child.pid))
        assert not broker_py.alive(child.pid, (broker_py.start_time(child.pid) or 0) + 1)
    finally:
        child.kill()
        child.wait()
    assert not broker_py.alive(child.pid, None)
