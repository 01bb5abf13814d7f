"""Prometheus metrics and /healthz of a running worker."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import trio
from kafka_broker import KafkaBroker
from prometheus_client.parser import text_string_to_metric_families
from worker_tools import running_worker, worker_settings

from loader.testing import EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=600, seed=3)


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    return await trio.to_thread.run_sync(_get, port, path)


def samples(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def test_metrics_count_what_the_worker_does(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "metrics")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(kafka, emulator, topic, METRICS_PORT="0")
        async with running_worker(settings) as worker:
            assert worker.metrics_port
            await worker.wait_written(3)
            status, first_text = await get(worker.metrics_port, "/metrics")
            assert status == 200
            first = samples(first_text)
            emulator.send_invalid_json()
            await worker.wait_written(worker.records_written + 5)
            second = samples((await get(worker.metrics_port, "/metrics"))[1])
            worker.stop()
            await worker.finished()
    assert (
        second["loader_candles_acknowledged_total"]
        > first["loader_candles_acknowledged_total"]
        >= 3
    )
    assert second["loader_candles_received_total"] >= second["loader_candles_acknowledged_total"]
    assert second["loader_frames_received_total"] > first["loader_frames_received_total"]
    assert second["loader_malformed_frames_total{kind=invalid_json}"] == 1
    assert second["loader_kafka_delivery_seconds_count"] >= 1
    assert second["loader_last_frame_age_seconds"] < 5
    assert "loader_channel_depth" in second
    assert second["loader_candles_lost_total"] == 0
    assert second["loader_holes_total"] == 0


async def test_healthz_fails_when_the_pipeline_stalls(kafka: KafkaBroker) -> None:
    topic = await trio.to_thread.run_sync(kafka.new_topic, "healthz")
    async with open_emulator(FAST) as emulator:
        settings = worker_settings(
            kafka, emulator, topic, METRICS_PORT="0", HEALTH_TIMEOUT="0.5", STALL_TIMEOUT="60"
        )
        async with running_worker(settings) as worker:
            assert worker.metrics_port
            await worker.wait_written(2)
            assert (await get(worker.metrics_port, "/healthz"))[0] == 200
            emulator.stall()
            for _ in range(100):  # polling the endpoint under test, 10 s at most
                health = await get(worker.metrics_port, "/healthz")
                if health[0] != 200:
                    break
                await trio.sleep(0.1)
            worker.stop()
            await worker.finished()
    assert health[0] == 503
    assert "no frame from Binance" in health[1]
