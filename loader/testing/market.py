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
no history before it (as for a symbol listed at that moment).
"""

from __future__ import annotations

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
_MAX_BURSTS = 8


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


def format_units(units: int) -> str:
    """``123456789`` -> ``"1.23456789"``: Binance's fixed 8-decimal rendering."""
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


def _splitmix(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return state, z ^ (z >> 31)


def symbol_spec(symbol: str, seed: int) -> SymbolSpec:
    """The trading parameters of ``symbol``: a fixed table for the defaults, else derived."""
    _, r = _splitmix((seed * 0x100000001B3) ^ _symbol_hash(symbol))
    first_id = 1_000_000 + r % 900_000_000
    known = _KNOWN.get(symbol)
    if known is not None:
        price, tick, lot, step, lots = known
        return SymbolSpec(symbol, price, tick, lot, step, lots, first_id)
    # Synthetic symbols: 1 to 1000 quote units, tick 0.0001, lot 0.01.
    price = (1 + (r >> 32) % 1000) * _UNIT
    return SymbolSpec(symbol, price, 10_000, 1_000_000, 20, 500, first_id)


class _Bursts:
    """The trading inside one candle, sorted by offset from the candle's open."""

    __slots__ = ("buys", "counts", "first_id", "offsets", "prev_close", "prices", "qtys")

    def __init__(self, prev_close: int, first_id: int) -> None:
        self.prev_close = prev_close
        self.first_id = first_id
        self.offsets: list[int] = []
        self.prices: list[int] = []
        self.counts: list[int] = []
        self.qtys: list[int] = []
        self.buys: list[bool] = []

    def count_before(self, offset: int | None) -> int:
        """How many bursts happened strictly before ``offset`` (all of them for ``None``)."""
        if offset is None:
            return len(self.offsets)
        n = 0
        for o in self.offsets:
            if o >= offset:
                break
            n += 1
        return n


_INTERVAL_CODES = {name: i for i, name in enumerate(iv.INTERVALS)}


class _Series:
    __slots__ = ("cache", "closes", "interval", "key", "last_ids", "spec")

    def __init__(self, spec: SymbolSpec, interval: str, seed: int) -> None:
        self.spec = spec
        self.interval = interval
        self.key = (
            (seed & _M64) * 0x9E3779B1 ^ _symbol_hash(spec.symbol) << 8 ^ _INTERVAL_CODES[interval]
        ) & _M64
        # Per candle: close price and the last trade id so far (carried over empty candles).
        # Compact arrays, because a benchmark can produce millions of candles.
        self.closes = array("q")
        self.last_ids = array("q")
        self.cache: dict[int, _Bursts] = {}


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

    def _bursts(self, series: _Series, index: int) -> _Bursts:
        cached = series.cache.get(index)
        if cached is not None:
            return cached
        closes = series.closes
        while len(closes) < index:
            self._bursts(series, len(closes))
        spec = series.spec
        if index == 0:
            prev_close, prev_last = spec.start_price, spec.first_trade_id - 1
        else:
            prev_close, prev_last = closes[index - 1], series.last_ids[index - 1]
        bursts = self._generate(series, index, prev_close, prev_last)
        if len(closes) == index:
            closes.append(bursts.prices[-1] if bursts.prices else prev_close)
            series.last_ids.append(prev_last + sum(bursts.counts))
        # Streams walk forward through recent candles; older ones are rebuilt if asked.
        if len(series.cache) >= 4:
            del series.cache[min(series.cache)]
        series.cache[index] = bursts
        return bursts

    def _generate(self, series: _Series, index: int, prev_close: int, prev_last: int) -> _Bursts:
        spec = series.spec
        bursts = _Bursts(prev_close, prev_last + 1)
        state, r = _splitmix(series.key ^ (index * 0xD1B54A32D192ED03 & _M64))
        if r % 10_000 < self._empty_threshold:
            return bursts
        open_ms = self.open_time(series.interval, index)
        length = iv.next_open(series.interval, open_ms) - open_ms
        n = 1 + (r >> 16) % _MAX_BURSTS
        draws = []
        for _ in range(n):
            state, r = _splitmix(state)
            draws.append((r % length, r >> 32))
        draws.sort()
        price = prev_close
        tick = spec.tick
        span = 2 * spec.max_step + 1
        for offset, bits in draws:
            step = bits % span - spec.max_step
            price = max(tick, price + step * tick)
            bursts.offsets.append(offset)
            bursts.prices.append(price)
            bursts.counts.append(1 + (bits >> 10) % 40)
            bursts.qtys.append((1 + (bits >> 16) % spec.max_lots) * spec.lot)
            bursts.buys.append(bool(bits >> 31 & 1))
        return bursts

    def kline(self, symbol: str, interval: str, index: int, as_of: int | None = None) -> Kline:
        """Candle ``index`` of ``(symbol, interval)``.

        With ``as_of=None`` it is the final candle (``closed=True``); otherwise its state
        after ``as_of`` ms of trading, as an intermediate update shows it (``closed=False``).
        """
        series = self._get_series(symbol, interval)
        bursts = self._bursts(series, index)
        open_ms = self.open_time(interval, index)
        close_ms = iv.next_open(interval, open_ms) - 1
        n = bursts.count_before(as_of)
        if n == 0:
            p = format_units(bursts.prev_close)
            zero = "0.00000000"
            return Kline(
                open_ms, close_ms, symbol, interval, -1, -1, p, p, p, p, zero, 0,
                as_of is None, zero, zero, zero,
            )  # fmt: skip
        prices = bursts.prices
        counts = bursts.counts
        qtys = bursts.qtys
        buys = bursts.buys
        volume = quote = buy_volume = buy_quote = trades = 0
        high = low = prices[0]
        for k in range(n):
            price = prices[k]
            qty = qtys[k]
            q = price * qty // _UNIT
            volume += qty
            quote += q
            trades += counts[k]
            if buys[k]:
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
            bursts.first_id,
            bursts.first_id + trades - 1,
            format_units(prices[0]),
            format_units(prices[n - 1]),
            format_units(high),
            format_units(low),
            format_units(volume),
            trades,
            as_of is None,
            format_units(quote),
            format_units(buy_volume),
            format_units(buy_quote),
        )

    def klines(self, symbol: str, interval: str, first: int, stop: int) -> list[Kline]:
        """Final candles ``first`` to ``stop - 1`` (clamped at 0) of ``(symbol, interval)``."""
        return [self.kline(symbol, interval, i) for i in range(max(first, 0), stop)]
