"""The emulator as the benchmark's own process, steerable over stdin.

``python -m loader.testing.emulator`` cannot hand out ``send_times`` nor change the firehose
rate of a running process, so this wraps ``serve_emulator`` (the public API) in a process
that prints its URL when ready and then obeys one command per stdin line:

    rate 1000            firehose frames/s in total from now on (``max``: as fast as read)
    dump /path/to.json   write send_times as [[stream, open_time, time_ns], ...]; "dumped N"
    sent                 "sent N": kline frames emitted so far

EOF on stdin (the orchestrator going away) or SIGTERM ends it.

    python -m bench.emulator --synthetic 1000 --rate 5000 --record-send-times
    python -m bench.emulator --clock        # the market clock (Binance's pace): idle, cadence
    python -m bench.emulator --market 1500 --record-send-times   # the whole spot market
    python -m bench.emulator --clock --tls DIR   # wss://, as Binance serves; trust DIR/ca.pem

With ``--tls DIR`` it serves wss:// with a certificate for 127.0.0.1 from a CA of its own
(trustme), made at start, whose certificate it writes to ``DIR/ca.pem`` before it prints its
URL: a client trusts it through ``SSL_CERT_FILE=DIR/ca.pem`` (OpenSSL's default store, which
the worker's and trio-websocket's default contexts read). Each message goes out in a TLS
record of its own, as Binance sends.
"""

from __future__ import annotations

import argparse
import signal
import ssl
import sys
import time
from pathlib import Path

import msgspec
import trio
import trustme

from loader.testing import (
    DEFAULT_SYMBOLS,
    EmulatorConfig,
    FirehoseConfig,
    market_symbols,
    serve_emulator,
)
from loader.testing.server import Emulator


def _rate(text: str) -> float | None:
    return None if text == "max" else float(text)


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synthetic", type=int, default=1000, help="SYM0USDT..SYM<N-1>USDT")
    p.add_argument("--rate", type=_rate, default=None, help="firehose frames/s, or 'max'")
    p.add_argument("--close-ratio", type=float, default=1.0, help="share of closing frames")
    p.add_argument("--record-send-times", action="store_true", help="keep send_times")
    p.add_argument("--clock", action="store_true", help="market clock (speed 1), no firehose")
    p.add_argument(
        "--market",
        type=int,
        default=0,
        metavar="N",
        help="market mode: N mixed-quote symbols at Binance's cadence (speed 1, spread)",
    )
    p.add_argument(
        "--tls",
        type=Path,
        default=None,
        metavar="DIR",
        help="serve wss:// with a CA of its own, its certificate written to DIR/ca.pem",
    )
    return p.parse_args()


def _tls(config: EmulatorConfig, folder: Path) -> EmulatorConfig:
    """``config`` serving wss:// with a certificate for 127.0.0.1 of a CA made now, whose
    certificate is written to ``folder/ca.pem`` for clients to trust."""
    ca = trustme.CA()
    folder.mkdir(parents=True, exist_ok=True)
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return config.replace(ssl_context=context)


def _config(args: argparse.Namespace) -> EmulatorConfig:
    if args.market:
        return EmulatorConfig(
            symbols=market_symbols(args.market),
            # Market time is the wall clock from the first instant (not floored), so `E` too.
            start_ms=time.time_ns() // 1_000_000,
            spread_updates=True,
            record_send_times=args.record_send_times,
        )
    synthetic = tuple(f"SYM{i}USDT" for i in range(args.synthetic))
    if args.clock:
        # Binance's pace (speed 1): every subscribed stream's frame at the same instants.
        return EmulatorConfig(symbols=DEFAULT_SYMBOLS + synthetic)
    return EmulatorConfig(
        symbols=synthetic,
        # Candles advance a frame at a time, far faster than the wall clock, which the
        # worker's door holds open times against: started 400 days back, they stay behind
        # it for hours at full rate (`E` is the wall clock anyway).
        start_ms=(time.time_ns() // 1_000_000 - 400 * 86_400_000) // 60_000 * 60_000,
        firehose=FirehoseConfig(
            rate=args.rate,
            close_ratio=args.close_ratio,
            record_send_times=args.record_send_times,
        ),
    )


def _obey(emulator: Emulator, line: str) -> str | None:
    command, _, arg = line.strip().partition(" ")
    if command == "rate":
        emulator.set_firehose_rate(_rate(arg))
        return None
    if command == "dump":
        rows = [(stream, open_time, ns) for (stream, open_time), ns in emulator.send_times.items()]
        with open(arg, "wb") as out:
            out.write(msgspec.json.encode(rows))
        return f"dumped {len(rows)}"
    if command == "sent":
        return f"sent {emulator.frames_sent}"
    return f"error unknown command {line.strip()!r}"


async def _main(config: EmulatorConfig) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            emulator: Emulator = await nursery.start(serve_emulator, config)
            print(emulator.url, flush=True)

            async def on_signal() -> None:
                async for _ in signals:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(on_signal)
            while line := await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
                if (answer := _obey(emulator, line)) is not None:
                    print(answer, flush=True)
            nursery.cancel_scope.cancel()


def main() -> int:
    args = _args()
    config = _config(args)
    trio.run(_main, config if args.tls is None else _tls(config, args.tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
