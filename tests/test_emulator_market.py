"""The emulator's deterministic market, intervals and wire format, without a network."""

from __future__ import annotations

import datetime as dt
import itertools
import time
from decimal import Decimal

import msgspec
import pytest

from loader.testing import (
    INTERVALS,
    KlineEvent,
    Market,
    ScheduledFault,
    candle_open,
    fixtures_dir,
    load_recordings,
    next_open,
    wire,
)
from loader.testing.streams import parse_kline_stream

START = 1_700_000_000_000  # 2023-11-14T22:13:20Z, a Tuesday


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)


def test_intervals_are_binances() -> None:
    assert INTERVALS == (
        "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h",
        "1d", "3d", "1w", "1M",
    )  # fmt: skip


def test_weeks_open_on_monday_and_months_on_the_first() -> None:
    week = candle_open("1w", START)
    assert _utc(week) == dt.datetime(2023, 11, 13, tzinfo=dt.UTC)
    assert _utc(week).weekday() == 0
    assert next_open("1w", week) - week == 7 * 86_400_000
    month = candle_open("1M", START)
    assert _utc(month) == dt.datetime(2023, 11, 1, tzinfo=dt.UTC)
    assert _utc(next_open("1M", month)) == dt.datetime(2023, 12, 1, tzinfo=dt.UTC)
    december = next_open("1M", month)
    assert _utc(next_open("1M", december)) == dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    assert candle_open("1m", START) == START - 20_000  # 22:13:00
    assert candle_open("1m", START + 59_999) == START + 40_000  # 22:14:00
    assert candle_open("1h", START) % 3_600_000 == 0


def test_same_seed_same_candles_other_seed_other_candles() -> None:
    a = Market(["BTCUSDT"], seed=3, start_ms=START)
    b = Market(["BTCUSDT"], seed=3, start_ms=START)
    c = Market(["BTCUSDT"], seed=4, start_ms=START)
    # Asked in a different order, the candles are the same.
    late_first = [b.kline("BTCUSDT", "1m", 40), *b.klines("BTCUSDT", "1m", 0, 40)]
    assert a.klines("BTCUSDT", "1m", 0, 41) == late_first[1:] + late_first[:1]
    assert a.klines("BTCUSDT", "1m", 0, 41) != c.klines("BTCUSDT", "1m", 0, 41)


def test_candles_chain_and_decimals_are_exact() -> None:
    market = Market(["BTCUSDT", "XRPUSDT", "SYM7USDT"], seed=1, start_ms=START, empty_ratio=0.3)
    for symbol in market.symbols:
        klines = market.klines(symbol, "1m", 0, 200)
        empty = [k for k in klines if k.trades == 0]
        assert 20 < len(empty) < 120  # some candles without trades, most with
        last_id = None
        prev_close = None
        for k in klines:
            assert k.closed
            assert k.close_time == k.open_time + 59_999
            for field in (k.open, k.close, k.high, k.low, k.volume, k.quote_volume):
                whole, frac = field.split(".")
                assert len(frac) == 8
                assert whole.isdigit()
            if k.trades == 0:
                assert (k.first_trade_id, k.last_trade_id) == (-1, -1)
                assert k.open == k.high == k.low == k.close == prev_close or prev_close is None
                assert k.volume == k.quote_volume == k.taker_buy_volume == "0.00000000"
            else:
                assert k.last_trade_id - k.first_trade_id + 1 == k.trades
                if last_id is not None:
                    assert k.first_trade_id == last_id + 1  # trade ids continue
                last_id = k.last_trade_id
                assert Decimal(k.low) <= min(Decimal(k.open), Decimal(k.close))
                assert Decimal(k.high) >= max(Decimal(k.open), Decimal(k.close))
                assert Decimal(k.taker_buy_volume) <= Decimal(k.volume)
            prev_close = k.close


def test_far_candles_are_cheap_and_trade_ids_keep_increasing() -> None:
    market = Market(["BTCUSDT"], seed=5, start_ms=START, empty_ratio=0.0)
    started = time.perf_counter()
    far = market.kline("BTCUSDT", "1s", 10_000_000)
    assert time.perf_counter() - started < 2  # one chunk of work, not ten million candles
    assert far.open_time == candle_open("1s", START) + 10_000_000 * 1000
    # Across a chunk boundary (every 4096 candles) ids jump forward, never back.
    around = market.klines("BTCUSDT", "1m", 4090, 4100)
    ids = [(k.first_trade_id, k.last_trade_id) for k in around]
    assert all(a[1] < b[0] for a, b in itertools.pairwise(ids))
    assert market.klines("BTCUSDT", "1m", 4090, 4100) == around


def test_intermediate_states_grow_into_the_final_candle() -> None:
    market = Market(["ETHUSDT"], seed=2, start_ms=START, empty_ratio=0.0)
    final = market.kline("ETHUSDT", "1m", 5)
    states = [market.kline("ETHUSDT", "1m", 5, as_of) for as_of in range(2000, 60_001, 2000)]
    assert not any(s.closed for s in states)
    trades = [s.trades for s in states]
    assert trades == sorted(trades)
    assert states[-1].trades == final.trades
    assert msgspec.structs.replace(states[-1], closed=True) == final


def test_kline_bytes_match_a_recorded_binance_frame() -> None:
    recording = next(r for r in load_recordings() if "binance-us" in r.name)
    text = next(t for _, t in recording.frames if '"x":true' in t)
    data = msgspec.json.decode(text)["data"]
    event = msgspec.json.decode(msgspec.json.encode(data), type=KlineEvent)
    # Re-encoding the decoded event gives Binance's bytes: same keys, order, formatting.
    encoded = wire.kline_payload(event.event_time, event.kline)
    assert wire.combined("omgbusd@kline_1m", encoded).decode() == text


def test_rest_row_has_binances_twelve_fields() -> None:
    rows = msgspec.json.decode(
        (fixtures_dir() / "rest-klines-btcusdt-1m-2021-10-22.json").read_bytes()
    )
    market = Market(["BTCUSDT"], seed=0, start_ms=START)
    row = market.kline("BTCUSDT", "1m", 0).rest_row()
    assert [type(v) for v in row] == [type(v) for v in rows[0]]
    assert len(row) == 12


def test_stream_names() -> None:
    def known(symbol: str) -> bool:
        return symbol == "BTCUSDT"

    assert parse_kline_stream("btcusdt@kline_1m", known) == ("BTCUSDT", "1m")
    assert parse_kline_stream("btcusdt@kline_1M", known) == ("BTCUSDT", "1M")
    assert parse_kline_stream("BTCUSDT@kline_1m", known) is None  # uppercase: silence
    assert parse_kline_stream("ethusdt@kline_1m", known) is None  # unknown symbol
    assert parse_kline_stream("btcusdt@kline_2m", known) is None  # unknown interval
    assert parse_kline_stream("btcusdt@aggTrade", known) is None  # other stream type


def test_fault_schedule_text_form() -> None:
    fault = ScheduledFault.parse("refuse:418:3:30@1.5/60")
    assert fault == ScheduledFault("refuse", 1.5, 60.0, ("418", "3", "30"))
    assert ScheduledFault.parse("drop") == ScheduledFault("drop")
    with pytest.raises(ValueError, match="unknown fault"):
        ScheduledFault.parse("explode@1")
