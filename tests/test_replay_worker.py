"""The worker against real recorded Binance sessions: what it publishes equals, field by
field, what the recordings' kline frames imply.

The emulator replays each recording in /work/shared/fixtures/binance (found through
``loader.testing.fixtures_dir()``) to whatever path the worker builds from its settings:
``/ws/<stream>`` for one symbol, ``/stream?streams=a/b`` for several. Expectations are
worked out here from the recorded frame texts alone, with ``json``, not from the worker's
or the emulator's code. The binance.us session holds one closed OMGBUSD candle; the
binance.com one holds no closed kline at all, so it is checked with ``CANDLES=all``, where
every kline update is published with ``is_closed``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import msgspec
import pytest
import trio
from kafka_broker import KafkaBroker
from worker_tools import CANDLE_FIELDS, candles, read_topic, running_worker, worker_env

from loader import Settings, load_settings
from loader.testing import EmulatorConfig, Recording, load_recordings, open_emulator

pytestmark = pytest.mark.anyio

RECORDINGS = {r.name.removesuffix(".ws"): r for r in load_recordings()}
# The replayed session goes silent after its last frame, and its symbols are unknown to the
# emulator's market: a stall check (default after 10 s) would end the run. Far beyond the test.
STALL_TIMEOUT = "60"
HEALTH_TIMEOUT = "120"  # above STALL_TIMEOUT, as settings require
WITHIN = 30.0  # seconds a case may take before it fails instead of hanging

# Kline field of Binance's payload for each published field.
WIRE = {
    "open_time": "t", "open": "o", "high": "h", "low": "l", "close": "c", "volume": "v",
    "close_time": "T", "quote_asset_volume": "q", "number_of_trades": "n",
    "taker_buy_base_asset_volume": "V", "taker_buy_quote_asset_volume": "Q", "symbol": "s",
    "interval": "i",
}  # fmt: skip
DECIMALS = {"open", "high", "low", "close", "volume", "quote_asset_volume",
            "taker_buy_base_asset_volume", "taker_buy_quote_asset_volume"}  # fmt: skip


def kline_events(recording: Recording) -> list[dict[str, Any]]:
    """The kline payloads of a recording, in recorded order, numbers as exact decimals."""
    events = []
    for _, text in recording.frames:
        frame = json.loads(text, parse_float=Decimal)
        data = frame["data"] if set(frame) == {"stream", "data"} else frame
        if data.get("e") == "kline":
            events.append(data)
    return events


def kline_symbols(recording: Recording, *, from_url: bool) -> list[str]:
    """Uppercase symbols of the recording's 1m kline streams: those the recorded URL asked
    for, or only those with at least one kline frame (in order of first frame)."""
    if from_url:
        names = recording.url.split("streams=", 1)[1].split("/")
        return [n.split("@")[0].upper() for n in names if n.endswith("@kline_1m")]
    return list(dict.fromkeys(e["s"] for e in kline_events(recording) if e["k"]["i"] == "1m"))


def expected_candles(
    recording: Recording, symbols: list[str], *, all_candles: bool
) -> list[dict[str, Any]]:
    """What the worker must publish for ``symbols``' 1m klines of ``recording``."""
    klines = [e["k"] for e in kline_events(recording) if e["s"] in symbols and e["k"]["i"] == "1m"]
    out = []
    for k in klines:
        if not (all_candles or k["x"]):
            continue
        candle = {
            field: Decimal(k[key]) if field in DECIMALS else k[key] for field, key in WIRE.items()
        }
        if all_candles:
            candle["is_closed"] = k["x"]
        out.append(candle)
    return out


def assert_every_frame_moves_forward(recording: Recording, symbols: list[str]) -> None:
    """Precondition of the expectation above: per stream, event times rise and no update
    follows its candle's close, so the worker has no reason to drop any of them."""
    last: dict[str, tuple[int, int]] = {}
    for e in kline_events(recording):
        if e["s"] not in symbols:
            continue
        event_time, open_time, closed = e["E"], e["k"]["t"], e["k"]["x"]
        if e["s"] in last:
            prev_event, last_closed = last[e["s"]]
            assert event_time > prev_event
            assert open_time > last_closed
        last[e["s"]] = (event_time, open_time if closed else -1)


def at_recording(env: dict[str, str], recording: Recording) -> Settings:
    """Settings whose clock stands at the recording's last event: the door holds the 2021
    frames against the time they were recorded, not against today."""
    last = max(e["E"] for e in kline_events(recording))
    return msgspec.structs.replace(load_settings(env), clock=lambda: last / 1000)


