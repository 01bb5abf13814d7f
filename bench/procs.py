"""The processes a benchmark starts: spawned, talked to line by line, measured, always ended.

``Procs`` is a context manager: every process spawned through it is terminated (SIGTERM, then
SIGKILL) when the block ends, however it ends. Each child's stderr (and stdout, unless it is
read as a pipe) goes to ``<logs>/<name>.log``. CPU time and memory come from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[1]
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class ChildFailed(RuntimeError):
    """A child exited, said something unexpected, or did not answer in time."""


@dataclass(frozen=True)
class Usage:
    """A process's CPU time and memory at one instant."""

    at: float  # time.monotonic()
    cpu: float  # seconds, user + system, all threads
    rss_kib: int  # VmRSS
    hwm_kib: int  # VmHWM: the peak RSS so far


def usage(pid: int) -> Usage:
    """Read ``/proc/<pid>/stat`` and ``/proc/<pid>/status``."""
    at = time.monotonic()
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15)
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            status[name] = int(value.split()[0])
    return Usage(at, cpu, status.get("VmRSS", 0), status.get("VmHWM", 0))


def system_cpu() -> float:
    """Seconds of CPU time the whole machine spent busy (all cores), from ``/proc/stat``."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in first]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / _TICKS


class Child:
    """One spawned process: its stdout lines (when piped), its stdin, its exit."""

    def __init__(self, name: str, popen: subprocess.Popen[str], log: Path, spawned_ns: int) -> None:
        self.name = name
        self.popen = popen
        self.log = log
        self.spawned_ns = spawned_ns  # time.time_ns() just before the fork
        self._lines: queue.Queue[str | None] = queue.Queue()
        if popen.stdout is not None:
            threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True).start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def readline(self, timeout: float) -> str:
        """The next stdout line; raise if the process ends or stays silent ``timeout`` s."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            silent = f"{self.name} said nothing for {timeout:.0f} s (see {self.log})"
            raise ChildFailed(silent) from None
        if line is None:
            code = self.popen.wait()
            raise ChildFailed(f"{self.name} exited with {code} (see {self.log})")
        return line

    def expect(self, prefix: str, timeout: float) -> str:
        """Read lines until one starts with ``prefix``; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def send(self, line: str) -> None:
        """Write one command line to the child's stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def wait_exit(self, timeout: float) -> tuple[int, int]:
        """Poll every millisecond until the process exits: ``(exit code, time.time_ns())``."""
        deadline = time.monotonic() + timeout
        while (code := self.popen.poll()) is None:
            if time.monotonic() > deadline:
                raise ChildFailed(f"{self.name} did not exit within {timeout} s (see {self.log})")
            time.sleep(0.001)
        return code, time.time_ns()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def end(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; close the pipes."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=grace)
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class Procs:
    """Spawns children and ends every one still running when the ``with`` block ends.

    With ``pycache``, children write and reuse bytecode there (``PYTHONPYCACHEPREFIX``, even
    where ``PYTHONDONTWRITEBYTECODE`` is set), as the container image ships it compiled: a
    start-up time should not include compiling every module from source.
    """

    def __init__(self, logs: Path, pycache: Path | None = None) -> None:
        self.logs = logs
        self.pycache = pycache
        self.children: list[Child] = []

    def __enter__(self) -> Procs:
        self.logs.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for child in reversed(self.children):
            child.end()
        self.children.clear()

    def python(
        self,
        name: str,
        module: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        talk: bool = False,
    ) -> Child:
        """``python -m module args`` with this interpreter, from the repository root.

        ``talk``: stdout and stdin are pipes (``readline``/``expect``/``send``); otherwise
        stdout goes to the log file with stderr.
        """
        return self.spawn(name, [sys.executable, "-m", module, *args], env=env, talk=talk)

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        talk: bool = False,
    ) -> Child:
        log = self.logs / f"{name}.log"
        environ = {**os.environ, **(env or {})}
        if self.pycache is not None:
            environ.pop("PYTHONDONTWRITEBYTECODE", None)
            environ["PYTHONPYCACHEPREFIX"] = str(self.pycache)
        with log.open("a") as sink:
            spawned_ns = time.time_ns()
            popen = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=environ,
                stdin=subprocess.PIPE if talk else subprocess.DEVNULL,
                stdout=subprocess.PIPE if talk else sink,
                stderr=sink,
                text=True,
                bufsize=1,
                start_new_session=True,  # a Ctrl-C reaches the orchestrator, which ends them
            )
        child = Child(name, popen, log, spawned_ns)
        self.children.append(child)
        return child

    def forget(self, child: Child) -> None:
        """Drop an exited child from the list (it needs no ending)."""
        child.end()
        self.children.remove(child)
