"""Every interval, every outage: the topic holds exactly the emulator's closed candles.

For each of the 16 intervals: a disconnect across one close, across several closes, a
SIGKILL and restart across closes, and STOP_AT. The emulator's market clock jumps (weeks and
months in a blink), so a monthly stream takes as long as a one-second one. Each gap must be
filled from the frames alone: after the reconnect only in-progress updates arrive until the
test moves the clock again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import trio
from kafka_broker import KafkaBroker
from worker_tools import (
    assert_matches_market,
    candles,
    env_without_kafka_vars,
    read_topic,
    running_worker,
    telemetry,
    worker_env,
    worker_settings,
)

from loader import Worker
from loader.intervals import INTERVALS, candle_open, length_ms
from loader.testing import Emulator, EmulatorConfig, open_emulator

pytestmark = pytest.mark.anyio

# The market all but stands still: only the test moves it (`advance`), so what closes when
# is exact whatever the machine's pace.
CLOCK = EmulatorConfig(speed=1e-6, seed=3, ping_interval=0.5, pong_timeout=2.0)
SYMBOL = "BTCUSDT"
# Long enough for several monthly candles: an outage within it is filled, not a hole.
WIDE_WINDOW = str(400 * 86_400)
# A gap after a reconnect is filled within this (seconds), without any candle closing.
FILL_WITHIN = 10.0


def _open(emulator: Emulator, interval: str, index: int) -> int:
    return emulator.market.open_time(interval, index)


def _past_close(emulator: Emulator, interval: str, index: int) -> None:
    """Move the market just past the open of candle `index`: the candles before it closed
    (their closing frames sent), and, but for 1s, one update of candle `index`."""
    emulator.advance_to(_open(emulator, interval, index) + (500 if interval == "1s" else 3_000))


def _nudge(emulator: Emulator, interval: str, index: int) -> int:
    """After a reconnect: frames that show candle `index` open, without closing it (`1s`
    candles only ever send closing frames: there, candle `index` closes). Returns the
    index of the newest closed candle."""
    if interval == "1s":
        _past_close(emulator, interval, index + 1)
        return index
    emulator.advance(2_000)
    return index - 1


async def _written(worker: Worker, count: int) -> None:
    with trio.fail_after(FILL_WITHIN):
        await worker.wait_written(count)


async def _check(kafka: KafkaBroker, emulator: Emulator, topic: str, interval: str,
                 first: int, last: int, *, more: bool = False) -> list[int]:  # fmt: skip
    """The topic holds candles `first..last` (and, with `more`, maybe later ones), each
    once, in order, equal to the market's."""
    records = await read_topic(kafka, topic)
    published = candles(records)
    opens = [c["open_time"] for c in published]
    expected = [_open(emulator, interval, i) for i in range(first, last + 1)]
    assert (opens[: len(expected)] if more else opens) == expected
    assert_matches_market(published, emulator, SYMBOL, interval)
    return opens


def _config(interval: str, behind: int = 0) -> EmulatorConfig:
    """Candle 0 opens at the current candle's open: a market in step with the wall clock.
    With `behind`, that many candles earlier: a worker process holds frames against the wall
    clock, and the test moves the market up to `behind` candles on."""
    now = int(time.time() * 1000)
    return CLOCK.replace(start_ms=candle_open(interval, now - behind * length_ms(interval)))


async def _new_topic(kafka: KafkaBroker, name: str) -> str:
    return await trio.to_thread.run_sync(kafka.new_topic, name)


@pytest.mark.parametrize("interval", INTERVALS)
@pytest.mark.parametrize("closes", [1, 4])
async def test_disconnect_across_closes(kafka: KafkaBroker, interval: str, closes: int) -> None:
    topic = await _new_topic(kafka, f"gap-{closes}-{interval.replace('M', 'mo')}")
    async with open_emulator(_config(interval)) as emulator:
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOL, INTERVAL=interval,
                                   BACKFILL_WINDOW=WIDE_WINDOW, STALL_TIMEOUT="1")  # fmt: skip
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, interval, 2)
            await _written(worker, 2)
            # The outage: frames published meanwhile are lost, then the socket dies.
            emulator.stall()
            _past_close(emulator, interval, 2 + closes)
            emulator.drop()
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            # Only updates of the open candle follow: the gap must be known from them.
            newest = _nudge(emulator, interval, 2 + closes)
            await _written(worker, newest + 1)
            _past_close(emulator, interval, newest + 2)
            await _written(worker, newest + 2)
            worker.stop()
            await worker.finished()
        await _check(kafka, emulator, topic, interval, 0, newest + 1)
    assert worker.stats.candles_backfilled == closes
    assert worker.stats.candles_lost == 0


