"""The symbol checker: Binance answers a stream of an unknown symbol with silence, so a
symbol none of whose streams has sent anything is asked about on the history API.

An unknown (or delisted) symbol is dropped and reported (log, metric, telemetry); the other
streams go on. Only a run left with no stream at all ends, with exit code 2: retrying cannot
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


async def check_symbols(
    router: Router,
    history: HistoryClient,
    silence: float,
    stats: Stats,
    report: Callable[[str], object] = lambda _: None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `silence` seconds, ask about the symbols not yet heard from nor confirmed; drop
    an unknown one's streams (`report` tells telemetry), and end the run with exit code 2
    when none is left."""
    confirmed: set[str] = set()
    dropped: list[str] = []
    task_status.started()
    while True:
        await trio.sleep(silence)
        heard = {s for (s, _), guard in router.guards.items() if guard.next_open >= 0}
        for symbol, interval in list(router.guards):
            if symbol in heard or symbol in confirmed or symbol in dropped:
                continue
            try:
                await history.check_symbol(symbol, interval)
            except HistoryError as exc:
                if exc.invalid_symbol:
                    dropped.append(symbol)
                    streams = router.drop_symbol(symbol)
                    stats.symbols_dropped += 1
                    message = (
                        f"dropped symbol {symbol} ({streams} stream(s)): Binance does not "
                        f"know it ({exc.msg})"
                    )
                    log.error("%s", message, extra={"symbol": symbol})
                    if not router.guards:
                        raise FatalError(
                            f"no stream left: Binance knows none of {', '.join(dropped)}",
                            exit_code=2,
                        ) from exc
                    report(message)
                    continue
                log.warning("cannot check symbol %s: %s", symbol, exc)
            except HistoryUnavailable as exc:
                log.warning("cannot check symbol %s: %s", symbol, exc)
            else:
                confirmed.add(symbol)
