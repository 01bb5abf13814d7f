"""A deterministic market: the candles the emulator streams, serves as history and calls truth.

Every ``(symbol, interval)`` pair is its own series of candles, a pure function of the seed:
candle ``i`` is derived from a per-candle pseudo-random stream plus the close price and last
trade id of candle ``i - 1``, so the same seed always yields the same candles, whichever
connection, history request or test asks first. Series are independent of each other: a
``5m`` candle is not the sum of five ``1m`` candles (that would make a ``1M`` candle cost
tens of thousands of ``1m`` ones to compute).

Inside a candle, trading happens as a handful of "bursts" at fixed offsets from the open; a
burst is ``count`` trades at one price. The state of a candle "as of" an offset aggregates the
bursts before it, which is what every intermediate stream update shows. Prices, quantities
and quote volumes are integers in units of 1e-8, the precision Binance prints, so every
decimal string is exact.

The first candle of each interval is the one containing the market's start instant; there is
no history before it (as for a symbol listed at that moment). Candles are generated in
chunks of 4096: within a chunk the walk and the trade ids are continuous; a chunk restarts
the walk near the symbol's start price and its trade ids leave a gap, so reaching candle
10,000,000 of a ``1s`` series costs one chunk of work, not ten million candles.
"""

from __future__ import annotations

import functools
import hashlib
import struct
import zlib
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from loader.testing import intervals as iv

__all__ = [
    "DEFAULT_SYMBOLS",
    "Kline",
    "KlineEvent",
    "Market",
    "SymbolSpec",
    "format_units",
]

#: Symbols the emulator knows when none are configured.
DEFAULT_SYMBOLS: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT")

_UNIT = 100_000_000  # 1e8: Binance prints 8 decimals
_M64 = (1 << 64) - 1
_MAX_BURSTS = 7  # one 64-bit random word each, plus one for the candle
_BURST_TRADES = 40  # most trades in one burst
_MAX_TRADES = _MAX_BURSTS * _BURST_TRADES
_CHUNK = 4096  # candles generated in sequence; see Market._chunk_start


class Kline(msgspec.Struct, frozen=True, gc=False):
    """One kline exactly as Binance puts it in a stream event's ``"k"`` object.

    Attribute names are readable; the wire names (and their order, which is Binance's) come
    from the ``name=`` of each field, so ``msgspec.json.encode(kline)`` gives Binance's bytes
    and ``msgspec.json.decode(raw, type=Kline)`` reads a real one.
    """

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
    trades: int = msgspec.field(name="n")
    closed: bool = msgspec.field(name="x")
    quote_volume: str = msgspec.field(name="q")
    taker_buy_volume: str = msgspec.field(name="V")
    taker_buy_quote_volume: str = msgspec.field(name="Q")
    ignore: str = msgspec.field(name="B", default="0")

    def rest_row(self) -> list[int | str]:
        """This kline as a row of ``/api/v3/klines`` (and WebSocket API ``klines``)."""
        return [
            self.open_time,
            self.open,
            self.high,
            self.low,
            self.close,
            self.volume,
            self.close_time,
            self.quote_volume,
            self.trades,
            self.taker_buy_volume,
            self.taker_buy_quote_volume,
            "0",
        ]


class KlineEvent(msgspec.Struct, frozen=True, gc=False):
    """A ``<symbol>@kline_<interval>`` stream payload: ``{"e":"kline","E":..,"s":..,"k":{..}}``."""

    event_type: str = msgspec.field(name="e")
    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    kline: Kline = msgspec.field(name="k")


@functools.lru_cache(maxsize=1 << 16)
def format_units(units: int) -> str:
    """``123456789`` -> ``"1.23456789"``: Binance's fixed 8-decimal rendering."""
    # Cached: prices revisit the same few ticks, and this runs seven times per frame.
    whole, frac = divmod(units, _UNIT)
    return f"{whole}.{frac:08d}"


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """How a symbol trades. All amounts are integers in units of 1e-8.

    ``tick * lot`` is a multiple of 1e8 so that every quote volume (price * quantity) is
    exact at 8 decimals, as on Binance.
    """

    symbol: str
    start_price: int
    tick: int
    lot: int
    #: Largest move of one burst, in ticks.
    max_step: int
    #: Largest burst size, in lots.
    max_lots: int
    first_trade_id: int


