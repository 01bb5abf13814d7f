"""Failure modes a test (or the emulator process, on a schedule) can inject.

Each fault is a method on the running :class:`~loader.testing.server.Emulator`; this module
holds what they send and the schedule format of the process (``--fault``). The frames are
the kinds a worker meets on a bad day: broken JSON, a binary frame, a frame larger than the
1 MiB a trio-websocket client accepts by default, an event type it has never seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from loader.testing import wire

__all__ = [
    "FAULT_KINDS",
    "FaultTarget",
    "ScheduledFault",
    "binary_frame",
    "invalid_json_frame",
    "oversized_payload",
    "refusal_body",
    "run_schedule",
    "shutdown_payload",
    "unknown_event_payload",
]

#: Fault names accepted by :meth:`ScheduledFault.parse` and ``--fault``.
FAULT_KINDS: tuple[str, ...] = (
    "drop",
    "reset",
    "stall",
    "invalid-json",
    "binary",
    "oversized",
    "unknown-event",
    "refuse",
    "shutdown",
    "rotate",
)

#: One byte over the 1 MiB (2**20) message limit of trio-websocket's client by default.
DEFAULT_OVERSIZE = 2**20 + 1


def invalid_json_frame() -> bytes:
    """A text frame cut in the middle of a kline event."""
    return wire.text_frame(b'{"e":"kline","E":17000000000')


def binary_frame() -> bytes:
    """A binary frame (gzip magic and noise): Binance's JSON streams never send one."""
    return wire.frame(wire.OP_BINARY, b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03binary")


def unknown_event_payload(event_time: int) -> bytes:
    """A well-formed event of a type no consumer knows."""
    return wire.encode({"e": "futureEvent", "E": event_time, "s": "BTCUSDT", "z": [1, 2, 3]})


def oversized_payload(size: int, event_time: int) -> bytes:
    """A valid JSON event of exactly ``size`` bytes (padded), for the message-size limit."""
    head = b'{"e":"padding","E":' + str(event_time).encode() + b',"p":"'
    pad = max(0, size - len(head) - 2)
    return head + b"x" * pad + b'"}'


def shutdown_payload(event_time: int) -> bytes:
    """``{"e":"serverShutdown","E":...}`` as documented for the market streams."""
    return wire.encode({"e": "serverShutdown", "E": event_time})


def refusal_body(status: int, until_ms: int) -> bytes:
    """The JSON body Binance sends with a 429 or a 418 (error -1003)."""
    if status == 418:
        msg = (
            f"Way too much request weight used; IP banned until {until_ms}. "
            "Please use WebSocket Streams for live updates to avoid bans."
        )
    else:
        msg = (
            "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. "
            "Please use WebSocket Streams for live updates to avoid polling the API."
        )
    return wire.encode({"code": -1003, "msg": msg})


@dataclass(frozen=True, slots=True)
class ScheduledFault:
    """A fault the process injects by itself, ``at`` seconds after start, then ``every``.

    Text form (``--fault``): ``KIND[:ARG[:ARG...]][@AT[/EVERY]]``, e.g. ``drop@30``,
    ``stall:5@10/60`` (stall 5 s at 10 s, then every minute), ``refuse:429:3:2@0`` (refuse the
    next 3 handshakes with 429 and ``Retry-After: 2``), ``shutdown:1@120`` (``serverShutdown``,
    close 1 s later), ``oversized:2000000@5``. Kinds are :data:`FAULT_KINDS`.
    """

    kind: str
    at: float = 0.0
    every: float | None = None
    args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; expected one of {FAULT_KINDS}")
        if self.every is not None and self.every <= 0:
            raise ValueError("every must be positive")

    @classmethod
    def parse(cls, text: str) -> ScheduledFault:
        """Read the text form described in the class docstring."""
        spec, _, when = text.partition("@")
        kind, *args = spec.split(":")
        at_text, _, every_text = when.partition("/")
        return cls(
            kind,
            float(at_text) if at_text else 0.0,
            float(every_text) if every_text else None,
            tuple(args),
        )


class FaultTarget(Protocol):
    """The fault methods of the emulator handle, as the schedule calls them."""

    def drop(self, *, reset: bool = False) -> int: ...

    def stall(self, seconds: float | None = None) -> int: ...

    def send_invalid_json(self) -> int: ...

    def send_binary(self) -> int: ...

    def send_oversized(self, size: int = ...) -> int: ...

    def send_unknown_event(self) -> int: ...

    def refuse_handshakes(
        self, count: int = 1, *, status: int = 429, retry_after: int = 1
    ) -> None: ...

    def shutdown(self, grace: float = ...) -> int: ...

    def rotate(self) -> int: ...


def _apply(target: FaultTarget, fault: ScheduledFault) -> None:
    a = fault.args
    kind = fault.kind
    if kind in ("drop", "reset"):
        target.drop(reset=kind == "reset")
    elif kind == "stall":
        target.stall(float(a[0]) if a else None)
    elif kind == "invalid-json":
        target.send_invalid_json()
    elif kind == "binary":
        target.send_binary()
    elif kind == "oversized":
        target.send_oversized(int(a[0]) if a else DEFAULT_OVERSIZE)
    elif kind == "unknown-event":
        target.send_unknown_event()
    elif kind == "refuse":
        target.refuse_handshakes(
            int(a[1]) if len(a) > 1 else 1,
            status=int(a[0]) if a else 429,
            retry_after=int(a[2]) if len(a) > 2 else 1,
        )
    elif kind == "shutdown":
        target.shutdown(float(a[0]) if a else 1.0)
    else:
        target.rotate()


async def run_schedule(target: FaultTarget, faults: tuple[ScheduledFault, ...]) -> None:
    """Inject ``faults`` on their schedule (relative to now) until cancelled."""

    async def one(fault: ScheduledFault) -> None:
        await trio.sleep(fault.at)
        while True:
            _apply(target, fault)
            if fault.every is None:
                return
            await trio.sleep(fault.every)

    async with trio.open_nursery() as nursery:
        for fault in faults:
            nursery.start_soon(one, fault)
