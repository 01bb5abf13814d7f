"""Where the worker's time goes: py-spy samples of a running process, summarised.

``py-spy record --format raw --threads`` writes one line per distinct stack,
``thread (<tid>): <name>;<outermost frame>;...;<innermost frame> <samples>``, each frame as
``function (file:line)``. The summary counts samples per thread, per function anywhere on the
stack (inclusive, once per stack) and per innermost function (self).
"""

from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.results import Profile

RATE = 250  # samples per second
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*):\d+\)$")
_SITE = re.compile(r".*/(?:site-packages|lib/python3\.\d+)/")


def py_spy() -> str:
    """py-spy next to this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: uv sync (it is a dev dependency)")
    return found


def record(pid: int, seconds: float, out: Path) -> Profile:
    """Sample ``pid`` for ``seconds``, only the thread holding the GIL (``--gil``): the
    worker's Python runs on one core at a time, so that is the time to cut. py-spy pauses
    the process for each sample (``--nonblocking`` tears coroutine stacks apart)."""
    raw = out.with_suffix(".txt")
    subprocess.run(
        [py_spy(), "record", "--pid", str(pid), "--duration", str(round(seconds)),
         "--rate", str(RATE), "--format", "raw", "--threads", "--gil",
         "--output", str(raw)],
        check=True, capture_output=True, timeout=seconds + 60,
    )  # fmt: skip
    return summarise(raw.read_text(), seconds, str(raw))


def _frame(text: str) -> str:
    """``function (file:line)`` -> ``module.py:function`` with site-packages cut off."""
    match = _FRAME.match(text)
    if match is None:
        return text
    path = _SITE.sub("", match["file"]).removeprefix(str(Path.cwd()) + "/")
    return f"{path}:{match['func']}"


def _thread(label: str) -> str:
    name = label.split(": ", 1)[-1]
    if name == "MainThread":
        return "MainThread (Trio: the tasks)"
    # Trio names a cached thread after the first function it ran ("_send from ..."), and
    # keeps that name for whatever it runs later: they are one pool.
    if " from " in name or name.startswith("Trio"):
        return "Trio's worker threads (trio.to_thread)"
    return name


# Wrappers every sample of a thread passes through: they say nothing about the work.
_WRAPPERS = (
    "threading.py:", "<frozen runpy>:", "loader/__main__.py:", "loader/cli.py:", "outcome/",
    "trio/_core/_thread_cache.py:", "trio/_threads.py:to_thread_run_sync.<locals>.worker_fn",
    "trio/_core/_run.py:run", "trio/_core/_run.py:unrolled_run",
)  # fmt: skip

# The worker's pipeline, stage by stage: (what, a function every sample of it has on its stack).
STAGES = (
    ("trio-websocket's reader task: wsproto parsing, UTF-8, message queue",
     "trio_websocket/_impl.py:WebSocketConnection._reader_task"),
    ("Source._read: get_message, decode (a look at an update), guard, record, channel",
     "loader/source.py:Source._read"),
    ("KafkaSink (Trio side): gathering, hand-off, counting acknowledgements",
     "loader/sink.py:KafkaSink.run"),
    ("", "loader/sink.py:KafkaSink._count_late_acks"),
    ("KafkaSink._hand in the sender thread: producer.send per record",
     "loader/sink.py:KafkaSink._hand"),
    ("kafka-python's network thread (Sender: batches, requests, acks)",
     "kafka/producer/sender.py:Sender.run"),
    ("the control watcher's consumer.poll (a Trio worker thread)",
     "loader/control.py:watch_control.<locals>.<lambda>"),
)  # fmt: skip


def _stages(stacks: list[tuple[str, list[str], int]]) -> list[tuple[str, int]]:
    counts: collections.Counter[str] = collections.Counter()
    for thread, names, count in stacks:
        stage = "other"
        for label, marker in STAGES:
            if marker in names:
                stage = label or STAGES[STAGES.index((label, marker)) - 1][0]
                break
        else:
            if thread.startswith("MainThread") and names and names[-1].startswith("trio/"):
                stage = "Trio's scheduler and I/O polling, between tasks"
        counts[stage] += count
    return counts.most_common()


def summarise(raw: str, seconds: float, path: str, top: int = 25) -> Profile:
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    self_time: collections.Counter[str] = collections.Counter()
    stacks: list[tuple[str, list[str], int]] = []
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        label, *frames = stack.split(";")
        total += count
        threads[_thread(label)] += count
        names = [_frame(f) for f in frames]
        stacks.append((_thread(label), names, count))
        for name in set(names):
            if not name.startswith(_WRAPPERS):
                inclusive[name] += count
        if names:
            self_time[names[-1]] += count
    return Profile(
        seconds=seconds,
        rate=RATE,
        samples=total,
        by_thread=threads.most_common(),
        stages=_stages(stacks),
        inclusive=inclusive.most_common(top),
        top_self=self_time.most_common(top),
        raw=path,
    )
