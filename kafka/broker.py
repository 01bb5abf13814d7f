#!/usr/bin/env python3
"""The local Kafka for development and tests: the command line of the package kafka/local/
(its docstring says what it does and where everything lives).

Run it in the project's environment (``uv run python kafka/broker.py``; the justfile does):

    broker.py up        # fetch jars, make certs, format, start, wait until ready
    broker.py down      # stop it (its whole process group) and wait until its ports are free
    broker.py wipe      # down, then delete the data, logs and generated config
    broker.py status    # exit 0 when running and both listeners answer
    broker.py env       # `export KEY=value` lines describing the broker
    broker.py tool ...  # one of Kafka's own command-line tools, from the same jars
    broker.py lock-jars # (needs Maven) resolve pom.xml again and rewrite jars.lock
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_NAME = "kafka_local"
PACKAGE_DIR = Path(__file__).resolve().parent / "local"


def load_package() -> ModuleType:
    """kafka/local/ as the package `kafka_local`: the folder's own name, `kafka`, is
    kafka-python's wherever both are importable."""
    if (loaded := sys.modules.get(PACKAGE_NAME)) is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, PACKAGE_DIR / "__init__.py", submodule_search_locations=[str(PACKAGE_DIR)]
    )
    assert spec is not None
    assert spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = package  # its modules import each other through it
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[PACKAGE_NAME]
        raise
    return package


if __name__ == "__main__":
    sys.exit(load_package().main())
