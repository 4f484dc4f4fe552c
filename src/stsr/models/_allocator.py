"""Keep freed CPU tensor memory in the process heap while the model runs (glibc only).

glibc's ``malloc`` serves every allocation above ``M_MMAP_THRESHOLD`` (at most 32 MiB) with a fresh ``mmap`` and
returns it to the system on ``free``. A denoising step allocates activations of ``genes x channels x tile`` floats
(52 MiB for 50 genes of four 64 x 64 tiles at 16 channels), so every step page-faults all of them in again: on 2 CPU
cores that made a SiLU over 52 MiB take 37 ms instead of 9 ms, and a whole step of the ``fast`` network up to 1.9x
slower than with the memory kept, the more so the larger the batch or tile (the "Freed-memory reuse" tables of
``benchmarks/model_speed.py``).

:func:`reuse_freed_memory` switches ``mmap`` off for allocations (``M_MMAP_MAX = 0``) and stops heap trimming
(``M_TRIM_THRESHOLD``) while it is active, so freed activations are reused by the next step; on exit it restores
glibc's documented defaults and hands the retained memory back (``malloc_trim(0)``). Peak memory is unchanged: the
same tensors are alive at the peak, only their pages are recycled. Elsewhere (macOS, Windows, musl) it does nothing.
Set the environment variable ``STSR_REUSE_FREED_MEMORY=0`` to switch it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

# glibc mallopt parameters (malloc.h) and their documented defaults
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}
#: freed memory kept at the top of the heap while active; the ``int`` argument of ``mallopt`` caps it below 2 GiB,
#: so runs whose activations exceed that (the default weights on 256-pixel tiles) still trim part of it
_KEEP_BYTES = 2**31 - 1

_lock = threading.Lock()
_depth = 0


@lru_cache(maxsize=1)
def _glibc() -> Any | None:
    """The C library when it is glibc (has ``mallopt`` and ``malloc_trim``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
        version.restype = ctypes.c_char_p
        version()
        libc.mallopt, libc.malloc_trim  # noqa: B018  (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def _enabled() -> bool:
    return os.environ.get("STSR_REUSE_FREED_MEMORY", "1").strip().lower() not in ("0", "false", "no", "off")


def reuse_freed_memory_available() -> bool:
    """Whether :func:`reuse_freed_memory` changes anything here (glibc, and not switched off by the environment)."""
    return _enabled() and _glibc() is not None


@contextmanager
def reuse_freed_memory(active: bool = True) -> Iterator[bool]:
    """Context in which large freed CPU allocations stay in the heap for reuse (no ``mmap``/``munmap`` per tensor).

    Re-entrant and thread-safe: the settings are applied when the first context opens and restored when the last
    one closes. Yields whether the settings are in effect.

    Parameters
    ----------
    active
        ``False`` makes the context do nothing (e.g. for a model on a GPU).
    """
    global _depth
    libc = _glibc() if active and _enabled() else None
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for param, value in _DEFAULTS.items():
                    libc.mallopt(param, value)
                libc.malloc_trim(0)
