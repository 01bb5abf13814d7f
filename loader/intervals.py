"""Candle boundaries of Binance's intervals, in epoch milliseconds (UTC).

Fixed-length intervals are aligned to the Unix epoch, weeks open on Monday 00:00 and `1M` is
the calendar month, so only months need a calendar.
"""

from __future__ import annotations

import calendar
import time
from typing import Final

INTERVALS: Final = (
    "1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h",
    "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M",
)  # fmt: skip
_UNIT_MS: Final = {"s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
# 1970-01-01 was a Thursday: weeks are counted from the Monday four days later.
_MONDAY: Final = 4 * 86_400_000
# The longest month, for bounds that must hold for every interval.
LONGEST_MS: Final = 31 * 86_400_000


def length_ms(interval: str) -> int:
    """A candle's length; for `1M` the longest month (31 days)."""
    if interval == "1M":
        return LONGEST_MS
    return int(interval[:-1]) * _UNIT_MS[interval[-1]]


def _month(ms: int) -> int:
    t = time.gmtime(ms // 1000)
    return t.tm_year * 12 + t.tm_mon - 1


def _month_start(month: int) -> int:
    year, month0 = divmod(month, 12)
    return calendar.timegm((year, month0 + 1, 1, 0, 0, 0)) * 1000


def candle_open(interval: str, ms: int) -> int:
    """Open time of the candle of `interval` that contains instant `ms`."""
    if interval == "1M":
        return _month_start(_month(ms))
    length = length_ms(interval)
    offset = _MONDAY if interval == "1w" else 0
    return (ms - offset) // length * length + offset


def next_open(interval: str, open_ms: int) -> int:
    """Open time of the candle after the one opening at `open_ms` (its close time + 1)."""
    if interval == "1M":
        return _month_start(_month(open_ms) + 1)
    return open_ms + length_ms(interval)


def open_before(interval: str, open_ms: int, n: int = 1) -> int:
    """Open time of the candle `n` before the one opening at `open_ms`."""
    if interval == "1M":
        return _month_start(_month(open_ms) - n)
    return open_ms - n * length_ms(interval)


def count_between(interval: str, first_open: int, stop_open: int) -> int:
    """How many candles open in `[first_open, stop_open)`; both are candle opens."""
    if stop_open <= first_open:
        return 0
    if interval == "1M":
        return _month(stop_open) - _month(first_open)
    return (stop_open - first_open) // length_ms(interval)
