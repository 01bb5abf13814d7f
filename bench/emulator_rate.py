"""How many kline frames per second the emulator pushes to one client on loopback.

Starts ``python -m loader.testing.emulator`` in firehose mode as its own process, connects a
bare trio-websocket client to a combined stream of ``--streams`` synthetic series, and counts
the frames it reads during ``--seconds`` (after a short warm-up). The emulator must not be
what limits a benchmark: the goal is >= 30,000 frames/s (a bare trio-websocket receive loop
reads ~34,000/s here).

    uv run python bench/emulator_rate.py --seconds 10 --streams 100
    uv run python bench/emulator_rate.py --rate 5000   # check the pacing instead
    uv run python bench/emulator_rate.py --client raw  # the emulator's own ceiling

``--client raw`` reads with a minimal frame parser on a plain socket instead of
trio-websocket, to show how far the emulator goes when the client costs almost nothing.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import trio
from trio_websocket import open_websocket_url


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="measuring time")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds not counted")
    p.add_argument("--streams", type=int, default=100, help="subscribed kline series")
    p.add_argument("--rate", default="max", help="firehose frames/s in total, or 'max'")
    p.add_argument("--close-ratio", type=float, default=1.0, help="share of closing frames")
    p.add_argument(
        "--client",
        choices=("trio-websocket", "raw"),
        default="trio-websocket",
        help="who reads: a bare trio-websocket loop, or a minimal frame parser",
    )
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


def _count_raw(url: str, warmup: float, seconds: float) -> tuple[int, float, int]:
    """Count server frames by their headers (unmasked, as servers send them)."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    sock = socket.create_connection((parts.hostname, parts.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(4096)
    buf = buf.split(b"\r\n\r\n", 1)[1]
    frames = closing = 0
    counting = False
    start = end = 0.0
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter()
        if not counting and now - t0 >= warmup:
            counting, start, frames, closing = True, now, 0, 0
        if counting and now - start >= seconds:
            end = now
            break
        buf += sock.recv(1 << 20)
        pos = 0
        while len(buf) - pos >= 2:
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                head, n = 4, int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif n == 127:
                head, n = 10, int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if len(buf) - pos < head + n:
                break
            frames += 1
            closing += b'"x":true' in buf[pos + head : pos + head + n]
            pos += head + n
        buf = buf[pos:]
    sock.close()
    return frames, end - start, closing


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
            if args.client == "raw":
                frames, elapsed, closing = _count_raw(url, args.warmup, args.seconds)
            else:
                frames, elapsed, closing = trio.run(_count, url, args.warmup, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    rate = frames / elapsed
    print(
        f"{frames} frames in {elapsed:.2f} s = {rate:,.0f} frames/s "
        f"({closing} closing) over {args.streams} streams, firehose rate {args.rate}, "
        f"client {args.client}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
