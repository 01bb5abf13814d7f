"""Configuration of the emulator: one frozen dataclass, every field with a Binance default."""

from __future__ import annotations

import dataclasses
import ssl
import time
from dataclasses import dataclass, field

from loader.testing.faults import ScheduledFault
from loader.testing.market import DEFAULT_SYMBOLS, Listing
from loader.testing.publisher import FirehoseConfig
from loader.testing.replay import Recording

__all__ = ["EmulatorConfig"]


FIREHOSE_HISTORY_MS = 365 * 86_400_000


@dataclass(frozen=True, slots=True, kw_only=True)
class EmulatorConfig:
    """How the emulator behaves. Defaults are Binance's; tests shorten the timers.

    Times named ``*_ms`` are market milliseconds; the connection timers (``ping_interval``,
    ``pong_timeout``, ``max_lifetime``, ...) are real seconds and do not scale with
    ``speed``. Use :meth:`replace` to derive a variant.
    """

    #: Interface to listen on. Loopback only by default.
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (see ``Emulator.url``).
    port: int = 0
    #: Symbols that trade (uppercase). Streams of others are accepted and stay silent.
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    #: Same seed, same candles.
    seed: int = 0
    #: Market time at start, epoch ms; ``None``: now, floored to the whole minute.
    start_ms: int | None = None
    #: Market ms per real ms: ``600`` makes a 1m candle last 0.1 s.
    speed: float = 1.0
    #: Share of candles without trades (``n=0``, ``f=L=-1``, o=h=l=c=previous close).
    empty_candle_ratio: float = 0.1
    #: Market ms between a candle's end and its closing (``"x": true``) frame; Binance's
    #: closing frames arrive up to a second or two late.
    close_lag_ms: int = 250
    #: Server ping period, seconds (Binance: 20).
    ping_interval: float = 20.0
    #: Close the connection when a ping has had no pong for this long, seconds (Binance: 60).
    pong_timeout: float = 60.0
    #: Close every connection after this long, seconds (Binance: 24 h).
    max_lifetime: float = 86_400.0
    #: Incoming messages (text, ping, pong) per second before closing with 1008;
    #: ``None`` disables the limit (Binance: 5). Not applied to the WebSocket API path.
    max_incoming_per_second: int | None = 5
    #: Streams one connection may carry (Binance: 1024).
    max_streams_per_connection: int = 1024
    #: WebSocket API request weight per IP per minute before 429 (Binance: 6000); ``None``:
    #: unlimited (the replies still count it).
    api_weight_limit: int | None = 6000
    #: Opening handshakes per IP within ``connection_attempts_window`` before 429, counted
    #: apart for market streams and the WebSocket API (Binance: 300 per 5 minutes on each);
    #: ``None``: unlimited (still counted).
    max_connection_attempts: int | None = 300
    #: Seconds over which connection attempts are counted (Binance: 300).
    connection_attempts_window: float = 300.0
    #: First IP ban for not backing off after a 429, seconds; doubles with each repeat up to
    #: three days (Binance: "from 2 minutes to 3 days").
    ban_seconds: float = 120.0
    #: Seconds to wait for the client's side of a closing handshake before hanging up.
    close_timeout: float = 2.0
    #: Seconds a client may take to complete the opening handshake.
    handshake_timeout: float = 10.0
    #: A client this far behind (bytes queued) is disconnected, as a slow consumer.
    max_send_buffer: int = 64 * 2**20
    #: Symbols listed or delisted while the emulator runs (market times); they trade here in
    #: addition to ``symbols``. Not applied in firehose mode.
    listings: tuple[Listing, ...] = ()
    #: Market mode: each series sends at its own phase within its update period (a stable
    #: hash of its stream name, 10 ms steps), so thousands of series do not all send in the
    #: same instant; ``E`` is still the instant each frame is due.
    spread_updates: bool = False
    #: ``False``: only closing frames, no in-progress updates (cheap for tests that read
    #: closed candles only).
    intermediate_updates: bool = True
    #: Keep ``time.time_ns()`` of each closing frame on the market clock (``send_times``),
    #: for freshness benchmarks (the firehose has its own switch).
    record_send_times: bool = False
    #: Benchmark mode: a paced flood instead of the market clock (see ``FirehoseConfig``).
    firehose: FirehoseConfig | None = None
    #: Recorded sessions to serve on their recorded path (see ``loader.testing.replay``).
    recordings: tuple[Recording, ...] = ()
    #: Replay pace: 1.0 recorded pace, 2.0 twice as fast, ``None`` as fast as possible.
    replay_speed: float | None = 1.0
    #: Faults the emulator injects by itself (the process's ``--fault``).
    faults: tuple[ScheduledFault, ...] = field(default=())
    #: Serve ``wss://`` with this server context (certificate chain loaded); ``None``: ``ws://``.
    #: Clients must trust its CA: one they do not is how a TLS failure is tested.
    ssl_context: ssl.SSLContext | None = None

    def __post_init__(self) -> None:
        if self.speed <= 0:
            raise ValueError("speed must be positive")
        if not 0 <= self.empty_candle_ratio <= 1:
            raise ValueError("empty_candle_ratio must be within [0, 1]")
        if self.close_lag_ms < 0:
            raise ValueError("close_lag_ms must not be negative")
        if self.api_weight_limit is not None and self.api_weight_limit < 1:
            raise ValueError("api_weight_limit must be positive or None")
        if self.max_connection_attempts is not None and self.max_connection_attempts < 1:
            raise ValueError("max_connection_attempts must be positive or None")
        if any(s != s.upper() for s in (*self.symbols, *(x.symbol for x in self.listings))):
            raise ValueError("symbols are uppercase, as Binance spells them (BTCUSDT)")

    def replace(self, **changes: object) -> EmulatorConfig:
        """A copy with some fields changed."""
        # Field names and types are checked by dataclasses.replace at run time; **object
        # cannot say which keyword takes which type.
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def resolved_start_ms(self) -> int:
        """``start_ms``, or now floored to the minute; in firehose mode a year before that.

        The firehose's candle times advance far faster than the wall clock: starting a year
        back, its flood is a backlog of candles that did close (over half a million per 1m
        stream before they would reach the present), which a client that checks a frame's
        times against its clock takes as real.
        """
        if self.start_ms is not None:
            return self.start_ms
        now = time.time_ns() // 60_000_000_000 * 60_000
        return now - FIREHOSE_HISTORY_MS if self.firehose is not None else now
