"""covrl.malloc: freed memory stays in the service processes (no page faults on reuse)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from covrl import malloc

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not malloc._glibc(),
                                reason="glibc's mallopt, Linux /proc")

# A fresh process: retain (or not), then a step's pattern six times over: allocate and touch
# three large buffers (224 MiB), free them. Reported: the minor page faults of the last round.
# glibc's defaults mmap such blocks and unmap them on free, so every round faults them all in
# again; kept, the freed blocks coalesce in the heap within a few rounds and are reused.
PROBE = r"""
import json
from covrl.malloc import retain_freed_memory
line = retain_freed_memory()
import torch

def faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

sizes = (32 * 2**20, 16 * 2**20, 8 * 2**20)  # float32 elements
for _ in range(6):
    f0 = faults()
    bufs = [torch.ones(n) for n in sizes]
    del bufs
    last = faults() - f0
print(json.dumps({"line": line, "faults": last, "pages": sum(sizes) * 4 // 4096}))
"""


def _probe(value: str | None) -> dict:
    import json

    env = dict(os.environ)
    env.pop(malloc.ENV, None)
    if value is not None:
        env[malloc.ENV] = value
    p = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    kept = _probe(None)
    assert "freed memory stays in the process" in kept["line"]
    assert kept["faults"] < kept["pages"] // 20, kept


def test_turned_off_it_leaves_glibc_defaults_which_fault_again():
    off = _probe("0")
    assert off["line"] == f"malloc: glibc's defaults ({malloc.ENV}=0)"
    assert off["faults"] > off["pages"] // 2, off  # what the setting is there to avoid


def test_a_bad_value_names_the_variable(monkeypatch):
    monkeypatch.setattr(malloc, "_status", None)
    with pytest.raises(ValueError, match=f"{malloc.ENV}: expected 1 or 0, got 'maybe'"):
        malloc.retain_freed_memory({malloc.ENV: "maybe"})
    p = subprocess.run([sys.executable, "-m", "covrl.services", "reward", "--port", "0"], capture_output=True,
                       text=True, env=dict(os.environ, **{malloc.ENV: "maybe"}), timeout=120)
    assert p.returncode == 2 and f"{malloc.ENV}: expected 1 or 0, got 'maybe'" in p.stderr, p.stderr[-2000:]


def test_not_applied_once_other_threads_run(monkeypatch):
    import threading

    monkeypatch.setattr(malloc, "_status", None)
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        line = malloc.retain_freed_memory({})
    finally:
        stop.set()
        t.join()
    assert "Python threads already run; call this first" in line


def test_the_service_launcher_applies_it_and_logs_it():
    import threading

    p = subprocess.Popen([sys.executable, "-m", "covrl.services", "reward", "--port", "0"], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env={k: v for k, v in os.environ.items()
                                                                    if k != malloc.ENV})
    killer = threading.Timer(120, p.kill)  # a launcher that hangs ends the output, and the test
    killer.start()
    try:
        seen = []
        for line in p.stdout:  # the line comes before the server starts
            seen.append(line)
            if "malloc:" in line or len(seen) > 200:
                break
        assert any("malloc: freed memory stays in the process" in s for s in seen), "".join(seen)[-2000:]
    finally:
        killer.cancel()
        p.terminate()
        p.wait(30)
