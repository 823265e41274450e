"""glibc malloc settings for the aggregator process (``secagg serve`` applies them at start)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def tune_malloc(arenas: int = 2, mmap_threshold: int = 4 << 20, trim_threshold: int = 32 << 20) -> None:
    """Tune glibc's malloc for the aggregator before its worker threads start.

    Arenas: by default glibc gives each thread that allocates its own arena and keeps freed memory
    there, so the aggregator's resident memory grew with every worker that ever handled an upload
    (measured with 24 clients of 1M parameters, one upload at a time: +50 MiB, against +24 MiB with
    2 arenas). Thresholds: gRPC hands every 1.5 MB message to Python through buffers that glibc
    served with fresh mmaps and gave back at once, so each update was page-faulted in anew (3,500
    faults and half of the aggregator's CPU per 1M-parameter update in the kernel); with buffers up
    to 4 MiB kept in the heap and up to 32 MiB of free heap kept for reuse, 50 faults remain.
    README, "Limits under load". A MALLOC_* variable set by the operator wins over each setting.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return
    for variable, option, value in (("MALLOC_ARENA_MAX", -8, arenas), ("MALLOC_MMAP_THRESHOLD_", -3, mmap_threshold),
                                    ("MALLOC_TRIM_THRESHOLD_", -1, trim_threshold)):
        if not os.environ.get(variable):
            mallopt(option, value)