@pytest.mark.parametrize("interval", INTERVALS)
async def test_sigkill_restart_across_closes(kafka: KafkaBroker, interval: str) -> None:
    topic = await _new_topic(kafka, f"gap-kill-{interval.replace('M', 'mo')}")
    async with open_emulator(_config(interval, behind=10)) as emulator:
        extra = {"SYMBOL": SYMBOL, "INTERVAL": interval, "BACKFILL_WINDOW": WIDE_WINDOW}
        env = env_without_kafka_vars(os.environ) | worker_env(
            kafka, emulator, topic, SYMBOL=SYMBOL, INTERVAL=interval, BACKFILL_WINDOW=WIDE_WINDOW
        )
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "loader"], env=env, stdout=subprocess.DEVNULL
        )
        try:
            await emulator.wait_connections(1)
            _past_close(emulator, interval, 2)
            with trio.fail_after(20):
                await read_topic(kafka, topic, expected=2)
        finally:
            process.kill()
            await process.wait()
        # Three candles close while no worker runs.
        _past_close(emulator, interval, 5)
        settings = worker_settings(kafka, emulator, topic, **extra)
        async with running_worker(settings) as worker:
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            newest = _nudge(emulator, interval, 5)
            await _written(worker, newest - 1)
            _past_close(emulator, interval, newest + 2)
            await _written(worker, newest)
            worker.stop()
            await worker.finished()
        await _check(kafka, emulator, topic, interval, 0, newest + 1)
    assert worker.stats.candles_backfilled == 3


@pytest.mark.parametrize("interval", INTERVALS)
async def test_stop_at_waits_for_the_last_candle(kafka: KafkaBroker, interval: str) -> None:
    """STOP_AT falls while the connection is dead: the candle closing at STOP_AT comes from
    history, and `finished` is said only once it is in Kafka."""
    topic = await _new_topic(kafka, f"gap-stop-at-{interval.replace('M', 'mo')}")
    async with open_emulator(_config(interval)) as emulator:
        stop_at = _open(emulator, interval, 3) - 1  # the close of candle 2
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOL, INTERVAL=interval,
                                   STOP_AT=str(stop_at), STALL_TIMEOUT="0.5")  # fmt: skip
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, interval, 2)
            await _written(worker, 2)
            emulator.stall()
            _past_close(emulator, interval, 3)
            # The stalled connection is replaced; Binance's clock, past STOP_AT, shows.
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            _nudge(emulator, interval, 3)
            with trio.fail_after(30):
                outcome = await worker.finished()
        assert (outcome.status, outcome.exit_code) == ("finished", 0), outcome.message
        # The candle closing at STOP_AT is in; a 1s one after it may be too.
        await _check(kafka, emulator, topic, interval, 0, 2, more=True)


async def test_1024_streams_after_a_ten_minute_outage(kafka: KafkaBroker) -> None:
    """Every stream's gap is filled over a handful of history connections, within the
    request-weight budget, while the market connection keeps answering pings."""
    symbols = [f"SYM{i}USDT" for i in range(512)]
    config = CLOCK.replace(
        symbols=tuple(symbols),
        start_ms=candle_open("1m", int(time.time() * 1000)),
        ping_interval=0.5,
        pong_timeout=3.0,
        # Emulator and worker share one Trio loop here: while the loop is busy with 1024
        # history replies the emulator reads late, and pongs read together would count as
        # a burst of "too many requests". Unanswered pings still close the connection.
        max_incoming_per_second=None,
    )
    topic = await trio.to_thread.run_sync(kafka.new_topic, "gap-1024", 4)
    async with open_emulator(config) as emulator:
        # One market connection carries all 1024 (the most Binance allows on one).
        settings = worker_settings(kafka, emulator, topic, SYMBOL=",".join(symbols),
                                   INTERVAL="1m,3m", CHANNEL_SIZE="2000",
                                   STREAMS_PER_CONNECTION="1024")  # fmt: skip
        assert len(settings.streams) == 1024
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, "1m", 6)  # six 1m and two 3m candles per symbol
            with trio.fail_after(60):
                await worker.wait_written(512 * 8)
            emulator.stall()
            # Ten minutes: ten 1m candles and three or four 3m ones missed per symbol.
            _past_close(emulator, "1m", 16)
            emulator.drop()
            # Reconnected, and every stream subscribed again (200 in the URL, the rest by
            # SUBSCRIBE): the market stands still, so a stream subscribed after the nudge
            # would see no frame to reveal its gap.
            await emulator.wait_for(
                lambda e: (
                    e.stream_handshakes >= 2
                    and sum(len(c.subscriptions) for c in e.connections if c.kind == "stream")
                    == 1024
                )
            )
            _nudge(emulator, "1m", 16)
            expected = 512 * (16 + len(emulator.closed_klines(symbols[0], "3m")))
            with trio.fail_after(60):
                await worker.wait_written(expected)
            worker.stop()
            await worker.finished()
        published = candles(await read_topic(kafka, topic, expected=expected))
        assert len(published) == expected
        for symbol, interval in settings.streams:
            assert_matches_market(published, emulator, symbol, interval)
        api_connections = emulator.handshakes - emulator.stream_handshakes
    stats = worker.stats
    print(
        f"\n{expected} candles, exact; backfilled {stats.candles_backfilled}, fills "
        f"{stats.fills_started}, history connections {api_connections}, history errors "
        f"{dict(stats.history_errors)}, reconnects {dict(stats.reconnects)}"
    )
    assert stats.fills_started == 1024
    assert stats.candles_backfilled == expected - 512 * 8
    assert not any(k.startswith("rejected") for k in stats.history_errors)
    assert api_connections <= 2
    # The one drop is the outage; the market connection was never lost to unanswered pings.
    assert dict(stats.reconnects) == {"closed": 1}
    assert emulator.stream_handshakes == 2


