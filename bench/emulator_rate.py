"""How many kline frames per second the emulator pushes to one client on loopback.

Starts ``python -m loader.testing.emulator`` in firehose mode as its own process, connects a
bare trio-websocket client to a combined stream of ``--streams`` synthetic series, and counts
the frames it reads during ``--seconds`` (after a short warm-up). The emulator must not be
what limits a benchmark: the goal is >= 30,000 frames/s (a bare trio-websocket receive loop
reads ~34,000/s here).

    uv run python bench/emulator_rate.py --seconds 10 --streams 100
    uv run python bench/emulator_rate.py --rate 5000   # check the pacing instead
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import trio
from trio_websocket import open_websocket_url


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    p.add_argument("--streams", type=int, default=100, help="subscribed kline series")
    p.add_argument("--rate", default="max", help="firehose frames/s in total, or 'max'")
    p.add_argument("--close-ratio", type=float, default=1.0, help="share of closing frames")
    return p.parse_args()


async def _count(url: str, warmup: float, seconds: float) -> tuple[int, float, int]:
    async with open_websocket_url(url) as ws:
        end_warmup = trio.current_time() + warmup
        while trio.current_time() < end_warmup:
            await ws.get_message()
        frames = 0
        closing = 0
        start = time.perf_counter()
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            message = await ws.get_message()
            frames += 1
            if '"x":true' in message:
                closing += 1
        return frames, time.perf_counter() - start, closing


def main() -> int:
    args = _args()
    cmd = [
        sys.executable,
        "-m",
        "loader.testing.emulator",
        "--port",
        "0",
        "--symbols",
        "",
        "--synthetic",
        str(args.streams),
        "--firehose",
        args.rate,
        "--close-ratio",
        str(args.close_ratio),
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            base = proc.stdout.readline().strip()
            if not base.startswith("ws://"):
                print(f"emulator did not start: {base!r}", file=sys.stderr)
                return 1
            names = "/".join(f"sym{i}usdt@kline_1m" for i in range(args.streams))
            url = f"{base}/stream?streams={names}"
            frames, elapsed, closing = trio.run(_count, url, args.warmup, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    rate = frames / elapsed
    print(
        f"{frames} frames in {elapsed:.2f} s = {rate:,.0f} frames/s "
        f"({closing} closing) over {args.streams} streams, firehose rate {args.rate}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
