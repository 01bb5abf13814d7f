"""End-to-end benchmarks of the worker: ``just bench`` (``python -m bench.run``).

Every party runs in its own process — the emulator (``bench.emulator``), the worker
(``python -m loader``), an independent Kafka consumer (``bench.consumer``) and the two
baselines (``bench.baselines``) — against the real local broker; ``bench.run`` orchestrates,
``bench.report`` prints the table and writes ``docs/benchmarks.md`` and ``docs/freshness.png``.
"""
