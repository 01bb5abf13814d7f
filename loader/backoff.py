"""Connection attempts: one per-IP budget for every connection, and backoff after failures."""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

import trio


class ConnectBudget:
    """Connection attempts allowed per minute, shared by every connection of the process:
    Binance limits handshakes per IP, whichever endpoint they are for."""

    def __init__(self, per_minute: int) -> None:
        self._recent: collections.deque[float] = collections.deque(maxlen=per_minute)

    async def turn(self) -> None:
        """Wait until one more attempt fits in the budget, and take it."""
        if len(self._recent) == self._recent.maxlen:
            await trio.sleep_until(self._recent[0] + 60.0)
        self._recent.append(trio.current_time())


class Backoff:
    """Capped exponential backoff with full jitter, over a (possibly shared) budget."""

    def __init__(
        self,
        per_minute: int = 5,
        base: float = 1.0,
        cap: float = 30.0,
        rng: Callable[[], float] = random.random,
        *,
        budget: ConnectBudget | None = None,
    ) -> None:
        self.base, self.cap, self.rng = base, cap, rng
        self.attempt = 0
        self.budget = budget or ConnectBudget(per_minute)

    async def turn(self) -> None:
        """Take one attempt from the budget: this holds for reconnects after a healthy
        connection died, too, not only after failures."""
        await self.budget.turn()

    def failed(self, at_least: float = 0.0) -> float:
        """Seconds to wait after a failed attempt (at least `at_least`, e.g. Retry-After)."""
        jittered = min(self.cap, self.base * 2.0**self.attempt) * self.rng()
        self.attempt += 1
        return max(jittered, at_least)

    def reset(self) -> None:
        self.attempt = 0
