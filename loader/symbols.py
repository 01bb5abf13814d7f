"""The symbol checker: Binance answers a stream of an unknown symbol with silence, so a
symbol none of whose streams has sent anything is asked about on the history API."""

from __future__ import annotations

import logging

import trio

from loader.errors import FatalError
from loader.history import HistoryClient, HistoryError, HistoryUnavailable
from loader.router import Router

log = logging.getLogger(__name__)


async def check_symbols(
    router: Router,
    history: HistoryClient,
    silence: float,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every `silence` seconds, ask about the symbols not yet heard from nor confirmed; an
    unknown one ends the run with exit code 2 (retrying cannot help)."""
    confirmed: set[str] = set()
    task_status.started()
    while True:
        await trio.sleep(silence)
        heard = {s for (s, _), guard in router.guards.items() if guard.next_open >= 0}
        for symbol, interval in router.guards:
            if symbol in heard or symbol in confirmed:
                continue
            try:
                await history.check_symbol(symbol, interval)
            except HistoryError as exc:
                if exc.invalid_symbol:
                    raise FatalError(
                        f"Binance does not know symbol {symbol} ({exc.msg})", exit_code=2
                    ) from exc
                log.warning("cannot check symbol %s: %s", symbol, exc)
            except HistoryUnavailable as exc:
                log.warning("cannot check symbol %s: %s", symbol, exc)
            else:
                confirmed.add(symbol)
