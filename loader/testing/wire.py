"""Bytes on the wire: WebSocket frames the server writes, and the JSON inside them.

Server-to-client frames are unmasked (RFC 6455, 5.1), so framing a message is a header and
the payload; building them here rather than through a WebSocket library lets the publisher
encode a frame once, fan it out to every subscriber and write a whole batch in one
``send_all``, which is what makes tens of thousands of frames per second possible.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from loader.testing.market import Kline, KlineEvent

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "combined",
    "error_reply",
    "frame",
    "kline_payload",
    "kline_payload_us",
    "micros",
    "result_reply",
    "text_frame",
]

OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

_encoder = msgspec.json.Encoder()
_pack_16 = struct.Struct("!BBH").pack
_pack_64 = struct.Struct("!BBQ").pack


def frame(opcode: int, payload: bytes) -> bytes:
    """One final (FIN) unmasked frame."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return _pack_16(first, 126, n) + payload
    return _pack_64(first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame; ``payload`` must be UTF-8 (all JSON here is)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return _pack_16(0x81, 126, n) + payload
    return _pack_64(0x81, 127, n) + payload


def kline_payload(event_time: int, kline: Kline) -> bytes:
    """The raw-stream payload of a kline event, key order and formatting as Binance's."""
    return _encoder.encode(KlineEvent("kline", event_time, kline.symbol, kline))


def micros(ms: int) -> int:
    """A millisecond instant in microseconds (``timeUnit=MICROSECOND``)."""
    return ms * 1000


def kline_payload_us(event_time: int, kline: Kline) -> bytes:
    """:func:`kline_payload` with every time in microseconds (``timeUnit=MICROSECOND``).

    The close time becomes the candle's last microsecond (``...999999``), as the millisecond
    one is its last millisecond.
    """
    in_us = msgspec.structs.replace(
        kline, open_time=kline.open_time * 1000, close_time=kline.close_time * 1000 + 999
    )
    return _encoder.encode(KlineEvent("kline", event_time * 1000, kline.symbol, in_us))


def combined(stream: str, data: bytes) -> bytes:
    """Wrap a payload for a combined stream: ``{"stream":"<name>","data":<payload>}``."""
    return b'{"stream":"' + stream.encode() + b'","data":' + data + b"}"


def encode(value: Any) -> bytes:
    """JSON with dict keys in insertion order, as the replies are documented."""
    return _encoder.encode(value)


def result_reply(result: Any, request_id: Any) -> bytes:
    """A live-method reply: ``{"result":...,"id":...}``."""
    return _encoder.encode({"result": result, "id": request_id})


def error_reply(code: int, msg: str, request_id: Any) -> bytes:
    """A live-method error: ``{"error":{"code":..,"msg":..},"id":..}``."""
    return _encoder.encode({"error": {"code": code, "msg": msg}, "id": request_id})
