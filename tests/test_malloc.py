"""The arena cap is applied where glibc is, and yields to MALLOC_ARENA_MAX."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from loader.malloc import limit_arenas

CHECK = "from loader.malloc import limit_arenas; print(limit_arenas())"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_arenas_are_capped_in_a_fresh_process() -> None:
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                          check=True, env={"PATH": ""},
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.stdout.strip() == "True"


def test_the_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_arenas() is False
