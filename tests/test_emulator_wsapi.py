"""The emulator's WebSocket API and request ids, read as Binance reads them, over real sockets.

What Binance's own SDK relies on, frame by frame: ids of every documented kind echoed in every
reply, parameters given as strings, ``returnRateLimits``, ``exchangeInfo``, the ``v3/`` method
prefix and ``timeUnit``. Per-IP limits are in test_emulator_limits.py (they need a clock the
test can move).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from trio_websocket import ConnectionRejected, WebSocketConnection, open_websocket_url

from loader.testing import Emulator, EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

FAST = EmulatorConfig(speed=1200.0, seed=3)
Json = dict[str, Any]
UUID = "5494febb-d167-46a2-996d-70533eb4d976"


async def ask(ws: WebSocketConnection, request: Json | str) -> Json:
    await ws.send_message(request if isinstance(request, str) else json.dumps(request))
    while True:
        reply: Json = json.loads(await ws.get_message())
        if "id" in reply:  # skip stream frames on stream connections
            return reply


async def api(emulator: Emulator, *requests: Json | str, query: str = "") -> list[Json]:
    async with open_websocket_url(emulator.ws_api_url + query) as ws:
        return [await ask(ws, r) for r in requests]


# -- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("request_id", [UUID, "a" * 36, 7, -(2**63), 2**63 - 1, None])
async def test_stream_live_methods_take_every_documented_id(request_id: Any) -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        subscribe = {"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": request_id}
        assert await ask(ws, subscribe) == {"result": None, "id": request_id}
        listed = await ask(ws, {"method": "LIST_SUBSCRIPTIONS", "id": request_id})
        assert listed == {"result": ["btcusdt@kline_1m"], "id": request_id}
        # An error reply echoes the id too, so a client matching by id is not left waiting.
        wrong = await ask(ws, {"method": "SET_PROPERTY", "params": ["x", 1], "id": request_id})
        assert wrong == {"error": {"code": 0, "msg": "Unknown property"}, "id": request_id}


@pytest.mark.parametrize("request_id", ["a" * 37, 2**63, 1.5, True, [1], {"a": 1}])
async def test_stream_live_methods_refuse_other_ids(request_id: Any) -> None:
    async with open_emulator(FAST) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        reply = await ask(ws, {"method": "LIST_SUBSCRIPTIONS", "id": request_id})
    msg = "Invalid request: request ID must be an unsigned integer"
    assert reply == {"error": {"code": 2, "msg": msg}, "id": None}


@pytest.mark.parametrize("request_id", [UUID, 42, None, "x"])
async def test_api_echoes_the_id_in_results_and_errors(request_id: Any) -> None:
    async with open_emulator(FAST) as emulator:
        ok, error = await api(
            emulator,
            {"id": request_id, "method": "ping"},
            {"id": request_id, "method": "klines", "params": {"symbol": "NOPEUSDT"}},
        )
    assert (ok["id"], ok["status"], ok["result"]) == (request_id, 200, {})
    assert (error["id"], error["status"]) == (request_id, 400)


# -- parameters -------------------------------------------------------------------------------


async def test_api_numbers_and_booleans_may_be_strings() -> None:
    async with open_emulator(FAST) as emulator:
        await emulator.wait_closed("ETHUSDT", "1m", 4)
        truth = [k.rest_row() for k in emulator.closed_klines("ETHUSDT", "1m")]
        params: Json = {"symbol": "ETHUSDT", "interval": "1m"}
        start, end = str(truth[1][0]), str(truth[3][0])
        as_numbers, as_strings, limited, hidden = await api(
            emulator,
            {
                "id": 1,
                "method": "klines",
                "params": {**params, "startTime": int(start), "limit": 2},
            },
            {"id": 2, "method": "klines", "params": {**params, "startTime": start, "limit": "2"}},
            {"id": 3, "method": "klines", "params": {**params, "endTime": end, "limit": "2"}},
            {"id": 4, "method": "time", "params": {"returnRateLimits": "false"}},
        )
    assert as_numbers["result"] == as_strings["result"] == truth[1:3]
    assert limited["result"] == truth[2:4]
    assert list(hidden) == ["id", "status", "result"]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"limit": "x"}, -1100),
        ({"limit": "-1"}, -1100),
        ({"limit": "1001"}, -1130),
        ({"startTime": "1e12"}, -1100),
        ({"startTime": True}, -1100),
        ({"returnRateLimits": "yes"}, -1100),
        ({"returnRateLimits": 1}, -1100),
    ],
)
async def test_api_refuses_malformed_values(params: Json, code: int) -> None:
    async with open_emulator(FAST) as emulator:
        (reply,) = await api(
            emulator,
            {
                "id": "m",
                "method": "klines",
                "params": {"symbol": "BTCUSDT", "interval": "1m", **params},
            },
        )
    assert (reply["id"], reply["status"], reply["error"]["code"]) == ("m", 400, code)


async def test_return_rate_limits_per_request_and_per_connection() -> None:
    async with open_emulator(FAST) as emulator:
        shown, hidden = await api(
            emulator,
            {"id": 1, "method": "time"},
            {"id": 2, "method": "time", "params": {"returnRateLimits": False}},
        )
        by_default, asked = await api(
            emulator,
            {"id": 3, "method": "time"},
            {"id": 4, "method": "time", "params": {"returnRateLimits": True}},
            query="?returnRateLimits=false",
        )
    assert "rateLimits" in shown
    assert "rateLimits" not in hidden
    assert "rateLimits" not in by_default
    assert asked["rateLimits"][0]["rateLimitType"] == "REQUEST_WEIGHT"


async def test_versioned_method_names_and_weights() -> None:
    async with open_emulator(FAST) as emulator:
        replies = await api(
            emulator,
            {"id": 1, "method": "v3/ping"},
            {"id": 2, "method": "time"},
            {"id": 3, "method": "klines", "params": {"symbol": "BTCUSDT", "interval": "1m"}},
            {"id": 4, "method": "exchangeInfo"},
        )
        weight = emulator.request_weight
    counts = [r["rateLimits"][0]["count"] for r in replies]
    assert all(r["status"] == 200 for r in replies)
    # Opening the connection costs 2, then ping 1, time 1, klines 2, exchangeInfo 20 (unless
    # a new minute began meanwhile, which restarts the count).
    steps = [2 + 1, 1, 2, 20]
    for i, (count, step) in enumerate(zip(counts, steps, strict=True)):
        assert count == step or count == (counts[i - 1] if i else 2) + step
    assert weight in (counts[-1], 0)
    assert emulator.api_connections == 1


# -- exchangeInfo -----------------------------------------------------------------------------


async def test_exchange_info_describes_the_market() -> None:
    config = FAST.replace(symbols=("BTCUSDT", "ETHBTC", "SYM7FDUSD"))
    async with open_emulator(config) as emulator:
        (everything,) = await api(emulator, {"id": "x", "method": "exchangeInfo"})
    result = everything["result"]
    assert list(result) == ["timezone", "serverTime", "rateLimits", "exchangeFilters", "symbols"]
    assert result["timezone"] == "UTC"
    assert {
        (r["rateLimitType"], r["interval"], r["intervalNum"], r["limit"])
        for r in result["rateLimits"]
    } >= {("REQUEST_WEIGHT", "MINUTE", 1, 6000), ("CONNECTIONS", "MINUTE", 5, 300)}
    symbols = result["symbols"]
    assert [s["symbol"] for s in symbols] == ["BTCUSDT", "ETHBTC", "SYM7FDUSD"]
    assert [(s["baseAsset"], s["quoteAsset"]) for s in symbols] == [
        ("BTC", "USDT"),
        ("ETH", "BTC"),
        ("SYM7", "FDUSD"),
    ]
    assert all(s["status"] == "TRADING" and s["isSpotTradingAllowed"] for s in symbols)
    btc = symbols[0]
    filters = {f["filterType"]: f for f in btc["filters"]}
    # BTCUSDT trades in ticks of 0.01 and lots of 0.00001 in the market.
    assert filters["PRICE_FILTER"]["tickSize"] == "0.01000000"
    assert filters["LOT_SIZE"]["stepSize"] == "0.00001000"
    assert btc["permissionSets"] == [["SPOT"]]


@pytest.mark.parametrize(
    ("params", "symbols"),
    [
        ({"symbol": "ETHUSDT"}, ["ETHUSDT"]),
        ({"symbols": ["SOLUSDT", "BTCUSDT"]}, ["SOLUSDT", "BTCUSDT"]),
        ({"symbols": '["SOLUSDT","BTCUSDT"]'}, ["SOLUSDT", "BTCUSDT"]),
        ({"permissions": "SPOT"}, list(EmulatorConfig().symbols)),
        ({"permissions": ["MARGIN"]}, []),
        ({"symbolStatus": "TRADING"}, list(EmulatorConfig().symbols)),
        ({"symbolStatus": "HALT"}, []),
        ({"permissions": ["SPOT"], "symbolStatus": "BREAK"}, []),
    ],
)
async def test_exchange_info_selections(params: Json, symbols: list[str]) -> None:
    async with open_emulator(FAST) as emulator:
        (reply,) = await api(emulator, {"id": 1, "method": "exchangeInfo", "params": params})
    assert [s["symbol"] for s in reply["result"]["symbols"]] == symbols


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"symbol": "NOPEUSDT"}, -1121),
        ({"symbols": ["BTCUSDT", "NOPEUSDT"]}, -1121),
        ({"symbol": "btcusdt"}, -1100),
        ({"symbols": "BTCUSDT,ETHUSDT"}, -1100),
        ({"symbol": "BTCUSDT", "symbols": ["ETHUSDT"]}, -1128),
        ({"symbol": "BTCUSDT", "symbolStatus": "TRADING"}, -1128),
        ({"symbolStatus": "OPEN"}, -1122),
        ({"colour": "red"}, -1104),
    ],
)
async def test_exchange_info_errors(params: Json, code: int) -> None:
    async with open_emulator(FAST) as emulator:
        (reply,) = await api(emulator, {"id": 9, "method": "exchangeInfo", "params": params})
    assert (reply["id"], reply["status"], reply["error"]["code"]) == (9, 400, code)


async def test_exchange_info_can_leave_permission_sets_empty() -> None:
    async with open_emulator(FAST) as emulator:
        (reply,) = await api(
            emulator,
            {"id": 1, "method": "exchangeInfo", "params": {"showPermissionSets": "false"}},
        )
    assert all(s["permissionSets"] == [] for s in reply["result"]["symbols"])


# -- timeUnit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["MICROSECOND", "microsecond"])
async def test_time_unit_microsecond_on_a_stream(unit: str) -> None:
    async with open_emulator(FAST) as emulator:
        url = emulator.stream_url("bnbusdt@kline_1s") + f"&timeUnit={unit}"
        async with open_websocket_url(url) as ws:
            frames = [json.loads(await ws.get_message()) for _ in range(3)]
        truth = {k.open_time: k for k in emulator.closed_klines("BNBUSDT", "1s")}
    for frame in frames:
        k = frame["data"]["k"]
        kline = truth[k["t"] // 1000]
        assert (k["t"], k["T"]) == (kline.open_time * 1000, kline.close_time * 1000 + 999)
        assert frame["data"]["E"] == (kline.close_time + 1 + FAST.close_lag_ms) * 1000
        assert (k["o"], k["c"], k["v"], k["x"]) == (kline.open, kline.close, kline.volume, True)


async def test_one_series_to_subscribers_of_both_units_and_both_forms() -> None:
    async with open_emulator(FAST) as emulator:
        stream = "bnbusdt@kline_1s"
        urls = [
            emulator.raw_url(stream),
            emulator.raw_url(stream) + "?timeUnit=MICROSECOND",
            emulator.stream_url(stream),
            emulator.stream_url(stream) + "&timeUnit=microsecond",
        ]
        async with (
            open_websocket_url(urls[0]) as raw_ms,
            open_websocket_url(urls[1]) as raw_us,
            open_websocket_url(urls[2]) as combined_ms,
            open_websocket_url(urls[3]) as combined_us,
        ):
            await emulator.wait_connections(4)
            got = [json.loads(await ws.get_message()) for ws in (raw_ms, raw_us)]
            got += [json.loads(await ws.get_message())["data"] for ws in (combined_ms, combined_us)]
        truth = {k.open_time: k for k in emulator.closed_klines("BNBUSDT", "1s")}
    for event, micros in zip(got, (False, True, False, True), strict=True):
        scale = 1000 if micros else 1
        kline = truth[event["k"]["t"] // scale]
        sent_at = kline.close_time + 1 + FAST.close_lag_ms  # 1s frames are all closing ones
        assert event["E"] == sent_at * scale
        assert event["k"]["T"] == (kline.close_time * 1000 + 999 if micros else kline.close_time)
        assert event["k"]["c"] == kline.close


async def test_time_unit_millisecond_is_the_default() -> None:
    async with open_emulator(FAST) as emulator:
        url = emulator.raw_url("bnbusdt@kline_1s") + "?timeUnit=MILLISECOND"
        async with open_websocket_url(url) as ws:
            frame = json.loads(await ws.get_message())
        truth = {k.open_time: k for k in emulator.closed_klines("BNBUSDT", "1s")}
    assert frame["k"]["T"] == truth[frame["k"]["t"]].close_time


@pytest.mark.parametrize("path", ["/ws/btcusdt@kline_1m", "/ws-api/v3"])
async def test_unknown_time_unit_is_refused(path: str) -> None:
    async with open_emulator(FAST) as emulator:
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(emulator.url + path + "?timeUnit=NANOSECOND"):
                pass
    assert info.value.status_code == 400
    assert json.loads(info.value.body or b"")["code"] == -1194


async def test_time_unit_microsecond_on_the_api() -> None:
    async with open_emulator(FAST) as emulator:
        await emulator.wait_closed("ETHUSDT", "1m", 3)
        truth = emulator.closed_klines("ETHUSDT", "1m")
        start_us = truth[1].open_time * 1000
        params: Json = {"symbol": "ETHUSDT", "interval": "1m"}
        before = emulator.market_time_ms()
        time_us, rows_us = await api(
            emulator,
            {"id": 1, "method": "time"},
            {"id": 2, "method": "klines", "params": {**params, "startTime": start_us, "limit": 2}},
            query="?timeUnit=MICROSECOND",
        )
        (from_us,) = await api(
            emulator,
            {"id": 3, "method": "klines", "params": {**params, "startTime": start_us + 1}},
        )
    assert time_us["result"]["serverTime"] % 1000 == 0
    assert time_us["result"]["serverTime"] >= before * 1000
    assert rows_us["result"] == [
        [k.open_time * 1000, *k.rest_row()[1:6], k.close_time * 1000 + 999, *k.rest_row()[7:]]
        for k in truth[1:3]
    ]
    # A start time in microseconds on a millisecond connection selects candles opening at or
    # after it: one microsecond past an open skips that candle.
    assert from_us["result"][0] == truth[2].rest_row()
