"""The process entry point: settings from the environment, signals, exit codes.

`loader-ws-candles schema ...` (`python -m loader schema ...`) prints the topics' contract
instead (`loader/contracts`).

Exit codes: 0 finished or stopped by command, 1 runtime failure (retryable), 2 bad
configuration (retrying cannot help), 128+signal when stopped by SIGTERM (143) or SIGINT (130).
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from loader import contracts, logs
from loader.errors import FatalError
from loader.malloc import limit_arenas
from loader.settings import ConfigError, Settings, load_settings
from loader.worker import Outcome, Worker, run

log = logging.getLogger("loader")


async def serve(settings: Settings) -> int:
    """Run the worker until it ends; SIGTERM/SIGINT stop it gracefully, at any moment, within
    its shutdown budget. Returns the exit code."""
    worker = Worker(settings)
    received: int | None = None
    outcome: Outcome | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def forward_signals() -> None:
                nonlocal received
                async for signum in signals:
                    received = received or signum
                    name = signal.Signals(signum).name
                    # Kubernetes sends SIGTERM to evict, drain or replace the pod: the Job
                    # starts the work again, so the outcome is not final.
                    worker.stop(f"stopped by {name}", final=False, exit_code=128 + signum)

            async def main() -> None:
                nonlocal outcome
                try:
                    outcome = await run(settings, worker=worker)
                except FatalError as exc:
                    log.error("could not start: %s", exc)
                    outcome = Outcome("error", str(exc), 0, exc.exit_code)
                nursery.cancel_scope.cancel()

            nursery.start_soon(forward_signals)
            nursery.start_soon(main)
    if outcome is not None:
        return outcome.exit_code
    return 128 + received if received is not None else 1


def main() -> None:
    if sys.argv[1:2] == ["schema"]:
        sys.exit(contracts.main(sys.argv[2:]))
    limit_arenas()  # before any thread starts: the arenas are per thread
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"loader-ws-candles: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_format, {"queue_id": settings.queue_id})
    sys.exit(trio.run(serve, settings))
