"""The history client over a real WebSocket: one connection for many requests, unreadable
replies retried, 429 and retryAfter honoured, the weight budget kept."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
import trio_websocket

from loader.backoff import Backoff
from loader.history import HistoryClient, HistoryUnavailable, _Weight
from loader.stats import Stats

pytestmark = pytest.mark.anyio

Reply = Callable[[dict[str, Any], int], str | None]


def row(open_time: int) -> list[Any]:
    return [open_time, "1.0", "2.0", "0.5", "1.5", "10", open_time + 59_999, "15", 3, "4", "6",
            "0"]  # fmt: skip


def good(request: dict[str, Any], _: int) -> str:
    start = request["params"].get("startTime", 0)
    return json.dumps({"id": request["id"], "status": 200, "result": [row(start)]})


@asynccontextmanager
async def api(reply: Reply) -> AsyncIterator[tuple[str, list[int]]]:
    """A WebSocket API that answers each request with `reply(request, n)` (None: no answer);
    yields its URL and a list counting connections."""
    connections: list[int] = []
    count = 0

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal count
        ws = await request.accept()
        connections.append(1)
        while True:
            try:
                message = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            count += 1
            answer = reply(json.loads(message), count)
            if answer is not None:
                await ws.send_message(answer)

    async with trio.open_nursery() as nursery:
        serve = partial(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, ssl_context=None)
        server = await nursery.start(serve)
        yield f"ws://127.0.0.1:{server.port}/ws-api/v3", connections
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(url: str, **kwargs: Any) -> AsyncIterator[tuple[HistoryClient, Stats]]:
    stats = Stats()
    history = HistoryClient(url, Backoff(per_minute=60), stats, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(history.run)
        yield history, stats
        nursery.cancel_scope.cancel()


async def test_requests_share_one_connection() -> None:
    async with api(good) as (url, connections), client(url) as (history, _):
        results: list[int] = []

        async def ask(i: int) -> None:
            page = await history.klines("BTCUSDT", "1m", i * 60_000, i * 60_000 + 59_999)
            results.append(page[0].open_time)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(ask, i)
    assert sorted(results) == [i * 60_000 for i in range(50)]
    assert len(connections) == 1


async def test_unreadable_and_malformed_replies_fail_the_request_not_the_client() -> None:
    def flaky(request: dict[str, Any], n: int) -> str:
        if n == 1:
            return "this is not JSON"
        if n == 2:
            return json.dumps({"id": request["id"], "status": 200, "result": {"no": "list"}})
        if n == 3:
            return json.dumps({"id": request["id"], "status": 200, "result": [["short"]]})
        return good(request, n)

    async with api(flaky) as (url, _), client(url, timeout=0.5) as (history, stats):
        for _ in range(3):
            with pytest.raises(HistoryUnavailable):
                await history.klines("BTCUSDT", "1m", 0, 59_999)
        page = await history.klines("BTCUSDT", "1m", 0, 59_999)
    assert [k.open_time for k in page] == [0]
    assert dict(stats.history_errors) == {"unreadable": 1, "timeout": 1, "malformed": 2}


async def test_429_makes_every_request_wait_for_retry_after() -> None:
    def limited(request: dict[str, Any], n: int) -> str:
        if n == 1:
            error = {"code": -1003, "msg": "Too much request weight used",
                     "data": {"serverTime": 1_000_000, "retryAfter": 1_001_500}}  # fmt: skip
            return json.dumps({"id": request["id"], "status": 429, "error": error})
        return good(request, n)

    async with api(limited) as (url, _), client(url) as (history, stats):
        with pytest.raises(HistoryUnavailable):
            await history.klines("BTCUSDT", "1m", 0, 59_999)
        refused_at = trio.current_time()
        await history.klines("BTCUSDT", "1m", 0, 59_999)
        waited = trio.current_time() - refused_at
    assert waited >= 1.5
    assert stats.history_errors["rejected_429"] == 1


def test_the_weight_budget_holds_requests_for_the_rest_of_the_minute() -> None:
    async def spend() -> list[float]:
        weight = _Weight(per_minute=10)
        times = []
        for _ in range(7):
            await weight.take(2)
            times.append(trio.current_time())
        return times

    times = trio.run(spend, clock=trio.testing.MockClock(autojump_threshold=0))
    assert [round(t - times[0]) for t in times] == [0, 0, 0, 0, 0, 60, 60]
