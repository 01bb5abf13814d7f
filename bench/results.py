"""What a benchmark run measured: plain structs, saved as JSON beside the logs and read by
``bench.report``. Times are seconds unless a name says otherwise; ``*_ns`` are wall clock."""

from __future__ import annotations

import math

import msgspec


class Lifecycle(msgspec.Struct, kw_only=True):
    """One worker process from spawn to exit."""

    label: str
    spawned_ns: int
    started_ns: int | None = None  # `started` telemetry's own timestamp
    first_ns: int | None = None  # the consumer first saw a candle in Kafka
    stop_sent_ns: int = 0
    stop_acked_ns: int = 0
    exited_ns: int = 0
    exit_code: int | None = None
    final_status: str = ""
    records_written: int = -1  # as the terminal telemetry says
    records_in_kafka: int = -2

    @property
    def to_started(self) -> float | None:
        return None if self.started_ns is None else (self.started_ns - self.spawned_ns) / 1e9

    @property
    def to_first(self) -> float | None:
        return None if self.first_ns is None else (self.first_ns - self.spawned_ns) / 1e9

    @property
    def stop(self) -> float:
        return (self.exited_ns - self.stop_sent_ns) / 1e9

    @property
    def delivered(self) -> bool:
        """Exit 0, `interrupted`, and Kafka holds exactly what telemetry says was written."""
        return (
            self.exit_code == 0
            and self.final_status == "interrupted"
            and self.records_written == self.records_in_kafka
        )


class WorkerView(msgspec.Struct, kw_only=True):
    """What the worker itself said over a window (its /metrics): CPU seconds per thread group
    in the window, and kafka-python's producer sensors at the window's end (averaged over the
    last 5-10 s; only with KAFKA_CLIENT_METRICS=1)."""

    threads: dict[str, float] = msgspec.field(default_factory=dict)
    kafka_client: dict[str, float] = msgspec.field(default_factory=dict)


class Phase(msgspec.Struct, kw_only=True):
    """Freshness at one firehose rate: every closing frame sent in the window, matched."""

    rate: float
    window: float
    sent: int  # closing frames the emulator sent in the window
    latencies_ms: list[float]  # of those the consumer read, send -> read, in send order
    sent_at: list[float]  # their send times, seconds from the window's start
    # Of the same candles, emulator send -> the record's CreateTime (ms resolution): the time
    # until the worker's producer.send(); the rest is kafka-python, the broker, the consumer.
    to_send_ms: list[float]
    worker_cpu: float  # CPU seconds in the window: the worker's,
    consumer_cpu: float  # the consumer's,
    emulator_cpu: float  # the emulator's,
    broker_cpu: float  # the broker's,
    machine_cpu: float  # and the whole machine's (at most cores x window)
    profile: Profile | None = None  # py-spy right after the window, same rate
    view: WorkerView | None = None

    @property
    def missing(self) -> int:
        return self.sent - len(self.latencies_ms)

    @property
    def cpu_us_per_candle(self) -> float:
        return self.worker_cpu / max(1, self.sent) * 1e6

    def percentile(self, p: float) -> float:
        return percentile(self.latencies_ms, p)

    @property
    def after_send_ms(self) -> list[float]:
        """CreateTime -> consumer read, per candle."""
        return [
            total - before for total, before in zip(self.latencies_ms, self.to_send_ms, strict=True)
        ]


class Throughput(msgspec.Struct, kw_only=True):
    """The worker at the firehose's full speed: end offsets over a steady window."""

    streams: int
    window: float
    records: int  # end-offset growth over the window
    worker_cpu: float
    emulator_cpu: float
    broker_cpu: float
    machine_cpu: float  # busy CPU seconds of the whole machine (2 cores: at most 2 x window)
    rss_kib: int
    hwm_kib: int
    plain: bool = False  # over plain ws:// (the comparison row), not wss:// as Binance serves
    view: WorkerView | None = None

    @property
    def rate(self) -> float:
        return self.records / self.window

    @property
    def others_cpu(self) -> float:
        """CPU seconds the rest of the machine used in the window (other people's work)."""
        return self.machine_cpu - self.worker_cpu - self.emulator_cpu - self.broker_cpu

    @property
    def cpu_us_per_candle(self) -> float:
        return self.worker_cpu / max(1, self.records) * 1e6


class Baseline(msgspec.Struct, kw_only=True):
    count: int
    seconds: float
    cpu: float
    value_bytes: int = 0

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_us(self) -> float:
        return self.cpu / max(1, self.count) * 1e6


