"""Following Binance's listings: which streams this shard carries, at start and every
`SYMBOLS_REFRESH` seconds after, from the WebSocket API's `exchangeInfo`.

A symbol newly trading is subscribed without a restart and captured from its first candle
(history fills what opened before the refresh saw it); a symbol no longer trading has its
streams ended, with a log line and a telemetry message. The choice of streams is
`loader/shards.py`'s: the selection, then the stable hash that names this shard.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from loader.backoff import Backoff
from loader.binance import stream_name
from loader.history import HistoryClient, HistoryError, HistoryUnavailable
from loader.intervals import candle_open
from loader.settings import Settings
from loader.shards import TRADING, SymbolInfo, shard_of
from loader.stats import Stats

log = logging.getLogger(__name__)

Stream = tuple[str, str]
# Between failed exchangeInfo requests at start (the history client backs off per connection).
RETRY_DELAY = 2.0


class Carrier(Protocol):
    """What following the listings needs of the source (`loader.source.Source`): the streams
    it carries, a way to add and end some, the history client, and where notices go. A
    protocol, so this module does not depend on the source that depends on it."""

    settings: Settings
    history: HistoryClient
    streams: list[Stream]
    on_notice: Callable[[str], object]

    async def add_streams(self, starts: dict[Stream, int]) -> None: ...

    def remove_streams(self, streams: Sequence[Stream]) -> None: ...


@dataclass
class Listing:
    """The last `exchangeInfo` read: Binance's clock then, and each symbol's status."""

    server_time: int
    statuses: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, server_time: int, symbols: Iterable[SymbolInfo]) -> Listing:
        return cls(server_time, {s.symbol: s.status for s in symbols})

    def trading(self, symbol: str) -> bool:
        return self.statuses.get(symbol) == TRADING


def shard_streams(settings: Settings, symbols: Iterable[SymbolInfo]) -> list[Stream]:
    """The streams this shard carries out of an `exchangeInfo` listing."""
    chosen = settings.selection.select(symbols)
    return [
        (symbol, interval)
        for symbol in chosen
        for interval in settings.intervals
        if shard_of(stream_name(symbol, interval), settings.shard_count) == settings.shard_index
    ]


def static_streams(settings: Settings) -> list[Stream]:
    """This shard's share of the named streams (no `exchangeInfo` needed)."""
    return [
        s
        for s in settings.streams
        if shard_of(stream_name(*s), settings.shard_count) == settings.shard_index
    ]


async def initial_streams(settings: Settings, stats: Stats) -> tuple[list[Stream], Listing | None]:
    """At start: the streams to carry, and the listing to follow (None: named symbols only,
    nothing to follow). Asks `exchangeInfo` until it answers; a stop cancels the wait."""
    if not settings.selection.dynamic:
        return static_streams(settings), None
    history = HistoryClient(settings.binance_api_url, Backoff(), stats)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        while True:
            try:
                server_time, symbols = await history.exchange_info()
                break
            except (HistoryError, HistoryUnavailable) as exc:
                log.warning("cannot read Binance's exchangeInfo yet: %s", exc)
                await trio.sleep(RETRY_DELAY)
        nursery.cancel_scope.cancel()
    streams = shard_streams(settings, symbols)
    log.info(
        "%s: %d trading symbols, %d streams in shard %d of %d",
        settings.selection.describe(),
        len({s for s, _ in streams}),
        len(streams),
        settings.shard_index,
        settings.shard_count,
    )
    return streams, Listing.of(server_time, symbols)


async def follow_listings(
    source: Carrier,
    listing: Listing,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `SYMBOLS_REFRESH` seconds, subscribe what was listed and end what was delisted."""
    settings = source.settings
    task_status.started()
    while True:
        await trio.sleep(settings.symbols_refresh)
        try:
            server_time, symbols = await source.history.exchange_info()
        except (HistoryError, HistoryUnavailable) as exc:
            log.warning("cannot read Binance's exchangeInfo; trying again later: %s", exc)
            continue
        now = Listing.of(server_time, symbols)
        wanted = shard_streams(settings, symbols)
        carried = set(source.streams)
        gone = [s for s in source.streams if not now.trading(s[0])]
        added = [s for s in wanted if s not in carried and now.trading(s[0])]
        if gone:
            _delisted(source, gone)
        if added:
            await _listed(source, added, listing)
        listing.server_time, listing.statuses = now.server_time, now.statuses


def _delisted(source: Carrier, streams: list[Stream]) -> None:
    source.remove_streams(streams)
    by_symbol: dict[str, list[str]] = {}
    for symbol, interval in streams:
        by_symbol.setdefault(symbol, []).append(interval)
    for symbol, intervals in by_symbol.items():
        message = (
            f"delisted: {symbol} is no longer trading; its {len(intervals)} stream(s) "
            f"{','.join(intervals)} ended after their last closed candle"
        )
        log.warning(message, extra={"symbol": symbol})
        source.on_notice(message)


async def _listed(source: Carrier, streams: list[Stream], before: Listing) -> None:
    """New streams start at their first candle when the symbol is new since the last read
    (history brings what opened before now), else at the first candle seen."""
    starts: dict[Stream, int] = {}
    for symbol, interval in streams:
        first = -1
        if not before.trading(symbol):
            since = candle_open(interval, before.server_time)
            try:
                found = await source.history.first_open(symbol, interval, since)
            except (HistoryError, HistoryUnavailable) as exc:
                log.warning("cannot find the first candle of %s %s: %s", symbol, interval, exc)
            else:
                first = -1 if found is None else found
        starts[(symbol, interval)] = first
    await source.add_streams(starts)
    symbols = sorted({s for s, _ in streams})
    message = f"listed: {', '.join(symbols)} ({len(streams)} stream(s) subscribed)"
    log.info(message)
    source.on_notice(message)
