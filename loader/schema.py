"""What the worker writes and reads on Kafka: candles, telemetry events and control commands."""

from __future__ import annotations

from typing import Literal

import msgspec

Status = Literal["started", "loading", "interrupted", "error", "finished"]

# What the reader hands the Kafka sink: (key, value), both built once on the Trio side.
Record = tuple[bytes, bytes]


class Candle(msgspec.Struct, frozen=True, omit_defaults=True):
    """One candle on `KAFKA_TOPIC`; prices and volumes are JSON numbers with Binance's digits."""

    open_time: int
    open: msgspec.Raw
    high: msgspec.Raw
    low: msgspec.Raw
    close: msgspec.Raw
    volume: msgspec.Raw
    close_time: int
    quote_asset_volume: msgspec.Raw
    number_of_trades: int
    taker_buy_base_asset_volume: msgspec.Raw
    taker_buy_quote_asset_volume: msgspec.Raw
    symbol: str
    interval: str
    # Present only with CANDLES=all, where in-progress updates are published too.
    is_closed: bool | msgspec.UnsetType = msgspec.UNSET

    @property
    def key(self) -> bytes:
        """Kafka message key: one stream stays on one partition, hence in order."""
        return f"{self.symbol}-{self.interval}".encode()


class TelemetryEvent(msgspec.Struct, frozen=True):
    """One event on `QUEUE_EVENTS_TOPIC`, the queue manager's view of this worker."""

    queue_id: str
    symbol: str
    type: str
    status: Status
    message: str
    records_written: int
    finished: bool
    producer: str
    timestamp: float


class ControlCommand(msgspec.Struct, frozen=True):
    """A message on `QUEUE_CONTROL_TOPIC`; other fields are ignored."""

    command: str
    queue_id: str
