"""The backfiller: fetches a stream's missing candles from history, off the reader's path.

It is a service of the router (`loader/router.py`), which owns each stream's gap: it starts a
fill as a task here, and the fill asks `fetch` for the gap's candles. `fetch` takes one page
at a time and publishes it before asking for the next, so memory is one page whatever the
gap. Fills of different streams run side by side over the one history connection, at most
`CONCURRENT_FILLS` fetching at once; each page has its own timeout and its own retries.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from loader.backoff import Backoff
from loader.binance import Kline, stream_name
from loader.errors import FatalError
from loader.guard import Gap
from loader.history import PAGE, HistoryClient, HistoryError, HistoryUnavailable
from loader.intervals import next_open
from loader.stats import Stats

log = logging.getLogger(__name__)

Stream = tuple[str, str]  # (SYMBOL, interval)

# Fills fetching at once: enough to keep the history connection busy, few enough that pages
# (one each) stay small in memory.
CONCURRENT_FILLS: Final = 16
# A page that cannot be had after this many tries (about five minutes with backoff) ends the
# run: the Job's retry resumes from the topic and fills the gap then.
PAGE_ATTEMPTS: Final = 12


class Backfiller:
    def __init__(
        self,
        history: HistoryClient,
        stats: Stats,
        invalid_symbol: Callable[[str, HistoryError], None],
    ) -> None:
        self.history = history
        self.stats = stats
        # Called when history says Binance does not know a stream's symbol (-1121): that is
        # the symbol's end, not the run's (`loader/symbols.py`), and the fill ends with it.
        self.invalid_symbol = invalid_symbol
        self.active = 0
        self._idle = trio.Event()
        self._idle.set()
        self._slots = trio.Semaphore(CONCURRENT_FILLS)
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def start(self, stream: Stream, fill: Callable[[], Awaitable[None]]) -> None:
        """Run `fill` (the router's, for `stream`) as a task of its own."""
        if self._nursery is None:
            raise RuntimeError("a gap to fill, and no backfiller running")
        if self.active == 0:
            self._idle = trio.Event()
        self.active += 1
        self._nursery.start_soon(self._run, stream, fill)

    async def idle(self) -> None:
        """Return once no fill is in progress."""
        await self._idle.wait()

    async def _run(self, stream: Stream, fill: Callable[[], Awaitable[None]]) -> None:
        try:
            await fill()
        except HistoryError as exc:
            # Only an unknown symbol gets here (`_page`); its streams are dropped with it.
            self.invalid_symbol(stream[0], exc)
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def fetch(
        self, stream: Stream, gap: Gap, publish: Callable[[Kline], Awaitable[None]]
    ) -> None:
        """Every candle of `gap` that history has, in order, each handed to `publish`."""
        symbol, interval = stream
        fields = {"stream": stream_name(symbol, interval), "gap_start": gap.start,
                  "gap_end": gap.end}  # fmt: skip
        cursor, filled = gap.start, 0
        async with self._slots:
            while cursor < gap.end:
                page = await self._page(symbol, interval, cursor, gap.end - 1)
                if not page:
                    break
                for kline in page:
                    await publish(kline)
                filled += len(page)
                cursor = next_open(interval, page[-1].open_time)
        log.info("backfilled %d closed candles", filled, extra=fields)

    async def _page(self, symbol: str, interval: str, start: int, end: int) -> list[Kline]:
        backoff = Backoff(base=1.0, cap=30.0)
        for attempt in range(1, PAGE_ATTEMPTS + 1):
            try:
                return await self.history.klines(symbol, interval, start, end, PAGE)
            except HistoryError as exc:
                if exc.invalid_symbol:
                    raise
                raise FatalError(f"cannot backfill {symbol} {interval}: {exc}") from exc
            except HistoryUnavailable as exc:
                if attempt == PAGE_ATTEMPTS:
                    raise FatalError(f"cannot backfill {symbol} {interval}: {exc}") from exc
                delay = backoff.failed()
                log.warning("backfill of %s %s failed (%s); retrying in %.1f s",
                            symbol, interval, exc, delay)  # fmt: skip
                await trio.sleep(delay)
        raise AssertionError("unreachable")
