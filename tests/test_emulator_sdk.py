"""Binance's official Python client (``binance-sdk-spot``) against the emulator.

The SDK is asyncio (aiohttp); the emulator is Trio. The test serves the emulator in its Trio
loop and runs the SDK with ``asyncio.run`` in a worker thread; the SDK side calls back into
Trio (``trio.from_thread``) for the emulator's ground truth and to wait on its conditions,
so every wait is on an event: a frame the SDK parsed, a reply, or the emulator's count of
answered pings. Everything is the SDK's default configuration except the URLs (and
``time_unit`` where that is what is tested).

Keepalive: Binance pings every 20 s and drops a connection after 60 s without a pong. Here
``ping_interval=1`` and ``pong_timeout=3`` (the same 1:3 ratio, 20 times faster: a Binance
minute is 3 s), and every SDK connection must answer ``KEEPALIVE_PINGS`` pings in a row
without being dropped or reconnecting: 6 s, two scaled minutes. The interval is not shorter
because pongs count towards Binance's 5 incoming messages a second: at 0.5 s, three pongs
and the SDK's LIST_SUBSCRIPTIONS, UNSUBSCRIBE, LIST_SUBSCRIPTIONS in one second would get
the stream connection closed, which Binance, pinging every 20 s, would never do.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from binance_common.configuration import ConfigurationWebSocketAPI, ConfigurationWebSocketStreams
from binance_common.constants import TimeUnit
from binance_sdk_spot.spot import Spot
from binance_sdk_spot.websocket_api.models import ExchangeInfoResponse, KlinesIntervalEnum
from binance_sdk_spot.websocket_streams.models import KlineIntervalEnum, KlineResponse

from loader.testing import Emulator, EmulatorConfig, Kline, open_emulator

pytestmark = [
    pytest.mark.anyio,
    # The SDK passes aiohttp a float timeout, which aiohttp deprecates; not ours to fix.
    pytest.mark.filterwarnings("ignore:parameter 'timeout' of type 'float':DeprecationWarning"),
]

CONFIG = EmulatorConfig(speed=60.0, seed=14, ping_interval=1.0, pong_timeout=3.0)
KEEPALIVE_PINGS = 6
SINGLE = "btcusdt@kline_1m"
COMBINED = ("ethusdt@kline_1m", "solusdt@kline_1s")
T = TypeVar("T")


class Bridge:
    """Calls from the SDK's asyncio thread into the emulator's Trio loop."""

    def __init__(self, emulator: Emulator, token: trio.lowlevel.TrioToken) -> None:
        self.emulator = emulator
        self._token = token

    async def call(self, fn: Callable[[], T]) -> T:
        # A worker thread blocks on Trio, so the SDK's loop keeps reading meanwhile.
        return await asyncio.to_thread(
            lambda: trio.from_thread.run_sync(fn, trio_token=self._token)
        )

    async def wait(self, afn: Callable[[], Awaitable[object]]) -> None:
        await asyncio.to_thread(lambda: trio.from_thread.run(afn, trio_token=self._token))


class Frames:
    """What the SDK hands one stream's callback, with a wait for the n-th closing frame."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self._changed = asyncio.Event()

    def add(self, message: Any) -> None:
        self.messages.append(message)
        self._changed.set()

    def closed(self) -> list[Any]:
        return [m for m in self.messages if m.k.x]

    async def wait_closed(self, count: int) -> list[Any]:
        while len(self.closed()) < count:
            self._changed.clear()
            await self._changed.wait()
        return self.closed()


@dataclass
class Events:
    """Connection events the SDK reports (its ``on_connection``), for every client opened."""

    pings: int = 0
    errors: list[Any] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)
    clients: list[Any] = field(default_factory=list)

    def watch(self, client: Any) -> None:
        self.clients.append(client)
        client.on_connection("ping", self._ping)
        client.on_connection("error", self.errors.append)
        client.on_connection("close", lambda: self.drops.append("close"))
        client.on_connection("reconnect", lambda: self.drops.append("reconnect"))

    def _ping(self) -> None:
        self.pings += 1


@dataclass
class Seen:
    """Everything the SDK surfaced, checked against the emulator once the SDK is done."""

    single: list[Any] = field(default_factory=list)
    combined: dict[str, list[Any]] = field(default_factory=dict)
    micros: list[Any] = field(default_factory=list)
    listed: Any = None
    listed_after_unsubscribe: Any = None
    unanswered_after_list: int = -1
    calls: dict[str, Any] = field(default_factory=dict)
    weights: list[tuple[str, int, int]] = field(default_factory=list)
    market_time: tuple[int, int] = (0, 0)
    pongs_before: dict[int, int] = field(default_factory=dict)
    pongs_after: dict[int, int] = field(default_factory=dict)
    events: Events = field(default_factory=Events)
    #: Errors and drops the SDK reported before the test closed its connections.
    errors: list[Any] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)


