"""One factor for every wait in the tests: LOADER_TEST_TIME_SCALE (default 1).

A busy or slow machine makes Kafka and the JVM slower, not the logic under test: stretching
every deadline together (CI can set 2 or 3) keeps the suite's verdicts the same there.
"""

from __future__ import annotations

import os

TIME_SCALE = float(os.environ.get("LOADER_TEST_TIME_SCALE") or 1.0)


def scaled(seconds: float) -> float:
    """`seconds` stretched by LOADER_TEST_TIME_SCALE."""
    return seconds * TIME_SCALE
