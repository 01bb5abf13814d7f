"""The emulator as a process: ``python -m loader.testing.emulator --port 9443 --speed 60``.

When it listens it prints one line, its base URL (``ws://127.0.0.1:9443``), and flushes;
a parent process reads that line to know it is ready. It runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from loader.testing.config import EmulatorConfig
from loader.testing.faults import FAULT_KINDS, ScheduledFault
from loader.testing.market import DEFAULT_SYMBOLS
from loader.testing.publisher import FirehoseConfig
from loader.testing.replay import Recording, load_recordings
from loader.testing.server import serve_emulator

__all__ = ["config_from_args", "main", "parser"]


def _speed_or_max(text: str) -> float | None:
    return None if text in ("max", "fast", "none") else float(text)


def parser() -> argparse.ArgumentParser:
    """The command line of the emulator process."""
    p = argparse.ArgumentParser(
        prog="python -m loader.testing.emulator",
        description="Binance-compatible spot kline stream emulator (prints its URL when ready).",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface (default: loopback)")
    p.add_argument("--port", type=int, default=0, help="TCP port (default 0: pick a free one)")
    p.add_argument("--speed", type=float, default=1.0, help="market ms per real ms (e.g. 600)")
    p.add_argument("--seed", type=int, default=0, help="market seed (same seed, same candles)")
    p.add_argument(
        "--symbols",
        default=",".join(DEFAULT_SYMBOLS),
        help="comma-separated uppercase symbols (default: %(default)s)",
    )
    p.add_argument(
        "--synthetic",
        type=int,
        default=0,
        metavar="N",
        help="also trade SYM0USDT..SYM<N-1>USDT (for benchmarks)",
    )
    p.add_argument("--start-ms", type=int, default=None, help="market start, epoch ms")
    p.add_argument("--close-lag-ms", type=int, default=250, help="closing frame lag, market ms")
    p.add_argument("--empty-ratio", type=float, default=0.1, help="share of candles w/o trades")
    p.add_argument("--ping-interval", type=float, default=20.0, help="seconds between pings")
    p.add_argument("--pong-timeout", type=float, default=60.0, help="seconds to wait for pong")
    p.add_argument("--max-lifetime", type=float, default=86_400.0, help="connection lifetime, s")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=5,
        help="incoming messages per second before close 1008 (0: no limit)",
    )
    p.add_argument("--max-streams", type=int, default=1024, help="streams per connection")
    p.add_argument(
        "--weight-limit",
        type=int,
        default=6000,
        help="WebSocket API request weight per IP per minute before 429 (0: no limit)",
    )
    p.add_argument(
        "--connection-attempts",
        type=int,
        default=300,
        help="opening handshakes per IP per 5 minutes before 429 (0: no limit)",
    )
    p.add_argument(
        "--firehose",
        type=_speed_or_max,
        default=argparse.SUPPRESS,
        metavar="RATE|max",
        help="benchmark mode: RATE kline frames/s in total (or 'max'), E = wall clock",
    )
    p.add_argument(
        "--close-ratio", type=float, default=1.0, help="firehose: share of closing frames"
    )
    p.add_argument(
        "--replay",
        action="append",
        default=[],
        metavar="PATH",
        help="serve a recorded .ws session (or every one in a directory) on its recorded path",
    )
    p.add_argument(
        "--replay-speed",
        type=_speed_or_max,
        default=1.0,
        metavar="X|max",
        help="replay pace: 1 = recorded, 'max' = as fast as possible",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        type=ScheduledFault.parse,
        metavar="KIND[:ARG..][@AT[/EVERY]]",
        help=f"inject a fault on a schedule; kinds: {', '.join(FAULT_KINDS)}",
    )
    return p


def config_from_args(args: argparse.Namespace) -> EmulatorConfig:
    """Turn parsed arguments into a configuration."""
    symbols = [s for s in args.symbols.split(",") if s]
    symbols += [f"SYM{i}USDT" for i in range(args.synthetic)]
    recordings: list[Recording] = []
    for path in args.replay:
        p = Path(path)
        recordings.extend(load_recordings(p) if p.is_dir() else [Recording.load(p)])
    firehose = (
        FirehoseConfig(rate=args.firehose, close_ratio=args.close_ratio)
        if "firehose" in args
        else None
    )
    return EmulatorConfig(
        host=args.host,
        port=args.port,
        symbols=tuple(dict.fromkeys(symbols)),
        seed=args.seed,
        start_ms=args.start_ms,
        speed=args.speed,
        empty_candle_ratio=args.empty_ratio,
        close_lag_ms=args.close_lag_ms,
        ping_interval=args.ping_interval,
        pong_timeout=args.pong_timeout,
        max_lifetime=args.max_lifetime,
        max_incoming_per_second=args.rate_limit or None,
        max_streams_per_connection=args.max_streams,
        api_weight_limit=args.weight_limit or None,
        max_connection_attempts=args.connection_attempts or None,
        firehose=firehose,
        recordings=tuple(recordings),
        replay_speed=args.replay_speed,
        faults=tuple(args.fault),
    )


async def _run(config: EmulatorConfig) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            emulator = await nursery.start(serve_emulator, config)
            print(emulator.url, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, OSError) as exc:
        print(f"emulator: {exc}", file=sys.stderr)
        return 2
    trio.run(_run, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
