"""Binance kline history over the WebSocket API (`klines`): one client per process.

One persistent connection carries every request, multiplexed by id, so a reconnect of a
thousand streams costs a thousand requests, not a thousand handshakes. The client counts
request weight against Binance's per-minute limit before sending, honours a 429/418 and its
`retryAfter` for every request at once, and reconnects with backoff, drawing on the same
per-IP connection budget as the market connections. A reply it cannot read fails only its
own request, which the caller retries.

The WebSocket API rather than REST keeps the whole stack on trio-websocket: no HTTP client to
add, and the emulator serves both on one port.
"""

from __future__ import annotations

import collections
import itertools
import logging
from typing import Any, Final

import msgspec
import trio
import trio_websocket

from loader.backoff import Backoff
from loader.binance import Kline
from loader.errors import FatalError
from loader.shards import SymbolInfo
from loader.stats import Stats
from loader.tls import TlsWatch

log = logging.getLogger(__name__)

PAGE: Final = 1000  # the API's own maximum per request
TIMEOUT: Final = 10.0  # seconds for one request's reply (and for a handshake)
KLINES_WEIGHT: Final = 2
EXCHANGE_INFO_WEIGHT: Final = 20
# exchangeInfo of the whole spot market is megabytes (klines pages are far less).
MAX_REPLY: Final = 32 * 1024 * 1024
# Binance allows 6,000 a minute per IP; a margin stays free for a sibling process or a
# miscount, since going over costs a 429 and, repeated, a ban (418).
WEIGHT_PER_MINUTE: Final = 4800
# A 429/418 without a usable retryAfter: how long every request waits.
DEFAULT_BACKOFF: Final = 60.0


class HistoryError(Exception):
    """The history API answered with an error object (`code`, `msg` as Binance gives them)."""

    def __init__(self, status: int, code: int, msg: str) -> None:
        super().__init__(f"Binance klines request failed: {status} {code} {msg}")
        self.status, self.code, self.msg = status, code, msg

    @property
    def invalid_symbol(self) -> bool:
        return self.code == -1121


class HistoryUnavailable(Exception):
    """The request got no usable answer (connection lost, timeout, unreadable or rate-limited
    reply): asking again later may work."""


class _ErrorData(msgspec.Struct):
    retryAfter: int | None = None  # noqa: N815 - Binance's name
    serverTime: int | None = None  # noqa: N815 - Binance's name


class _Error(msgspec.Struct):
    code: int
    msg: str
    data: _ErrorData | None = None


class _SymbolInfo(msgspec.Struct):
    symbol: str
    status: str
    quoteAsset: str  # noqa: N815 - Binance's name


class _ExchangeInfo(msgspec.Struct):
    serverTime: int  # noqa: N815 - Binance's name
    symbols: list[_SymbolInfo]


class _Reply(msgspec.Struct):
    id: str | int | None = None
    status: int = 200
    result: Any = None
    error: _Error | None = None


class _ExchangeReply(msgspec.Struct):
    """`exchangeInfo` read straight into the few fields used: the whole market's reply is
    megabytes, and generic JSON objects of it would be many times that in memory."""

    id: str | int | None = None
    status: int = 200
    result: _ExchangeInfo | None = None
    error: _Error | None = None


class _Id(msgspec.Struct):
    id: str | int | None = None


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


