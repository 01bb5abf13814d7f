"""Replay of recorded Binance sessions, byte for byte.

A recording (``.ws``) is a text file whose first line is ``<url> <-> <connect unix time>``
and whose other lines are ``<receive unix time>: <text frame exactly as received>``. The
emulator serves a recording to every connection whose path and query equal the recorded
URL's, at the recorded pace (scaled by ``replay_speed``) or as fast as possible.

A stream connection that asks for some of a recording's streams (``/ws/<stream>``,
``/ws/a/b`` or ``/stream?streams=a/b``) gets that recording filtered to those streams, as
Binance would have sent them: :func:`split_frames` tells each frame's stream and slices its
event (the ``data`` of a combined-stream wrapper) out of the recorded text, so a raw
connection receives the payload exactly as it appears inside the recording and a combined
one the recorded frame itself.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio
import trio.lowlevel

from loader.testing import wire

__all__ = [
    "FIXTURES_ENV",
    "RecordedFrame",
    "Recording",
    "fixtures_dir",
    "load_recordings",
    "replay",
    "replay_frames",
    "requested_streams",
    "split_frames",
]

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

    @property
    def combined(self) -> bool:
        """Whether the session was recorded on a combined-stream path (``/stream?...``)."""
        return urlsplit(self.url).path.rstrip("/") == "/stream"

    @property
    def streams(self) -> tuple[str, ...]:
        """The stream names the recorded URL asked for, in its order (empty if none)."""
        return requested_streams(self.target) or ()

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


def requested_streams(target: str) -> tuple[str, ...] | None:
    """The streams a market-stream path asks for, in order; ``None`` if it is no such path.

    ``/ws/a/b`` -> ``("a", "b")``, ``/stream?streams=a/b`` -> ``("a", "b")``, ``/ws`` -> ``()``.
    """
    parts = urlsplit(target)
    path = parts.path
    if path == "/ws" or path.startswith("/ws/"):
        return tuple(n for n in path[4:].split("/") if n)
    if path in ("/stream", "/stream/"):
        return tuple(n for n in parse_qs(parts.query).get("streams", [""])[0].split("/") if n)
    return None


@dataclass(frozen=True, slots=True)
class RecordedFrame:
    """One recorded frame, with the stream it belongs to."""

    #: Receive unix time, as recorded.
    at: float
    #: The frame exactly as received.
    text: str
    #: The stream it was sent on; ``None`` if that cannot be told (a reply, garbage, ...).
    stream: str | None
    #: The event alone: the ``data`` of a combined-stream wrapper, sliced out of ``text``
    #: character for character; ``text`` itself when the frame is not wrapped.
    payload: str
    #: Whether ``text`` is a combined-stream wrapper ``{"stream":..,"data":..}``.
    wrapped: bool


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _skip(text: str, i: int) -> int:
    m = _WHITESPACE.match(text, i)
    return m.end() if m else i


def _members(text: str) -> dict[str, tuple[int, int]] | None:
    """Where each member's value of a JSON object text starts and ends; ``None`` if the
    text is not one JSON object. Positions index ``text``, so values can be sliced out."""

    def expect(i: int, chars: str) -> str:
        if text[i : i + 1] not in tuple(chars):
            raise ValueError(f"expected one of {chars!r} at {i}")
        return text[i]

    members: dict[str, tuple[int, int]] = {}
    try:
        i = _skip(text, 0)
        expect(i, "{")
        i = _skip(text, i + 1)
        if text[i : i + 1] != "}":
            while True:
                expect(i, '"')
                key, i = _DECODER.raw_decode(text, i)
                i = _skip(text, i)
                expect(i, ":")
                start = _skip(text, i + 1)
                _, end = _DECODER.raw_decode(text, start)
                members[key] = (start, end)
                i = _skip(text, end)
                if expect(i, ",}") == "}":
                    break
                i = _skip(text, i + 1)
        if _skip(text, i + 1) != len(text):
            raise ValueError("text after the object")
    except ValueError:  # includes json.JSONDecodeError
        return None
    return members


def _raw_stream(payload: Any, streams: tuple[str, ...]) -> str | None:
    """The stream of an unwrapped event recorded on a raw path carrying ``streams``."""
    if not isinstance(payload, dict) or "e" not in payload:
        return None  # a reply to a live method, or not an event at all
    if len(streams) == 1:
        return streams[0]
    # Several raw streams: only a kline tells its stream by itself.
    k = payload.get("k")
    if payload["e"] == "kline" and isinstance(k, dict):
        name = f"{str(payload.get('s', '')).lower()}@kline_{k.get('i')}"
        return name if name in streams else None
    return None


def split_frames(recording: Recording) -> tuple[RecordedFrame, ...]:
    """Every frame of ``recording`` with its stream and its event sliced out of the text."""
    streams = recording.streams
    out = []
    for at, text in recording.frames:
        stream: str | None = None
        payload, wrapped = text, False
        members = _members(text)
        if members is not None and set(members) == {"stream", "data"}:
            s_start, s_end = members["stream"]
            name = json.loads(text[s_start:s_end])
            if isinstance(name, str):
                d_start, d_end = members["data"]
                stream, payload, wrapped = name, text[d_start:d_end], True
        elif members is not None and not recording.combined:
            stream = _raw_stream(json.loads(text), streams)
        out.append(RecordedFrame(at, text, stream, payload, wrapped))
    return tuple(out)


async def replay_frames(
    frames: Sequence[RecordedFrame],
    connected_at: float,
    push: Callable[[RecordedFrame], None],
    speed: float | None,
) -> None:
    """Hand each frame to ``push`` at its recorded time (scaled by ``speed``), then return.

    ``speed=1.0`` keeps the recorded gaps (measured from ``connected_at``), ``2.0`` halves
    them, ``None`` hands everything over at once.
    """
    start = trio.current_time()
    for frame in frames:
        if speed is not None:
            await trio.sleep_until(start + max(0.0, frame.at - connected_at) / speed)
        push(frame)
    await trio.lowlevel.checkpoint()


async def replay(recording: Recording, push: Callable[[bytes], None], speed: float | None) -> None:
    """Push ``recording``'s frames, framed, through ``push`` as recorded, then return.

    ``speed=1.0`` keeps the recorded gaps (measured from the recorded connect time),
    ``2.0`` halves them, ``None`` sends everything at once.
    """
    start = trio.current_time()
    for stamp, text in recording.frames:
        if speed is not None:
            await trio.sleep_until(start + max(0.0, stamp - recording.connected_at) / speed)
        push(wire.text_frame(text.encode("utf-8")))
    await trio.lowlevel.checkpoint()