# -- the SDK side (asyncio) -------------------------------------------------------------------


async def _streams(spot: Any, seen: Seen) -> Frames:
    client = await spot.websocket_streams.create_connection()
    seen.events.watch(client)
    single = Frames()
    handle = await client.kline(symbol="BTCUSDT", interval=KlineIntervalEnum.INTERVAL_1m)
    handle.on("message", single.add)
    combined = {name: Frames() for name in COMBINED}
    await client.subscribe(list(COMBINED), response_model=KlineResponse)
    for name, frames in combined.items():
        client.on("message", frames.add, name)
    seen.single = await single.wait_closed(2)
    for name, frames in combined.items():
        # Four closed candles: enough for the history requests to select a middle range.
        seen.combined[name] = await frames.wait_closed(4)
    seen.listed = await client.list_subscribe()
    # Replies come in order: by now every SUBSCRIBE reply has settled its request.
    seen.unanswered_after_list = len(client.connections[0].pending_request)
    await handle.unsubscribe()
    seen.listed_after_unsubscribe = await client.list_subscribe()
    return combined[COMBINED[0]]


async def _micro_stream(url: str, seen: Seen) -> None:
    config = ConfigurationWebSocketStreams(stream_url=url, time_unit=TimeUnit.MICROSECOND)
    client = await Spot(config_ws_streams=config).websocket_streams.create_connection()
    seen.events.watch(client)
    frames = Frames()
    handle = await client.kline(symbol="XRPUSDT", interval=KlineIntervalEnum.INTERVAL_1s)
    handle.on("message", frames.add)
    seen.micros = await frames.wait_closed(2)


async def _api(spot: Any, opens: list[int], seen: Seen) -> Any:
    api = await spot.websocket_api.create_connection()
    seen.events.watch(api)
    calls: list[tuple[str, str, Callable[[], Awaitable[Any]]]] = [
        ("ping", "ping", api.ping),
        ("time", "time", api.time),
        (
            "klines_start_end",
            "klines",
            lambda: api.klines(
                symbol="ETHUSDT",
                interval=KlinesIntervalEnum.INTERVAL_1m,
                start_time=opens[1],
                end_time=opens[3],
                limit=500,
            ),
        ),
        (
            "klines_end_limit",
            "klines",
            lambda: api.klines(
                symbol="ETHUSDT",
                interval=KlinesIntervalEnum.INTERVAL_1m,
                end_time=opens[3],
                limit=2,
            ),
        ),
        (
            "klines_start_limit",
            "klines",
            lambda: api.klines(
                symbol="ETHUSDT",
                interval=KlinesIntervalEnum.INTERVAL_1m,
                start_time=opens[0],
                limit=3,
            ),
        ),
        ("exchange_info", "exchangeInfo", lambda: api.exchange_info(symbol="BTCUSDT")),
        (
            "exchange_infos",
            "exchangeInfo",
            lambda: api.exchange_info(symbols=["ETHUSDT", "SOLUSDT"]),
        ),
        (
            "unknown_symbol",
            "klines",
            lambda: api.klines(symbol="NOPEUSDT", interval=KlinesIntervalEnum.INTERVAL_1m),
        ),
    ]
    for name, method, call in calls:
        response = await call()
        seen.calls[name] = response.data()
        if response.rate_limits:  # the SDK drops them from error replies
            seen.weights.append((method, response.rate_limits[0].count, len(response.rate_limits)))
    return api


async def _micro_api(url: str, opens: list[int], seen: Seen) -> None:
    config = ConfigurationWebSocketAPI(stream_url=url, time_unit=TimeUnit.MICROSECOND)
    api = await Spot(config_ws_api=config).websocket_api.create_connection()
    seen.events.watch(api)
    seen.calls["time_us"] = (await api.time()).data()
    response = await api.klines(
        symbol="ETHUSDT",
        interval=KlinesIntervalEnum.INTERVAL_1m,
        start_time=opens[1] * 1000,  # timestamps may be sent in microseconds too
        limit=2,
    )
    seen.calls["klines_us"] = response.data()


async def _keepalive(bridge: Bridge, seen: Seen) -> None:
    emulator = bridge.emulator
    seen.pongs_before = await bridge.call(lambda: {c.id: c.pongs for c in emulator.connections})
    ids = set(seen.pongs_before)

    def held_or_dropped(e: Emulator) -> bool:
        now = {c.id: c.pongs for c in e.connections}
        if set(now) != ids:
            return True  # a connection closed or a new one came: fail below, do not hang
        return all(now[i] >= seen.pongs_before[i] + KEEPALIVE_PINGS for i in ids)

    await bridge.wait(lambda: emulator.wait_for(held_or_dropped))
    seen.pongs_after = await bridge.call(lambda: {c.id: c.pongs for c in emulator.connections})


