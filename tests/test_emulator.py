"""The Binance emulator over real sockets, driven by plain clients (trio-websocket, wsproto).

Every wait is on an event (a frame, a reply, a close, an emulator condition); the market runs
hundreds of times faster than real time and the connection timers are shortened, so the
whole file takes seconds.
"""

from __future__ import annotations

import functools
import itertools
import json
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Ping, Request

from loader.testing import (
    Emulator,
    EmulatorConfig,
    FirehoseConfig,
    Kline,
    KlineEvent,
    ScheduledFault,
    load_recordings,
    open_emulator,
    serve_emulator,
)

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=1200.0, seed=1)
KLINE_KEYS = ["t", "T", "s", "i", "f", "L", "o", "c", "h", "l", "v", "n", "x", "q", "V", "Q", "B"]
Json = dict[str, Any]


# -- helpers ----------------------------------------------------------------------------------


async def recv(ws: WebSocketConnection) -> Json:
    message: Json = json.loads(await ws.get_message())
    return message


async def request(ws: WebSocketConnection, payload: Json) -> tuple[Json, list[Json]]:
    """Send a live method; return its reply and the stream frames that came before it."""
    await ws.send_message(json.dumps(payload))
    before: list[Json] = []
    while True:
        message = await recv(ws)
        if "id" in message and ("result" in message or "error" in message):
            return message, before
        before.append(message)


async def read_until(ws: WebSocketConnection, done: Callable[[list[Json]], bool]) -> list[Json]:
    got: list[Json] = []
    while not done(got):
        got.append(await recv(ws))
    return got


def closing(messages: list[Json]) -> list[Json]:
    return [m for m in messages if m.get("k", {}).get("x")]


def as_kline(k: Json) -> Kline:
    return msgspec.json.decode(json.dumps(k), type=Kline)


async def closed_code(ws: WebSocketConnection) -> int:
    """Read until the connection closes; the close code."""
    try:
        while True:
            await ws.get_message()
    except ConnectionClosed as exc:
        code: int = exc.reason.code if exc.reason is not None else -1
        return code


