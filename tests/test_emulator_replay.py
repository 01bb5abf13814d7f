"""Replay of recorded Binance sessions to connections that ask for some of their streams.

The worker builds its own URL (``/ws/<stream>`` for one stream, ``/stream?streams=a/b`` for
several), never the recorded one; the emulator serves a recording to any such connection
whose streams were all recorded, as Binance would have: on a combined path the recorded
frames themselves, on a raw path the ``data`` of each, character for character as it
appears inside the recorded text. Expectations here are sliced out of the recorded text by
hand, independently of the emulator's own splitting.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from loader.testing import (
    FIXTURES_ENV,
    Emulator,
    EmulatorConfig,
    Recording,
    fixtures_dir,
    load_recordings,
    open_emulator,
)

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=1200.0, seed=1)
RECORDINGS = load_recordings()


def recording(name: str) -> Recording:
    found = [r for r in RECORDINGS if name in r.name]
    if not found:
        raise RuntimeError(
            f"no recorded Binance session named {name!r} in {fixtures_dir()}: clone the "
            f"repository beside shared/, or point {FIXTURES_ENV} at shared/fixtures/binance"
        )
    return found[0]


US = recording("binance-us")
COM = recording("binance-com")


def stream_of(text: str) -> str:
    name: str = json.loads(text)["stream"]
    return name


def recorded(rec: Recording, streams: set[str]) -> list[str]:
    """The recorded frame texts of ``streams``, in recorded order."""
    return [text for _, text in rec.frames if stream_of(text) in streams]


def payload(text: str) -> str:
    """The ``data`` of a recorded combined frame, as it appears in the text.

    Binance writes the wrapper as ``{"stream":"<name>","data":<payload>}`` with nothing
    else in it, which the recordings confirm."""
    prefix = '{"stream":"' + stream_of(text) + '","data":'
    assert text.startswith(prefix)
    assert text.endswith("}")
    data = text[len(prefix) : -1]
    assert json.loads(data) == json.loads(text)["data"]
    return data


def recorded_streams(rec: Recording) -> list[str]:
    """Every stream with at least one recorded frame, in order of first appearance."""
    return list(dict.fromkeys(stream_of(text) for _, text in rec.frames))


async def receive(ws: WebSocketConnection, count: int) -> list[bytes]:
    return [str(await ws.get_message()).encode() for _ in range(count)]


async def assert_open_and_silent(ws: WebSocketConnection, subscriptions: list[str]) -> None:
    """Nothing more arrives before the reply to a live method: the recording is over and
    the connection stays open (with replay_speed=None every frame was queued at once)."""
    await ws.send_message(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 1}))
    reply: dict[str, Any] = json.loads(await ws.get_message())
    assert reply == {"result": subscriptions, "id": 1}


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    config = FAST.replace(recordings=RECORDINGS, replay_speed=None)
    async with open_emulator(config) as running:
        yield running


@pytest.mark.parametrize(
    ("rec", "stream"),
    [(r, s) for r in RECORDINGS for s in recorded_streams(r)],
    ids=lambda v: v.name.removesuffix(".ws") if isinstance(v, Recording) else v,
)
async def test_raw_path_gets_the_recorded_payloads_of_its_stream(
    emulator: Emulator, rec: Recording, stream: str
) -> None:
    expected = [payload(t).encode() for t in recorded(rec, {stream})]
    assert expected
    async with open_websocket_url(emulator.raw_url(stream)) as ws:
        assert await receive(ws, len(expected)) == expected
        (info,) = emulator.connections
        assert (info.kind, info.path, info.subscriptions, info.combined) == (
            "replay",
            f"/ws/{stream}",
            (stream,),
            False,
        )
        await assert_open_and_silent(ws, [stream])


async def test_raw_path_of_a_closed_kline_is_the_recorded_text_inside_the_wrapper(
    emulator: Emulator,
) -> None:
    """The one closed candle of the binance.us session, as a raw connection gets it."""
    closing = next(t for _, t in US.frames if '"x":true' in t)
    async with open_websocket_url(emulator.raw_url("omgbusd@kline_1m")) as ws:
        frames = await receive(ws, 5)
    assert payload(closing).encode() in frames
    assert frames[3] == payload(closing).encode()
    assert json.loads(frames[3])["k"]["x"] is True


@pytest.mark.parametrize(
    ("rec", "streams"),
    [
        (US, ["omgbusd@kline_1m", "compusdt@kline_1m", "crvusdt@kline_1m", "zrxusdt@kline_1m"]),
        (COM, ["nknusdt@kline_1m", "lrcbtc@kline_1m"]),
        (COM, ["lrcbtc@depth@100ms", "nknusdt@kline_1m", "blzeth@bookTicker"]),
        (US, ["omgbusd@bookTicker", "omgbusd@aggTrade", "omgbusd@kline_1m"]),
    ],
    ids=["us-klines", "com-klines", "com-mixed", "us-omgbusd"],
)
async def test_combined_path_gets_the_recorded_frames_of_its_streams(
    emulator: Emulator, rec: Recording, streams: list[str]
) -> None:
    expected = [t.encode() for t in recorded(rec, set(streams))]
    assert expected
    async with open_websocket_url(emulator.stream_url(streams)) as ws:
        assert await receive(ws, len(expected)) == expected
        (info,) = emulator.connections
        assert (info.kind, info.subscriptions, info.combined) == ("replay", tuple(streams), True)
        await assert_open_and_silent(ws, streams)


async def test_raw_path_with_several_streams_gets_bare_payloads(emulator: Emulator) -> None:
    streams = ["omgbusd@kline_1m", "zrxusdt@bookTicker"]
    expected = [payload(t).encode() for t in recorded(US, set(streams))]
    async with open_websocket_url(emulator.raw_url("/".join(streams))) as ws:
        assert await receive(ws, len(expected)) == expected
        await assert_open_and_silent(ws, streams)


async def test_the_recorded_path_still_gets_the_whole_session(emulator: Emulator) -> None:
    async with open_websocket_url(emulator.replay_url(COM)) as ws:
        assert await receive(ws, len(COM.frames)) == [t.encode() for _, t in COM.frames]
        assert [c.kind for c in emulator.connections] == ["replay"]


async def test_a_stream_not_recorded_makes_it_a_market_connection(emulator: Emulator) -> None:
    streams = ["omgbusd@kline_1m", "btcusdt@kline_1m"]  # BTCUSDT: the market's, not recorded
    async with open_websocket_url(emulator.stream_url(streams)) as ws:
        message = json.loads(await ws.get_message())
        assert message["stream"] == "btcusdt@kline_1m"
        assert [c.kind for c in emulator.connections] == ["stream"]
    # Streams of two different recordings are not served from either.
    async with open_websocket_url(emulator.raw_url("omgbusd@kline_1m/nknusdt@kline_1m")) as ws:
        await assert_open_and_silent(ws, ["omgbusd@kline_1m", "nknusdt@kline_1m"])
        assert [c.kind for c in emulator.connections] == ["stream"]
    # Binance's names are lowercase: an uppercase one is another (silent) stream.
    async with open_websocket_url(emulator.raw_url("OMGBUSD@kline_1m")) as ws:
        await assert_open_and_silent(ws, ["OMGBUSD@kline_1m"])
        assert [c.kind for c in emulator.connections] == ["stream"]
    # Bare /ws asks for nothing, so no recording.
    async with open_websocket_url(emulator.raw_url()) as ws:
        await assert_open_and_silent(ws, [])
        assert [c.kind for c in emulator.connections] == ["stream"]


@pytest.mark.parametrize("short_first", [True, False])
async def test_of_several_recordings_with_the_streams_the_first_loaded(
    short_first: bool,
) -> None:
    kline = [(at, t) for at, t in US.frames if stream_of(t) == "omgbusd@kline_1m"]
    short = Recording(US.url, US.connected_at, tuple(kline[:2]), "short.ws")
    recordings = (short, US) if short_first else (US, short)
    config = FAST.replace(recordings=recordings, replay_speed=None)
    served = kline[:2] if short_first else kline
    async with (
        open_emulator(config) as emulator,
        open_websocket_url(emulator.raw_url("omgbusd@kline_1m")) as ws,
    ):
        assert await receive(ws, len(served)) == [payload(t).encode() for _, t in served]
        await assert_open_and_silent(ws, ["omgbusd@kline_1m"])


async def test_a_raw_recording_is_wrapped_for_a_combined_path() -> None:
    """A session recorded on a raw path, asked for on a combined one (and on its own)."""
    stream = "omgbusd@kline_1m"
    frames = tuple((at, payload(t)) for at, t in US.frames if stream_of(t) == stream)
    raw = Recording(f"wss://stream.binance.us:9443/ws/{stream}", US.connected_at, frames, "raw")
    config = FAST.replace(recordings=(raw,), replay_speed=None)
    async with open_emulator(config) as emulator:
        async with open_websocket_url(emulator.stream_url([stream])) as ws:
            got = await receive(ws, len(frames))
        assert got == [t.encode() for t in recorded(US, {stream})]
        async with open_websocket_url(emulator.raw_url(stream)) as ws:
            assert await receive(ws, len(frames)) == [t.encode() for _, t in frames]


async def test_live_methods_steer_a_replay_connection() -> None:
    """Unsubscribed streams stop, SET_PROPERTY combined switches to the wrapper: the
    recording is filtered and shaped frame by frame, at its (scaled) pace."""
    streams = ["omgbusd@kline_1m", "omgbusd@bookTicker"]
    span = US.frames[-1][0] - US.connected_at
    config = FAST.replace(recordings=(US,), replay_speed=span / 1.0)  # the session in 1 s
    kline = recorded(US, {"omgbusd@kline_1m"})
    async with (
        open_emulator(config) as emulator,
        open_websocket_url(emulator.raw_url("/".join(streams))) as ws,
    ):
        started = trio.current_time()
        first = recorded(US, set(streams))[0]  # a bookTicker at 2 s of 31 (0.06 s here)
        assert str(await ws.get_message()) == payload(first)
        for request in (
            {"method": "UNSUBSCRIBE", "params": ["omgbusd@bookTicker"], "id": 1},
            {"method": "SET_PROPERTY", "params": ["combined", True], "id": 2},
        ):
            await ws.send_message(json.dumps(request))
            while "id" not in (reply := json.loads(await ws.get_message())):
                pass
            assert reply == {"result": None, "id": request["id"]}
        # What follows is kline frames only, wrapped as recorded, ending with the last one.
        rest = [str(await ws.get_message())]
        while rest[-1] != kline[-1]:
            rest.append(str(await ws.get_message()))
        elapsed = trio.current_time() - started
    assert rest == kline[len(kline) - len(rest) :]  # the klines from 0.45 s on, at least
    assert len(rest) >= 4
    assert 0.9 < elapsed < 5  # the last kline: 30 s of 31
