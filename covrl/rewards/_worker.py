"""Verifier worker process: receives jobs over a pipe, scores them, sends results back.

Protocol (pickled tuples over one duplex ``multiprocessing`` pipe):
  worker -> parent  ``("ready",)`` once warmed up
  parent -> worker  ``(job_id, task, completion, ground_truth, metadata)``, or ``None`` to stop
  worker -> parent  ``("started", job_id)`` on receipt, then ``("done", job_id, status, reward, detail)``
The parent kills the worker when a job outlives its deadline; nothing here is time-guarded.
"""

from __future__ import annotations

import resource
import signal

from covrl.rewards.tasks import score_one


def _limit_memory(extra_mb: int) -> None:
    """Cap the address space at what the worker has now plus ``extra_mb``, so a result that
    would need gigabytes (``9**9**9**9``) raises MemoryError instead of swapping the host."""
    if extra_mb <= 0:
        return
    try:
        with open("/proc/self/status") as f:
            vm_kb = next(int(ln.split()[1]) for ln in f if ln.startswith("VmSize:"))
        limit = (vm_kb * 1024) + extra_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, StopIteration):  # not Linux, or not allowed: deadlines still hold
        pass


def main(conn, memory_limit_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    _limit_memory(memory_limit_mb)
    score_one("math", "\\boxed{1}", "1", {})  # warm up: sympy / the LaTeX parser load lazily
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        job_id, task, completion, ground_truth, metadata = msg
        conn.send(("started", job_id))
        status, reward, detail = score_one(task, completion, ground_truth, metadata)
        conn.send(("done", job_id, status, reward, detail))
