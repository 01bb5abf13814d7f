"""Read pacing: the decision on plain values, then its effect on a real WebSocket."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import open_websocket_url

from loader.pacing import Pacer, pace
from loader.testing import EmulatorConfig, FirehoseConfig, open_emulator

TICK = 0.010


def test_a_quiet_connection_reads_at_once() -> None:
    pacer = Pacer(TICK)
    pacer.read(started=0.0, ended=0.050, full=False)  # waited 50 ms for its frame
    pacer.read(started=0.051, ended=0.100, full=False)
    assert pacer.read_at(0.1003) == 0.1003


def test_frames_closer_than_a_tick_are_read_on_the_next_tick() -> None:
    pacer = Pacer(TICK)
    pacer.read(started=0.0, ended=1.0, full=False)
    pacer.read(started=1.0001, ended=1.003, full=False)  # 3 ms after the last one
    assert pacer.busy
    assert math.isclose(pacer.read_at(1.0031), 1.01)


def test_data_found_waiting_keeps_a_connection_busy() -> None:
    pacer = Pacer(TICK)
    pacer.read(started=1.0, ended=1.0002, full=False)  # a read right after a tick
    assert pacer.busy
    pacer.read(started=1.02, ended=1.0401, full=False)  # then 20 ms of waiting: quiet
    assert not pacer.busy
    assert pacer.read_at(1.0402) == 1.0402


def test_a_full_buffer_is_read_again_at_once() -> None:
    pacer = Pacer(TICK)
    pacer.read(started=1.0, ended=1.0001, full=True)
    assert pacer.read_at(1.0002) == 1.0002


def test_pacing_off() -> None:
    pacer = Pacer(0.0)
    pacer.read(started=1.0, ended=1.0, full=False)
    assert pacer.read_at(1.0) == 1.0


@given(
    now=st.floats(min_value=0, max_value=1e6, allow_nan=False),
    phase=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_busy_connections_share_one_grid(now: float, phase: float) -> None:
    """Two busy connections read on the same ticks whatever their phase: one wake-up."""
    a, b = Pacer(TICK), Pacer(TICK)
    for pacer, at in ((a, now), (b, now + (phase % TICK))):
        pacer.read(started=at, ended=at, full=False)
    for pacer in (a, b):
        at = pacer.read_at(now)
        assert now <= at < now + TICK + 1e-9
        assert math.isclose(at / TICK, round(at / TICK), abs_tol=1e-6)
    assert a.read_at(now) == b.read_at(now)


@pytest.mark.anyio
async def test_a_busy_feed_is_read_a_tick_at_a_time_and_nothing_is_lost() -> None:
    """2,000 frames a second on one real connection: reads take several frames each, and
    every frame arrives, in order. Fails too if trio-websocket stops reading through the
    stream `pace` wraps (no paced reads)."""
    symbols = tuple(f"SYM{i}USDT" for i in range(20))
    config = EmulatorConfig(symbols=symbols, firehose=FirehoseConfig(rate=2000, close_ratio=1.0))
    streams = [f"{s.lower()}@kline_1m" for s in symbols]
    async with open_emulator(config) as emulator:
        url = emulator.stream_url(streams)
        # The worker's read size (a smaller one fills up within a tick, and is read again).
        async with open_websocket_url(url, receive_buffer_size=64 * 1024) as ws:
            assert pace(ws, 0.0) is None  # off: the stream is left as it is
            paced = pace(ws, 0.020)
            assert paced is not None
            opens: dict[str, list[int]] = {}
            for _ in range(1000):
                message = await ws.get_message()
                assert isinstance(message, str)
                stream = message.split('"stream":"', 1)[1].split('"', 1)[0]
                opens.setdefault(stream, []).append(int(message.split('"t":', 1)[1].split(",")[0]))
    assert paced.reads > 0  # trio-websocket still reads through the stream `pace` wraps
    assert paced.reads <= 1000 / 4  # several frames per read
    assert paced.paced >= paced.reads / 2  # most reads waited for their tick
    for times in opens.values():
        assert times == sorted(set(times))  # in order, none twice
