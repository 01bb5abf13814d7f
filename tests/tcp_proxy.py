"""A TCP proxy in front of a broker, for tests of a Kafka that answers late or not at all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import trio


async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    try:
        async for chunk in source:
            await sink.send_all(chunk)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sink.aclose()


@asynccontextmanager
async def tcp_proxy(upstream: str, admit: Callable[[int], Awaitable[None]]) -> AsyncIterator[str]:
    """A proxy to `upstream` (host:port): each connection, numbered from 1, waits for
    `admit(number)` (which may hold it for ever), then is forwarded both ways. Yields its
    address."""
    host, _, port = upstream.rpartition(":")
    connections = 0

    async def handle(client: trio.SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with client:
            await admit(connections)
            server = await trio.open_tcp_stream(host, int(port))
            async with server, trio.open_nursery() as nursery:
                nursery.start_soon(_pipe, client, server)
                nursery.start_soon(_pipe, server, client)

    async with trio.open_nursery() as nursery:
        (listener,) = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield f"127.0.0.1:{listener.socket.getsockname()[1]}"
        nursery.cancel_scope.cancel()
