"""Binance kline intervals: names, candle boundaries and update cadence.

All times are Unix epoch milliseconds, UTC. Binance aligns every fixed-length interval
to the Unix epoch, except ``1w`` (weeks open on Monday 00:00 UTC) and ``1M`` (calendar
months).
"""

from __future__ import annotations

import datetime as _dt

__all__ = [
    "INTERVALS",
    "candle_open",
    "interval_ms",
    "is_interval",
    "next_open",
    "open_at",
    "update_period_ms",
]

_SECOND = 1000
_MINUTE = 60 * _SECOND
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR
_WEEK = 7 * _DAY
# 1970-01-01 was a Thursday; the first Monday is four days later.
_FIRST_MONDAY = 4 * _DAY

_FIXED: dict[str, int] = {
    "1s": _SECOND,
    "1m": _MINUTE,
    "3m": 3 * _MINUTE,
    "5m": 5 * _MINUTE,
    "15m": 15 * _MINUTE,
    "30m": 30 * _MINUTE,
    "1h": _HOUR,
    "2h": 2 * _HOUR,
    "4h": 4 * _HOUR,
    "6h": 6 * _HOUR,
    "8h": 8 * _HOUR,
    "12h": 12 * _HOUR,
    "1d": _DAY,
    "3d": 3 * _DAY,
}

#: Every interval Binance spot serves, in Binance's own order.
INTERVALS: tuple[str, ...] = (*_FIXED, "1w", "1M")


def is_interval(name: str) -> bool:
    """Whether ``name`` is a Binance interval (case-sensitive: ``1m`` is not ``1M``)."""
    return name in _FIXED or name in ("1w", "1M")


def interval_ms(interval: str) -> int | None:
    """Length of a candle in ms, or ``None`` for ``1M`` whose months differ in length."""
    if interval == "1w":
        return _WEEK
    if interval == "1M":
        return None
    return _FIXED[interval]


def update_period_ms(interval: str) -> int:
    """How often Binance pushes an update of the current candle (its documented cadence)."""
    return _SECOND if interval == "1s" else 2 * _SECOND


def _month_index(ms: int) -> int:
    d = _dt.datetime.fromtimestamp(ms / 1000, tz=_dt.UTC)
    return d.year * 12 + d.month - 1


def _month_start(month_index: int) -> int:
    year, month0 = divmod(month_index, 12)
    start = _dt.datetime(year, month0 + 1, 1, tzinfo=_dt.UTC)
    return int(start.timestamp()) * 1000


def candle_open(interval: str, ms: int) -> int:
    """Open time of the candle of ``interval`` that contains instant ``ms``."""
    if interval == "1M":
        return _month_start(_month_index(ms))
    if interval == "1w":
        return (ms - _FIRST_MONDAY) // _WEEK * _WEEK + _FIRST_MONDAY
    length = _FIXED[interval]
    return ms // length * length


def next_open(interval: str, open_ms: int) -> int:
    """Open time of the candle after the one opening at ``open_ms`` (its close time + 1)."""
    if interval == "1M":
        return _month_start(_month_index(open_ms) + 1)
    length = interval_ms(interval)
    assert length is not None
    return open_ms + length


def open_at(interval: str, first_open: int, index: int) -> int:
    """Open time of the ``index``-th candle counted from the candle opening at ``first_open``."""
    if interval == "1M":
        return _month_start(_month_index(first_open) + index)
    length = interval_ms(interval)
    assert length is not None
    return first_open + index * length


def index_of(interval: str, first_open: int, ms: int) -> int:
    """Index (from the candle opening at ``first_open``) of the candle containing ``ms``.

    Negative for instants before ``first_open``.
    """
    if interval == "1M":
        return _month_index(ms) - _month_index(first_open)
    length = interval_ms(interval)
    assert length is not None
    return (ms - first_open) // length