class _Weight:
    """Request weight spent in the last minute, by this process's own count."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._spent: collections.deque[tuple[float, int]] = collections.deque()
        self._total = 0

    async def take(self, weight: int) -> None:
        while True:
            now = trio.current_time()
            while self._spent and self._spent[0][0] <= now - 60.0:
                self._total -= self._spent.popleft()[1]
            if self._total + weight <= self.per_minute or not self._spent:
                self._spent.append((now, weight))
                self._total += weight
                return
            await trio.sleep_until(self._spent[0][0] + 60.0)


class HistoryClient:
    """`run` owns the connection (started in a nursery); `klines`/`check_symbol` ask."""

    def __init__(
        self,
        url: str,
        backoff: Backoff,
        stats: Stats,
        *,
        weight_per_minute: int = WEIGHT_PER_MINUTE,
        timeout: float = TIMEOUT,
    ) -> None:
        self.url = url
        self.tls = TlsWatch(url)
        self.backoff = backoff
        self.stats = stats
        self.timeout = timeout
        self.weight = _Weight(weight_per_minute)
        self._ids = itertools.count(1)
        self._decode_id = msgspec.json.Decoder(_Id).decode
        self._waiting: dict[str, trio.MemorySendChannel[str | bytes | None]] = {}
        self._ws: trio_websocket.WebSocketConnection | None = None
        self._changed = trio.Event()  # set (and replaced) when the connection comes or goes
        self._demand = 0  # requests in progress: a lost connection is reopened only for them
        self._wanted = trio.Event()
        self._blocked_until = 0.0

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep one connection while requests want it; connect lazily, reconnect on loss."""
        task_status.started()
        while True:
            while not self._demand:
                self._wanted = trio.Event()
                await self._wanted.wait()
            await self.backoff.turn()
            try:
                async with trio_websocket.open_websocket_url(
                    self.url,
                    ssl_context=self.tls.context,
                    connect_timeout=self.timeout,
                    disconnect_timeout=2,
                    max_message_size=MAX_REPLY,
                ) as ws:
                    self.stats.history_connections += 1
                    log.info("connected to the Binance WebSocket API")
                    self._ws = ws
                    self._notify()
                    await self._read(ws)
            except (trio_websocket.HandshakeError, trio_websocket.ConnectionClosed, OSError) as exc:
                if (untrusted := self.tls.untrusted()) is not None:
                    # Every retry would meet the same certificate: not a network blip.
                    raise FatalError(f"cannot connect to the Binance API: {untrusted}", 2) from exc
                log.warning("Binance WebSocket API connection lost: %s", exc)
            finally:
                self._ws = None
                self._notify()
                for waiting in self._waiting.values():
                    waiting.send_nowait(None)
                self._waiting.clear()
            await trio.sleep(self.backoff.failed())

    async def _read(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.backoff.reset()
        while True:
            message = await ws.get_message()
            try:
                # Only the id here: the requester reads the reply into the type it expects.
                reply = self._decode_id(message)
            except msgspec.DecodeError as exc:
                # Without an id it answers nobody in particular: its request times out and
                # is asked again.
                self.stats.history_errors["unreadable"] += 1
                log.warning("unreadable WebSocket API reply skipped: %s", exc)
                continue
            waiting = self._waiting.pop(str(reply.id), None)
            if waiting is not None:
                waiting.send_nowait(message)

    async def _request(
        self,
        method: str,
        params: dict[str, Any],
        weight: int,
        kind: type = list,
        reply_type: type[_Reply | _ExchangeReply] = _Reply,
    ) -> Any:
        """Send one request and return its `result`; raise `HistoryError` for an error
        Binance means, `HistoryUnavailable` for anything worth asking again."""
        self._demand += 1
        try:
            return await self._ask(method, params, weight, kind, reply_type)
        finally:
            self._demand -= 1

    async def _ask(
        self,
        method: str,
        params: dict[str, Any],
        weight: int,
        kind: type,
        reply_type: type[_Reply | _ExchangeReply],
    ) -> Any:
        self._wanted.set()
        await trio.sleep_until(self._blocked_until)
        await self.weight.take(weight)
        with trio.move_on_after(self.timeout):
            while self._ws is None:
                await self._changed.wait()
        ws = self._ws
        if ws is None:
            raise HistoryUnavailable("no connection to the Binance WebSocket API")
        request_id = str(next(self._ids))
        send, receive = trio.open_memory_channel[str | bytes | None](1)
        self._waiting[request_id] = send
        try:
            text = msgspec.json.encode({"id": request_id, "method": method, "params": params})
            try:
                await ws.send_message(text.decode())
            except trio_websocket.ConnectionClosed as exc:
                raise HistoryUnavailable(f"connection lost: {exc}") from exc
            with trio.move_on_after(self.timeout):
                raw = await receive.receive()
                if raw is None:
                    raise HistoryUnavailable("connection lost before the reply")
                try:
                    reply = msgspec.json.decode(raw, type=reply_type)
                except msgspec.DecodeError as exc:
                    self.stats.history_errors["unreadable"] += 1
                    raise HistoryUnavailable(f"unreadable reply: {exc}") from exc
                return self._result(reply, kind)
            self.stats.history_errors["timeout"] += 1
            raise HistoryUnavailable(f"no reply within {self.timeout} s")
        finally:
            self._waiting.pop(request_id, None)

    def _result(self, reply: _Reply | _ExchangeReply, kind: type = list) -> Any:
        if reply.status in (429, 418):
            self.stats.history_errors[f"rejected_{reply.status}"] += 1
            wait = DEFAULT_BACKOFF
            data = reply.error.data if reply.error is not None else None
            if data is not None and data.retryAfter is not None and data.serverTime is not None:
                wait = max(0.0, (data.retryAfter - data.serverTime) / 1000)
            self._blocked_until = max(self._blocked_until, trio.current_time() + wait)
            log.warning("Binance WebSocket API rate limit (%d): waiting %.1f s", reply.status, wait)
            raise HistoryUnavailable(f"rate limited ({reply.status})")
        if reply.error is not None or reply.status != 200:
            error = reply.error or _Error(0, "no result")
            if reply.status >= 500:
                raise HistoryUnavailable(f"server error {reply.status} {error.msg}")
            raise HistoryError(reply.status, error.code, error.msg)
        if not isinstance(reply.result, kind):
            self.stats.history_errors["malformed"] += 1
            raise HistoryUnavailable(f"a reply without a result {kind.__name__}")
        return reply.result

    async def klines(
        self, symbol: str, interval: str, start_ms: int, end_ms: int, limit: int = PAGE
    ) -> list[Kline]:
        """One page: the closed klines opening in `[start_ms, end_ms]`, oldest first (at
        most `limit`). The caller asks only for candles it knows are closed."""
        params = {
            "symbol": symbol,
            "interval": interval,
            "startTime": start_ms,
            "endTime": end_ms,
            "limit": limit,
        }
        rows = await self._request("klines", params, KLINES_WEIGHT)
        try:
            klines = [row_to_kline(r, symbol, interval) for r in rows]
        except (TypeError, ValueError) as exc:
            self.stats.history_errors["malformed"] += 1
            raise HistoryUnavailable(f"unreadable klines row: {exc}") from exc
        return [k for k in klines if start_ms <= k.open_time <= end_ms]

    async def check_symbol(self, symbol: str, interval: str) -> None:
        """Raise `HistoryError` if Binance does not know `symbol`."""
        params = {"symbol": symbol, "interval": interval, "limit": 1}
        await self._request("klines", params, KLINES_WEIGHT)

    async def exchange_info(self) -> tuple[int, list[SymbolInfo]]:
        """Binance's clock and every spot symbol with its status and quote asset."""
        # Trading symbols only: a symbol missing from the reply is one that no longer trades.
        params = {"symbolStatus": "TRADING"}
        info: _ExchangeInfo = await self._request(
            "exchangeInfo", params, EXCHANGE_INFO_WEIGHT, _ExchangeInfo, _ExchangeReply
        )
        symbols = [SymbolInfo(s.symbol, s.status, s.quoteAsset) for s in info.symbols]
        return info.serverTime, symbols

    async def first_open(self, symbol: str, interval: str, since_ms: int) -> int | None:
        """The open time of the first candle of `symbol` opening at or after `since_ms`
        (closed or not), or None: where a listing's stream begins."""
        params = {"symbol": symbol, "interval": interval, "startTime": since_ms, "limit": 1}
        rows = await self._request("klines", params, KLINES_WEIGHT)
        if not rows:
            return None
        try:
            return int(rows[0][0])
        except (TypeError, ValueError, IndexError) as exc:
            self.stats.history_errors["malformed"] += 1
            raise HistoryUnavailable(f"unreadable klines row: {exc}") from exc
