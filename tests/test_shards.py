"""Shards, connections and subscriptions: the planning rules, as properties (no I/O)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader.shards import (
    ConnectionPlan,
    Selection,
    SymbolInfo,
    parse_selection,
    producer_name,
    rotation_offsets,
    select_streams,
    shard_of,
    subscribe_schedule,
    summary,
)

symbols = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=2, max_size=12)
stream_names = st.builds(
    lambda s, i: f"{s.lower()}@kline_{i}", symbols, st.sampled_from(["1s", "1m", "1h", "1M"])
)
stream_sets = st.lists(stream_names, unique=True, max_size=400)
# No per-example deadline: on a shared machine the timings say nothing about the rules.
relaxed = settings(deadline=None)


# -- selection ---------------------------------------------------------------------------------


def test_selection_items() -> None:
    selection, problems = parse_selection(["btcusdt", " *usdt", "*FDUSD", "ETHBTC", "BTCUSDT"])
    assert problems == []
    assert selection == Selection(("BTCUSDT", "ETHBTC"), ("USDT", "FDUSD"), False)
    assert selection.dynamic
    everything, _ = parse_selection(["*", "*USDT", "BNBBTC"])
    assert everything == Selection(("BNBBTC",), (), True)
    assert not parse_selection(["BTCUSDT"])[0].dynamic
    _, problems = parse_selection(["*US-DT", "BTC USDT", "**", "x"])
    assert len(problems) == 4
    assert all("SYMBOL" in p for p in problems)


def test_select_takes_trading_symbols_of_the_wanted_quotes_after_the_named_ones() -> None:
    listing = [
        SymbolInfo("BTCUSDT", "TRADING", "USDT"),
        SymbolInfo("ETHBTC", "TRADING", "BTC"),
        SymbolInfo("OLDUSDT", "BREAK", "USDT"),
        SymbolInfo("SOLUSDT", "TRADING", "USDT"),
    ]
    usdt, _ = parse_selection(["ETHBTC", "*USDT"])
    assert usdt.select(listing) == ("ETHBTC", "BTCUSDT", "SOLUSDT")
    every, _ = parse_selection(["*"])
    assert every.select(listing) == ("BTCUSDT", "ETHBTC", "SOLUSDT")
    named, _ = parse_selection(["OLDUSDT"])
    assert named.select(listing) == ("OLDUSDT",)  # named: reported by the caller, not dropped


@relaxed
@given(st.lists(st.builds(SymbolInfo, symbols, st.sampled_from(["TRADING", "BREAK"]),
                          st.sampled_from(["USDT", "BTC", "FDUSD"]))))  # fmt: skip
def test_a_wildcard_selects_exactly_the_trading_symbols_it_matches(
    listing: list[SymbolInfo],
) -> None:
    selection, _ = parse_selection(["*USDT", "*BTC"])
    chosen = set(selection.select(listing))
    assert chosen == {
        i.symbol for i in listing if i.status == "TRADING" and i.quote_asset in ("USDT", "BTC")
    }


# -- shards ------------------------------------------------------------------------------------


def test_shard_of_is_a_fixed_function_of_the_name() -> None:
    # Fixed values: every pod, every Python, every release computes the same split.
    assert [shard_of("btcusdt@kline_1m", n) for n in (1, 2, 3, 7)] == [0, 0, 1, 3]
    with pytest.raises(ValueError, match="at least 1"):
        shard_of("btcusdt@kline_1m", 0)


@relaxed
@given(stream_sets, st.integers(1, 12))
def test_shards_partition_the_streams(names: list[str], count: int) -> None:
    shards = [select_streams(names, count, i) for i in range(count)]
    flat = [s for shard in shards for s in shard]
    assert sorted(flat) == sorted(names)  # the union is the whole set, none in two shards
    for i, shard in enumerate(shards):
        assert all(shard_of(s, count) == i for s in shard)


@relaxed
@given(stream_sets, stream_sets, st.integers(1, 12))
def test_a_listing_moves_no_other_stream(before: list[str], listed: list[str], n: int) -> None:
    after = before + [s for s in listed if s not in before]
    for i in range(n):
        kept = set(select_streams(after, n, i)) & set(before)
        assert kept == set(select_streams(before, n, i))


@pytest.mark.parametrize("count", [2, 3, 8, 24])
def test_shards_are_even_over_many_streams(count: int) -> None:
    names = [f"s{i}usdt@kline_1m" for i in range(24_000)]
    sizes = [len(select_streams(names, count, i)) for i in range(count)]
    mean = len(names) / count
    # As even as a fair random split: within five standard deviations of the mean.
    assert all(abs(n - mean) < 5 * math.sqrt(mean) for n in sizes), sizes


# -- connections -------------------------------------------------------------------------------


@relaxed
@given(stream_sets, st.integers(1, 1024))
def test_initial_plan_uses_as_few_connections_as_the_cap_allows(names: list[str], per: int) -> None:
    plan = ConnectionPlan.initial(names, per)
    assert len(plan.connections) == math.ceil(len(names) / per)
    assert [s for c in sorted(plan.connections) for s in plan.connections[c]] == names
    sizes = [len(v) for v in plan.connections.values()]
    assert all(0 < n <= per for n in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1


@relaxed
@given(stream_sets, st.lists(st.tuples(st.booleans(), stream_sets), max_size=6),
       st.integers(1, 64))  # fmt: skip
def test_listings_and_delistings_never_move_a_placed_stream(
    names: list[str], changes: list[tuple[bool, list[str]]], per: int
) -> None:
    plan = ConnectionPlan.initial(names, per)
    expected = set(names)
    for adding, batch in changes:
        before = plan.where()
        if adding:
            added = plan.add(batch)
            new = set(batch) - set(before)
            assert {s for v in added.values() for s in v} == new
            expected |= set(batch)
        else:
            removed = plan.remove(batch)
            assert {s for v in removed.values() for s in v} == set(batch) & set(before)
            expected -= set(batch)
        after = plan.where()
        assert all(after[s] == c for s, c in before.items() if s in after)
        assert set(after) == expected
        assert all(0 < len(v) <= per for v in plan.connections.values())


def test_new_streams_fill_the_emptiest_connection_before_opening_one() -> None:
    plan = ConnectionPlan.initial([f"s{i}" for i in range(5)], 3)  # 3 + 2
    assert plan.add(["a"]) == {1: ["a"]}
    assert plan.add(["b", "c"]) == {2: ["b", "c"]}
    assert plan.remove(["s3", "s4", "a"]) == {1: ["s3", "s4", "a"]}
    assert 1 not in plan.connections
    assert plan.add(["d"]) == {2: ["d"]}
    with pytest.raises(ValueError, match="1024"):
        ConnectionPlan(1025)


# -- subscriptions and rotations -----------------------------------------------------------------


@relaxed
@given(stream_sets, st.integers(1, 300), st.integers(1, 5))
def test_subscribe_messages_stay_within_five_a_second(
    names: list[str], per_message: int, per_second: int
) -> None:
    schedule = subscribe_schedule(names, per_message=per_message, per_second=per_second)
    assert [s for _, chunk in schedule for s in chunk] == names
    assert all(0 < len(chunk) <= per_message for _, chunk in schedule)
    times = [t for t, _ in schedule]
    # Any one-second window holds at most per_second messages.
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u < t + 1) <= per_second


@relaxed
@given(st.integers(1, 200), st.floats(60, 86_400))
def test_rotations_are_staggered(count: int, rotate_after: float) -> None:
    offsets = rotation_offsets(count, rotate_after)
    assert len(offsets) == count
    assert all(rotate_after * 0.9 - 1e-6 <= t <= rotate_after for t in offsets)
    gap = min(rotate_after / 10, 3600) / count
    ordered = sorted(offsets)
    assert all(b - a >= gap * 0.999 for a, b in itertools.pairwise(ordered))


def test_telemetry_names_the_shard_and_summarises_many_symbols() -> None:
    assert producer_name("loader-1", 0, 1) == "loader-1"
    assert producer_name("loader-1", 2, 3) == "loader-1/shard-2-of-3"
    every, _ = parse_selection(["*"])
    text = summary(every, 1500, ("1m", "1h"), 1000)
    assert text == "*: 1500 symbols x 1m,1h; 1000 streams"
    named, _ = parse_selection(["BTCUSDT", "ETHUSDT"])
    assert summary(named, 2, ("1m",), 2) == "BTCUSDT,ETHUSDT"