async def test_an_outage_longer_than_the_window_is_a_reported_hole(kafka: KafkaBroker) -> None:
    """Ten 1m candles missed with a five-minute BACKFILL_WINDOW: the ones that closed within
    it are filled, the older ones are a hole that is counted and told in telemetry."""
    topic = await _new_topic(kafka, "gap-hole")
    async with open_emulator(_config("1m")) as emulator:
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOL, BACKFILL_WINDOW="300")
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, "1m", 2)
            await _written(worker, 2)
            emulator.stall()
            _past_close(emulator, "1m", 12)  # candles 2..11 closed meanwhile
            emulator.drop()
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            _nudge(emulator, "1m", 12)
            # The update that reveals the gap has its event time 4.25 s into candle 12:
            # candles closing within five minutes of it, 7..11, are filled; 2..6 are not.
            await _written(worker, 7)
            worker.stop()
            await worker.finished()
        opens = [c["open_time"] for c in candles(await read_topic(kafka, topic))]
        assert opens == [_open(emulator, "1m", i) for i in (0, 1, 7, 8, 9, 10, 11)]
        events = telemetry(await read_topic(kafka, settings.queue_events_topic))
    assert worker.stats.candles_lost == 5
    assert worker.stats.holes == 1
    holes = [e["message"] for e in events if e["message"].startswith("hole:")]
    assert len(holes) == 1
    assert "5 closed candles of btcusdt@kline_1m" in holes[0]
    assert "beyond BACKFILL_WINDOW" in holes[0]


async def test_a_weekly_candle_missed_from_sunday_to_tuesday_is_filled(kafka: KafkaBroker) -> None:
    """The default one-day window, an outage from before a weekly close (Sunday night) to the
    Tuesday after: the week closed more than a day before the frame that reveals it, and is
    filled all the same, not lost."""
    topic = await _new_topic(kafka, "gap-week-window")
    async with open_emulator(_config("1w")) as emulator:
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOL, INTERVAL="1w")
        assert settings.backfill_window == 86_400
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, "1w", 2)
            await _written(worker, 2)
            emulator.stall()
            # Week 2 closes on Sunday night; the feed is back on Tuesday at noon.
            emulator.advance_to(_open(emulator, "1w", 3) + 36 * 3_600_000)
            emulator.drop()
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            _nudge(emulator, "1w", 3)
            await _written(worker, 3)
            worker.stop()
            await worker.finished()
        await _check(kafka, emulator, topic, "1w", 0, 2)
    assert worker.stats.candles_backfilled == 1
    assert worker.stats.candles_lost == 0


async def test_a_stop_waits_for_the_fill_in_progress(kafka: KafkaBroker) -> None:
    """Stopped as soon as a two-hour gap of a 1s stream is known: the 7,200 candles of the
    fill (eight pages) are in Kafka all the same, in order, before the run ends."""
    topic = await _new_topic(kafka, "gap-stop-fill")
    async with open_emulator(_config("1s")) as emulator:
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOL, INTERVAL="1s")
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, "1s", 2)
            await _written(worker, 2)
            emulator.stall()
            _past_close(emulator, "1s", 7202)
            emulator.drop()
            await emulator.wait_for(lambda e: e.stream_handshakes >= 2)
            _nudge(emulator, "1s", 7202)
            await _written(worker, 3)  # the fill has begun
            worker.stop()
            outcome = await worker.finished()
        assert outcome.status == "interrupted"
        await _check(kafka, emulator, topic, "1s", 0, 7201, more=True)
    assert worker.stats.candles_backfilled == 7200


async def test_stop_at_with_a_dead_feed_fills_from_history(kafka: KafkaBroker) -> None:
    """STOP_AT comes (by the wall clock) while the feed is silent and not yet replaced: the
    candles that closed by then are fetched from history before `finished`."""
    topic = await _new_topic(kafka, "gap-stop-at-dead")
    async with open_emulator(_config("1s")) as emulator:
        stop_at = _open(emulator, "1s", 3) - 1
        settings = worker_settings(kafka, emulator, topic, SYMBOL=SYMBOL, INTERVAL="1s",
                                   STOP_AT=str(stop_at), STALL_TIMEOUT="60",
                                   HEALTH_TIMEOUT="120")  # fmt: skip
        async with running_worker(settings) as worker:
            await emulator.wait_connections(1)
            _past_close(emulator, "1s", 2)
            await _written(worker, 2)
            emulator.stall()
            _past_close(emulator, "1s", 4)  # candles 2 and 3 close unseen
            with trio.fail_after(30):
                outcome = await worker.finished()
        assert (outcome.status, outcome.exit_code) == ("finished", 0), outcome.message
        await _check(kafka, emulator, topic, "1s", 0, 2, more=True)
    assert worker.stats.candles_backfilled >= 1
    assert emulator.stream_handshakes == 1
