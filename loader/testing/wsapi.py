"""The WebSocket API path (``/ws-api/v3``): history for gap backfill, plus ``ping``/``time``.

``klines`` answers from the same deterministic market and the same publication state as the
streams, so a backfill returns exactly the candles the streams sent: every closed candle
with its final values, and at most one candle in progress (the one the stream is currently
updating, in the state of its latest update), as Binance's history includes the open candle.

Selection follows Binance: without ``startTime``/``endTime`` the most recent ``limit``
candles; with ``startTime`` the oldest candles opening at or after it; with only
``endTime`` the most recent candles opening at or before it. ``limit`` defaults to 500 and
must be within 1..1000.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec
import trio

from loader.testing import wire
from loader.testing.intervals import is_interval
from loader.testing.publisher import Publisher

__all__ = ["WsApi"]

_SYMBOL_CHARS = re.compile(r"[A-Z0-9\-_.]{1,20}")
_KLINES_PARAMS = ("symbol", "interval", "startTime", "endTime", "timeZone", "limit")
_UTC_ZONES = {"0", "+0", "-0", "00:00", "+00:00", "-00:00", "0:00", "+0:00"}
_WEIGHT_LIMIT = 6000
_KLINES_WEIGHT = 2


class _ApiError(Exception):
    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status


def _mandatory(name: str) -> _ApiError:
    return _ApiError(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


class WsApi:
    """Answers WebSocket API requests; one instance per emulator (weights are per IP)."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._minute = -1
        self._weight = 0

    def _rate_limits(self, weight: int) -> list[dict[str, Any]]:
        minute = int(trio.current_time() // 60)
        if minute != self._minute:
            self._minute, self._weight = minute, 0
        self._weight += weight
        return [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": _WEIGHT_LIMIT,
                "count": self._weight,
            }
        ]

    def handle(self, text: str) -> bytes:
        """Answer one request frame."""
        request_id: Any = None
        weight = 0
        try:
            try:
                request = msgspec.json.decode(text)
            except msgspec.DecodeError:
                raise _ApiError(-1135, "Invalid JSON Request") from None
            if not isinstance(request, dict):
                raise _ApiError(-1135, "Invalid JSON Request")
            request_id = request.get("id")
            method = request.get("method")
            if not isinstance(method, str) or not method:
                raise _mandatory("method")
            params = request.get("params", {})
            if not isinstance(params, dict):
                raise _ApiError(-1135, "Invalid 'params' in JSON request; expected an object.")
            weight = 1
            if method == "ping":
                result: Any = {}
            elif method == "time":
                result = {"serverTime": self.publisher.now_ms()}
            elif method == "klines":
                weight = _KLINES_WEIGHT
                result = self._klines(params)
            else:
                # The code Binance uses for an unknown method is a guess.
                raise _ApiError(-1020, "Unsupported operation.")
        except _ApiError as exc:
            return wire.encode(
                {
                    "id": request_id,
                    "status": exc.status,
                    "error": {"code": exc.code, "msg": exc.msg},
                    "rateLimits": self._rate_limits(weight),
                }
            )
        return wire.encode(
            {
                "id": request_id,
                "status": 200,
                "result": result,
                "rateLimits": self._rate_limits(weight),
            }
        )

    def _klines(self, params: dict[str, Any]) -> list[list[int | str]]:
        symbol, interval = self._series_params(params)
        start = self._int_param(params, "startTime")
        end = self._int_param(params, "endTime")
        limit = self._int_param(params, "limit")
        limit = 500 if limit is None else limit
        if not 1 <= limit <= 1000:
            raise _ApiError(-1130, "Invalid data sent for a parameter.")
        zone = params.get("timeZone")
        if zone is not None and str(zone) not in _UTC_ZONES:
            # Only UTC candles exist here; other time zones are not emulated.
            raise _ApiError(-1130, "Invalid data sent for a parameter.")
        market = self.publisher.market
        key = (symbol, interval)
        closed = self.publisher.closed_count(key)
        current = self.publisher.in_progress(key)
        stop = closed + 1 if current is not None and current[0] == closed else closed
        first = 0
        if start is not None:
            first = market.index_at(interval, start)
            if market.open_time(interval, first) < start:
                first += 1
            first = max(first, 0)
        if end is not None:
            stop = min(stop, market.index_at(interval, end) + 1)
        if start is None:
            first = max(first, stop - limit)
        else:
            stop = min(stop, first + limit)
        rows: list[list[int | str]] = []
        for i in range(first, stop):
            as_of = current[1] if current is not None and i == current[0] else None
            rows.append(market.kline(symbol, interval, i, as_of).rest_row())
        return rows

    def _series_params(self, params: dict[str, Any]) -> tuple[str, str]:
        unread = [k for k in params if k not in _KLINES_PARAMS]
        if unread:
            read = len(params) - len(unread)
            raise _ApiError(
                -1104,
                f"Not all sent parameters were read; read '{read}' parameter(s) "
                f"but was sent '{len(params)}'.",
            )
        symbol = params.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise _mandatory("symbol")
        if not _SYMBOL_CHARS.fullmatch(symbol):
            raise _ApiError(
                -1100,
                "Illegal characters found in parameter 'symbol'; "
                "legal range is '^[A-Z0-9-_.]{1,20}$'.",
            )
        interval = params.get("interval")
        if not isinstance(interval, str) or not interval:
            raise _mandatory("interval")
        if not self.publisher.market.has_symbol(symbol):
            raise _ApiError(-1121, "Invalid symbol.")
        if not is_interval(interval):
            raise _ApiError(-1120, "Invalid interval.")
        return symbol, interval

    @staticmethod
    def _int_param(params: dict[str, Any], name: str) -> int | None:
        value = params.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _ApiError(
                -1100, f"Illegal characters found in parameter '{name}'; legal range is '^[0-9]+$'."
            )
        return value