async def sdk_session(bridge: Bridge) -> Seen:
    emulator = bridge.emulator
    seen = Seen()
    start = await bridge.call(emulator.market_time_ms)
    spot = Spot(
        config_ws_api=ConfigurationWebSocketAPI(stream_url=emulator.ws_api_url),
        config_ws_streams=ConfigurationWebSocketStreams(stream_url=emulator.url),
    )
    try:
        still_streaming = await _streams(spot, seen)
        await _micro_stream(emulator.url, seen)
        opens = [m.k.t for m in seen.combined[COMBINED[0]]]
        api = await _api(spot, opens, seen)
        await _micro_api(emulator.ws_api_url, opens, seen)
        await _keepalive(bridge, seen)
        # Still alive after the keepalive: the API answers, the stream still delivers.
        seen.calls["ping_after_keepalive"] = (await api.ping()).data()
        await still_streaming.wait_closed(len(still_streaming.closed()) + 1)
        seen.market_time = (start, await bridge.call(emulator.market_time_ms))
        seen.errors, seen.drops = list(seen.events.errors), list(seen.events.drops)
    finally:
        for client in seen.events.clients:
            await client.close_connection()
    return seen


def run_sdk(bridge: Bridge) -> Seen:
    async def bounded() -> Seen:
        return await asyncio.wait_for(sdk_session(bridge), timeout=60)

    return asyncio.run(bounded())


# -- the test (Trio) --------------------------------------------------------------------------


def _same(parsed: Any, truth: Kline) -> None:
    k = parsed.k
    assert parsed.e == "kline"
    assert parsed.s == truth.symbol
    got = (k.t, k.T, k.s, k.i, k.f, k.L, k.o, k.c, k.h, k.l, k.v, k.n, k.x, k.q, k.V, k.Q, k.B)
    assert got == (
        truth.open_time,
        truth.close_time,
        truth.symbol,
        truth.interval,
        truth.first_trade_id,
        truth.last_trade_id,
        truth.open,
        truth.close,
        truth.high,
        truth.low,
        truth.volume,
        truth.trades,
        True,
        truth.quote_volume,
        truth.taker_buy_volume,
        truth.taker_buy_quote_volume,
        "0",
    )


def _check_closed(emulator: Emulator, stream: str, closed: list[Any]) -> None:
    symbol, interval = stream.split("@kline_")
    truth = {k.open_time: k for k in emulator.closed_klines(symbol.upper(), interval)}
    assert closed
    for parsed in closed:
        assert isinstance(parsed, KlineResponse)
        _same(parsed, truth[parsed.k.t])
        assert parsed.E > parsed.k.T  # sent once the candle is over


def _rows(emulator: Emulator, opens: list[int]) -> list[list[Any]]:
    by_open = {k.open_time: k for k in emulator.closed_klines("ETHUSDT", "1m")}
    return [by_open[t].rest_row() for t in opens]


