"""Binance's wire format: stream names, kline events as they arrive, and their decoding.

Structs mirror Binance's one-letter keys (renamed to readable attributes) so msgspec validates a
frame in one pass; anything that does not fit is classified, never raised past the reader.
"""

from __future__ import annotations

import re
from typing import Final, Literal

import msgspec

from loader.intervals import next_open
from loader.schema import Candle

# JSON's own number grammar: what Binance sends as a decimal string must be emittable verbatim.
_NUMBER: Final = r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_JSON_NUMBER: Final = re.compile(_NUMBER, re.ASCII)
_EIGHT_NUMBERS: Final = re.compile(rf"(?:{_NUMBER},){{7}}{_NUMBER}", re.ASCII)


def stream_name(symbol: str, interval: str) -> str:
    """Binance stream names carry the symbol in lowercase; uppercase ones get silence."""
    return f"{symbol.lower()}@kline_{interval}"


def stream_path(names: tuple[str, ...] | list[str]) -> str:
    """A raw path for one stream, a combined one for several (payloads then come wrapped)."""
    if len(names) == 1:
        return f"/ws/{names[0]}"
    return "/stream?streams=" + "/".join(names)


def next_open_time(open_time: int, interval: str) -> int:
    """Open time of the candle after the one opening at `open_time` (months are calendar months)."""
    return next_open(interval, open_time)


class Kline(msgspec.Struct, frozen=True):
    open_time: int = msgspec.field(name="t")
    close_time: int = msgspec.field(name="T")
    symbol: str = msgspec.field(name="s")
    interval: str = msgspec.field(name="i")
    first_trade_id: int = msgspec.field(name="f")
    last_trade_id: int = msgspec.field(name="L")
    open: str = msgspec.field(name="o")
    close: str = msgspec.field(name="c")
    high: str = msgspec.field(name="h")
    low: str = msgspec.field(name="l")
    volume: str = msgspec.field(name="v")
    number_of_trades: int = msgspec.field(name="n")
    is_closed: bool = msgspec.field(name="x")
    quote_asset_volume: str = msgspec.field(name="q")
    taker_buy_base_asset_volume: str = msgspec.field(name="V")
    taker_buy_quote_asset_volume: str = msgspec.field(name="Q")


class KlineEvent(msgspec.Struct, frozen=True, tag_field="e", tag="kline"):
    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    kline: Kline = msgspec.field(name="k")


class ServerShutdown(msgspec.Struct, frozen=True, tag_field="e", tag="serverShutdown"):
    event_time: int = msgspec.field(name="E")


Event = KlineEvent | ServerShutdown


class Combined(msgspec.Struct, frozen=True):
    stream: str
    data: Event


Malformed = Literal[
    "binary", "oversize", "invalid_json", "unknown_event", "invalid_kline", "invalid_number"
]


class BadFrame(Exception):
    """A frame the worker skips; `kind` is what metrics and logs count it under."""

    def __init__(self, kind: Malformed, detail: str) -> None:
        self.kind: Malformed = kind
        super().__init__(detail)


class FrameDecoder:
    """Decodes frames of one connection: raw (`/ws/...`) or combined (`/stream?...`)."""

    def __init__(self, *, combined: bool, max_size: int = 64 * 1024) -> None:
        self.combined = combined
        self.max_size = max_size
        self._decode = msgspec.json.Decoder(Combined if combined else Event).decode

    def decode(self, frame: str | bytes) -> Event:
        if isinstance(frame, bytes):
            raise BadFrame("binary", f"binary frame of {len(frame)} bytes")
        if len(frame) > self.max_size:
            raise BadFrame("oversize", f"frame of {len(frame)} characters")
        try:
            decoded = self._decode(frame)
        except msgspec.DecodeError as exc:
            raise self._classify(frame, exc) from None
        return decoded.data if isinstance(decoded, Combined) else decoded

    def _classify(self, frame: str, exc: msgspec.DecodeError) -> BadFrame:
        if not isinstance(exc, msgspec.ValidationError):
            return BadFrame("invalid_json", str(exc))
        # Only the failure path pays for a second, untyped decode to say what the frame was.
        obj = msgspec.json.decode(frame)
        if self.combined and isinstance(obj, dict):
            obj = obj.get("data")
        event = obj.get("e") if isinstance(obj, dict) else None
        if event in ("kline", "serverShutdown"):
            return BadFrame("invalid_kline", str(exc))
        return BadFrame("unknown_event", f"event {event!r}")


def to_candle(kline: Kline, *, with_state: bool = False) -> Candle:
    """The published form of a kline: numbers as JSON numbers, digits exactly as Binance sent."""
    k = kline
    numbers = (
        k.open, k.high, k.low, k.close, k.volume,
        k.quote_asset_volume, k.taker_buy_base_asset_volume, k.taker_buy_quote_asset_volume,
    )  # fmt: skip
    # One match over all eight (commas cannot occur inside a number) costs a fraction of eight.
    if not _EIGHT_NUMBERS.fullmatch(",".join(numbers)):
        bad = next(n for n in numbers if not _JSON_NUMBER.fullmatch(n))
        raise BadFrame("invalid_number", f"{bad!r} is not a decimal number")
    o, h, low, c, v, q, tb, tq = map(msgspec.Raw, numbers)
    return Candle(
        open_time=k.open_time,
        open=o,
        high=h,
        low=low,
        close=c,
        volume=v,
        close_time=k.close_time,
        quote_asset_volume=q,
        number_of_trades=k.number_of_trades,
        taker_buy_base_asset_volume=tb,
        taker_buy_quote_asset_volume=tq,
        symbol=k.symbol,
        interval=k.interval,
        is_closed=k.is_closed if with_state else msgspec.UNSET,
    )
