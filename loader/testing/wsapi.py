"""The WebSocket API path (``/ws-api/v3``): ``klines``, ``exchangeInfo``, ``ping``, ``time``.

``klines`` answers from the same deterministic market and the same publication state as the
streams, so a backfill returns exactly the candles the streams sent: every closed candle
with its final values, and at most one candle in progress (the one the stream is currently
updating, in the state of its latest update), as Binance's history includes the open candle.

Selection follows Binance: without ``startTime``/``endTime`` the most recent ``limit``
candles; with ``startTime`` the oldest candles opening at or after it; with only
``endTime`` the most recent candles opening at or before it. ``limit`` defaults to 500 and
must be within 1..1000.

Parameters are read as Binance reads them: numbers and booleans may be JSON numbers and
booleans or strings (``"limit":"5"``, ``"returnRateLimits":"false"``; Binance's own SDK sends
nothing else), arrays may be JSON arrays or strings holding one (``"symbols":"[\\"BTCUSDT\\"]"``),
and timestamps may be milliseconds or microseconds. Every request is charged its weight
against the per-IP budget (:mod:`loader.testing.limits`); every reply echoes the request's
``id`` and, unless ``returnRateLimits`` is false (in the request or the connection URL), the
``rateLimits`` it was charged to.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from loader.testing import exchange, wire
from loader.testing.intervals import is_interval
from loader.testing.limits import IpLimits, Refusal
from loader.testing.publisher import Publisher

__all__ = ["CONNECT_WEIGHT", "ApiSession", "WsApi"]

_SYMBOL_CHARS = re.compile(r"[A-Z0-9\-_.]{1,20}")
_LONG = re.compile(r"[0-9]{1,20}")
_KLINES_PARAMS = ("symbol", "interval", "startTime", "endTime", "timeZone", "limit")
_EXCHANGE_INFO_PARAMS = ("symbol", "symbols", "permissions", "showPermissionSets", "symbolStatus")
_UTC_ZONES = {"0", "+0", "-0", "00:00", "+00:00", "-00:00", "0:00", "+0:00"}
_DEFAULT_WEIGHT_LIMIT = 6000
_WEIGHTS = {"ping": 1, "time": 1, "klines": 2, "exchangeInfo": 20}
#: Opening a WebSocket API connection costs this much weight (Binance: 2).
CONNECT_WEIGHT = 2
#: Timestamps with 16 digits or more are microseconds, shorter ones milliseconds.
_MICROS_FROM = 10**15


class _ApiError(Exception):
    def __init__(self, code: int, msg: str, status: int = 400) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.status = status


class _Limited(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.template)
        self.refusal = refusal


def _mandatory(name: str) -> _ApiError:
    return _ApiError(
        -1102, f"Mandatory parameter '{name}' was not sent, was empty/null, or malformed."
    )


def _illegal(name: str, legal: str) -> _ApiError:
    return _ApiError(
        -1100, f"Illegal characters found in parameter '{name}'; legal range is '{legal}'."
    )


@dataclass(slots=True)
class ApiSession:
    """One WebSocket API connection: its peer and the settings of its URL."""

    ip: str = "127.0.0.1"
    #: ``timeUnit=MICROSECOND``: times in replies in microseconds.
    micros: bool = False
    #: ``returnRateLimits`` when a request does not say (``?returnRateLimits=false``).
    rate_limits: bool = True
    #: Set when a reply banned the peer's IP: the connection is closed once it is sent.
    banned: bool = False


class WsApi:
    """Answers WebSocket API requests; one instance per emulator (weights are per IP)."""

    def __init__(self, publisher: Publisher, limits: IpLimits | None = None) -> None:
        self.publisher = publisher
        self.limits = limits or IpLimits(_DEFAULT_WEIGHT_LIMIT, None, 300.0, 120.0)
        self._methods: dict[str, Callable[[dict[str, Any], ApiSession], Any]] = {
            "ping": self._ping,
            "time": self._time,
            "klines": self._klines,
            "exchangeInfo": self._exchange_info,
        }

    def _rate_limits(self, ip: str) -> list[dict[str, Any]]:
        return [
            {
                "rateLimitType": "REQUEST_WEIGHT",
                "interval": "MINUTE",
                "intervalNum": 1,
                "limit": self.limits.weight_limit or _DEFAULT_WEIGHT_LIMIT,
                "count": self.limits.weight(ip),
            }
        ]

    def _time_out(self, ms: int, session: ApiSession) -> int:
        return wire.micros(ms) if session.micros else ms

    def handle(self, text: str, session: ApiSession | None = None) -> bytes:
        """Answer one request frame."""
        session = session or ApiSession()
        request_id: Any = None
        show = session.rate_limits
        reply: dict[str, Any]
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
            params = request.get("params")
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise _ApiError(-1135, "Invalid 'params' in JSON request; expected an object.")
            show = self._bool_param(params, "returnRateLimits", session.rate_limits)
            # Method names may carry the API version: "v3/klines".
            name = method.removeprefix("v3/")
            handler = self._methods.get(name)
            refusal = self.limits.charge(session.ip, _WEIGHTS.get(name, 1))
            if refusal is not None:
                raise _Limited(refusal)
            if handler is None:
                # The code Binance uses for an unknown method is a guess.
                raise _ApiError(-1020, "Unsupported operation.")
            reply = {"id": request_id, "status": 200, "result": handler(params, session)}
        except _ApiError as exc:
            reply = {
                "id": request_id,
                "status": exc.status,
                "error": {"code": exc.code, "msg": exc.msg},
            }
        except _Limited as limited:
            reply = self._refused(request_id, limited.refusal, session)
        if show:
            reply["rateLimits"] = self._rate_limits(session.ip)
        return wire.encode(reply)

    def _refused(self, request_id: Any, refusal: Refusal, session: ApiSession) -> dict[str, Any]:
        # retryAfter is on the clock of serverTime (market time): serverTime plus the real
        # time to wait, so that "retryAfter - serverTime" is what a client must wait.
        now = self.publisher.now_ms()
        until = now + int(refusal.retry_after * 1000) + 1
        if refusal.status == 418:
            session.banned = True
        return {
            "id": request_id,
            "status": refusal.status,
            "error": {
                "code": -1003,
                "msg": refusal.message(self._time_out(until, session)),
                "data": {
                    "serverTime": self._time_out(now, session),
                    "retryAfter": self._time_out(until, session),
                },
            },
        }

    # -- methods ----------------------------------------------------------------------------

    def _ping(self, params: dict[str, Any], session: ApiSession) -> dict[str, Any]:
        self._check_read(params, ())
        return {}

    def _time(self, params: dict[str, Any], session: ApiSession) -> dict[str, Any]:
        self._check_read(params, ())
        return {"serverTime": self._time_out(self.publisher.now_ms(), session)}

    def _klines(self, params: dict[str, Any], session: ApiSession) -> list[list[int | str]]:
        self._check_read(params, _KLINES_PARAMS)
        symbol, interval = self._series_params(params)
        start = self._time_param(params, "startTime", round_up=True)
        end = self._time_param(params, "endTime", round_up=False)
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
            row = market.kline(symbol, interval, i, as_of).rest_row()
            if session.micros:
                # The close time becomes the candle's last microsecond, as on the streams.
                row[0] = wire.micros(int(row[0]))
                row[6] = wire.micros(int(row[6])) + 999
            rows.append(row)
        return rows

    def _exchange_info(self, params: dict[str, Any], session: ApiSession) -> dict[str, Any]:
        self._check_read(params, _EXCHANGE_INFO_PARAMS)
        given = [n for n in ("symbol", "symbols", "permissions") if params.get(n) is not None]
        status = params.get("symbolStatus")
        if len(given) > 1 or (status is not None and given and given[0] != "permissions"):
            # Binance documents the rule, not its error code; -1128 is a guess.
            raise _ApiError(-1128, "Combination of optional parameters invalid.")
        permission_sets = self._bool_param(params, "showPermissionSets", True)
        market = self.publisher.market
        names: list[str]
        if params.get("symbol") is not None:
            names = [self._symbol_param(params)]
        elif params.get("symbols") is not None:
            names = self._symbols_param(params)
        else:
            names = list(market.symbols)
            if params.get("permissions") is not None:
                wanted = self._list_param(params, "permissions", single=True)
                if not exchange.symbols_with(wanted):
                    names = []
        for name in names:
            if not market.has_symbol(name):
                raise _ApiError(-1121, "Invalid symbol.")
        if status is not None:
            if status not in exchange.SYMBOL_STATUSES:
                raise _ApiError(-1122, "Invalid symbolStatus.")
            if status != "TRADING":
                names = []
        limits = self.limits
        return exchange.exchange_info(
            market,
            names,
            server_time=self._time_out(self.publisher.now_ms(), session),
            permission_sets=permission_sets,
            rate_limits=exchange.global_rate_limits(
                limits.weight_limit or _DEFAULT_WEIGHT_LIMIT, limits.max_attempts
            ),
        )

    # -- parameters -------------------------------------------------------------------------

    @staticmethod
    def _check_read(params: dict[str, Any], known: tuple[str, ...]) -> None:
        unread = [k for k in params if k not in known and k != "returnRateLimits"]
        if unread:
            read = len(params) - len(unread)
            raise _ApiError(
                -1104,
                f"Not all sent parameters were read; read '{read}' parameter(s) "
                f"but was sent '{len(params)}'.",
            )

    def _symbol_param(self, params: dict[str, Any]) -> str:
        symbol = params.get("symbol")
        if not isinstance(symbol, str) or not symbol:
            raise _mandatory("symbol")
        if not _SYMBOL_CHARS.fullmatch(symbol):
            raise _illegal("symbol", "^[A-Z0-9-_.]{1,20}$")
        return symbol

    def _symbols_param(self, params: dict[str, Any]) -> list[str]:
        names = self._list_param(params, "symbols", single=False)
        if not names or not all(_SYMBOL_CHARS.fullmatch(n) for n in names):
            raise _illegal(
                "symbols", '^\\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\\]$'
            )
        return names

    @staticmethod
    def _list_param(params: dict[str, Any], name: str, *, single: bool) -> list[str]:
        value = params.get(name)
        if isinstance(value, str):
            # As in REST, an array may come as its JSON text (Binance's SDK sends that).
            try:
                decoded = msgspec.json.decode(value)
            except msgspec.DecodeError:
                decoded = [value] if single else None
            value = [decoded] if single and isinstance(decoded, str) else decoded
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _illegal(name, '^\\[("[A-Z0-9_]{1,30}"(,"[A-Z0-9_]{1,30}"){0,}){0,1}\\]$')
        return value

    def _series_params(self, params: dict[str, Any]) -> tuple[str, str]:
        symbol = self._symbol_param(params)
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
        if isinstance(value, str) and _LONG.fullmatch(value):
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _illegal(name, "^[0-9]{1,20}$")
        return value

    def _time_param(self, params: dict[str, Any], name: str, *, round_up: bool) -> int | None:
        """A timestamp parameter in milliseconds, whether it was sent in ms or in us."""
        value = self._int_param(params, name)
        if value is None or value < _MICROS_FROM:
            return value
        # A start in microseconds selects candles opening at or after it: round up.
        return -(-value // 1000) if round_up else value // 1000

    @staticmethod
    def _bool_param(params: dict[str, Any], name: str, default: bool) -> bool:
        value = params.get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if value == "true":
            return True
        if value == "false":
            return False
        raise _illegal(name, "^(true|false)$")
