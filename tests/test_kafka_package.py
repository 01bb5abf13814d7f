"""The local Kafka package (kafka/local/) stays a set of small rooms: one job per module, none
over 400 lines."""

from __future__ import annotations

from kafka_broker import REPO_ROOT

PACKAGE = REPO_ROOT / "kafka" / "local"
MAX_LINES = 400


def test_no_module_of_the_local_kafka_package_is_over_400_lines() -> None:
    modules = sorted(PACKAGE.glob("*.py"))
    assert len(modules) >= 8  # the package is there, split as its docstring lists
    sizes = {path.name: len(path.read_text().splitlines()) for path in modules}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_LINES} == {}
