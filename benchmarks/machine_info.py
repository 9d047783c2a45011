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


def write_results(path: str, lines: list[str]) -> None:
    """Write a results markdown file (creating its folder), echo it, and say where it went."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
