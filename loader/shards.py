"""Which streams a run carries and how: symbol selection, shards, connections, subscriptions.

Pure functions of their arguments (no clock, no I/O), so the rules are property-tested:

* a :class:`Selection` (``SYMBOL``: explicit symbols, ``*`` for every trading symbol, or
  quote filters such as ``*USDT``) picks symbols from an ``exchangeInfo`` listing;
* a stream belongs to shard ``shard_of(name, count)``, a stable hash of its name
  (BLAKE2b, never Python's per-process ``hash``), so every pod computes the same split and a
  listing adds its own streams without moving any other;
* a :class:`ConnectionPlan` spreads one shard's streams over connections of at most
  ``STREAMS_PER_CONNECTION``, placing new streams where there is room and never moving one
  that is already placed (a move would cost an unsubscribe and a resubscribe: a gap risk);
* :func:`subscribe_schedule` cuts a connection's streams into ``SUBSCRIBE`` messages sent
  within Binance's 5 incoming messages a second, and :func:`rotation_offsets` staggers the
  24-hour rotations so that connections never all reconnect at once.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "MAX_STREAMS_PER_CONNECTION",
    "ConnectionPlan",
    "Selection",
    "SymbolInfo",
    "parse_selection",
    "producer_name",
    "rotation_offsets",
    "select_streams",
    "shard_of",
    "subscribe_schedule",
    "summary",
]

#: Binance's cap on the streams of one connection.
MAX_STREAMS_PER_CONNECTION = 1024
#: The status of a symbol that can be subscribed.
TRADING = "TRADING"


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    """What selection reads of one ``exchangeInfo`` symbol."""

    symbol: str
    status: str
    quote_asset: str


@dataclass(frozen=True, slots=True)
class Selection:
    """``SYMBOL`` parsed: explicit symbols, and/or every symbol or every one of some quotes.

    ``everything`` (``*``) takes every trading symbol; ``quotes`` (``*USDT,*FDUSD``) every
    trading symbol quoted in one of them; ``symbols`` are named ones, kept in their order.
    """

    symbols: tuple[str, ...] = ()
    quotes: tuple[str, ...] = ()
    everything: bool = False

    @property
    def dynamic(self) -> bool:
        """Whether the symbols come from ``exchangeInfo`` (and follow listings)."""
        return self.everything or bool(self.quotes)

    def matches(self, info: SymbolInfo) -> bool:
        """Whether a trading symbol falls under a wildcard of this selection."""
        return self.everything or info.quote_asset in self.quotes

    def select(self, listing: Iterable[SymbolInfo]) -> tuple[str, ...]:
        """The symbols to carry: the named ones (in order), then the matching trading ones
        in the listing's order. Named symbols are kept whatever their status (the caller
        reports the unknown or halted ones)."""
        chosen = dict.fromkeys(self.symbols)
        if self.dynamic:
            for info in listing:
                if info.status == TRADING and self.matches(info):
                    chosen[info.symbol] = None
        return tuple(chosen)

    def describe(self) -> str:
        """``SYMBOL`` as given, normalised: ``*USDT,BTCFDUSD``."""
        parts = ["*"] if self.everything else [f"*{q}" for q in self.quotes]
        return ",".join([*parts, *self.symbols])


def parse_selection(items: Iterable[str]) -> tuple[Selection, list[str]]:
    """``SYMBOL``'s comma-separated items -> a selection and the problems found.

    ``*`` is every trading symbol, ``*QUOTE`` every one quoted in ``QUOTE``; anything else is
    a symbol (letters and digits, 2 to 20). Case does not matter; repeats are dropped.
    """
    problems: list[str] = []
    symbols: dict[str, None] = {}
    quotes: dict[str, None] = {}
    everything = False
    for raw in items:
        item = raw.strip().upper()
        if not item:
            continue
        if item == "*":
            everything = True
        elif item.startswith("*"):
            quote = item[1:]
            if quote.isalnum() and 2 <= len(quote) <= 10:
                quotes[quote] = None
            else:
                problems.append(f"SYMBOL {item!r} is not * or *QUOTE (e.g. *USDT)")
        elif item.isalnum() and item.isascii() and 2 <= len(item) <= 20:
            symbols[item] = None
        else:
            problems.append(f"SYMBOL {item!r} is not a Binance symbol (letters and digits)")
    selection = Selection(tuple(symbols), () if everything else tuple(quotes), everything)
    return selection, problems


def shard_of(stream: str, shard_count: int) -> int:
    """The shard (``0 <= shard < shard_count``) a stream name belongs to, stable everywhere."""
    if shard_count < 1:
        raise ValueError("shard_count must be at least 1")
    digest = hashlib.blake2b(stream.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


def select_streams(names: Iterable[str], shard_count: int, shard_index: int) -> tuple[str, ...]:
    """The streams of ``names`` that shard ``shard_index`` of ``shard_count`` carries."""
    if not 0 <= shard_index < shard_count:
        raise ValueError("shard_index must be within [0, shard_count)")
    return tuple(n for n in names if shard_of(n, shard_count) == shard_index)


@dataclass
class ConnectionPlan:
    """The streams of one shard over numbered connections of at most ``per_connection``.

    Placement is sticky: :meth:`add` fills connections that have room (fewest first, so load
    stays even) before opening new ones, :meth:`remove` frees room; a placed stream never
    moves. Connection numbers are never reused, so a number names one connection's life.
    """

    per_connection: int
    connections: dict[int, list[str]] = field(default_factory=dict)
    _next: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.per_connection <= MAX_STREAMS_PER_CONNECTION:
            raise ValueError(f"per_connection must be within 1..{MAX_STREAMS_PER_CONNECTION}")

    @classmethod
    def initial(cls, streams: Sequence[str], per_connection: int) -> ConnectionPlan:
        """``streams`` split evenly over as few connections as the cap allows."""
        plan = cls(per_connection)
        if streams:
            count = math.ceil(len(streams) / per_connection)
            size, extra = divmod(len(streams), count)
            start = 0
            for i in range(count):
                end = start + size + (1 if i < extra else 0)
                plan.connections[plan._open()] = list(streams[start:end])
                start = end
        return plan

    def _open(self) -> int:
        number = self._next
        self._next += 1
        return number

    def streams(self) -> set[str]:
        """Every placed stream."""
        return {s for names in self.connections.values() for s in names}

    def where(self) -> dict[str, int]:
        """Stream -> the connection carrying it."""
        return {s: c for c, names in self.connections.items() for s in names}

    def add(self, streams: Iterable[str]) -> dict[int, list[str]]:
        """Place the streams not placed yet; returns connection -> streams to subscribe
        there (connections not in ``connections`` before are new and to be opened)."""
        placed = self.streams()
        todo = [s for s in dict.fromkeys(streams) if s not in placed]
        added: dict[int, list[str]] = {}
        for conn in sorted(self.connections, key=lambda c: len(self.connections[c])):
            room = self.per_connection - len(self.connections[conn])
            if room > 0 and todo:
                take, todo = todo[:room], todo[room:]
                self.connections[conn].extend(take)
                added[conn] = take
        while todo:
            take, todo = todo[: self.per_connection], todo[self.per_connection :]
            conn = self._open()
            self.connections[conn] = list(take)
            added[conn] = list(take)
        return added

    def remove(self, streams: Iterable[str]) -> dict[int, list[str]]:
        """Forget streams; returns connection -> streams to unsubscribe there. A connection
        left empty is dropped from the plan (to be closed)."""
        gone = set(streams)
        removed: dict[int, list[str]] = {}
        for conn in list(self.connections):
            names = self.connections[conn]
            hit = [s for s in names if s in gone]
            if hit:
                removed[conn] = hit
                kept = [s for s in names if s not in gone]
                if kept:
                    self.connections[conn] = kept
                else:
                    del self.connections[conn]
        return removed


def subscribe_schedule(
    streams: Sequence[str], *, per_message: int = 200, per_second: int = 4
) -> list[tuple[float, list[str]]]:
    """``SUBSCRIBE`` messages for ``streams``: ``(seconds after the first, names)``.

    Binance closes a connection that receives more than 5 messages within a second (pongs
    included), so messages go at most ``per_second`` a second, leaving room for the
    keepalive; each names at most ``per_message`` streams.
    """
    if per_message < 1 or not 1 <= per_second <= 5:
        raise ValueError("per_message must be positive and per_second within 1..5")
    chunks = [list(streams[i : i + per_message]) for i in range(0, len(streams), per_message)]
    return [(k / per_second, chunk) for k, chunk in enumerate(chunks)]


def rotation_offsets(count: int, rotate_after: float) -> list[float]:
    """Seconds after opening at which each of ``count`` connections is replaced.

    Spread evenly over the last tenth of ``rotate_after`` (at most an hour), so rotations,
    each a few seconds of overlap and a short backfill, never coincide.
    """
    if count < 1:
        return []
    window = min(rotate_after / 10, 3600.0)
    return [rotate_after - window * i / count for i in range(count)]


def producer_name(producer_id: str, shard_index: int, shard_count: int) -> str:
    """The telemetry ``producer``: the configured id, naming the shard when there are several."""
    if shard_count == 1:
        return producer_id
    return f"{producer_id}/shard-{shard_index}-of-{shard_count}"


def summary(selection: Selection, symbols: int, intervals: Sequence[str], streams: int) -> str:
    """The telemetry ``symbol`` field of a run over many symbols: what was asked and what it
    came to, instead of a list of thousands (``*USDT: 612 symbols x 1m,1h; 408 streams``)."""
    if not selection.dynamic and symbols <= 10:
        return ",".join(selection.symbols)
    return f"{selection.describe()}: {symbols} symbols x {','.join(intervals)}; {streams} streams"
