"""``python -m covrl.trainer.supervised PARENT_PID [--pdeathsig] NAME ARGS...``: a service owned by a trainer.

The trainer starts its local services through this wrapper so that none outlives it:

* ``--pdeathsig`` (Linux; given when the trainer's main thread starts the service): the
  kernel sends SIGTERM when the trainer dies, even by ``kill -9``
  (``prctl(PR_SET_PDEATHSIG)`` through ctypes). It is only given from the main thread,
  because the signal follows the death of the *thread* that forked.
* a watchdog thread polls the parent pid every 0.5 s and sends this process SIGTERM once
  it is gone (every platform, every starting thread).
* after the graceful stop (``serve`` returns, within the server's grace period) the
  process exits at once with ``os._exit``: a handler thread still busy (a Train step)
  cannot keep it alive, and the trainer never has to SIGKILL it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1


def set_pdeathsig(sig: int = signal.SIGTERM) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent thread dies; False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, interval_s: float = 0.5) -> threading.Thread:
    """A daemon thread that SIGTERMs this process once ``parent_pid`` is no longer its parent."""

    def run() -> None:
        stop = threading.Event()
        while not stop.wait(interval_s):
            if os.getppid() != parent_pid:
                print(f"covrl: parent process {parent_pid} is gone; stopping", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)
                # the graceful stop has its grace period; a process that ignores it still goes
                stop.wait(60.0)
                os._exit(1)

    t = threading.Thread(target=run, name="covrl-parent-watchdog", daemon=True)
    t.start()
    return t


def main(argv: list[str]) -> int:
    parent = int(argv[0])
    rest = argv[1:]
    if rest[:1] == ["--pdeathsig"]:
        set_pdeathsig(signal.SIGTERM)
        rest = rest[1:]
    if os.getppid() != parent:  # the parent died before the death signal was armed
        return 1
    from covrl.malloc import retain_freed_memory

    try:
        retain_freed_memory()  # before the watchdog thread; the service logs what it did
    except ValueError:
        pass  # a bad COVRL_RETAIN_FREED_MEMORY: the service's own call reports it
    watch_parent(parent)
    from covrl.services.__main__ import main as service_main

    try:
        code = service_main(rest)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
