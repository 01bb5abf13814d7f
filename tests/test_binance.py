"""Binance frame decoding against the real recorded frames in ../shared/fixtures/binance."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from loader.binance import (
    BadFrame,
    FrameDecoder,
    KlineEvent,
    KlineUpdate,
    KlineUpdateEvent,
    RecordEncoder,
    ServerShutdown,
    stream_name,
    stream_path,
    to_candle,
)
from loader.intervals import next_open
from loader.testing import fixtures_dir

FIXTURES = fixtures_dir()
RECORDINGS = sorted(FIXTURES.glob("*.ws"))
CANDLE_FIELDS = [
    "open_time", "open", "high", "low", "close", "volume", "close_time", "quote_asset_volume",
    "number_of_trades", "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume", "symbol",
    "interval",
]  # fmt: skip


def frames(path: Path) -> list[str]:
    lines = path.read_text().splitlines()[1:]
    return [line.split(": ", 1)[1] for line in lines if line]


def test_fixtures_are_present() -> None:
    assert len(RECORDINGS) == 2, f"expected the recorded sessions in {FIXTURES}"


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_recorded_klines_become_candles_with_binance_digits(path: Path) -> None:
    decoder = FrameDecoder(combined=True)
    klines = 0
    for frame in frames(path):
        wire = json.loads(frame)
        if wire["data"].get("e") != "kline":
            with pytest.raises(BadFrame) as caught:
                decoder.decode(frame)
            assert caught.value.kind == "unknown_event"
            continue
        event = decoder.decode(frame)
        assert isinstance(event, KlineEvent)
        klines += 1
        k = wire["data"]["k"]
        published = json.loads(msgspec.json.encode(to_candle(event.kline)), parse_float=Decimal)
        assert list(published) == CANDLE_FIELDS
        expected = {
            "open_time": k["t"], "open": Decimal(k["o"]), "high": Decimal(k["h"]),
            "low": Decimal(k["l"]), "close": Decimal(k["c"]), "volume": Decimal(k["v"]),
            "close_time": k["T"], "quote_asset_volume": Decimal(k["q"]),
            "number_of_trades": k["n"], "taker_buy_base_asset_volume": Decimal(k["V"]),
            "taker_buy_quote_asset_volume": Decimal(k["Q"]), "symbol": k["s"], "interval": k["i"],
        }  # fmt: skip
        assert published == expected
        # Numbers, not strings: a consumer's plain json.loads gives floats and ints.
        assert all(
            not isinstance(v, str) for f, v in published.items() if f not in ("symbol", "interval")
        )
    assert klines > 0


def test_raw_stream_frames_are_the_unwrapped_payload() -> None:
    path = FIXTURES / "binance-us-combined-2021-10-11.ws"
    kline_frames = [f for f in frames(path) if '"e":"kline"' in f]
    payload = json.dumps(json.loads(kline_frames[0])["data"])
    event = FrameDecoder(combined=False).decode(payload)
    assert isinstance(event, KlineEvent)
    assert event.kline.symbol == "OMGBUSD"


def test_closing_frame_of_the_recorded_candle() -> None:
    path = FIXTURES / "binance-us-combined-2021-10-11.ws"
    decoder = FrameDecoder(combined=True)
    closed = []
    for frame in frames(path):
        try:
            event = decoder.decode(frame)
        except BadFrame:
            continue
        if isinstance(event, KlineEvent) and event.kline.is_closed:
            closed.append(event.kline)
    assert [(k.symbol, k.open_time, k.number_of_trades) for k in closed] == [
        ("OMGBUSD", 1633998240000, 14)
    ]


def test_server_shutdown_wrapped_and_raw() -> None:
    wrapped = '{"stream":"btcusdt@kline_1m","data":{"e":"serverShutdown","E":1700000000000}}'
    assert FrameDecoder(combined=True).decode(wrapped) == ServerShutdown(1700000000000)
    raw = '{"e":"serverShutdown","E":1700000000000}'
    assert FrameDecoder(combined=False).decode(raw) == ServerShutdown(1700000000000)


KLINE = (
    '{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":0,"T":59999,"s":"BTCUSDT","i":"1m","f":-1,'
    '"L":-1,"o":"%s","c":"1","h":"1","l":"1","v":"0","n":0,"x":true,"q":"0","V":"0","Q":"0",'
    '"B":"0"}}'
)


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        (b"\x00\x01", "binary"),
        ("{" + " " * 70_000 + "}", "oversize"),
        ('{"e":"kline",', "invalid_json"),
        ("[1,2,3]", "unknown_event"),
        ('{"e":"24hrTicker","E":1}', "unknown_event"),
        ('{"result":null,"id":1}', "unknown_event"),
        ('{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":"soon"}}', "invalid_kline"),
    ],
)
def test_malformed_frames_are_classified(frame: str | bytes, kind: str) -> None:
    with pytest.raises(BadFrame) as caught:
        FrameDecoder(combined=False).decode(frame)
    assert caught.value.kind == kind


@pytest.mark.parametrize("number", ["NaN", "1e", "+1", ".5", "1_000", "0x10", " 1", ""])
def test_numbers_that_are_not_json_numbers_are_refused(number: str) -> None:
    event = FrameDecoder(combined=False).decode(KLINE % number)
    assert isinstance(event, KlineEvent)
    with pytest.raises(BadFrame) as caught:
        to_candle(event.kline)
    assert caught.value.kind == "invalid_number"


def test_in_progress_updates_carry_their_state_only_when_asked() -> None:
    event = FrameDecoder(combined=False).decode(KLINE % "1.5")
    assert isinstance(event, KlineEvent)
    assert b"is_closed" not in msgspec.json.encode(to_candle(event.kline))
    assert json.loads(msgspec.json.encode(to_candle(event.kline, with_state=True)))["is_closed"]


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
@pytest.mark.parametrize("with_state", [False, True])
def test_records_are_the_candles_encoded_with_their_stream_as_key(
    path: Path, with_state: bool
) -> None:
    decoder, encode = FrameDecoder(combined=True), RecordEncoder(with_state=with_state)
    klines = [e.kline for f in frames(path) if '"e":"kline"' in f
              if isinstance(e := decoder.decode(f), KlineEvent)]  # fmt: skip
    assert klines
    for k in klines:
        key, value = encode(k)
        assert key == f"{k.symbol}-{k.interval}".encode()
        assert value == msgspec.json.encode(to_candle(k, with_state=with_state))


@pytest.mark.parametrize("number", ["NaN", "1e", "+1", ".5", "1,5", ""])
def test_records_refuse_numbers_that_are_not_json_numbers(number: str) -> None:
    event = FrameDecoder(combined=False).decode(KLINE % number)
    assert isinstance(event, KlineEvent)
    with pytest.raises(BadFrame) as caught:
        RecordEncoder()(event.kline)
    assert caught.value.kind == "invalid_number"
    assert repr(number) in str(caught.value)


@pytest.mark.parametrize("path", RECORDINGS, ids=lambda p: p.name)
def test_closed_only_decoding_looks_at_updates_and_decodes_the_rest(path: Path) -> None:
    full, closed_only = FrameDecoder(combined=True), FrameDecoder(combined=True, updates=False)
    looked = 0
    for frame in frames(path):
        try:
            expected: object = full.decode(frame)
        except BadFrame as bad:
            expected = bad.kind
        try:
            got: object = closed_only.decode(frame)
        except BadFrame as bad:
            got = bad.kind
        if isinstance(expected, KlineEvent) and not expected.kline.is_closed:
            k = expected.kline
            update = KlineUpdate(k.open_time, k.symbol, k.interval, is_closed=False)
            # The look keeps the event time too: it is what a gap is measured from.
            assert got == KlineUpdateEvent("kline", expected.event_time, update)
            looked += 1
        else:
            assert got == expected
    assert looked > 0


@pytest.mark.parametrize(
    ("frame", "kind"),
    [
        # Looks like an update, but is no kline event: the full decode classifies it.
        ('{"e":"24hrTicker","E":1,"k":{"t":0,"s":"X","i":"1m","x":false}}', "unknown_event"),
        ('{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":"soon","x":false}}', "invalid_kline"),
        ('{"e":"kline","x":false,', "invalid_json"),
    ],
)
def test_closed_only_decoding_classifies_what_only_looks_like_an_update(
    frame: str, kind: str
) -> None:
    with pytest.raises(BadFrame) as caught:
        FrameDecoder(combined=False, updates=False).decode(frame)
    assert caught.value.kind == kind


def test_closed_only_decoding_never_drops_a_closed_kline() -> None:
    # "x":false elsewhere in the frame, the kline itself closed: decoded in full.
    frame = (KLINE % "1").replace('"B":"0"', '"B":"0","extra":{"x":false}')
    event = FrameDecoder(combined=False, updates=False).decode(frame)
    assert isinstance(event, KlineEvent)
    assert event.kline.is_closed


def test_stream_names_and_paths() -> None:
    assert stream_name("BTCUSDT", "1m") == "btcusdt@kline_1m"
    assert stream_path(["btcusdt@kline_1m"]) == "/ws/btcusdt@kline_1m"
    assert stream_path(["a@kline_1m", "b@kline_1m"]) == "/stream?streams=a@kline_1m/b@kline_1m"


@pytest.mark.parametrize(
    ("open_time", "interval", "expected"),
    [
        (1634943780000, "1m", 1634943840000),
        (1634943780000, "1s", 1634943781000),
        (1609459200000, "1w", 1610064000000),
        (1700000000000 - 1700000000000 % 86_400_000, "3d", 1699920000000 + 3 * 86_400_000),
        (1701388800000, "1M", 1704067200000),  # December -> January crosses the year
        (1706745600000, "1M", 1709251200000),  # February of a leap year
    ],
)
def test_next_open(open_time: int, interval: str, expected: int) -> None:
    assert next_open(interval, open_time) == expected
