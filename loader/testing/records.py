"""TLS records as Binance writes them: one WebSocket message per record.

A TLS client reads one record per `receive_some` (trio's `SSLStream` does), so how a server
cuts its records decides how many reads a client makes. Binance sends every message in a
record of its own; an emulator that encrypted a whole batch in one record would let a client
take a hundred messages in one read, and hide what a client pays for each one.

`HeldStream` sits between the emulator's `SSLStream` and the socket. While the writer holds
it, the records that `SSLStream` produces (one per `send_all`) are kept, and then go to the
socket in one write: one record per message on the wire, one system call per batch here.
"""

from __future__ import annotations

import trio


class HeldStream(trio.abc.Stream):
    """A socket stream whose writes can be held back and sent as one."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._held: list[bytes] | None = None
        # A record the TLS layer writes while reading (an alert, a key update) must not
        # interleave with a held batch on its way out.
        self._lock = trio.Lock()

    def hold(self) -> None:
        """Keep every write from now on for `release`."""
        self._held = []

    async def release(self) -> None:
        """Send what was kept since `hold`, in one write, and stop holding."""
        held, self._held = self._held or [], None
        if held:
            async with self._lock:
                await self.stream.send_all(b"".join(held))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            self._held.append(bytes(data))
            await trio.lowlevel.checkpoint()
            return
        async with self._lock:
            await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
