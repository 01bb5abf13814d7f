"""The emulator at market scale: 1024 streams a connection, listings and delistings on a
schedule, and market mode (thousands of series, each at its own phase of Binance's cadence).
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Any

import msgspec
import pytest
from trio_websocket import WebSocketConnection, open_websocket_url

from loader.testing import (
    INTERVALS,
    EmulatorConfig,
    Kline,
    Listing,
    market_symbols,
    open_emulator,
)
from loader.testing.emulator import config_from_args, parser
from loader.testing.exchange import split_symbol

pytestmark = pytest.mark.anyio

START = 1_700_000_040_000  # a whole minute
Json = dict[str, Any]


async def recv(ws: WebSocketConnection) -> Json:
    message: Json = json.loads(await ws.get_message())
    return message


async def call(ws: WebSocketConnection, method: str, params: list[str], request_id: int) -> Json:
    """A live method; stream frames that arrive before the reply are dropped."""
    await ws.send_message(json.dumps({"method": method, "params": params, "id": request_id}))
    while True:
        message = await recv(ws)
        if message.get("id") == request_id:
            return message


async def api(url: str, method: str, **params: object) -> Json:
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"id": 1, "method": method, "params": params}))
        reply: Json = json.loads(await ws.get_message())
        return reply


def kline(frame: Json) -> Kline:
    data = frame.get("data", frame)
    return msgspec.json.decode(json.dumps(data["k"]), type=Kline)


# -- 1024 streams per connection --------------------------------------------------------------


async def test_a_connection_carries_1024_streams_and_refuses_the_1025th() -> None:
    names = [f"{s.lower()}@kline_{i}" for s in market_symbols(64) for i in INTERVALS]
    assert len(names) == 1024
    config = EmulatorConfig(symbols=market_symbols(65), max_incoming_per_second=None)
    async with open_emulator(config) as emulator, open_websocket_url(emulator.raw_url()) as ws:
        for n, k in enumerate(range(0, 1024, 256)):
            assert await call(ws, "SUBSCRIBE", names[k : k + 256], n) == {"result": None, "id": n}
        listed = await call(ws, "LIST_SUBSCRIPTIONS", [], 10)
        assert listed["result"] == names
        extra = "s64usdt@kline_1m"
        refused = await call(ws, "SUBSCRIBE", [extra], 11)
        assert refused["error"]["code"] == 2
        assert "too many streams" in refused["error"]["msg"]
        # A refused request adds nothing; a stream already there costs no room.
        assert await call(ws, "SUBSCRIBE", names[:3], 12) == {"result": None, "id": 12}
        assert len((await call(ws, "LIST_SUBSCRIPTIONS", [], 13))["result"]) == 1024
        assert await call(ws, "UNSUBSCRIBE", names[:1], 14) == {"result": None, "id": 14}
        assert await call(ws, "SUBSCRIBE", [extra], 15) == {"result": None, "id": 15}


async def test_a_url_naming_more_than_1024_streams_carries_the_first_1024() -> None:
    names = [f"{s.lower()}@kline_{i}" for s in market_symbols(65) for i in INTERVALS[:16]]
    config = EmulatorConfig(symbols=market_symbols(65))
    async with open_emulator(config) as emulator:
        async with open_websocket_url(emulator.stream_url(names)) as ws:
            listed = await call(ws, "LIST_SUBSCRIPTIONS", [], 1)
        assert listed["result"] == names[:1024]


# -- listings and delistings -------------------------------------------------------------------


async def test_a_listed_symbol_appears_trades_from_its_first_candle_and_a_delisted_one_stops() -> (
    None
):
    listed_at = START + 3 * 60_000
    delisted_at = START + 5 * 60_000
    config = EmulatorConfig(
        start_ms=START,
        speed=600,
        seed=2,
        symbols=("BTCUSDT", "OLDUSDT"),
        listings=(Listing("NEWUSDT", listed_ms=listed_at), Listing("OLDUSDT", None, delisted_at)),
        intermediate_updates=False,
    )
    async with open_emulator(config) as emulator:
        info = await api(emulator.ws_api_url, "exchangeInfo")
        statuses = {s["symbol"]: s["status"] for s in info["result"]["symbols"]}
        assert statuses == {"BTCUSDT": "TRADING", "OLDUSDT": "TRADING"}
        early = await api(emulator.ws_api_url, "klines", symbol="NEWUSDT", interval="1m")
        assert early["error"]["code"] == -1121  # not listed yet
        assert emulator.closed_klines("NEWUSDT", "1m") == []

        names = ["newusdt@kline_1m", "oldusdt@kline_1m", "btcusdt@kline_1m"]
        async with open_websocket_url(emulator.stream_url(names)) as ws:
            frames: dict[str, list[Kline]] = defaultdict(list)
            # Until BTCUSDT's candle of 7 minutes in closes: past both dates.
            while not frames["btcusdt@kline_1m"] or (
                frames["btcusdt@kline_1m"][-1].open_time < START + 7 * 60_000
            ):
                message = await recv(ws)
                frames[message["stream"]].append(kline(message))

        new = frames["newusdt@kline_1m"]
        assert new[0].open_time == listed_at  # captured from its very first candle
        assert [k.open_time for k in new] == list(range(listed_at, new[-1].open_time + 1, 60_000))
        assert new == emulator.closed_klines("NEWUSDT", "1m")[: len(new)]
        old = frames["oldusdt@kline_1m"]
        # Candles ending by the delisting close; nothing after.
        assert old == emulator.closed_klines("OLDUSDT", "1m")
        assert old[-1].close_time == delisted_at - 1
        assert [k.open_time for k in old] == list(range(START, delisted_at, 60_000))

        info = await api(emulator.ws_api_url, "exchangeInfo")
        statuses = {s["symbol"]: s["status"] for s in info["result"]["symbols"]}
        assert statuses == {"BTCUSDT": "TRADING", "OLDUSDT": "BREAK", "NEWUSDT": "TRADING"}
        trading = await api(emulator.ws_api_url, "exchangeInfo", symbolStatus="TRADING")
        assert [s["symbol"] for s in trading["result"]["symbols"]] == ["BTCUSDT", "NEWUSDT"]
        history = await api(emulator.ws_api_url, "klines", symbol="NEWUSDT", interval="1m")
        assert history["result"][0][0] == listed_at
        history = await api(emulator.ws_api_url, "klines", symbol="OLDUSDT", interval="1m")
        assert [row[0] for row in history["result"]] == [k.open_time for k in old]


def test_listing_dates_must_be_in_order() -> None:
    with pytest.raises(ValueError, match="after"):
        Listing("XUSDT", listed_ms=START, delisted_ms=START)


# -- market mode -------------------------------------------------------------------------------


def test_market_symbols_are_distinct_uppercase_and_quoted_in_a_mix_of_assets() -> None:
    symbols = market_symbols(1500)
    assert len(set(symbols)) == 1500
    assert all(s == s.upper() for s in symbols)
    quotes: dict[str, int] = defaultdict(int)
    for s in symbols:
        quotes[split_symbol(s)[1]] += 1
    assert set(quotes) >= {"USDT", "BTC", "FDUSD", "USDC", "ETH", "BNB", "TRY", "EUR"}
    assert 0.3 < quotes["USDT"] / 1500 < 0.5
    assert market_symbols(10) == symbols[:10]


async def test_market_mode_spreads_series_over_their_period_at_binances_cadence() -> None:
    symbols = market_symbols(40)
    names = [f"{s.lower()}@kline_{i}" for s in symbols for i in ("1s", "1m")]
    config = EmulatorConfig(start_ms=START, speed=20, symbols=symbols, spread_updates=True)
    times: dict[str, list[int]] = defaultdict(list)
    closes: dict[str, list[Kline]] = defaultdict(list)
    async with (
        open_emulator(config) as emulator,
        open_websocket_url(emulator.stream_url(names)) as ws,
    ):
        while min((len(times[n]) for n in names), default=0) < 8:
            message = await recv(ws)
            times[message["stream"]].append(message["data"]["E"])
            if message["data"]["k"]["x"]:
                closes[message["stream"]].append(kline(message))
    for name in names:
        period = 1000 if name.endswith("_1s") else 2000
        got = times[name]
        assert {b - a for a, b in itertools.pairwise(got)} == {period}, name
    # Each series keeps one phase; together they cover the period instead of one instant.
    phases = {times[n][0] % 2000 for n in names if n.endswith("_1m")}
    assert len(phases) > 10
    for name, closed in closes.items():
        symbol = name.split("@")[0].upper()
        interval = name.split("_")[-1]
        assert closed == emulator.closed_klines(symbol, interval)[: len(closed)]


async def test_closes_only_sends_nothing_but_closing_frames() -> None:
    config = EmulatorConfig(start_ms=START, speed=1200, seed=3, intermediate_updates=False)
    async with open_emulator(config) as emulator:
        async with open_websocket_url(emulator.raw_url("ethusdt@kline_1m")) as ws:
            got = [kline(await recv(ws)) for _ in range(5)]
        assert all(k.closed for k in got)
        assert got == emulator.closed_klines("ETHUSDT", "1m")[:5]


def test_process_flags_for_market_mode_and_listings() -> None:
    args = parser().parse_args(
        [
            *("--market", "3", "--symbols", "", "--closes-only"),
            *("--listing", "NEWUSDT:60000", "--listing", "OLDUSDT::120000"),
        ]
    )
    config = config_from_args(args)
    assert config.symbols == market_symbols(3)
    assert config.spread_updates
    assert not config.intermediate_updates
    assert config.listings == (Listing("NEWUSDT", 60_000), Listing("OLDUSDT", None, 120_000))