class Idle(msgspec.Struct, kw_only=True):
    rss_kib: int
    hwm_kib: int
    cpu_share: float  # CPU seconds per second while idle


class Machine(msgspec.Struct, kw_only=True):
    cores: int
    cpu_model: str
    memory_gib: float
    kernel: str
    python: str
    kafka_python: str
    trio: str
    trio_websocket: str
    msgspec: str
    crc32c: str
    kafka: str
    load_before: tuple[float, float, float]


class Profile(msgspec.Struct, kw_only=True):
    """py-spy samples of the worker under full load, summarised."""

    seconds: float
    rate: int  # samples per second asked of py-spy
    samples: int  # taken while some thread held the GIL
    by_thread: list[tuple[str, int]]
    stages: list[tuple[str, int]]  # the worker's pipeline stages (bench.profile.STAGES)
    inclusive: list[tuple[str, int]]  # samples with the function anywhere on the stack
    top_self: list[tuple[str, int]]  # samples with the function innermost
    raw: str  # path of the raw collapsed stacks


class Cadence(msgspec.Struct, kw_only=True):
    """The worker on the emulator's market clock at Binance's pace (speed 1): every stream's
    frame at the same instants, in-progress updates included (CANDLES=closed drops them)."""

    interval: str
    streams: int
    window: float
    worker_cpu: float
    frames: int  # frames the worker received in the window (its own counter)
    candles: int  # candles Kafka acknowledged in the window (its own counter)
    others_cpu: float  # CPU seconds of the rest of the machine (not worker, emulator, broker)
    rss_kib: int
    profile: Profile | None = None
    view: WorkerView | None = None

    @property
    def share(self) -> float:
        """Share of one core."""
        return self.worker_cpu / self.window

    @property
    def updates(self) -> int:
        return max(0, self.frames - self.candles)

    @property
    def us_per_frame(self) -> float:
        return self.worker_cpu / max(1, self.frames) * 1e6


class SoakSample(msgspec.Struct, array_like=True):
    at: float  # seconds since the worker was spawned
    rss_kib: int
    cpu: float  # the worker's CPU seconds so far
    acknowledged: int  # candles Kafka acknowledged so far (the worker's counter)


class Soak(msgspec.Struct, kw_only=True):
    """A long run at a steady firehose rate, resident memory sampled throughout."""

    streams: int
    rate: float  # frames/s asked of the firehose, all closing
    seconds: float
    samples: list[SoakSample]
    lifecycle: Lifecycle | None = None

    def rss_around(self, at: float, span: float = 60.0) -> float:
        """Median RSS (KiB) of the samples within ``span`` seconds ending at ``at``."""
        near = sorted(s.rss_kib for s in self.samples if at - span <= s.at <= at)
        return float(near[len(near) // 2]) if near else math.nan

    @property
    def half(self) -> float:
        """When the second half starts (seconds since spawn)."""
        return (self.samples[0].at + self.samples[-1].at) / 2

    @property
    def growth_kib(self) -> float:
        """RSS growth over the second half: last minute's median less the median of the
        minute before the half-way point."""
        return self.rss_around(self.samples[-1].at) - self.rss_around(self.half)

    @property
    def candles_per_s(self) -> float:
        first, last = self.samples[0], self.samples[-1]
        return (last.acknowledged - first.acknowledged) / max(1e-9, last.at - first.at)

    @property
    def cpu_us_per_candle(self) -> float:
        first, last = self.samples[0], self.samples[-1]
        return (last.cpu - first.cpu) / max(1, last.acknowledged - first.acknowledged) * 1e6


class Run(msgspec.Struct, kw_only=True):
    command: str
    started: str  # ISO 8601, UTC
    seconds: float  # the whole benchmark's wall time
    machine: Machine
    settings: dict[str, str | int | float]
    ws: Baseline | None = None  # the bare reader over wss://, as Binance serves
    kafka: Baseline | None = None
    throughput: Throughput | None = None
    # The comparison row: the bare reader and the worker at full speed over plain ws://.
    ws_plain: Baseline | None = None
    throughput_plain: Throughput | None = None
    # The bare wss reader on the paced firehose, by frames/s: the floor of a read at that rate.
    ws_paced: dict[float, Baseline] = msgspec.field(default_factory=dict)
    phases: list[Phase] = msgspec.field(default_factory=list)
    idle: Idle | None = None
    lifecycles: list[Lifecycle] = msgspec.field(default_factory=list)
    profile: Profile | None = None
    cadences: list[Cadence] = msgspec.field(default_factory=list)
    soak: Soak | None = None


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]
