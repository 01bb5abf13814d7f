"""The emulator over wss://, as Binance serves its streams: a CA made for the test session,
trusted by the process through OpenSSL's default trust store (`SSL_CERT_FILE`)."""

from __future__ import annotations

import queue
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trustme

from loader.testing import Emulator, EmulatorConfig, serve_emulator


@dataclass(frozen=True)
class Wss:
    """A test CA: server contexts for the emulator, client contexts that trust it."""

    ca: trustme.CA
    ca_file: Path

    def serve(self, config: EmulatorConfig) -> EmulatorConfig:
        """`config` serving wss:// with a certificate of this CA for 127.0.0.1."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        return config.replace(ssl_context=context)

    def client(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


@pytest.fixture(scope="session")
def wss_ca(tmp_path_factory: pytest.TempPathFactory) -> Wss:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("wss") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Wss(ca, ca_file)


@pytest.fixture
def wss(wss_ca: Wss, monkeypatch: pytest.MonkeyPatch) -> Wss:
    """`wss_ca`, trusted by this process for the test (the service's default context)."""
    monkeypatch.setenv("SSL_CERT_FILE", str(wss_ca.ca_file))
    return wss_ca


@contextmanager
def emulator_thread(config: EmulatorConfig) -> Iterator[Emulator]:
    """The emulator on a Trio loop of its own, in a thread: a client that sleeps (a paced
    reader) leaves it running, as Binance does, instead of idling the one loop they share.
    Only its URLs may be used from the caller's thread."""
    ready: queue.Queue[tuple[Emulator, trio.lowlevel.TrioToken, trio.CancelScope]] = queue.Queue()

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            emulator = await nursery.start(serve_emulator, config)
            ready.put((emulator, trio.lowlevel.current_trio_token(), nursery.cancel_scope))

    thread = threading.Thread(target=trio.run, args=(serve,), name="emulator", daemon=True)
    thread.start()
    emulator, token, scope = ready.get(timeout=30)
    try:
        yield emulator
    finally:
        token.run_sync_soon(scope.cancel)
        thread.join(timeout=30)