_KNOWN: dict[str, tuple[int, int, int, int, int]] = {
    # symbol: (start price, tick, lot, max step ticks, max lots)
    "BTCUSDT": (60_000 * _UNIT, 1_000_000, 1_000, 300, 2_000),
    "ETHUSDT": (3_500 * _UNIT, 1_000_000, 10_000, 40, 5_000),
    "BNBUSDT": (450 * _UNIT, 1_000_000, 100_000, 8, 2_000),
    "SOLUSDT": (150 * _UNIT, 1_000_000, 100_000, 5, 3_000),
    "XRPUSDT": (_UNIT // 2, 10_000, 10_000_000, 6, 5_000),
}


def _symbol_hash(symbol: str) -> int:
    return zlib.crc32(symbol.encode())


def _splitmix(state: int) -> int:
    z = (state + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def symbol_spec(symbol: str, seed: int) -> SymbolSpec:
    """The trading parameters of ``symbol``: a fixed table for the defaults, else derived."""
    r = _splitmix((seed * 0x100000001B3) ^ _symbol_hash(symbol))
    first_id = 1_000_000 + r % 900_000_000
    known = _KNOWN.get(symbol)
    if known is not None:
        price, tick, lot, step, lots = known
        return SymbolSpec(symbol, price, tick, lot, step, lots, first_id)
    # Synthetic symbols: 1 to 1000 quote units, tick 0.0001, lot 0.01.
    price = (1 + (r >> 32) % 1000) * _UNIT
    return SymbolSpec(symbol, price, 10_000, 1_000_000, 20, 500, first_id)


_INTERVAL_CODES = {name: i for i, name in enumerate(iv.INTERVALS)}
_KEY = struct.Struct("<QQ")
_WORDS = struct.Struct("<8Q")


class _Candle:
    """The trading inside one candle: bursts sorted by offset from the open.

    A burst is ``(offset ms, price, trade count, quantity, taker is buyer)``.
    """

    __slots__ = ("bursts", "final", "first_id", "prev_close", "totals", "trades")

    def __init__(
        self,
        prev_close: int,
        first_id: int,
        bursts: list[tuple[int, int, int, int, bool]],
        totals: tuple[int, int, int, int, int, int, int] = (0, 0, 0, 0, 0, 0, 0),
    ) -> None:
        self.prev_close = prev_close
        self.first_id = first_id
        self.bursts = bursts
        #: Whole-candle (high, low, volume, quote, buy volume, buy quote, trades), summed
        #: while generating so the closing frame needs no second pass.
        self.totals = totals
        self.trades = totals[6]
        self.final: Kline | None = None

    def count_before(self, offset: int | None) -> int:
        """How many bursts happened strictly before ``offset`` (all of them for ``None``)."""
        if offset is None:
            return len(self.bursts)
        n = 0
        for burst in self.bursts:
            if burst[0] >= offset:
                break
            n += 1
        return n


class _Series:
    __slots__ = ("cache", "chunks", "interval", "key", "length", "spec")

    def __init__(self, spec: SymbolSpec, interval: str, seed: int) -> None:
        self.spec = spec
        self.interval = interval
        self.length = iv.interval_ms(interval)
        self.key = _splitmix(
            (seed & _M64) ^ (_symbol_hash(spec.symbol) << 8) ^ _INTERVAL_CODES[interval]
        )
        # Per chunk of candles, per candle: close price and the last trade id so far (carried
        # over empty candles). Compact arrays: a benchmark can produce millions of candles.
        self.chunks: dict[int, tuple[array[int], array[int]]] = {}
        self.cache: dict[int, _Candle] = {}


class Market:
    """Deterministic candles for a set of symbols, from a seed and a start instant.

    Args:
        symbols: the symbols that trade (Binance's uppercase form, e.g. ``"BTCUSDT"``).
        seed: the same seed gives the same candles.
        start_ms: the market's start; the first candle of each interval contains it.
        empty_ratio: the share of candles without any trade.
    """

    def __init__(
        self,
        symbols: Iterable[str],
        *,
        seed: int,
        start_ms: int,
        empty_ratio: float = 0.1,
    ) -> None:
        self.seed = seed
        self.start_ms = start_ms
        self.empty_ratio = empty_ratio
        self._empty_threshold = int(empty_ratio * 10_000)
        self._specs = {s: symbol_spec(s, seed) for s in symbols}
        self._series: dict[tuple[str, str], _Series] = {}
        self._first_open = {i: iv.candle_open(i, start_ms) for i in iv.INTERVALS}

    @property
    def symbols(self) -> tuple[str, ...]:
        """The known symbols, in configuration order."""
        return tuple(self._specs)

    def has_symbol(self, symbol: str) -> bool:
        """Whether ``symbol`` (uppercase) trades here."""
        return symbol in self._specs

    def spec(self, symbol: str) -> SymbolSpec:
        """How ``symbol`` trades (tick, lot, ...); ``KeyError`` if it does not."""
        return self._specs[symbol]

    def first_open(self, interval: str) -> int:
        """Open time of candle 0 of ``interval``: the candle containing the start instant."""
        return self._first_open[interval]

    def open_time(self, interval: str, index: int) -> int:
        """Open time of candle ``index`` of ``interval``."""
        return iv.open_at(interval, self._first_open[interval], index)

    def index_at(self, interval: str, ms: int) -> int:
        """Index of the candle of ``interval`` containing ``ms`` (negative before the start)."""
        return iv.index_of(interval, self._first_open[interval], ms)

    def _get_series(self, symbol: str, interval: str) -> _Series:
        series = self._series.get((symbol, interval))
        if series is None:
            series = _Series(self._specs[symbol], interval, self.seed)
            self._series[(symbol, interval)] = series
        return series

    def _chunk_start(self, series: _Series, chunk: int) -> tuple[int, int]:
        """Price and last trade id before the first candle of ``chunk``.

        Chunks restart the walk from an anchor near the start price (a bounded jump once
        every ``_CHUNK`` candles) and leave room for the most trades a chunk can hold, so a
        candle far from the start costs at most one chunk of work, not every candle before
        it, and prices do not drift away over long runs.
        """
        spec = series.spec
        first_before = spec.first_trade_id - 1 + chunk * _CHUNK * _MAX_TRADES
        if chunk == 0:
            return spec.start_price, first_before
        reach = 100 * spec.max_step
        r = _splitmix(series.key ^ chunk)
        price = spec.start_price + (r % (2 * reach + 1) - reach) * spec.tick
        return max(price, spec.tick), first_before

    def _candle(self, series: _Series, index: int) -> _Candle:
        cached = series.cache.get(index)
        if cached is not None:
            return cached
        chunk, j = divmod(index, _CHUNK)
        arrays = series.chunks.get(chunk)
        if arrays is None:
            arrays = series.chunks[chunk] = (array("q"), array("q"))
        closes, last_ids = arrays
        while len(closes) < j:
            self._candle(series, chunk * _CHUNK + len(closes))
        if j == 0:
            prev_close, prev_last = self._chunk_start(series, chunk)
        else:
            prev_close, prev_last = closes[j - 1], last_ids[j - 1]
        candle = self._generate(series, index, prev_close, prev_last)
        if len(closes) == j:
            closes.append(candle.bursts[-1][1] if candle.bursts else prev_close)
            last_ids.append(prev_last + candle.trades)
        # Streams walk forward through recent candles; older ones are rebuilt if asked.
        if len(series.cache) >= 4:
            del series.cache[next(iter(series.cache))]
        series.cache[index] = candle
        return candle

    def _generate(self, series: _Series, index: int, prev_close: int, prev_last: int) -> _Candle:
        # One keyed hash gives all the randomness of a candle: eight 64-bit words.
        digest = hashlib.blake2b(_KEY.pack(series.key, index), digest_size=64).digest()
        head, *words = _WORDS.unpack(digest)
        if head % 10_000 < self._empty_threshold:
            return _Candle(prev_close, prev_last + 1, [])
        length = series.length
        if length is None:
            opened = self.open_time(series.interval, index)
            length = iv.next_open(series.interval, opened) - opened
        spec = series.spec
        draws = sorted((w % length, w >> 32) for w in words[: 1 + (head >> 16) % _MAX_BURSTS])
        tick = spec.tick
        lot = spec.lot
        span = 2 * spec.max_step + 1
        max_step = spec.max_step
        max_lots = spec.max_lots
        price = prev_close
        bursts = []
        high = 0
        low = 1 << 62
        volume = quote = buy_volume = buy_quote = trades = 0
        for offset, bits in draws:
            price += (bits % span - max_step) * tick
            price = max(price, tick)
            count = 1 + (bits >> 10) % _BURST_TRADES
            qty = (1 + (bits >> 16) % max_lots) * lot
            buy = bool(bits >> 31 & 1)
            bursts.append((offset, price, count, qty, buy))
            q = price * qty // _UNIT
            volume += qty
            quote += q
            trades += count
            if buy:
                buy_volume += qty
                buy_quote += q
            high = max(high, price)
            low = min(low, price)
        totals = (high, low, volume, quote, buy_volume, buy_quote, trades)
        return _Candle(prev_close, prev_last + 1, bursts, totals)

    def kline(self, symbol: str, interval: str, index: int, as_of: int | None = None) -> Kline:
        """Candle ``index`` of ``(symbol, interval)``.

        With ``as_of=None`` it is the final candle (``closed=True``); otherwise its state
        after ``as_of`` ms of trading, as an intermediate update shows it (``closed=False``).
        """
        series = self._series.get((symbol, interval))
        if series is None:
            series = self._get_series(symbol, interval)
        candle = self._candle(series, index)
        if as_of is None and candle.final is not None:
            return candle.final
        length = series.length
        if length is None:
            open_ms = self.open_time(interval, index)
            close_ms = iv.next_open(interval, open_ms) - 1
        else:
            open_ms = self._first_open[interval] + index * length
            close_ms = open_ms + length - 1
        n = candle.count_before(as_of)
        closed = as_of is None
        if n == 0:
            p = format_units(candle.prev_close)
            zero = "0.00000000"
            kline = Kline(
                open_ms, close_ms, symbol, interval, -1, -1, p, p, p, p, zero, 0,
                closed, zero, zero, zero,
            )  # fmt: skip
        elif closed:
            bursts = candle.bursts
            high, low, volume, quote, buy_volume, buy_quote, trades = candle.totals
            kline = Kline(
                open_ms,
                close_ms,
                symbol,
                interval,
                candle.first_id,
                candle.first_id + trades - 1,
                format_units(bursts[0][1]),
                format_units(bursts[-1][1]),
                format_units(high),
                format_units(low),
                format_units(volume),
                trades,
                True,
                format_units(quote),
                format_units(buy_volume),
                format_units(buy_quote),
            )
        else:
            kline = self._aggregate(
                candle,
                n,
                open_ms=open_ms,
                close_ms=close_ms,
                symbol=symbol,
                interval=interval,
                closed=closed,
            )
        if closed:
            candle.final = kline
        return kline

    @staticmethod
    def _aggregate(
        candle: _Candle,
        n: int,
        *,
        open_ms: int,
        close_ms: int,
        symbol: str,
        interval: str,
        closed: bool,
    ) -> Kline:
        bursts = candle.bursts
        volume = quote = buy_volume = buy_quote = trades = 0
        high = low = bursts[0][1]
        for k in range(n):
            _, price, count, qty, buy = bursts[k]
            q = price * qty // _UNIT
            volume += qty
            quote += q
            trades += count
            if buy:
                buy_volume += qty
                buy_quote += q
            if price > high:
                high = price
            elif price < low:
                low = price
        return Kline(
            open_ms,
            close_ms,
            symbol,
            interval,
            candle.first_id,
            candle.first_id + trades - 1,
            format_units(bursts[0][1]),
            format_units(bursts[n - 1][1]),
            format_units(high),
            format_units(low),
            format_units(volume),
            trades,
            closed,
            format_units(quote),
            format_units(buy_volume),
            format_units(buy_quote),
        )

    def klines(self, symbol: str, interval: str, first: int, stop: int) -> list[Kline]:
        """Final candles ``first`` to ``stop - 1`` (clamped at 0) of ``(symbol, interval)``."""
        return [self.kline(symbol, interval, i) for i in range(max(first, 0), stop)]