class RawClient:
    """A bare wsproto client, for what trio-websocket hides (pings, close frames)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: deque[Event] = deque()

    @classmethod
    async def connect(cls, emulator: Emulator, target: str) -> RawClient:
        client = cls(await trio.open_tcp_stream(emulator.host, emulator.port))
        host = f"{emulator.host}:{emulator.port}"
        await client.stream.send_all(client.ws.send(Request(host=host, target=target)))
        assert isinstance(await client.next_event(), AcceptConnection)
        return client

    async def next_event(self) -> Event:
        while not self.pending:
            data = await self.stream.receive_some(65536)
            self.ws.receive_data(data or None)
            self.pending.extend(self.ws.events())
        return self.pending.popleft()

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))


# -- ways in ----------------------------------------------------------------------------------


async def test_nursery_start_and_raw_stream_events_in_binance_format() -> None:
    async with trio.open_nursery() as nursery:
        emulator: Emulator = await nursery.start(serve_emulator, FAST)
        assert emulator.url == f"ws://127.0.0.1:{emulator.port}"
        async with open_websocket_url(emulator.raw_url("btcusdt@kline_1m")) as ws:
            raw = await ws.get_message()
        nursery.cancel_scope.cancel()
    event = json.loads(raw)
    assert list(event) == ["e", "E", "s", "k"]
    assert list(event["k"]) == KLINE_KEYS
    assert (event["e"], event["s"], event["k"]["s"], event["k"]["i"]) == (
        "kline",
        "BTCUSDT",
        "BTCUSDT",
        "1m",
    )
    decoded = msgspec.json.decode(raw, type=KlineEvent)
    assert decoded.kline.close_time == decoded.kline.open_time + 59_999


async def test_process_prints_its_url_and_serves() -> None:
    command = [sys.executable, "-m", "loader.testing.emulator", "--speed", "1200"]
    command += ["--symbols", "ETHUSDT", "--seed", "3"]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            functools.partial(trio.run_process, command, stdout=subprocess.PIPE, check=False)
        )
        try:
            with trio.fail_after(20):
                line = b""
                while not line.endswith(b"\n"):
                    line += await process.stdout.receive_some(1)
                url = line.decode().strip()
                assert url.startswith("ws://127.0.0.1:")
                async with open_websocket_url(f"{url}/ws/ethusdt@kline_1s") as ws:
                    event = await recv(ws)
        finally:
            process.terminate()
    assert event["s"] == "ETHUSDT"
    assert process.returncode == 0


# -- paths and stream names -------------------------------------------------------------------


async def test_combined_stream_wraps_every_payload() -> None:
    streams = ["btcusdt@kline_1s", "ethusdt@kline_1m"]
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.stream_url(streams)) as ws,
    ):
        messages = await read_until(ws, lambda got: len({m["stream"] for m in got}) == 2)
    for message in messages:
        assert list(message) == ["stream", "data"]
        symbol, _, interval = message["stream"].partition("@kline_")
        assert message["data"]["s"] == symbol.upper()
        assert message["data"]["k"]["i"] == interval


async def test_uppercase_unknown_and_malformed_streams_stay_silent() -> None:
    silent = ["BTCUSDT@kline_1m", "foousdt@kline_1m", "btcusdt@kline_7m", "btcusdt@depth"]
    streams = [*silent, "ethusdt@kline_1s"]
    async with open_emulator(FAST) as emulator:
        async with open_websocket_url(emulator.stream_url(streams)) as ws:
            messages = await read_until(ws, lambda got: len(got) >= 5)
            reply, _ = await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1})
        assert {m["stream"] for m in messages} == {"ethusdt@kline_1s"}
        assert reply == {"result": streams, "id": 1}
        # A connection carrying only an uppercase symbol: open, and silent.
        async with open_websocket_url(emulator.raw_url("BTCUSDT@kline_1s")) as ws:
            await emulator.wait_closed("BTCUSDT", "1s", 5)
            reply, before = await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2})
        assert before == []
        assert reply == {"result": ["BTCUSDT@kline_1s"], "id": 2}


async def test_unknown_path_is_refused() -> None:
    async with open_emulator(FAST) as emulator:
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(emulator.url + "/api/v3/klines"):
                pass
    assert info.value.status_code == 404


# -- klines on the stream ---------------------------------------------------------------------


async def test_cadence_close_lag_and_one_closing_frame_per_candle() -> None:
    config = FAST.replace(close_lag_ms=700)
    async with open_emulator(config) as emulator:
        async with open_websocket_url(emulator.raw_url("btcusdt@kline_1m")) as ws:
            messages = await read_until(ws, lambda got: len(closing(got)) == 3)
        truth = {k.open_time: k for k in emulator.closed_klines("BTCUSDT", "1m")}
    by_candle: dict[int, list[Json]] = {}
    for m in messages:
        by_candle.setdefault(m["k"]["t"], []).append(m)
    candles = list(by_candle.values())
    assert len(candles) == 3
    for frames in candles:
        times = [m["E"] for m in frames]
        assert all(b - a == 2000 for a, b in itertools.pairwise(times))
        assert all(e % 2000 == 700 for e in times)  # state as of every 2 s, sent 700 ms later
        assert [m["k"]["x"] for m in frames] == [False] * (len(frames) - 1) + [True]
        last = frames[-1]
        assert last["E"] == last["k"]["T"] + 1 + 700
        assert as_kline(last["k"]) == truth[last["k"]["t"]]  # the ground truth, exactly
        trades = [m["k"]["n"] for m in frames]
        assert trades == sorted(trades)
    assert len(candles[1]) == 30  # a full candle: 29 updates, then the close
    assert candles[1][0]["k"]["t"] == candles[0][-1]["k"]["T"] + 1


async def test_one_second_klines_are_closing_frames_every_second() -> None:
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.raw_url("solusdt@kline_1s")) as ws,
    ):
        messages = await read_until(ws, lambda got: len(got) == 6)
    assert all(m["k"]["x"] for m in messages)
    starts = [m["k"]["t"] for m in messages]
    assert starts == list(range(starts[0], starts[0] + 6000, 1000))
    assert [m["E"] - m["k"]["T"] - 1 for m in messages] == [FAST.close_lag_ms] * 6


async def test_candles_without_trades() -> None:
    config = FAST.replace(empty_candle_ratio=0.5, seed=4)
    async with (
        open_emulator(config) as emulator,
        open_websocket_url(emulator.raw_url("xrpusdt@kline_1s")) as ws,
    ):

        def empty_after_trades(got: list[Json]) -> bool:
            ks = [m["k"] for m in got]
            return any(a["n"] > 0 and b["n"] == 0 for a, b in itertools.pairwise(ks))

        messages = await read_until(ws, empty_after_trades)
    ks = [m["k"] for m in messages]
    a, b = next((a, b) for a, b in itertools.pairwise(ks) if a["n"] > 0 and b["n"] == 0)
    assert (b["n"], b["f"], b["L"]) == (0, -1, -1)
    assert b["o"] == b["h"] == b["l"] == b["c"] == a["c"]  # the previous close
    assert b["v"] == b["q"] == b["V"] == b["Q"] == "0.00000000"


# -- live methods -----------------------------------------------------------------------------


async def test_subscribe_list_unsubscribe() -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        await ws.send_message('{"method":"SUBSCRIBE","params":["btcusdt@kline_1s"],"id":1}')
        assert await ws.get_message() == '{"result":null,"id":1}'
        event = await recv(ws)
        assert (event["s"], event["k"]["i"]) == ("BTCUSDT", "1s")
        await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":3}')
        while (message := str(await ws.get_message())).startswith('{"e"'):
            pass
        assert message == '{"result":["btcusdt@kline_1s"],"id":3}'
        reply, _ = await request(
            ws, {"method": "UNSUBSCRIBE", "params": ["btcusdt@kline_1s"], "id": 312}
        )
        assert reply == {"result": None, "id": 312}
        await emulator.wait_closed(
            "BTCUSDT", "1s", len(emulator.closed_klines("BTCUSDT", "1s")) + 3
        )
        reply, before = await request(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 4})
        assert before == []  # nothing after the unsubscription
        assert reply == {"result": [], "id": 4}


async def test_combined_property() -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        reply, _ = await request(ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 1})
        assert reply == {"result": False, "id": 1}
        reply, _ = await request(
            ws, {"method": "SET_PROPERTY", "params": ["combined", True], "id": 2}
        )
        assert reply == {"result": None, "id": 2}
        reply, _ = await request(
            ws, {"method": "SUBSCRIBE", "params": ["bnbusdt@kline_1s"], "id": 3}
        )
        message = await recv(ws)
        assert message["stream"] == "bnbusdt@kline_1s"
        assert message["data"]["s"] == "BNBUSDT"


async def test_live_method_errors() -> None:
    config = FAST.replace(max_incoming_per_second=None, max_streams_per_connection=2)
    cases: list[tuple[str, Json]] = [
        ('{"method": "SUBSCRIBE",', {"code": 3, "id": None, "msg": "Invalid JSON: expected value"}),
        ('{"method":"FOO","id":7}', {"code": 2, "id": 7, "msg": "unknown variant `FOO`"}),
        ('{"method":"LIST_SUBSCRIPTIONS","id":1.5}', {"code": 2, "msg": "unsigned integer"}),
        ('{"params":[],"id":8}', {"code": 2, "id": 8, "msg": "missing field `method`"}),
        ('{"method":"SET_PROPERTY","params":["foo",true],"id":9}', {"code": 0, "id": 9}),
        ('{"method":"SET_PROPERTY","params":["combined",1],"id":10}', {"code": 1, "id": 10}),
        ('{"method":"GET_PROPERTY","params":[5],"id":11}', {"code": 2, "msg": "must be a string"}),
        ('{"method":"LIST_SUBSCRIPTIONS","params":[1],"id":12}', {"code": 2, "msg": "too many"}),
        (
            '{"method":"SUBSCRIBE","params":["a@kline_1m","b@kline_1m","c@kline_1m"],"id":13}',
            {"code": 2, "id": 13},
        ),
    ]
    async with open_emulator(config) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        for text, expected in cases:
            await ws.send_message(text)
            reply = await recv(ws)
            assert list(reply) == ["error", "id"], text
            assert reply["error"]["code"] == expected["code"], text
            if "id" in expected:
                assert reply["id"] == expected["id"], text
            assert expected.get("msg", "") in reply["error"]["msg"], text


async def test_more_than_five_messages_a_second_closes_with_1008() -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        for n in range(6):
            await ws.send_message(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": n}))
        assert await closed_code(ws) == 1008


# -- connection rules -------------------------------------------------------------------------


async def test_pings_are_sent_and_answered_pongs_keep_the_connection() -> None:
    config = FAST.replace(ping_interval=0.25, pong_timeout=0.6)
    async with open_emulator(config) as emulator:
        client = await RawClient.connect(emulator, "/ws")
        payloads: list[bytes] = []
        started = trio.current_time()
        while len(payloads) < 4:  # 1 s, well past the pong timeout
            event = await client.next_event()
            assert isinstance(event, Ping), event
            payloads.append(event.payload)
            await client.send(event.response())
        assert len(set(payloads)) == 4
        assert trio.current_time() - started >= 0.9
        assert len(emulator.connections) == 1


async def test_no_pong_closes_the_connection() -> None:
    config = FAST.replace(ping_interval=0.25, pong_timeout=0.6)
    async with open_emulator(config) as emulator:
        client = await RawClient.connect(emulator, "/ws")
        started = trio.current_time()
        pings = 0
        while not isinstance(event := await client.next_event(), CloseConnection):
            assert isinstance(event, Ping)
            pings += 1
        elapsed = trio.current_time() - started
    assert event.code == 1008
    assert pings >= 2
    assert 0.8 <= elapsed < 3


async def test_connection_lifetime_is_capped() -> None:
    async with open_emulator(FAST.replace(max_lifetime=0.3)) as emulator:
        started = trio.current_time()
        async with open_websocket_url(emulator.raw_url("btcusdt@kline_1s")) as ws:
            assert await closed_code(ws) == 1000
        assert trio.current_time() - started >= 0.3
        await emulator.wait_handshakes(1)


@pytest.mark.parametrize(("path", "wrapped"), [("/ws", False), ("/stream?streams=", True)])
async def test_server_shutdown_event_then_close(path: str, wrapped: bool) -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.url + path) as ws:
        await emulator.wait_connections(1)
        assert emulator.shutdown(grace=0.05) == 1
        message = await recv(ws)
        assert await closed_code(ws) == 1001
    event = message["data"] if wrapped else message
    assert list(event) == ["e", "E"]
    assert event["e"] == "serverShutdown"
    if wrapped:
        assert message["stream"] == "serverShutdown"


# -- history ----------------------------------------------------------------------------------


async def klines(emulator: Emulator, **params: Any) -> Json:
    async with open_websocket_url(emulator.ws_api_url) as ws:
        await ws.send_message(json.dumps({"id": "h1", "method": "klines", "params": params}))
        return await recv(ws)


async def test_history_is_what_the_stream_sent() -> None:
    async with open_emulator(FAST) as emulator:
        async with open_websocket_url(emulator.raw_url("ethusdt@kline_1m")) as ws:
            messages = await read_until(ws, lambda got: len(closing(got)) == 4)
        streamed = [as_kline(m["k"]).rest_row() for m in closing(messages)]
        reply = await klines(emulator, symbol="ETHUSDT", interval="1m")
        truth = [k.rest_row() for k in emulator.closed_klines("ETHUSDT", "1m")]
        assert reply["status"] == 200
        assert reply["id"] == "h1"
        assert reply["rateLimits"][0]["rateLimitType"] == "REQUEST_WEIGHT"
        rows = reply["result"]
        assert all(len(row) == 12 for row in rows)
        assert rows[: len(truth)] == truth  # every closed candle, final values
        assert all(row in truth for row in streamed)
        assert len(rows) - len(truth) <= 1  # at most the candle in progress
        if len(rows) > len(truth):
            assert rows[-1][0] == int(truth[-1][6]) + 1

        t1, t2 = int(truth[1][0]), int(truth[2][0])
        reply = await klines(emulator, symbol="ETHUSDT", interval="1m", startTime=t1, limit=2)
        assert reply["result"] == truth[1:3]
        reply = await klines(emulator, symbol="ETHUSDT", interval="1m", endTime=t2, limit=2)
        assert reply["result"] == truth[1:3]
        reply = await klines(emulator, symbol="ETHUSDT", interval="1m", startTime=t1 + 1)
        assert reply["result"][0] == truth[2]
        selected = emulator.closed_klines("ETHUSDT", "1m", start_ms=t1, end_ms=t2)
        assert [k.rest_row() for k in selected] == truth[1:3]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"symbol": "BTCUSDX", "interval": "1m"}, -1121),
        ({"symbol": "BTCUSDT", "interval": "2m"}, -1120),
        ({"interval": "1m"}, -1102),
        ({"symbol": "BTCUSDT"}, -1102),
        ({"symbol": "btcusdt", "interval": "1m"}, -1100),
        ({"symbol": "BTCUSDT", "interval": "1m", "limit": 1001}, -1130),
        ({"symbol": "BTCUSDT", "interval": "1m", "limit": 0}, -1130),
        ({"symbol": "BTCUSDT", "interval": "1m", "startTime": "x"}, -1100),
        ({"symbol": "BTCUSDT", "interval": "1m", "colour": "red"}, -1104),
    ],
)
async def test_history_errors(params: Json, code: int) -> None:
    async with open_emulator(FAST) as emulator:
        reply = await klines(emulator, **params)
    assert list(reply) == ["id", "status", "error", "rateLimits"]
    assert reply["status"] == 400
    assert reply["error"]["code"] == code


async def test_history_request_errors_and_other_methods() -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.ws_api_url) as ws:
        await ws.send_message("{nope")
        assert (await recv(ws))["error"]["code"] == -1135
        await ws.send_message('{"id":2,"method":"klines","params":[]}')
        assert (await recv(ws))["error"]["code"] == -1135
        await ws.send_message('{"id":3,"method":"avgPrice","params":{}}')
        reply = await recv(ws)
        assert (reply["id"], reply["status"]) == (3, 400)
        await ws.send_message('{"id":4,"method":"time"}')
        reply = await recv(ws)
        assert reply["result"]["serverTime"] >= emulator.config.resolved_start_ms() - 60_000


# -- faults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reset", [False, True])
async def test_drop_without_close_frame(reset: bool) -> None:
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.raw_url("btcusdt@kline_1s")) as ws,
    ):
        await recv(ws)
        assert emulator.drop(reset=reset) == 1
        assert await closed_code(ws) == 1006  # abnormal closure: no close frame
        await emulator.wait_for(lambda e: not e.connections)


async def drain(ws: WebSocketConnection, got: list[Json]) -> None:
    """Keep reading: trio-websocket handles pongs only while its messages are consumed."""
    try:
        while True:
            got.append(await recv(ws))
    except ConnectionClosed:
        return


async def test_stall_and_resume() -> None:
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.raw_url("btcusdt@kline_1s")) as ws,
    ):
        got: list[Json] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, ws, got)
            await ws.ping(b"warm")
            assert emulator.stall() == 1
            assert emulator.connections[0].stalled
            with trio.move_on_after(0.3) as scope:
                await ws.ping(b"are you there")
            assert scope.cancelled_caught  # no pong while stalled
            assert emulator.resume() == 1
            with trio.fail_after(5):
                await ws.ping(b"back")
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            assert (await recv(ws))["e"] == "kline"  # data flows again


async def test_stall_with_a_duration_ends_by_itself() -> None:
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.raw_url("btcusdt@kline_1s")) as ws,
    ):
        got: list[Json] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain, ws, got)
            await emulator.wait_connections(1)
            emulator.stall(0.2)
            await emulator.wait_for(lambda e: not e.connections[0].stalled)
            with trio.fail_after(5):
                await ws.ping(b"back")
            await ws.aclose()


async def test_bad_frames() -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        await emulator.wait_connections(1)
        emulator.send_invalid_json()
        text = await ws.get_message()
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        emulator.send_binary()
        assert isinstance(await ws.get_message(), bytes)
        emulator.send_unknown_event()
        assert (await recv(ws))["e"] == "futureEvent"


async def test_an_injected_event_goes_to_the_connections_carrying_its_stream() -> None:
    payload = b'{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":0}}'
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.stream_url(["ethusdt@kline_1m", "btcusdt@kline_1s"])) as both,
        open_websocket_url(emulator.raw_url("ethusdt@kline_1m")) as other,
    ):
        await emulator.wait_connections(2)
        assert emulator.send_event(payload, "btcusdt@kline_1s") == 1
        while (frame := json.loads(await both.get_message()))["data"]["E"] != 1:
            pass  # the market's own frames, queued before it
        assert frame == {"stream": "btcusdt@kline_1s", "data": json.loads(payload)}
        assert emulator.send_event(payload) == 2
        while (raw := json.loads(await other.get_message()))["E"] != 1:
            pass
        assert raw == json.loads(payload)


async def test_oversized_frame() -> None:
    async with open_emulator(FAST) as emulator:
        async with open_websocket_url(emulator.raw_url(), max_message_size=2**21) as ws:
            await emulator.wait_connections(1)
            emulator.send_oversized()
            text = await ws.get_message()
            assert len(text) == 2**20 + 1
            assert json.loads(text)["e"] == "padding"
        # trio-websocket's default limit is 1 MiB: the client closes with 1009.
        async with open_websocket_url(emulator.raw_url()) as ws:
            await emulator.wait_connections(1)
            emulator.send_oversized()
            assert await closed_code(ws) == 1009


@pytest.mark.parametrize("status", [429, 418])
async def test_refused_handshakes(status: int) -> None:
    async with open_emulator(FAST) as emulator:
        emulator.refuse_handshakes(2, status=status, retry_after=7)
        for _ in range(2):
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(emulator.raw_url("btcusdt@kline_1s")):
                    pass
            assert info.value.status_code == status
            headers = {k.lower(): v for k, v in info.value.headers}
            assert headers[b"retry-after"] == b"7"
            assert json.loads(info.value.body or b"")["code"] == -1003
        async with open_websocket_url(emulator.raw_url("btcusdt@kline_1s")) as ws:
            await recv(ws)
        assert (emulator.refused, emulator.handshakes) == (2, 1)


async def test_rotate_closes_as_at_24_hours() -> None:
    async with (
        open_emulator(FAST) as emulator,
        open_websocket_url(emulator.raw_url("btcusdt@kline_1s")) as ws,
    ):
        await recv(ws)
        assert emulator.rotate() == 1
        assert await closed_code(ws) == 1000


async def test_scheduled_faults_from_the_config() -> None:
    config = FAST.replace(faults=(ScheduledFault.parse("unknown-event@0.05/0.05"),))
    async with open_emulator(config) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        assert (await recv(ws))["e"] == "futureEvent"
        assert (await recv(ws))["e"] == "futureEvent"


# -- replay -----------------------------------------------------------------------------------


async def test_replay_serves_recorded_frames_byte_for_byte() -> None:
    recordings = load_recordings()
    assert len(recordings) >= 2
    config = FAST.replace(recordings=recordings, replay_speed=None)
    async with open_emulator(config) as emulator:
        for recording in recordings:
            async with open_websocket_url(
                emulator.replay_url(recording), max_message_size=2**22
            ) as ws:
                received = [str(await ws.get_message()) for _ in recording.frames]
            expected = [text for _, text in recording.frames]
            assert [t.encode() for t in received] == [t.encode() for t in expected]
            kline_frames = [t for t in received if '"e":"kline"' in t]
            assert kline_frames
            assert kline_frames == [t for t in expected if '"e":"kline"' in t]


async def test_replay_at_recorded_pace() -> None:
    recording = min(load_recordings(), key=lambda r: r.frames[-1][0] - r.connected_at)
    span = recording.frames[-1][0] - recording.connected_at
    speed = span / 0.5  # the whole session in half a second
    config = FAST.replace(recordings=(recording,), replay_speed=speed)
    async with open_emulator(config) as emulator:
        started = trio.current_time()
        async with open_websocket_url(emulator.replay_url(recording)) as ws:
            first = await ws.get_message()
            first_at = trio.current_time() - started
            for _ in recording.frames[1:]:
                await ws.get_message()
        elapsed = trio.current_time() - started
    assert first == recording.frames[0][1]
    assert first_at < 0.45
    assert 0.45 <= elapsed < 5


# -- firehose ---------------------------------------------------------------------------------


async def test_firehose_paced_rate_closing_share_and_send_times() -> None:
    symbols = tuple(f"SYM{i}USDT" for i in range(10))
    firehose = FirehoseConfig(rate=4000, close_ratio=0.5, record_send_times=True)
    config = EmulatorConfig(symbols=symbols, firehose=firehose)
    streams = [f"{s.lower()}@kline_1m" for s in symbols]
    async with open_emulator(config) as emulator:
        async with open_websocket_url(emulator.stream_url(streams)) as ws:
            await recv(ws)
            started = time.monotonic()
            messages = await read_until(ws, lambda got: len(got) == 800)
            elapsed = time.monotonic() - started
            now_ms = time.time() * 1000
        rate = len(messages) / elapsed
        # Paced: never faster than asked. How close it comes to the rate depends on the CPU
        # this process gets (the client shares it), so the floor only catches a stall.
        assert 400 < rate < 4000 * 1.25
        assert all(abs(m["data"]["E"] - now_ms) < 5000 for m in messages)  # wall clock
        per_stream: dict[str, list[Json]] = {}
        for m in messages:
            per_stream.setdefault(m["stream"], []).append(m["data"]["k"])
        for name, ks in per_stream.items():
            flags = [k["x"] for k in ks]
            assert all(a != b for a, b in itertools.pairwise(flags))  # every other
            symbol = name.split("@")[0].upper()
            truth = {k.open_time: k for k in emulator.closed_klines(symbol, "1m")}
            for k in ks:
                if k["x"]:
                    assert as_kline(k) == truth[k["t"]]
                    assert (name, k["t"]) in emulator.send_times
        emulator.set_firehose_rate(None)
        assert emulator.frames_sent >= 800
