"""Keep freed memory in the process, so a CPU training step does not page-fault its buffers anew.

glibc's malloc hands large blocks back to the kernel as soon as they are freed (``mmap``'d
chunks are unmapped, the heap top is trimmed, and each thread gets its own arena whose free
heaps are unmapped too). A CPU learner step allocates and frees a few GB of activations, so
the next step faults every page in again: on this project's 2-core VM that cost up to 10 s of
kernel time in a 5 s step, and made the learner service's step time swing between ~5 and
~13 s depending on which gRPC handler thread ran it (``benchmarks/results/learner_malloc_cpu.md``).

:func:`retain_freed_memory` tells glibc, through ``mallopt``, to use one arena for every
thread, to serve large blocks from the heap instead of ``mmap``, and never to trim the heap.
Freed memory then stays mapped and the next step reuses it, the way PyTorch's CUDA caching
allocator keeps GPU memory. The cost is that the process's resident size stays at its peak.

It must run before any second thread allocates (``M_ARENA_MAX`` only bounds arenas created
after it), so the service and CLI entry points call it first thing. ``covrl`` used as a
library never calls it. ``COVRL_RETAIN_FREED_MEMORY=0`` turns it off; other C libraries
(musl, macOS) are left alone. The services log :func:`status` once they serve.
"""

from __future__ import annotations

import ctypes
import os
import threading

ENV = "COVRL_RETAIN_FREED_MEMORY"
# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def _glibc():
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr on this platform
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


_status: str | None = None  # what the first call did


def status() -> str:
    """What :func:`retain_freed_memory` did in this process, as one line (the services log it)."""
    return _status or "malloc: glibc's defaults (covrl.malloc.retain_freed_memory was not called in this process)"


def retain_freed_memory(env: dict | None = None) -> str:
    """Apply the settings above; returns one line saying what was done. Only the first call in a
    process acts (a bad ``COVRL_RETAIN_FREED_MEMORY`` raises ValueError naming it, every time)."""
    global _status
    if _status is None:
        _status = _retain(os.environ if env is None else env)
    return _status


def _retain(env) -> str:
    value = env.get(ENV, "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return f"malloc: glibc's defaults ({ENV}={env[ENV]})"
    if value not in ("1", "true", "yes", "on", ""):
        raise ValueError(f"{ENV}: expected 1 or 0, got {env[ENV]!r}")
    libc = _glibc()
    if libc is None:
        return "malloc: not glibc; left as it is"
    threads = threading.active_count()
    if threads != 1:  # threads with arenas of their own would keep them: worse than the default
        return f"malloc: glibc's defaults ({threads} Python threads already run; call this first)"
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # TRIM_THRESHOLD -1: never trim (mallopt(3)); MMAP_MAX 0: large blocks from the heap too
    results = [libc.mallopt(M_ARENA_MAX, 1), libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, -1)]
    if not all(results):
        return "malloc: glibc refused mallopt; left as it is"
    return f"malloc: freed memory stays in the process (one arena, no mmap, no trim; {ENV}=0 turns this off)"
