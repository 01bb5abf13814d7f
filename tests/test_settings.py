"""Settings from the environment: defaults, aliases, and one message naming every problem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loader.settings import ConfigError, Secret, load_settings

MINIMAL = {
    "QUEUE_ID": "q-1",
    "SYMBOL": "btcusdt",
    "KAFKA_TOPIC": "candles",
    "TELEMETRY_PRODUCER_ID": "loader-1",
}


def test_defaults() -> None:
    s = load_settings(MINIMAL)
    assert s.symbols == ("BTCUSDT",)
    assert s.intervals == ("1m",)
    assert s.type == "ws_candles"
    assert s.kafka.bootstrap_servers == "localhost:9092"
    assert s.kafka.security_protocol == "PLAINTEXT"
    assert (s.queue_control_topic, s.queue_events_topic) == ("queue-control", "queue-events")
    assert s.binance_ws_url == "wss://stream.binance.com:9443/ws"
    assert s.telemetry_interval == 10.0
    assert s.stop_grace == 10.0
    assert (s.termination_grace, s.shutdown_budget) == (30.0, 25.0)
    assert not s.all_candles
    assert s.coalesce == 0.010


def test_coalescing_is_in_milliseconds_and_zero_turns_it_off() -> None:
    assert load_settings({**MINIMAL, "COALESCE_MS": "2.5"}).coalesce == 0.0025
    assert load_settings({**MINIMAL, "COALESCE_MS": "0"}).coalesce == 0.0


def test_kafka_client_metrics_are_off_unless_a_measuring_run_asks() -> None:
    assert not load_settings(MINIMAL).kafka.client_metrics
    assert load_settings({**MINIMAL, "KAFKA_CLIENT_METRICS": "1"}).kafka.client_metrics
    with pytest.raises(ConfigError, match="KAFKA_CLIENT_METRICS='yes' is not one of 0, 1"):
        load_settings({**MINIMAL, "KAFKA_CLIENT_METRICS": "yes"})


def test_streams_are_every_symbol_interval_pair_in_lowercase_names() -> None:
    s = load_settings({**MINIMAL, "SYMBOL": "BTCUSDT, ethusdt,BTCUSDT", "INTERVAL": "1m,1h"})
    assert s.stream_names == (
        "btcusdt@kline_1m", "btcusdt@kline_1h", "ethusdt@kline_1m", "ethusdt@kline_1h",
    )  # fmt: skip


def test_security_follows_user_and_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    sasl = load_settings({**MINIMAL, "KAFKA_USER": "u", "KAFKA_PASSWORD": "p", "CA_PATH": str(ca)})
    assert sasl.kafka.security_protocol == "SASL_SSL"
    assert sasl.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert sasl.kafka.ca_path == ca
    tls = load_settings({**MINIMAL, "CA_PATH": str(ca)})
    assert tls.kafka.security_protocol == "SSL"


def test_producer_names_win_over_aliases() -> None:
    s = load_settings(
        {
            **MINIMAL,
            "KAFKA_USER_PRODUCER": "producer",
            "KAFKA_PASSWORD_PRODUCER": "right",
            "KAFKA_USER": "alias",
            "KAFKA_PASSWORD": "wrong",
        }
    )
    assert s.kafka.user == "producer"
    assert s.kafka.password == Secret("right")


def test_secret_never_shows() -> None:
    s = load_settings({**MINIMAL, "KAFKA_USER": "u", "KAFKA_PASSWORD": "hunter2-secret"})
    assert "hunter2-secret" not in repr(s)
    assert "hunter2-secret" not in str(s.kafka)
    assert s.kafka.password is not None
    assert s.kafka.password.reveal() == "hunter2-secret"


def test_stop_at_accepts_iso_and_epoch_ms() -> None:
    iso = load_settings({**MINIMAL, "STOP_AT": "2026-11-24T10:00:00Z"})
    ms = load_settings({**MINIMAL, "STOP_AT": "1795514400000"})
    naive = load_settings({**MINIMAL, "STOP_AT": "2026-11-24T10:00:00"})
    assert iso.stop_at == ms.stop_at == naive.stop_at == 1795514400.0


@pytest.mark.parametrize(
    "raw",
    [
        "1795514400",  # epoch seconds: 10 digits
        "1795514400.0",
        "1795514400000",  # epoch milliseconds: 13 digits
        "2026-11-24T10:00:00Z",
        "2026-11-24T10:00:00+00:00",
        "2026-11-24T11:00:00+01:00",
        "2026-11-24T10:00:00",  # naive: UTC
        "2026-11-24 10:00:00",
        "2026-11-24T10:00:00.000Z",
    ],
)
def test_stop_at_in_seconds_milliseconds_or_iso_is_the_same_instant(raw: str) -> None:
    assert load_settings({**MINIMAL, "STOP_AT": raw}).stop_at == 1795514400.0


def test_stop_at_numbers_are_told_apart_by_magnitude() -> None:
    # Below 1e11 seconds (the year 5138), milliseconds from there (1e11 ms is 1973).
    assert load_settings({**MINIMAL, "STOP_AT": "99999999999"}).stop_at == 99999999999.0
    assert load_settings({**MINIMAL, "STOP_AT": "1500000000000"}).stop_at == 1500000000.0
    assert load_settings({**MINIMAL, "STOP_AT": "1500000000"}).stop_at == 1500000000.0
    assert load_settings({**MINIMAL, "STOP_AT": "99999999999999"}).stop_at == 99999999999.999


@pytest.mark.parametrize(
    "raw",
    [
        "1795514400000000",  # microseconds: past milliseconds' range
        "1400000000",  # 2014: before Binance's candles
        "0",
        "-1795514400",
        "tomorrow",
        "2026-13-01T00:00:00Z",
        "1.7955e9",
    ],
)
def test_a_stop_at_that_is_no_time_of_binance_is_refused_naming_the_rule(raw: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, "STOP_AT": raw})
    (problem,) = caught.value.problems
    assert problem.startswith(f"STOP_AT={raw!r} is not an ISO 8601 time, epoch seconds")
    assert "below 1e11" in problem
    assert "epoch milliseconds (below 1e14)" in problem


def test_a_stop_at_in_the_past_is_valid() -> None:
    """A retried pod gets the same STOP_AT, often past by then: it completes up to it."""
    assert load_settings({**MINIMAL, "STOP_AT": "2020-01-01T00:00:00Z"}).stop_at == 1577836800.0


@pytest.mark.parametrize(
    ("env", "rule"),
    [
        ({"ROTATE_AFTER": "86400"}, "ROTATE_AFTER=86400 is not below 86400: Binance cuts"),
        ({"ROTATE_AFTER": "90000"}, "ROTATE_AFTER=90000 is not below 86400"),
        (
            {"HEALTH_TIMEOUT": "10", "STALL_TIMEOUT": "10"},
            "HEALTH_TIMEOUT=10 is not above STALL_TIMEOUT=10: the worker pings",
        ),
        ({"STALL_TIMEOUT": "120"}, "HEALTH_TIMEOUT=60 is not above STALL_TIMEOUT=120"),
        ({"TERMINATION_GRACE_PERIOD": "5"}, "TERMINATION_GRACE_PERIOD=5 is not above 5"),
        (
            {"BINANCE_WS_URL": "wss://stream.binance.com:9443/ws?timeUnit=MICROSECOND"},
            "has a query or fragment: the worker adds its own path and query",
        ),
        ({"BINANCE_WS_URL": "wss://stream.binance.com:9443/ws?"}, "has a query or fragment"),
        ({"BINANCE_WS_URL": "wss://stream.binance.com:9443/ws#x"}, "has a query or fragment"),
        ({"BINANCE_WS_URL": "wss:///ws"}, "has no host"),
        ({"BINANCE_API_URL": "ws://:9443/ws-api/v3"}, "has no host"),
    ],
)
def test_values_that_do_not_work_together_are_refused_with_the_rule(
    env: dict[str, str], rule: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, **env})
    (problem,) = caught.value.problems
    assert rule in problem


def test_cross_checks_go_in_the_one_message_with_the_other_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                **MINIMAL,
                "ROTATE_AFTER": "86400",
                "HEALTH_TIMEOUT": "5",
                "BINANCE_WS_URL": "wss://example/ws?x=1",
                "INTERVAL": "2m",
                "STOP_AT": "1795514400000000",
            }
        )
    text = str(caught.value)
    for needle in ["ROTATE_AFTER", "HEALTH_TIMEOUT", "BINANCE_WS_URL", "'2m'", "STOP_AT"]:
        assert needle in text
    assert len(caught.value.problems) == 5


def test_a_refused_value_is_not_judged_again_against_the_others() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**MINIMAL, "HEALTH_TIMEOUT": "-1", "STALL_TIMEOUT": "90"})
    assert caught.value.problems == ["HEALTH_TIMEOUT='-1' is not a positive number of seconds"]


def test_a_url_path_is_kept() -> None:
    s = load_settings({**MINIMAL, "BINANCE_WS_URL": "wss://proxy.example:443/binance/ws"})
    assert s.binance_ws_url == "wss://proxy.example:443/binance/ws"


def test_every_problem_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            {
                "SYMBOL": "btc-usdt",
                "INTERVAL": "2m",
                "KAFKA_USER": "u",
                "CA_PATH": "/nonexistent/ca.pem",
                "STOP_AT": "tomorrow",
                "CANDLES": "some",
                "TELEMETRY_INTERVAL": "-1",
                "METRICS_PORT": "70000",
                "BINANCE_WS_URL": "http://example",
                "KAFKA_TOPIC": "bad topic",
                "COALESCE_MS": "1e3",
            }
        )
    text = str(caught.value)
    for needle in [
        "QUEUE_ID", "TELEMETRY_PRODUCER_ID", "'BTC-USDT'", "'2m'", "KAFKA_PASSWORD_PRODUCER",
        "CA_PATH", "STOP_AT", "CANDLES", "TELEMETRY_INTERVAL", "METRICS_PORT", "BINANCE_WS_URL",
        "KAFKA_TOPIC", "COALESCE_MS",
    ]:  # fmt: skip
        assert needle in text
    assert len(caught.value.problems) == 13


def test_more_streams_than_one_connection_carries() -> None:
    # Split over connections of STREAMS_PER_CONNECTION (at most Binance's 1024) each.
    symbols = ",".join(f"S{i}USDT" for i in range(65))
    intervals = "1m,3m,5m,15m,30m,1h,2h,4h,6h,8h,12h,1d,3d,1w,1M,1s"
    settings = load_settings({**MINIMAL, "SYMBOL": symbols, "INTERVAL": intervals})
    assert len(settings.streams) == 1040


def test_process_exits_2_with_one_message_naming_every_problem() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA", "QUEUE", "SYMBOL"))}
    env.update({"INTERVAL": "7m", "KAFKA_PASSWORD_PRODUCER": "s3cret-value"})
    done = subprocess.run(
        [sys.executable, "-m", "loader"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("invalid configuration") == 1
    for needle in ["QUEUE_ID", "SYMBOL", "'7m'", "KAFKA_TOPIC", "KAFKA_USER_PRODUCER"]:
        assert needle in done.stderr
    assert "s3cret-value" not in done.stderr
