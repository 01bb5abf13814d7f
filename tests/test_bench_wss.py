"""The benchmark's parties over wss://, as Binance serves: its emulator process makes a CA of
its own, and a client process trusts it only through the SSL_CERT_FILE it is handed."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import msgspec
import trustme

from bench.parties import Emulator, Scrape, combined_url, window_view
from bench.procs import Procs
from bench.results import Baseline


def _read(procs: Procs, name: str, url: str, env: dict[str, str]) -> Baseline:
    # The paced firehose may open with a burst of up to 256 frames, then pause as long as
    # they take at its rate: at 2,000 frames/s the warm-up covers that.
    child = procs.python(name, "bench.baselines", "ws", "--url", url, "--warmup", "0.5",
                         "--seconds", "0.5", env=env, talk=True)  # fmt: skip
    return msgspec.json.decode(child.readline(60), type=Baseline)


def test_the_bench_emulator_serves_wss_trusted_through_ssl_cert_file(tmp_path: Path) -> None:
    with Procs(tmp_path) as procs:
        emulator = Emulator(procs, "emulator", "--synthetic", "2", "--rate", "2000")
        assert emulator.url.startswith("wss://")
        url = combined_url(emulator.url, 2)
        read = _read(procs, "trusting", url, emulator.env)
        assert read.count > 0
        # The trust is what was handed over: a context without the emulator's CA refuses it.
        host, _, port = emulator.url.removeprefix("wss://").partition(":")
        trusting = ssl.create_default_context(cafile=emulator.env["SSL_CERT_FILE"])
        assert _handshake(trusting, host, int(port)) is None
        stranger = ssl.create_default_context(cafile=_stranger_ca(tmp_path))
        assert isinstance(_handshake(stranger, host, int(port)), ssl.SSLCertVerificationError)


def _handshake(context: ssl.SSLContext, host: str, port: int) -> ssl.SSLError | None:
    with socket.create_connection((host, port), timeout=10) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=host):
                return None
        except ssl.SSLError as exc:
            return exc


def _stranger_ca(folder: Path) -> str:
    path = folder / "stranger.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


def test_the_plain_comparison_emulator_serves_ws(tmp_path: Path) -> None:
    with Procs(tmp_path) as procs:
        emulator = Emulator(procs, "emulator", "--synthetic", "2", "--rate", "2000", tls=False)
        assert emulator.url.startswith("ws://")
        assert emulator.env == {}
        assert _read(procs, "plain", combined_url(emulator.url, 2), {}).count > 0


def test_a_window_counts_each_thread_group_from_its_start() -> None:
    start = Scrape({}, {"MainThread": 1.0, "loader-kafka-sender": 0.5}, {})
    end = Scrape(
        {},
        {"MainThread": 1.75, "loader-kafka-sender": 0.75,
         "kafka-python-producer-1-network-thread": 0.25},
        {"records-per-request-avg": 4.0},
    )  # fmt: skip
    view = window_view(start, end)
    assert view.threads == {
        "Trio (MainThread: the tasks, TLS, decoding)": 0.75,
        "sink's sender thread (producer.send)": 0.25,
        "kafka-python's network thread": 0.25,  # born within the window: from zero
    }
    assert view.kafka_client == {"records-per-request-avg": 4.0}
