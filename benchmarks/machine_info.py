"""The CPU a benchmark ran on, for the results files' "Machine:" line."""

from __future__ import annotations

import os
import platform


def cpu() -> str:
    """``"<cores>-core <arch> CPU (<model name>, family <f>; <ISA>)"`` from /proc/cpuinfo where there is one.

    The family and the ISA tell apart VMs that share a model name ("AMD EPYC" has been a Zen 3
    with AVX2 only and a Zen 5 with AVX-512 BF16); ISA is the widest of AMX-BF16, AVX-512 BF16,
    AVX-512 and AVX2 in the flags, which decides whether bf16 runs natively.
    """
    model = platform.processor() or platform.machine()
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    model = info.get("model name", model)
    flags = set(info.get("flags", "").split())
    isa = next((name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX-512 BF16"),
                                        ("avx512f", "AVX-512, no bf16"), ("avx2", "AVX2 only"))
                if flag in flags), None)
    detail = (f", family {info['cpu family']}" if "cpu family" in info else "") + (f"; {isa}" if isa else "")
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({model}{detail})"


def copy_bandwidth_gbs(mib: int = 256, repeats: int = 3) -> float:
    """Memory bandwidth now: GB/s (read + write) of the best of ``repeats`` copies of ``mib`` MiB.

    A shared VM's bandwidth moves with its neighbours (20.8 GB/s and 3.3 GB/s on this one, an
    hour apart), so a benchmark records it beside the runs it compares.
    """
    import time

    import torch

    src = torch.empty(mib << 18, dtype=torch.float32)  # mib MiB
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault both in
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / best / 1e9


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Compute speed now: fp32 GFLOP/s of the best of ``repeats`` n x n matmuls on torch's threads.

    Beside :func:`copy_bandwidth_gbs`: on this VM the two move separately (at 06:50 the copy ran
    at 24-27 GB/s while every engine took twice its 03:35 time).
    """
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def write_results(path: str, lines: list[str]) -> None:
    """Write a results markdown file (creating its folder), echo it, and say where it went."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {path}")
