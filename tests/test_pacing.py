"""Read pacing: the decision on plain values, then its effect on a real WebSocket."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import TypeVar

import msgspec
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from trio_websocket import WebSocketConnection, open_websocket_url
from wss import Wss, emulator_thread

from loader.pacing import Pacer, pace
from loader.schema import Candle, Record
from loader.settings import load_settings
from loader.source import Source
from loader.stats import Stats
from loader.testing import EmulatorConfig, FirehoseConfig, open_emulator

TICK = 0.010
# The flood test's reads: a warm-up, then windows timed one by one.
WARMUP, WINDOW, WINDOWS = 500, 1000, 8
T = TypeVar("T")


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


async def read_candles(ws: WebSocketConnection, count: int) -> dict[str, list[int]]:
    """Open times of the next `count` frames, per stream."""
    opens: dict[str, list[int]] = {}
    for _ in range(count):
        message = await ws.get_message()
        assert isinstance(message, str)
        stream = message.split('"stream":"', 1)[1].split('"', 1)[0]
        opens.setdefault(stream, []).append(int(message.split('"t":', 1)[1].split(",")[0]))
    return opens


def in_order_once(opens: Iterable[list[int]]) -> bool:
    return all(times == sorted(set(times)) for times in opens)


@pytest.mark.anyio
async def test_a_busy_feed_is_read_a_tick_at_a_time_and_nothing_is_lost(wss: Wss) -> None:
    """2,000 frames a second on one real wss connection, a TLS record each as Binance sends
    them: reads of the socket take several frames each, and every frame arrives, in order.
    Fails too if trio-websocket or SSLStream stops reading through the stream `pace` wraps
    (no paced reads)."""
    symbols = tuple(f"SYM{i}USDT" for i in range(20))
    config = EmulatorConfig(symbols=symbols, firehose=FirehoseConfig(rate=2000, close_ratio=1.0))
    async with open_emulator(wss.serve(config)) as emulator:
        url = emulator.stream_url([f"{s.lower()}@kline_1m" for s in symbols])
        # The worker's read size (a smaller one fills up within a tick, and is read again).
        async with open_websocket_url(
            url, ssl_context=wss.client(), receive_buffer_size=64 * 1024
        ) as ws:
            assert pace(ws, 0.0) is None  # off: the stream is left as it is
            paced = pace(ws, 0.020)
            assert paced is not None
            opens = await read_candles(ws, 1000)
    assert paced.reads > 0  # the TLS layer still reads through the stream `pace` wraps
    assert paced.reads <= 1000 / 4  # several frames per read
    assert paced.paced >= paced.reads / 2  # most reads waited for their tick
    assert in_order_once(opens.values())


async def best_rate(take: Callable[[], Awaitable[list[T]]]) -> tuple[float, list[T]]:
    """What `take` gives (a batch a call) over a warm-up and a few timed windows, and its best
    window's rate (items a second): a window another process slowed says nothing of what the
    reader can do."""
    taken: list[T] = []
    while len(taken) < WARMUP:
        taken += await take()
    best = 0.0
    for _ in range(WINDOWS):
        began, start = trio.current_time(), len(taken)
        while len(taken) < start + WINDOW:
            taken += await take()
        best = max(best, (len(taken) - start) / (trio.current_time() - began))
    return best, taken


async def one_message(ws: WebSocketConnection) -> list[str | bytes]:
    return [await ws.get_message()]


async def every_record(channel: trio.MemoryReceiveChannel[Record]) -> list[Record]:
    """The next record and every one queued behind it, as the sink takes them."""
    records = [await channel.receive()]
    with contextlib.suppress(trio.WouldBlock):
        while len(records) < WINDOW:
            records.append(channel.receive_nowait())
    return records


@pytest.mark.anyio
async def test_a_flooded_wss_connection_is_drained_at_least_half_as_fast_as_a_bare_reader(
    wss: Wss,
) -> None:
    """A backlog of closed candles on one wss connection: the service's reader at its default
    settings (pacing on) takes them at no less than half the rate of a bare trio-websocket
    reader of the same feed, timed in the same test. A pacer that let a busy connection read
    one TLS record per tick took about one candle per 10 ms: a hundredth of the bare rate."""
    symbols = tuple(f"SYM{i}USDT" for i in range(4))
    streams = [f"{s.lower()}@kline_1m" for s in symbols]
    config = EmulatorConfig(symbols=symbols, firehose=FirehoseConfig(rate=None, close_ratio=1.0))
    # The emulator on a loop of its own, as Binance is: a paced read's sleep leaves it sending.
    with emulator_thread(wss.serve(config)) as emulator:
        async with open_websocket_url(
            emulator.stream_url(streams), ssl_context=wss.client(), receive_buffer_size=64 * 1024
        ) as ws:
            bare_rate, frames = await best_rate(partial(one_message, ws))
        settings = load_settings(
            {
                "QUEUE_ID": "q",
                "SYMBOL": ",".join(symbols),
                "INTERVAL": "1m",
                "KAFKA_TOPIC": "t",
                "TELEMETRY_PRODUCER_ID": "p",
                "BINANCE_WS_URL": emulator.raw_url(),
                "BINANCE_API_URL": emulator.ws_api_url,
            }
        )
        assert settings.coalesce > 0  # the default paces
        send, receive = trio.open_memory_channel[Record](settings.channel_size)
        async with trio.open_nursery() as nursery:
            await nursery.start(Source(settings, send, Stats()).run)
            async with receive:
                service_rate, records = await best_rate(partial(every_record, receive))
            nursery.cancel_scope.cancel()
    bare: dict[str, list[int]] = {}
    for frame in frames:
        assert isinstance(frame, str)
        stream = frame.split('"stream":"', 1)[1].split('"', 1)[0]
        bare.setdefault(stream, []).append(int(frame.split('"t":', 1)[1].split(",")[0]))
    published: dict[bytes, list[int]] = {}
    for key, value in records:
        published.setdefault(key, []).append(msgspec.json.decode(value, type=Candle).open_time)
    assert in_order_once(bare.values())
    assert in_order_once(published.values())
    assert len(published) == len(symbols)
    assert service_rate >= bare_rate / 2, f"{service_rate:.0f} against {bare_rate:.0f}/s"
