"""The emulator's per-IP limits: WebSocket API request weight (429, then a 418 ban), and
connection attempts, with the counts a test can watch a storm by.

The limits run on the Trio clock in real seconds, so these tests run Trio on a frozen
``MockClock`` and move it by hand: a minute's window or a two-minute ban passes in no time,
and no request can straddle a window by accident.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    open_websocket_url,
)

from loader.testing import EmulatorConfig, open_emulator

Json = dict[str, Any]
# Opening a WebSocket API connection costs 2, each ping 1: a connection and four pings fit.
LIMITED = EmulatorConfig(seed=5, api_weight_limit=6)


def run(test: Callable[[trio.testing.MockClock], Awaitable[None]]) -> None:
    clock = trio.testing.MockClock(rate=0)  # time moves only when the test jumps it
    trio.run(test, clock, clock=clock)


async def ping(ws: WebSocketConnection, request_id: int) -> Json:
    await ws.send_message(json.dumps({"id": request_id, "method": "ping"}))
    reply: Json = json.loads(await ws.get_message())
    assert reply["id"] == request_id
    return reply


async def refused(url: str) -> ConnectionRejected:
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url):
            pass
    return info.value


def headers(rejection: ConnectionRejected) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in rejection.headers or []}


async def exhaust(ws: WebSocketConnection) -> Json:
    """Use up the window's weight; return the 429 that follows."""
    for n in range(1, 5):
        reply = await ping(ws, n)
        assert reply["status"] == 200
    return await ping(ws, 5)


def test_over_the_weight_limit_429_then_a_ban_for_not_backing_off() -> None:
    async def scenario(clock: trio.testing.MockClock) -> None:
        clock.jump(7.5)  # somewhere inside a minute: the 429 names the rest of it
        async with open_emulator(LIMITED) as emulator:
            async with open_websocket_url(emulator.ws_api_url) as ws:
                limited = await exhaust(ws)
                assert limited["status"] == 429
                assert limited["rateLimits"][0]["count"] == 7
                error = limited["error"]
                assert error["code"] == -1003
                assert "current limit is 6 request weight per 1 MINUTE" in error["msg"]
                waited = error["data"]["retryAfter"] - error["data"]["serverTime"]
                assert 52_500 <= waited <= 52_501  # until the next minute, in real ms
                assert emulator.rate_limited == 1

                # Not backing off: banned, told until when, and disconnected.
                banned = await ping(ws, 6)
                assert banned["status"] == 418
                until = banned["error"]["data"]["retryAfter"]
                assert until - banned["error"]["data"]["serverTime"] in (120_000, 120_001)
                assert f"IP banned until {until}" in banned["error"]["msg"]
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
                assert closed.value.reason is not None
                assert closed.value.reason.code == 1008

            # The ban holds for new WebSocket API connections, not for market streams.
            rejection = await refused(emulator.ws_api_url)
            assert rejection.status_code == 418
            assert headers(rejection)[b"retry-after"] == b"120"
            assert json.loads(rejection.body or b"")["code"] == -1003
            async with open_websocket_url(emulator.raw_url("btcusdt@kline_1m")):
                pass
            assert emulator.rate_limited == 3

            # Once it is over the API answers again; a second ban lasts twice as long.
            clock.jump(120)
            async with open_websocket_url(emulator.ws_api_url) as ws:
                assert (await exhaust(ws))["status"] == 429
                again = await ping(ws, 6)
                assert again["status"] == 418
                data = again["error"]["data"]
                assert data["retryAfter"] - data["serverTime"] in (240_000, 240_001)
            assert emulator.api_connections == 2

    run(scenario)


def test_backing_off_after_a_429_is_not_banned() -> None:
    async def scenario(clock: trio.testing.MockClock) -> None:
        async with (
            open_emulator(LIMITED) as emulator,
            open_websocket_url(emulator.ws_api_url) as ws,
        ):
            limited = await exhaust(ws)
            assert limited["status"] == 429
            data = limited["error"]["data"]
            clock.jump((data["retryAfter"] - data["serverTime"]) / 1000)
            reply = await ping(ws, 6)
            assert reply["status"] == 200
            assert reply["rateLimits"][0]["count"] == 1  # a new window
            assert emulator.request_weight == 1

    run(scenario)


def test_connection_attempts_per_ip_are_limited_and_counted() -> None:
    config = EmulatorConfig(seed=5, max_connection_attempts=3, connection_attempts_window=300)

    async def scenario(clock: trio.testing.MockClock) -> None:
        async with open_emulator(config) as emulator:
            async with open_websocket_url(emulator.raw_url("btcusdt@kline_1m")):
                pass
            clock.jump(100)
            for _ in range(2):
                async with open_websocket_url(emulator.stream_url(["ethusdt@kline_1m"])):
                    pass
            rejection = await refused(emulator.raw_url("btcusdt@kline_1m"))
            assert rejection.status_code == 429
            assert headers(rejection)[b"retry-after"] == b"200"  # when the first attempt expires
            assert json.loads(rejection.body or b"")["code"] == -1003
            # The WebSocket API is another service (another host on Binance): its own budget.
            for _ in range(3):
                async with open_websocket_url(emulator.ws_api_url):
                    pass
            assert (await refused(emulator.ws_api_url)).status_code == 429
            assert (emulator.connection_attempts, emulator.handshakes) == (8, 6)
            assert emulator.api_connections == 3
            assert emulator.rate_limited == 2
            # The first attempt has aged out, but the refused one still counts.
            clock.jump(200)
            rejection = await refused(emulator.raw_url("btcusdt@kline_1m"))
            assert headers(rejection)[b"retry-after"] == b"100"
            clock.jump(100)
            async with open_websocket_url(emulator.raw_url("btcusdt@kline_1m")):
                pass
            assert (emulator.connection_attempts, emulator.handshakes) == (10, 7)

    run(scenario)


def test_limits_can_be_lifted_but_are_still_counted() -> None:
    config = EmulatorConfig(seed=5, api_weight_limit=None, max_connection_attempts=None)

    async def scenario(clock: trio.testing.MockClock) -> None:
        async with open_emulator(config) as emulator:
            for _ in range(4):
                async with open_websocket_url(emulator.ws_api_url) as ws:
                    for n in range(3):
                        assert (await ping(ws, n))["status"] == 200
            assert emulator.request_weight == 4 * (2 + 3)
            assert (emulator.connection_attempts, emulator.api_connections) == (4, 4)
            assert emulator.rate_limited == 0

    run(scenario)
