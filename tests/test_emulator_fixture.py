"""The ``binance_emulator`` pytest fixture (loader.testing.pytest_plugin) and its configuration."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import open_websocket_url

from loader.testing import Emulator, EmulatorConfig

pytestmark = pytest.mark.anyio


@pytest.fixture
def binance_emulator_config() -> EmulatorConfig:
    # Overriding the plugin's config fixture for this module.
    return EmulatorConfig(speed=1200.0, seed=11, symbols=("BTCUSDT", "DOGEUSDT"))


async def test_fixture_serves_streams_with_the_overridden_config(
    binance_emulator: Emulator,
) -> None:
    assert binance_emulator.config.seed == 11
    assert binance_emulator.market.symbols == ("BTCUSDT", "DOGEUSDT")
    async with open_websocket_url(binance_emulator.raw_url("dogeusdt@kline_1m")) as ws:
        event = json.loads(await ws.get_message())
    assert event["e"] == "kline"
    assert event["s"] == "DOGEUSDT"


@pytest.mark.parametrize("binance_emulator", [{"seed": 5}], indirect=True)
async def test_indirect_dict_changes_fields_of_the_config(binance_emulator: Emulator) -> None:
    assert binance_emulator.config.seed == 5
    assert binance_emulator.config.speed == 1200.0  # the rest from binance_emulator_config


@pytest.mark.parametrize(
    "binance_emulator", [EmulatorConfig(seed=9, symbols=("ETHUSDT",))], indirect=True
)
async def test_indirect_config_replaces_it(binance_emulator: Emulator) -> None:
    assert binance_emulator.config.seed == 9
    assert binance_emulator.config.speed == 1.0
    assert binance_emulator.market.symbols == ("ETHUSDT",)


async def test_emulator_runs_beside_the_test_body(binance_emulator: Emulator) -> None:
    # The fixture's nursery lives across the test: its tasks keep serving while the test
    # awaits, and a nursery of the test's own works inside it.
    async with trio.open_nursery() as nursery:
        got: list[str] = []

        async def read_one() -> None:
            async with open_websocket_url(binance_emulator.raw_url("btcusdt@kline_1s")) as ws:
                got.append(str(await ws.get_message()))

        nursery.start_soon(read_one)
        await binance_emulator.wait_connections(1)
    assert json.loads(got[0])["k"]["i"] == "1s"
