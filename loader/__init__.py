"""loader-ws-candles: Binance klines over WebSocket into Kafka, in one Trio nursery.

Embedding::

    settings = load_settings({"QUEUE_ID": "q1", "SYMBOL": "BTCUSDT", ...})
    async with trio.open_nursery() as nursery:
        worker = await nursery.start(run, settings)
        ...
        worker.stop()
"""

from loader.errors import FatalError
from loader.settings import ConfigError, KafkaSettings, Secret, Settings, load_settings
from loader.worker import Outcome, Worker, run

__all__ = [
    "ConfigError",
    "FatalError",
    "KafkaSettings",
    "Outcome",
    "Secret",
    "Settings",
    "Worker",
    "load_settings",
    "run",
]
