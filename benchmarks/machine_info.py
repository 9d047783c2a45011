"""The CPU a benchmark ran on, for the results files' "Machine:" line."""

from __future__ import annotations

import os
import platform


def cpu() -> str:
    """``"<cores>-core <arch> CPU (<model name>)"``; the model from /proc/cpuinfo where there is one."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model})"