async def test_official_sdk_against_the_emulator() -> None:
    async with open_emulator(CONFIG) as emulator:
        bridge = Bridge(emulator, trio.lowlevel.current_trio_token())
        with trio.fail_after(90):
            seen = await trio.to_thread.run_sync(run_sdk, bridge, abandon_on_cancel=True)

        # Streams: parsed by the SDK's own model, equal to the emulator's closed candles.
        _check_closed(emulator, SINGLE, seen.single)
        for name in COMBINED:
            _check_closed(emulator, name, seen.combined[name])
        # Live methods: SUBSCRIBE replies settled, LIST_SUBSCRIPTIONS and UNSUBSCRIBE.
        assert seen.unanswered_after_list == 0
        assert seen.listed["result"] == [SINGLE, *COMBINED]
        assert len(seen.listed["id"]) == 36  # the SDK's uuid, echoed
        assert seen.listed_after_unsubscribe["result"] == list(COMBINED)

        # timeUnit=MICROSECOND on a stream: every time in microseconds.
        truth = {k.open_time: k for k in emulator.closed_klines("XRPUSDT", "1s")}
        for parsed in seen.micros:
            kline = truth[parsed.k.t // 1000]
            assert (parsed.k.t, parsed.k.T) == (
                kline.open_time * 1000,
                kline.close_time * 1000 + 999,
            )
            assert parsed.E % 1000 == 0
            assert kline.close_time < parsed.E // 1000
            assert (parsed.k.o, parsed.k.c, parsed.k.n) == (kline.open, kline.close, kline.trades)

        # The WebSocket API as the SDK surfaces it: a model for results, a dict for errors.
        calls = seen.calls
        assert calls["ping"].status == 200
        assert calls["ping"].result == {}
        server_time = calls["time"].result.server_time
        assert seen.market_time[0] <= server_time <= seen.market_time[1]
        opens = [m.k.t for m in seen.combined[COMBINED[0]]]
        assert calls["klines_start_end"].result == _rows(emulator, opens[1:4])
        assert calls["klines_end_limit"].result == _rows(emulator, opens[2:4])
        assert calls["klines_start_limit"].result == _rows(emulator, opens[0:3])
        assert calls["unknown_symbol"] == {"error": {"code": -1121, "msg": "Invalid symbol."}}

        # exchangeInfo: the SDK's model has no `result` field, so the reply's result lands in
        # additional_properties (as with Binance); the SDK's model of the result parses it.
        for name, symbols in (
            ("exchange_info", ["BTCUSDT"]),
            ("exchange_infos", ["ETHUSDT", "SOLUSDT"]),
        ):
            reply = calls[name].additional_properties
            assert reply["status"] == 200
            info = ExchangeInfoResponse.from_dict(reply["result"])
            assert [s.symbol for s in info.symbols] == symbols
            assert all(s.status == "TRADING" for s in info.symbols)
            spec = emulator.market.spec(symbols[0])
            price_filter = info.symbols[0].filters[0].actual_instance
            assert price_filter.filter_type == "PRICE_FILTER"
            assert price_filter.tick_size == f"{spec.tick / 1e8:.8f}"
            assert info.server_time is not None
            assert info.rate_limits[0].rate_limit_type == "REQUEST_WEIGHT"

        # Weights: each request adds its own (ping 1, time 1, klines 2, exchangeInfo 20) to
        # the count the reply shows, unless a new minute started in between.
        weights = {"ping": 1, "time": 1, "klines": 2, "exchangeInfo": 20}
        assert len(seen.weights) == 7
        for (_, before, _), (method, after, shown) in itertools.pairwise(seen.weights):
            assert shown == 1
            assert after in (before + weights[method], weights[method])

        # timeUnit=MICROSECOND on the API, and a start time sent in microseconds.
        assert calls["time_us"].result.server_time % 1000 == 0
        assert seen.market_time[0] * 1000 <= calls["time_us"].result.server_time
        in_us = [
            [row[0] * 1000, *row[1:6], row[6] * 1000 + 999, *row[7:]]
            for row in _rows(emulator, opens[1:3])
        ]
        assert calls["klines_us"].result == in_us

        # Keepalive: every SDK connection answered the pings, none was dropped or replaced.
        assert len(seen.pongs_before) == 4
        assert seen.pongs_after.keys() == seen.pongs_before.keys()
        for conn_id, pongs in seen.pongs_after.items():
            assert pongs >= seen.pongs_before[conn_id] + KEEPALIVE_PINGS
        assert seen.events.pings >= 4 * KEEPALIVE_PINGS
        assert seen.calls["ping_after_keepalive"].status == 200
        assert emulator.handshakes == 4
        assert emulator.api_connections == 2
        assert seen.errors == []
        assert seen.drops == []


# -- limits, as the SDK meets them ------------------------------------------------------------


async def _storm(url: str) -> tuple[list[Any], list[Any]]:
    api = await Spot(
        config_ws_api=ConfigurationWebSocketAPI(stream_url=url)
    ).websocket_api.create_connection()
    closed = asyncio.Event()
    api.on_connection("close", closed.set)
    try:
        replies = [(await api.ping()).data() for _ in range(4)]
        await closed.wait()  # the ban disconnects
        return replies, list(api.connections)
    finally:
        await api.close_connection()


def test_the_sdk_is_told_429_then_banned_and_disconnected() -> None:
    # Connecting costs 2 and a ping 1: two pings fit, the third is over, the fourth banned.
    config = EmulatorConfig(seed=14, api_weight_limit=4)

    async def scenario() -> None:
        async with open_emulator(config) as emulator:
            replies, left = await trio.to_thread.run_sync(
                lambda: asyncio.run(asyncio.wait_for(_storm(emulator.ws_api_url), timeout=30)),
                abandon_on_cancel=True,
            )
            assert [r.status for r in replies[:2]] == [200, 200]
            over, banned = replies[2]["error"], replies[3]["error"]
            assert (over["code"], banned["code"]) == (-1003, -1003)
            assert "current limit is 4 request weight per 1 MINUTE" in over["msg"]
            assert over["data"]["retryAfter"] > over["data"]["serverTime"]
            assert f"IP banned until {banned['data']['retryAfter']}" in banned["msg"]
            assert left == []
            assert (emulator.rate_limited, emulator.api_connections) == (2, 1)

    # A frozen clock: the minute cannot turn between the pings.
    trio.run(scenario, clock=trio.testing.MockClock(rate=0))
