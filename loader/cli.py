"""The process entry point: settings from the environment, signals, exit codes.

Exit codes: 0 finished or stopped by command, 1 runtime failure (retryable), 2 bad
configuration (retrying cannot help), 128+signal when stopped by SIGTERM (143) or SIGINT (130).
"""

from __future__ import annotations

import logging
import signal
import sys

import trio

from loader import logs
from loader.errors import FatalError
from loader.settings import ConfigError, Settings, load_settings
from loader.worker import Outcome, Worker, run

log = logging.getLogger("loader")


class _Ready:
    """A task status that keeps the worker handle, for stopping it on a signal."""

    def __init__(self) -> None:
        self.worker: Worker | None = None

    def started(self, value: Worker | None = None) -> None:
        self.worker = value


async def serve(settings: Settings) -> int:
    """Run the worker until it ends; SIGTERM/SIGINT stop it gracefully. Returns the exit code."""
    ready = _Ready()
    received: int | None = None
    outcome: Outcome | None = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def forward_signals() -> None:
                nonlocal received
                async for signum in signals:
                    received = received or signum
                    if ready.worker is not None:
                        _stop(ready.worker, signum)
                    # else: the worker is stopped as soon as it exists (`created` below);
                    # until then it is opening its Kafka producer, in a thread that
                    # cancelling would wait for all the same.

            async def main() -> None:
                nonlocal outcome

                def created(worker: Worker) -> None:
                    ready.worker = worker
                    if received is not None:
                        _stop(worker, received)

                try:
                    outcome = await run(settings, task_status=ready, created=created)
                except FatalError as exc:
                    log.error("could not start: %s", exc)
                    outcome = Outcome("error", str(exc), 0, exc.exit_code)
                nursery.cancel_scope.cancel()

            nursery.start_soon(forward_signals)
            nursery.start_soon(main)
    if outcome is not None:
        return outcome.exit_code
    return 128 + received if received is not None else 1


def _stop(worker: Worker, signum: int) -> None:
    """A signal stops the run gracefully with the shell's code for it (143 for SIGTERM): not
    a final outcome, the Job runs a new pod (an eviction, a node drain)."""
    worker.stop(f"stopped by {signal.Signals(signum).name}", exit_code=128 + signum)


def main() -> None:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"loader-ws-candles: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(settings.log_format, {"queue_id": settings.queue_id})
    sys.exit(trio.run(serve, settings))
