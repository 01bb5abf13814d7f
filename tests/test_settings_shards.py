"""Settings of a market-wide run: SYMBOL wildcards, shards, connections, exchangeInfo refresh."""

from __future__ import annotations

import pytest

from loader.settings import ConfigError, load_settings
from loader.shards import Selection

MINIMAL = {
    "QUEUE_ID": "q-1",
    "SYMBOL": "btcusdt",
    "KAFKA_TOPIC": "candles",
    "TELEMETRY_PRODUCER_ID": "loader-1",
}


def test_defaults_are_one_shard_of_one_run() -> None:
    s = load_settings(MINIMAL)
    assert (s.shard_count, s.shard_index) == (1, 0)
    assert s.streams_per_connection == 200
    assert s.symbols_refresh == 3600.0
    assert s.selection == Selection(("BTCUSDT",))


def test_wildcards_and_named_symbols() -> None:
    s = load_settings({**MINIMAL, "SYMBOL": "*usdt,*FDUSD,ethbtc"})
    assert s.selection == Selection(("ETHBTC",), ("USDT", "FDUSD"))
    assert s.symbols == ("ETHBTC",)
    assert load_settings({**MINIMAL, "SYMBOL": "*"}).selection.everything


def test_the_shard_index_comes_from_the_indexed_job_unless_given() -> None:
    env = {**MINIMAL, "SHARD_COUNT": "3", "JOB_COMPLETION_INDEX": "2"}
    assert load_settings(env).shard_index == 2
    assert load_settings({**env, "SHARD_INDEX": "1"}).shard_index == 1


def test_every_problem_in_one_message() -> None:
    env = {
        **MINIMAL,
        "SYMBOL": "*US-DT,BTC USDT",
        "SHARD_COUNT": "3",
        "JOB_COMPLETION_INDEX": "3",
        "STREAMS_PER_CONNECTION": "1025",
        "SYMBOLS_REFRESH": "0",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    problems = caught.value.problems
    assert len(problems) == 5, problems
    text = str(caught.value)
    for name in ("*US-DT", "BTC USDT", "JOB_COMPLETION_INDEX=3", "STREAMS_PER_CONNECTION"):
        assert name in text
    assert "SYMBOLS_REFRESH" in text


@pytest.mark.parametrize(
    ("name", "value"),
    [("SHARD_COUNT", "0"), ("SHARD_INDEX", "-1"), ("STREAMS_PER_CONNECTION", "0")],
)
def test_bad_values(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({**MINIMAL, name: value})
