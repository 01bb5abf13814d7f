"""Market-stream names and the live methods of a stream connection.

``SUBSCRIBE``, ``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``, ``SET_PROPERTY`` and ``GET_PROPERTY``
with the replies and error objects of Binance's "Live Subscribing/Unsubscribing" section.
Binance validates requests with a strict JSON deserializer whose messages name a line and
column; the emulator reproduces the wording, and its column is the end of the message
(the exact column Binance would give is not reproduced).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeAlias

import msgspec

from loader.testing import wire
from loader.testing.intervals import is_interval

__all__ = ["StreamKey", "handle_control", "parse_kline_stream", "stream_name"]

#: A kline series: (uppercase symbol, interval).
StreamKey: TypeAlias = tuple[str, str]

_METHODS = ("SUBSCRIBE", "UNSUBSCRIBE", "LIST_SUBSCRIPTIONS", "SET_PROPERTY", "GET_PROPERTY")
_KLINE = re.compile(r"([a-z0-9]+)@kline_([0-9]+[smhdwM])")
#: Binance documents "alphanumeric strings; max length 36", yet its own SDK sends uuid4
#: strings (36 characters with hyphens) and they are accepted, so length is what counts.
_ID_MAX_LENGTH = 36
_MALFORMED_AT = re.compile(r"byte (\d+)")


def stream_name(key: StreamKey) -> str:
    """``("BTCUSDT", "1m")`` -> ``"btcusdt@kline_1m"``."""
    return f"{key[0].lower()}@kline_{key[1]}"


def parse_kline_stream(name: str, known: Callable[[str], bool]) -> StreamKey | None:
    """The kline series a stream name carries, or ``None`` if it carries nothing here.

    Binance stream names take a lowercase symbol; an uppercase or unknown symbol, an unknown
    interval or another stream type is accepted and stays silent, as Binance does.
    """
    m = _KLINE.fullmatch(name)
    if m is None or not is_interval(m.group(2)):
        return None
    symbol = m.group(1).upper()
    return (symbol, m.group(2)) if known(symbol) else None


class ControlTarget(Protocol):
    """What a live method acts on: one stream connection."""

    combined: bool

    def list_subscriptions(self) -> list[str]:
        """Stream names in subscription order."""
        ...

    def subscribe(self, names: Sequence[str]) -> bool:
        """Add streams; ``False`` (and nothing added) if the per-connection cap would break."""
        ...

    def unsubscribe(self, names: Sequence[str]) -> None:
        """Remove streams; unknown names are ignored."""
        ...


class _Refused(Exception):
    """A request answered with an error object."""

    def __init__(self, code: int, msg: str, request_id: Any) -> None:
        super().__init__(msg)
        self.reply = wire.error_reply(code, msg, request_id)


def _bad_request(detail: str, request_id: Any, text: str) -> _Refused:
    return _Refused(2, f"Invalid request: {detail} at line 1 column {len(text)}", request_id)


def _valid_id(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return -(2**63) <= value < 2**63
    return isinstance(value, str) and len(value) <= _ID_MAX_LENGTH


def handle_control(text: str, target: ControlTarget) -> bytes:
    """Answer one text message received on a stream connection."""
    try:
        method, params, request_id = _parse(text)
        return _dispatch(method, params, request_id, text, target)
    except _Refused as refused:
        return refused.reply


def _parse(text: str) -> tuple[str, list[Any], Any]:
    try:
        request = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        m = _MALFORMED_AT.search(str(exc))
        column = int(m.group(1)) + 1 if m else len(text)
        raise _Refused(3, f"Invalid JSON: expected value at line 1 column {column}", None) from None
    if not isinstance(request, dict):
        raise _bad_request("expected a JSON object", None, text)
    request_id = request.get("id")
    if "id" not in request or not _valid_id(request_id):
        raise _Refused(2, "Invalid request: request ID must be an unsigned integer", None)
    method = request.get("method")
    if method is None:
        raise _bad_request("missing field `method`", request_id, text)
    if method not in _METHODS:
        expected = ", ".join(f"`{m}`" for m in _METHODS)
        raise _bad_request(
            f"unknown variant `{method}`, expected one of {expected}", request_id, text
        )
    if set(request) - {"id", "method", "params"}:
        raise _Refused(2, "Invalid request: too many parameters", request_id)
    params = request.get("params", [])
    if not isinstance(params, list):
        raise _bad_request("invalid type: expected a sequence", request_id, text)
    return method, params, request_id


def _dispatch(
    method: str, params: list[Any], request_id: Any, text: str, target: ControlTarget
) -> bytes:
    if method in ("SUBSCRIBE", "UNSUBSCRIBE"):
        if not all(isinstance(p, str) for p in params):
            raise _bad_request("invalid type: expected a string", request_id, text)
        if method == "UNSUBSCRIBE":
            target.unsubscribe(params)
        elif not target.subscribe(params):
            # Binance documents the 1024-stream cap but not its error; this is a guess.
            raise _Refused(2, "Invalid request: too many streams", request_id)
        return wire.result_reply(None, request_id)
    if method == "LIST_SUBSCRIPTIONS":
        if params:
            raise _Refused(2, "Invalid request: too many parameters", request_id)
        return wire.result_reply(target.list_subscriptions(), request_id)
    return _property(method, params, request_id, target)


def _property(method: str, params: list[Any], request_id: Any, target: ControlTarget) -> bytes:
    wanted = 2 if method == "SET_PROPERTY" else 1
    if len(params) > wanted:
        raise _Refused(2, "Invalid request: too many parameters", request_id)
    if not params or not isinstance(params[0], str):
        raise _Refused(2, "Invalid request: property name must be a string", request_id)
    if params[0] != "combined":
        raise _Refused(0, "Unknown property", request_id)
    if method == "GET_PROPERTY":
        return wire.result_reply(target.combined, request_id)
    if len(params) < 2 or not isinstance(params[1], bool):
        raise _Refused(1, "Invalid value type: expected Boolean", request_id)
    target.combined = params[1]
    return wire.result_reply(None, request_id)
