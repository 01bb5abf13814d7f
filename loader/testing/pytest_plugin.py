"""pytest plugin (entry point ``pytest11: loader``): the ``binance_emulator`` fixture.

``binance_emulator`` is an async fixture run by anyio's pytest plugin; the emulator is a
Trio program, so use it from tests marked ``@pytest.mark.anyio`` with an ``anyio_backend``
fixture returning ``"trio"`` (under another backend the test is skipped). It yields a
running :class:`~loader.testing.Emulator` and stops it after the test.

Configuration, most specific first:

* indirect parametrization, with an :class:`~loader.testing.EmulatorConfig` or a dict of
  fields to change in ``binance_emulator_config``::

      @pytest.mark.parametrize("binance_emulator", [{"speed": 1200, "seed": 7}], indirect=True)
      async def test_x(binance_emulator: Emulator) -> None: ...

* overriding the ``binance_emulator_config`` fixture in a test module, class or conftest::

      @pytest.fixture
      def binance_emulator_config() -> EmulatorConfig:
          return EmulatorConfig(speed=600, ping_interval=0.2, pong_timeout=0.5)

The default configuration is Binance's except ``speed=600`` (a 1m candle every 0.1 s).

On the trio backend anyio runs an async-generator fixture and the test in the same task, so
the Trio nursery the fixture opens stays open across the test body: the emulator serves while
the test awaits, and a crash inside the emulator cancels the test rather than going unseen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from loader.testing.config import EmulatorConfig
from loader.testing.server import Emulator, open_emulator

__all__ = ["binance_emulator", "binance_emulator_config"]


@pytest.fixture
def binance_emulator_config() -> EmulatorConfig:
    """The emulator's configuration; override this fixture to change it."""
    return EmulatorConfig(speed=600.0)


@pytest.fixture
async def binance_emulator(
    request: pytest.FixtureRequest,
    anyio_backend: Any,
    binance_emulator_config: EmulatorConfig,
) -> AsyncIterator[Emulator]:
    """A running emulator for one test (see the module docstring for configuration)."""
    backend = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if backend != "trio":
        pytest.skip("the Binance emulator runs on Trio only")
    param = getattr(request, "param", None)
    if isinstance(param, EmulatorConfig):
        config = param
    elif isinstance(param, dict):
        config = binance_emulator_config.replace(**param)
    else:
        config = binance_emulator_config
    async with open_emulator(config) as emulator:
        yield emulator
