"""The symbol checker: Binance answers a stream of an unknown symbol with silence, so a
symbol none of whose streams has sent a frame is asked about on the history API, a symbol
resumed from Kafka as well as a new one (a resume point says the symbol existed once, not
that Binance still knows it).

An unknown (or delisted) symbol is dropped and reported (log, metric, telemetry); the other
streams go on. The history API may say so first, answering a fill with -1121: that drops the
symbol the same way (`Symbols.drop`), rather than failing the run, which every retry would
fail again. Only a run left with no stream at all ends, with exit code 2: retrying cannot
help."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from loader.errors import FatalError
from loader.history import HistoryClient, HistoryError, HistoryUnavailable
from loader.router import Router
from loader.stats import Stats

log = logging.getLogger(__name__)


class Symbols:
    """Which symbols Binance was found to know, and the dropping of those it does not."""

    def __init__(
        self, router: Router, stats: Stats, report: Callable[[str], object] = lambda _: None
    ) -> None:
        self.router = router
        self.stats = stats
        self.report = report
        self.confirmed: set[str] = set()
        self.dropped: list[str] = []

    def drop(self, symbol: str, exc: HistoryError) -> None:
        """Binance does not know `symbol`: end its streams and say so (once, however many of
        its streams found out). Raises `FatalError` (exit 2) when no stream is left."""
        if symbol in self.dropped:
            return
        streams = self.router.drop_symbol(symbol)
        if not streams:
            return  # its streams ended already (delisted meanwhile): nothing left to drop
        self.dropped.append(symbol)
        self.stats.symbols_dropped += 1
        message = (
            f"dropped symbol {symbol} ({streams} stream(s)): Binance does not know it ({exc.msg})"
        )
        log.error("%s", message, extra={"symbol": symbol})
        if not self.router.guards:
            raise FatalError(
                f"no stream left: Binance knows none of {', '.join(self.dropped)}", exit_code=2
            ) from exc
        self.report(message)

    async def check(
        self,
        history: HistoryClient,
        silence: float,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Every `silence` seconds, ask about the symbols not yet heard from nor confirmed,
        and drop an unknown one."""
        task_status.started()
        while True:
            await trio.sleep(silence)
            heard = {s for (s, _), guard in self.router.guards.items() if guard.heard}
            for symbol, interval in list(self.router.guards):
                if symbol in heard or symbol in self.confirmed or symbol in self.dropped:
                    continue
                try:
                    await history.check_symbol(symbol, interval)
                except HistoryError as exc:
                    if exc.invalid_symbol:
                        self.drop(symbol, exc)
                        continue
                    log.warning("cannot check symbol %s: %s", symbol, exc)
                except HistoryUnavailable as exc:
                    log.warning("cannot check symbol %s: %s", symbol, exc)
                else:
                    self.confirmed.add(symbol)
