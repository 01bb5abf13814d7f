"""Replay of recorded Binance sessions, byte for byte.

A recording (``.ws``) is a text file whose first line is ``<url> <-> <connect unix time>``
and whose other lines are ``<receive unix time>: <text frame exactly as received>``. The
emulator serves a recording to every connection whose path and query equal the recorded
URL's, at the recorded pace (scaled by ``replay_speed``) or as fast as possible.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import trio
import trio.lowlevel

from loader.testing import wire

__all__ = ["FIXTURES_ENV", "Recording", "fixtures_dir", "load_recordings", "replay"]

#: Environment variable overriding where the recorded fixtures are.
FIXTURES_ENV = "BINANCE_FIXTURES_DIR"


def fixtures_dir() -> Path:
    """The recorded Binance fixtures: ``$BINANCE_FIXTURES_DIR``, else ``<repo>/../shared/...``.

    In CI the repository is cloned beside ``shared/``, so the default is relative to the
    repository root (the parent of the ``loader`` package).
    """
    override = os.environ.get(FIXTURES_ENV)
    if override:
        return Path(override)
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "fixtures" / "binance"


@dataclass(frozen=True, slots=True)
class Recording:
    """A recorded WebSocket session."""

    #: The URL as recorded, e.g. ``wss://stream.binance.com:9443/stream?streams=...``.
    url: str
    #: Unix time (seconds) of the connection.
    connected_at: float
    #: ``(receive unix time, frame text)`` in order; the text is exactly what was received.
    frames: tuple[tuple[float, str], ...]
    #: Where it was read from (file name), for messages.
    name: str = ""

    @property
    def target(self) -> str:
        """Path and query of the recorded URL: where the emulator serves this recording."""
        parts = urlsplit(self.url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recording:
        """Read a ``.ws`` file."""
        p = Path(path)
        # newline="" keeps any \r inside a frame; only the \n separators are removed.
        with p.open(encoding="utf-8", newline="") as f:
            header = f.readline().rstrip("\n")
            url, sep, connected = header.rpartition(" <-> ")
            if not sep:
                raise ValueError(f"{p}: first line is not '<url> <-> <time>'")
            frames = []
            for n, line in enumerate(f, start=2):
                text = line[:-1] if line.endswith("\n") else line
                if not text:
                    continue
                stamp, sep, frame_text = text.partition(": ")
                if not sep:
                    raise ValueError(f"{p}:{n}: not '<time>: <frame>'")
                frames.append((float(stamp), frame_text))
        return cls(url, float(connected), tuple(frames), p.name)


def load_recordings(directory: str | os.PathLike[str] | None = None) -> tuple[Recording, ...]:
    """Every ``*.ws`` recording in ``directory`` (default :func:`fixtures_dir`), by name."""
    d = Path(directory) if directory is not None else fixtures_dir()
    return tuple(Recording.load(p) for p in sorted(d.glob("*.ws")))


async def replay(recording: Recording, push: Callable[[bytes], None], speed: float | None) -> None:
    """Push ``recording``'s frames through ``push``, then return.

    ``speed=1.0`` keeps the recorded gaps (measured from the recorded connect time),
    ``2.0`` halves them, ``None`` sends everything at once.
    """
    start = trio.current_time()
    for stamp, text in recording.frames:
        if speed is not None:
            await trio.sleep_until(start + max(0.0, stamp - recording.connected_at) / speed)
        push(wire.text_frame(text.encode("utf-8")))
    await trio.lowlevel.checkpoint()
