"""Binance's per-IP budgets: WebSocket API request weight, and connection attempts.

Weight is counted per IP in fixed one-minute windows (a request at 00:01:23 counts towards the
00:01:00 minute), as Binance documents. The first request over the limit in a window is
answered 429 with ``retryAfter`` (the start of the next window); a further request in the same
window, i.e. a client that did not back off, earns an IP ban (418) of ``ban_seconds``,
doubled for each repeat up to three days, during which every request and every WebSocket API
handshake from that IP is refused. Connection attempts (every opening handshake, accepted or
not) are counted per IP and per service over a sliding window, market streams and the
WebSocket API apart as Binance serves them from different hosts; over the limit the
handshake is refused with 429. All of it runs on the Trio clock, in real seconds, whatever
the market speed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio

__all__ = ["IpLimits", "Refusal"]

_MINUTE = 60.0
_MAX_BAN = 3 * 86_400.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request or a handshake is refused: HTTP-style status, and seconds until retry."""

    status: int  # 429 or 418
    retry_after: float
    #: Binance's -1003 message; ``{until}`` stands for the epoch time the refusal ends.
    template: str

    def message(self, until_ms: int) -> str:
        """The -1003 message, naming ``until_ms`` where Binance names the end of a ban."""
        return self.template.format(until=until_ms)


class _Ip:
    __slots__ = ("attempts", "ban_until", "bans", "strikes", "weight", "window")

    def __init__(self) -> None:
        self.window = -1
        self.weight = 0
        # 429s answered in the current window: one more request earns a ban.
        self.strikes = 0
        self.ban_until = 0.0
        self.bans = 0
        # Per service ("stream", "api"): times of the attempts still in the window.
        self.attempts: dict[str, deque[float]] = {}


class IpLimits:
    """Request weight and connection attempts per IP, with Binance's answers when over."""

    def __init__(
        self,
        weight_limit: int | None,
        max_attempts: int | None,
        attempts_window: float,
        ban_seconds: float,
    ) -> None:
        self.weight_limit = weight_limit
        self.max_attempts = max_attempts
        self.attempts_window = attempts_window
        self.ban_seconds = ban_seconds
        self._ips: dict[str, _Ip] = {}
        #: Requests and handshakes refused for exceeding a limit (429 and 418).
        self.refusals = 0

    def _ip(self, ip: str, now: float) -> _Ip:
        state = self._ips.get(ip)
        if state is None:
            state = self._ips[ip] = _Ip()
        window = int(now // _MINUTE)
        if window != state.window:
            state.window, state.weight, state.strikes = window, 0, 0
        return state

    def weight(self, ip: str) -> int:
        """Weight ``ip`` has used in the current minute."""
        return self._ip(ip, trio.current_time()).weight

    def total_weight(self) -> int:
        """Weight used in the current minute, all IPs together."""
        now = trio.current_time()
        return sum(self._ip(ip, now).weight for ip in list(self._ips))

    def charge(self, ip: str, weight: int) -> Refusal | None:
        """Count a request of ``weight``; ``None`` if it may be served, else the refusal."""
        now = trio.current_time()
        state = self._ip(ip, now)
        if now < state.ban_until:
            self.refusals += 1
            return self._ban_refusal(state, now)
        state.weight += weight
        limit = self.weight_limit
        if limit is None or state.weight <= limit:
            return None
        self.refusals += 1
        if state.strikes:
            # It did not back off after a 429: banned, longer each time.
            duration = min(self.ban_seconds * 2**state.bans, _MAX_BAN)
            state.bans += 1
            state.ban_until = now + duration
            return self._ban_refusal(state, now)
        state.strikes += 1
        return Refusal(
            429,
            (state.window + 1) * _MINUTE - now,
            f"Too much request weight used; current limit is {limit} request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        )

    @staticmethod
    def _ban_refusal(state: _Ip, now: float) -> Refusal:
        # The message names the end of the ban; the caller fills in the epoch time.
        return Refusal(
            418,
            state.ban_until - now,
            "Way too much request weight used; IP banned until {until}. "
            "Please use WebSocket Streams for live updates to avoid bans.",
        )

    def attempt(self, ip: str, service: str) -> Refusal | None:
        """Count one connection attempt to ``service``; ``None`` if within the limit, else
        the refusal."""
        now = trio.current_time()
        state = self._ip(ip, now)
        window = state.attempts.setdefault(service, deque())
        window.append(now)
        while window[0] <= now - self.attempts_window:
            window.popleft()
        if self.max_attempts is None or len(window) <= self.max_attempts:
            return None
        self.refusals += 1
        return Refusal(
            429,
            window[0] + self.attempts_window - now,
            f"Too many connection attempts; current limit is {self.max_attempts} per "
            f"{self.attempts_window:g} seconds.",
        )
