"""The worker as a process: signals, exit codes, JSON logs, and no secret in any output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import trio
from kafka_broker import KafkaBroker
from worker_tools import (
    env_without_kafka_vars,
    for_a_process,
    read_topic,
    row,
    telemetry,
    terminal,
    worker_env,
)

from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=11)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
async def test_signal_stops_gracefully(kafka: KafkaBroker, signum: int, code: int) -> None:
    name = signal.Signals(signum).name
    topic = await trio.to_thread.run_sync(kafka.new_topic, f"signal-{name}")
    async with open_emulator(for_a_process(FAST)) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, listener="sasl_ssl", LOG_FORMAT="json"
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = bytearray()
        async with trio.open_nursery() as nursery:

            async def collect() -> None:
                assert process.stdout is not None
                async for chunk in process.stdout:
                    output.extend(chunk)

            nursery.start_soon(collect)
            with trio.fail_after(30):
                await read_topic(kafka, topic, expected=3)  # streaming for real
                process.send_signal(signum)
                assert await process.wait() == code
    events = telemetry(await read_topic(kafka, f"{topic}-events"))
    assert terminal(events, code) == row(name)
    assert f"stopped by {name}" in events[-1]["message"]
    # Not final: the Job starts a new pod, which resumes from the topic.
    assert events[-1]["finished"] is False
    assert f"exit {code}: the Job will retry" in events[-1]["message"]
    written = await read_topic(kafka, topic)
    assert events[-1]["records_written"] == len(written)
    text = output.decode()
    assert kafka.password not in text
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert lines, "the worker logged nothing"
    for line in lines:
        assert {"time", "level", "event", "queue_id"} <= set(line)
        assert line["queue_id"] == f"q-{topic}"


async def test_wrong_password_process_exits_1_naming_the_cause(kafka: KafkaBroker) -> None:
    async with open_emulator(FAST) as emulator:
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka,
            emulator,
            "never-written",
            listener="sasl_ssl",
            KAFKA_PASSWORD_PRODUCER="definitely-wrong-pw",
            KAFKA_DELIVERY_TIMEOUT="4",
            LOG_FORMAT="text",
        )
        done = await trio.run_process(
            [sys.executable, "-m", "loader"], env=env, capture_stdout=True, capture_stderr=True,
            check=False,
        )  # fmt: skip
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 1
    assert "cannot open a Kafka producer to" in out
    assert "definitely-wrong-pw" not in out
    assert kafka.password not in out
