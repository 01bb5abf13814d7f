"""A Binance-compatible spot market-stream emulator, for tests, local runs and benchmarks.

It speaks the WebSocket protocol of ``stream.binance.com`` (raw ``/ws/<stream>``, bare
``/ws`` with live ``SUBSCRIBE``, combined ``/stream?streams=a/b``) for
``<symbol>@kline_<interval>`` streams, with Binance's rules and failure modes (pings, pong
timeout, 24 h lifetime, 5 messages/s limit, ``serverShutdown``, ``timeUnit``), serves the
WebSocket API's ``klines``, ``exchangeInfo``, ``ping`` and ``time`` on ``/ws-api/v3`` with
Binance's per-IP request weight and connection-attempt limits, replays recorded sessions byte
for byte, and injects faults on demand. Binance's official ``binance-sdk-spot`` works
against it with its default settings. Its candles come from a seeded deterministic market that is
also the ground truth tests compare against.

Three ways in::

    # 1. In a Trio test or harness
    emulator = await nursery.start(serve_emulator, EmulatorConfig(speed=600, seed=1))
    # or: async with open_emulator(config) as emulator: ...

    # 2. As a process (prints its URL on one line when ready)
    #    python -m loader.testing.emulator --port 9443 --speed 60 --seed 1

    # 3. As a pytest fixture (anyio + trio): def test_x(binance_emulator): ...
    #    (configure with a ``binance_emulator_config`` fixture or indirect parametrization)
"""

from loader.testing.config import EmulatorConfig
from loader.testing.connection import ConnectionInfo, ConnectionKind
from loader.testing.faults import FAULT_KINDS, ScheduledFault
from loader.testing.intervals import INTERVALS, candle_open, interval_ms, next_open
from loader.testing.market import DEFAULT_SYMBOLS, Kline, KlineEvent, Market, format_units
from loader.testing.publisher import FirehoseConfig
from loader.testing.replay import FIXTURES_ENV, Recording, fixtures_dir, load_recordings
from loader.testing.server import Emulator, open_emulator, serve_emulator

__all__ = [
    "DEFAULT_SYMBOLS",
    "FAULT_KINDS",
    "FIXTURES_ENV",
    "INTERVALS",
    "ConnectionInfo",
    "ConnectionKind",
    "Emulator",
    "EmulatorConfig",
    "FirehoseConfig",
    "Kline",
    "KlineEvent",
    "Market",
    "Recording",
    "ScheduledFault",
    "candle_open",
    "fixtures_dir",
    "format_units",
    "interval_ms",
    "load_recordings",
    "next_open",
    "open_emulator",
    "serve_emulator",
]
