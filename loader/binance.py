"""Binance's wire format: stream names, kline events as they arrive, and their decoding.

Structs mirror Binance's one-letter keys (renamed to readable attributes) so msgspec validates a
frame in one pass; anything that does not fit is classified, never raised past the reader.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Final, Literal, cast

import msgspec

from loader.schema import Candle, Record

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


class KlineUpdate(msgspec.Struct, frozen=True, gc=False):
    """An in-progress kline update only looked at (`FrameDecoder(updates=False)`): which
    stream it is for and which candle, enough to know the stream is alive."""

    open_time: int = msgspec.field(name="t")
    symbol: str = msgspec.field(name="s")
    interval: str = msgspec.field(name="i")
    is_closed: bool = msgspec.field(name="x")


class BadFrame(Exception):
    """A frame the worker skips; `kind` is what metrics and logs count it under."""

    def __init__(self, kind: Malformed, detail: str) -> None:
        self.kind: Malformed = kind
        super().__init__(detail)


class FrameDecoder:
    """Decodes frames of one connection: raw (`/ws/...`) or combined (`/stream?...`).

    With `updates=False` (CANDLES=closed) an in-progress update is only looked at: a frame
    holding `"x":false` is read for four fields (stream, open time, state) and comes back as a
    `KlineUpdate`, without the sixteen-field `Kline`, its eight strings and two wrappers. Most
    frames are such updates (29 of 30 on a 1m stream). A frame the look cannot read, or that
    turns out closed, is decoded in full, so nothing is dropped on a guess.
    """

    def __init__(self, *, combined: bool, max_size: int = 64 * 1024, updates: bool = True) -> None:
        self.combined = combined
        self.max_size = max_size
        self.updates = updates
        self._decode = msgspec.json.Decoder(Combined if combined else Event).decode
        looker = msgspec.json.Decoder(_CombinedUpdate if combined else KlineUpdateEvent).decode
        self._look = cast(Callable[[str], _CombinedUpdate | KlineUpdateEvent], looker)

    def decode(self, frame: str | bytes) -> Event | KlineUpdateEvent:
        if isinstance(frame, bytes):
            raise BadFrame("binary", f"binary frame of {len(frame)} bytes")
        if len(frame) > self.max_size:
            raise BadFrame("oversize", f"frame of {len(frame)} characters")
        if not self.updates and _IN_PROGRESS in frame:
            try:
                looked = self._look(frame)
            except msgspec.DecodeError:
                pass  # the full decode below says what is wrong with it
            else:
                update = looked.data if isinstance(looked, _CombinedUpdate) else looked
                if not update.kline.is_closed:
                    return update
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


_IN_PROGRESS: Final = '"x":false'


class KlineUpdateEvent(msgspec.Struct, frozen=True, gc=False):
    """An in-progress update only looked at: its event time and its `KlineUpdate`, read the
    way a `KlineEvent` is (`event_time`, `kline`)."""

    event: Literal["kline"] = msgspec.field(name="e")
    event_time: int = msgspec.field(name="E")
    kline: KlineUpdate = msgspec.field(name="k")


class _CombinedUpdate(msgspec.Struct, frozen=True, gc=False):
    data: KlineUpdateEvent


def _bad_number(numbers: tuple[str, ...]) -> BadFrame:
    bad = next(n for n in numbers if not _JSON_NUMBER.fullmatch(n))
    return BadFrame("invalid_number", f"{bad!r} is not a decimal number")


def to_candle(kline: Kline, *, with_state: bool = False) -> Candle:
    """The published form of a kline: numbers as JSON numbers, digits exactly as Binance sent."""
    k = kline
    numbers = (
        k.open, k.high, k.low, k.close, k.volume,
        k.quote_asset_volume, k.taker_buy_base_asset_volume, k.taker_buy_quote_asset_volume,
    )  # fmt: skip
    if not _EIGHT_NUMBERS.fullmatch(",".join(numbers)):
        raise _bad_number(numbers)
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


class RecordEncoder:
    """Kafka records of klines: the value built once as JSON bytes, the key per stream cached.

    The bytes are exactly what encoding `to_candle(kline)` with msgspec gives (a test holds
    them equal), without building a `Candle` and eight `Raw`s per candle to encode them.
    Only streams the worker reads come here, so the caches stay as small as the stream list.
    """

    def __init__(self, *, with_state: bool = False) -> None:
        self.with_state = with_state
        # (symbol, interval) -> (key, the value's tail for a closed and an open candle)
        self._streams: dict[tuple[str, str], tuple[bytes, str, str]] = {}

    def __call__(self, k: Kline) -> Record:
        numbers = (
            k.open, k.high, k.low, k.close, k.volume, k.quote_asset_volume,
            k.taker_buy_base_asset_volume, k.taker_buy_quote_asset_volume,
        )  # fmt: skip
        # They go into the value verbatim, so they must be JSON numbers; one match over all
        # eight (commas cannot occur inside a number) costs a fraction of eight.
        if not _EIGHT_NUMBERS.fullmatch(",".join(numbers)):
            raise _bad_number(numbers)
        stream = (k.symbol, k.interval)
        known = self._streams.get(stream)
        if known is None:
            known = self._streams[stream] = self._stream(*stream)
        key, closed_tail, open_tail = known
        value = (
            f'{{"open_time":{k.open_time},"open":{k.open},"high":{k.high},"low":{k.low},'
            f'"close":{k.close},"volume":{k.volume},"close_time":{k.close_time},'
            f'"quote_asset_volume":{k.quote_asset_volume},'
            f'"number_of_trades":{k.number_of_trades},'
            f'"taker_buy_base_asset_volume":{k.taker_buy_base_asset_volume},'
            f'"taker_buy_quote_asset_volume":{k.taker_buy_quote_asset_volume}'
            f"{closed_tail if k.is_closed else open_tail}"
        )
        return key, value.encode()

    def _stream(self, symbol: str, interval: str) -> tuple[bytes, str, str]:
        tail = (
            f',"symbol":{msgspec.json.encode(symbol).decode()}'
            f',"interval":{msgspec.json.encode(interval).decode()}'
        )
        if not self.with_state:
            return f"{symbol}-{interval}".encode(), tail + "}", tail + "}"
        return (
            f"{symbol}-{interval}".encode(),
            tail + ',"is_closed":true}',
            tail + ',"is_closed":false}',
        )
