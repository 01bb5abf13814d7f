"""Binance kline history over the WebSocket API (`klines`), for filling gaps after a reconnect.

The WebSocket API rather than REST keeps the whole stack on trio-websocket: no HTTP client to
add, and the emulator serves both on one port.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Final

import msgspec
import trio
import trio_websocket

from loader.binance import Kline

log = logging.getLogger(__name__)

PAGE: Final = 1000  # the API's own maximum per request
TIMEOUT: Final = 10.0


class HistoryError(Exception):
    """The history API answered with an error object (`code`, `msg` as Binance gives them)."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(f"Binance klines request failed: {status} {code} {msg}")
        self.status, self.code, self.msg = status, code, msg

    @property
    def invalid_symbol(self) -> bool:
        return self.code == -1121


class _Error(msgspec.Struct):
    code: int
    msg: str


class _Reply(msgspec.Struct):
    id: str | int | None = None
    status: int = 200
    result: list[list[Any]] | None = None
    error: _Error | None = None


def row_to_kline(row: list[Any], symbol: str, interval: str) -> Kline:
    """A `/api/v3/klines` row as the closed kline event the stream would have sent."""
    t, o, h, low, c, v, close_time, q, n, taker_v, taker_q = row[:11]
    return Kline(
        open_time=int(t),
        close_time=int(close_time),
        symbol=symbol,
        interval=interval,
        first_trade_id=-1,
        last_trade_id=-1,
        open=str(o),
        close=str(c),
        high=str(h),
        low=str(low),
        volume=str(v),
        number_of_trades=int(n),
        is_closed=True,
        quote_asset_volume=str(q),
        taker_buy_base_asset_volume=str(taker_v),
        taker_buy_quote_asset_volume=str(taker_q),
    )


class History:
    """Fetches closed klines; one short-lived connection per call, since gaps are rare."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._ids = itertools.count(1)
        self._decode = msgspec.json.Decoder(_Reply).decode

    async def closed_klines(
        self, symbol: str, interval: str, start_ms: int, end_ms: int
    ) -> list[Kline]:
        """Every kline with `start_ms <= open_time` and `close_time <= end_ms`, oldest first."""
        klines: list[Kline] = []
        with trio.fail_after(TIMEOUT * 4):
            async with trio_websocket.open_websocket_url(self.url, connect_timeout=TIMEOUT) as ws:
                cursor = start_ms
                while cursor <= end_ms:
                    rows = await self._request(ws, symbol, interval, start_ms=cursor, end_ms=end_ms)
                    page = [row_to_kline(r, symbol, interval) for r in rows]
                    klines.extend(k for k in page if k.close_time <= end_ms)
                    if len(rows) < PAGE:
                        break
                    cursor = page[-1].open_time + 1
        return klines

    async def check_symbol(self, symbol: str, interval: str) -> None:
        """Raise `HistoryError` if Binance does not know `symbol`."""
        async with trio_websocket.open_websocket_url(self.url, connect_timeout=TIMEOUT) as ws:
            with trio.fail_after(TIMEOUT):
                await self._request(ws, symbol, interval, start_ms=None, end_ms=None, limit=1)

    async def _request(
        self,
        ws: trio_websocket.WebSocketConnection,
        symbol: str,
        interval: str,
        *,
        start_ms: int | None,
        end_ms: int | None,
        limit: int = PAGE,
    ) -> list[list[Any]]:
        request_id = f"klines-{next(self._ids)}"
        params: dict[str, object] = {"symbol": symbol, "interval": interval, "limit": limit}
        if start_ms is not None:
            params["startTime"] = start_ms
        if end_ms is not None:
            params["endTime"] = end_ms
        await ws.send_message(
            msgspec.json.encode({"id": request_id, "method": "klines", "params": params}).decode()
        )
        while True:
            reply = self._decode(await ws.get_message())
            if reply.id == request_id:
                break
        if reply.error is not None or reply.status != 200 or reply.result is None:
            error = reply.error or _Error(0, "no result")
            raise HistoryError(reply.status, error.code, error.msg)
        return reply.result
