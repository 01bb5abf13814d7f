"""glibc's malloc arenas: at most two, set before any thread starts.

glibc gives each thread that allocates its own arena (up to eight per core), and the worker
has several: Trio's, the Kafka sender's, kafka-python's I/O threads, Trio's thread cache.
Each arena keeps what fragmentation leaves in it, so resident memory crept up with every
candle (a few bytes each: tens of MB a day against a 128 Mi limit). With two arenas it stays
flat and starts smaller (docs/benchmarks.md, the soak); the GIL lets one thread run Python at
a time, so the threads hardly ever wait for each other's arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

ARENAS = 2
_M_ARENA_MAX = -8  # from glibc's malloc.h


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's arenas unless MALLOC_ARENA_MAX says otherwise; False where there is no
    glibc (musl, macOS): nothing to do there."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False  # the environment's choice, already applied by glibc at start
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arenas))