def exact(values: list[dict[str, Any]]) -> list[list[tuple[str, str, str]]]:
    """Field, type and digits: 13.72120000 must not come out as 13.7212."""
    return [[(f, type(v).__name__, str(v)) for f, v in c.items()] for c in values]


CASES = [
    # (recording, SYMBOL from the recorded URL's kline streams or from kline frames, CANDLES)
    pytest.param("binance-us-combined-2021-10-11", False, "closed", id="us-omgbusd-raw-closed"),
    pytest.param("binance-us-combined-2021-10-11", True, "closed", id="us-4-combined-closed"),
    pytest.param("binance-us-combined-2021-10-11", False, "all", id="us-omgbusd-raw-all"),
    pytest.param("binance-com-combined-2021-10-11", False, "all", id="com-2-combined-all"),
    pytest.param("binance-com-combined-2021-10-11", True, "all", id="com-4-combined-all"),
]


@pytest.mark.parametrize(("name", "from_url", "mode"), CASES)
async def test_published_candles_equal_the_recorded_klines(
    kafka: KafkaBroker, name: str, from_url: bool, mode: str
) -> None:
    recording = RECORDINGS[name]
    symbols = kline_symbols(recording, from_url=from_url)
    all_candles = mode == "all"
    expected = expected_candles(recording, symbols, all_candles=all_candles)
    assert expected, f"{name} has no {mode} kline of {symbols}"
    assert_every_frame_moves_forward(recording, symbols)
    streams = [f"{s.lower()}@kline_1m" for s in symbols]
    path = f"/ws/{streams[0]}" if len(streams) == 1 else "/stream?streams=" + "/".join(streams)

    topic = await trio.to_thread.run_sync(kafka.new_topic, f"replay-{name[:10]}-{mode}")
    config = EmulatorConfig(recordings=tuple(RECORDINGS.values()), replay_speed=None)
    async with open_emulator(config) as emulator:
        env = worker_env(
            kafka, emulator, topic,
            SYMBOL=",".join(symbols), INTERVAL="1m", CANDLES=mode, STALL_TIMEOUT=STALL_TIMEOUT,
            HEALTH_TIMEOUT=HEALTH_TIMEOUT,
        )  # fmt: skip
        with trio.fail_after(WITHIN):
            async with running_worker(at_recording(env, recording)) as worker:
                await worker.wait_written(len(expected))
                # The worker asked for its own path, and got the recording filtered to it.
                replayed = [c for c in emulator.connections if c.kind == "replay"]
                assert [(c.path, c.subscriptions) for c in replayed] == [(path, tuple(streams))]
                worker.stop("replayed")
                outcome = await worker.finished()
    assert (outcome.status, outcome.exit_code) == ("interrupted", 0), outcome.message
    assert outcome.records_written == len(expected)
    stats = worker.stats
    assert not stats.malformed, stats.malformed  # real frames: nothing skipped
    assert not stats.frames_refused, stats.frames_refused  # and each plausible
    assert stats.duplicates_dropped == 0
    assert stats.candles_backfilled == 0
    assert not stats.reconnects, stats.reconnects

    records = await read_topic(kafka, topic, expected=len(expected))
    fields = CANDLE_FIELDS + (["is_closed"] if all_candles else [])
    for record in records:
        assert list(json.loads(record.value)) == fields
    published = candles(records)
    assert [r.key for r in records] == [f"{c['symbol']}-1m".encode() for c in published]
    assert {c["symbol"] for c in published} <= set(symbols)
    assert published == expected
    assert exact(published) == exact(expected)


async def test_a_quiet_stream_that_answers_pings_is_kept(kafka: KafkaBroker) -> None:
    """Real quiet symbols send nothing between trades: after its last frame the replayed
    session stays silent but answers pings, and silence alone must not cost a reconnect."""
    recording = RECORDINGS["binance-us-combined-2021-10-11"]
    topic = await trio.to_thread.run_sync(kafka.new_topic, "quiet-stream")
    # The market knows OMGBUSD, so the history API confirms the silent symbol is real.
    config = EmulatorConfig(
        recordings=(recording,), replay_speed=None, symbols=("BTCUSDT", "OMGBUSD")
    )
    async with open_emulator(config) as emulator:
        env = worker_env(kafka, emulator, topic, SYMBOL="OMGBUSD", STALL_TIMEOUT="0.3")
        async with running_worker(at_recording(env, recording)) as worker:
            await worker.wait_written(1)
            # The silence under test: ten stall timeouts without a single frame.
            await trio.sleep(3.0)
            worker.stop()
            outcome = await worker.finished()
        assert emulator.stream_handshakes == 1
    assert (outcome.status, outcome.records_written) == ("interrupted", 1)
    assert sum(worker.stats.reconnects.values()) == 0
