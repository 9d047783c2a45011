"""The reward verifier: a worker-process pool with per-item deadlines and an LRU result cache.

``Verifier.score(items)`` returns one :class:`RewardResult` per item, in order, and never raises
for a bad item. Checks made in this process (cheap, before any worker sees the item): field
types, ``deadline_s``, ``max_completion_bytes``, a known task, JSON-serialisable metadata.
Everything else runs in a worker process; an item that outlives its deadline gets status
``"timeout"``, its worker is killed and replaced, and the rest of the batch goes on.

Workers come from the ``forkserver`` start method: the fork server is a fresh interpreter (no
gRPC threads of the parent are copied), preloaded with the task code, so a replacement worker
starts in milliseconds instead of re-importing sympy and torch.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata as _importlib_metadata
from multiprocessing.connection import wait

from covrl.rewards import _worker
from covrl.rewards.tasks import TASKS

__all__ = ["RewardItem", "RewardResult", "Verifier", "STATUSES", "VERIFIER_VERSION"]

STATUSES = ("ok", "timeout", "error", "invalid", "unknown_task")
CACHED_STATUSES = ("ok", "invalid")  # deterministic outcomes; timeouts and errors are retried
MAX_DEADLINE_S = 600.0
WORKER_START_TIMEOUT_S = 120.0  # a worker that is not ready by then is killed and replaced
MAX_FAILED_STARTS = 3  # consecutive start failures before the pool gives up on a batch


def _math_verify_version() -> str:
    try:
        return _importlib_metadata.version("math-verify")
    except _importlib_metadata.PackageNotFoundError:
        return "absent"


VERIFIER_VERSION = f"covrl-verifier/1 math-verify/{_math_verify_version()}"


@dataclass
class RewardItem:
    """One completion to score.

    task: a key of ``covrl.rewards.TASKS`` ("math", "arithmetic", "countdown", "format").
    prompt: the prompt text (not used by the built-in tasks; not part of the cache key).
    completion: the model's text.
    ground_truth: the reference answer (task-specific; countdown may give the target here).
    metadata: task options, JSON-serialisable (see docs/rewards.md).
    deadline_s: seconds a worker may spend on this item; None uses the verifier's default.
    """

    task: str
    prompt: str
    completion: str
    ground_truth: str
    metadata: dict = field(default_factory=dict)
    deadline_s: float | None = None


@dataclass
class RewardResult:
    """reward: the score (0.0 unless status is "ok"); status: one of STATUSES; detail: why."""

    reward: float
    status: str
    detail: str
    cached: bool = False


@dataclass
class _Worker:
    proc: mp.process.BaseProcess
    conn: object
    spawned_at: float
    ready: bool = False
    job: int | None = None  # index into the batch's job list
    started: bool = False  # the worker acknowledged the job
    deadline_at: float = 0.0


class Verifier:
    """Scores :class:`RewardItem` batches in ``workers`` processes.

    workers: worker processes (each scores one item at a time).
    default_deadline_s: per-item deadline when ``item.deadline_s`` is None.
    max_completion_bytes: completions longer than this (UTF-8) are "invalid" without a worker.
    cache_size: LRU entries kept (0 turns the cache off).
    memory_limit_mb: extra address space each worker may grow by (0: no limit).

    Concurrent ``score`` calls from several threads are safe; they run one batch at a time.
    """

    def __init__(
        self,
        workers: int = 2,
        default_deadline_s: float = 5.0,
        max_completion_bytes: int = 1_000_000,
        cache_size: int = 100_000,
        memory_limit_mb: int = 2048,
    ):
        for name, value, low in (("workers", workers, 1), ("max_completion_bytes", max_completion_bytes, 1),
                                 ("cache_size", cache_size, 0), ("memory_limit_mb", memory_limit_mb, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not _valid_deadline(default_deadline_s):
            raise ValueError(f"default_deadline_s: expected a number in (0, {MAX_DEADLINE_S}], "
                             f"got {default_deadline_s!r}")
        self.workers = workers
        self.default_deadline_s = float(default_deadline_s)
        self.max_completion_bytes = max_completion_bytes
        self.cache_size = cache_size
        self.memory_limit_mb = memory_limit_mb
        self.version = VERIFIER_VERSION
        self.stats = collections.Counter()  # scored, cache_hits, timeouts, worker_restarts, ...
        self._cache: collections.OrderedDict[str, tuple[float, str, str]] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._lock = threading.Lock()
        self._closed = False
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(["covrl.rewards._worker"])
        self._pool: list[_Worker] = [self._start_worker() for _ in range(workers)]

    # ---------------------------------------------------------------- lifecycle

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=_worker.main, args=(child_conn, self.memory_limit_mb),
                                 name="covrl-reward-worker", daemon=True)
        proc.start()
        child_conn.close()
        return _Worker(proc=proc, conn=parent_conn, spawned_at=time.monotonic())

    def _replace(self, i: int) -> None:
        old = self._pool[i]
        if old.proc.is_alive():
            old.proc.kill()
        old.proc.join(timeout=5)
        old.conn.close()
        self._pool[i] = self._start_worker()
        self.stats["worker_restarts"] += 1

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._pool:
                try:
                    w.conn.send(None)
                except (OSError, ValueError):
                    pass
            for w in self._pool:
                w.proc.join(timeout=1)
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(timeout=5)
                w.conn.close()
            self._pool = []

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def worker_pids(self) -> list[int | None]:
        """Process ids of the current workers (for monitoring and tests)."""
        return [w.proc.pid for w in self._pool]

    # ---------------------------------------------------------------- scoring

    def score(self, items: list[RewardItem]) -> list[RewardResult]:
        """Score ``items``; one result per item, same order. Never raises for a bad item."""
        if not isinstance(items, (list, tuple)):
            raise TypeError(f"items: expected a list of RewardItem, got {type(items).__name__}")
        if self._closed:
            raise RuntimeError("Verifier is closed")
        results: list[RewardResult | None] = [None] * len(items)
        jobs: list[tuple[str, tuple, float]] = []  # (cache key, payload, deadline_s)
        waiting: dict[str, list[int]] = {}  # cache key -> item indices (duplicates scored once)
        for idx, item in enumerate(items):
            checked = self._precheck(item)
            if isinstance(checked, RewardResult):
                results[idx] = checked
                continue
            key, deadline_s = checked
            hit = self._cache_get(key)
            if hit is not None:
                results[idx] = RewardResult(reward=hit[0], status=hit[1], detail=hit[2], cached=True)
                self.stats["cache_hits"] += 1
                continue
            if key in waiting:
                waiting[key].append(idx)
                continue
            waiting[key] = [idx]
            payload = (item.task, item.completion, item.ground_truth, item.metadata)
            jobs.append((key, payload, deadline_s))

        if jobs:
            with self._lock:
                if self._closed:
                    raise RuntimeError("Verifier is closed")
                outcomes = self._run(jobs)
            for (key, _, _), (status, reward, detail) in zip(jobs, outcomes, strict=True):
                if status in CACHED_STATUSES:
                    self._cache_put(key, (reward, status, detail))
                first, *dupes = waiting[key]
                results[first] = RewardResult(reward=reward, status=status, detail=detail)
                for idx in dupes:
                    results[idx] = RewardResult(reward=reward, status=status, detail=detail,
                                                cached=True)
        self.stats["scored"] += len(items)
        return results  # type: ignore[return-value]

    def _precheck(self, item) -> RewardResult | tuple[str, float]:
        """A final result for items that never reach a worker, else ``(cache key, deadline_s)``."""

        def invalid(detail: str) -> RewardResult:
            self.stats["invalid"] += 1
            return RewardResult(reward=0.0, status="invalid", detail=detail)

        if not isinstance(item, RewardItem):
            return invalid(f"item: expected a RewardItem, got {type(item).__name__}")
        for name in ("task", "prompt", "completion", "ground_truth"):
            if not isinstance(getattr(item, name), str):
                return invalid(f"{name}: expected a string, got {type(getattr(item, name)).__name__}")
        if not isinstance(item.metadata, dict):
            return invalid(f"metadata: expected a dict, got {type(item.metadata).__name__}")
        deadline_s = self.default_deadline_s if item.deadline_s is None else item.deadline_s
        if not _valid_deadline(deadline_s):
            return invalid(f"deadline_s: expected a number in (0, {MAX_DEADLINE_S}], got {item.deadline_s!r}")
        if item.task not in TASKS:
            return RewardResult(reward=0.0, status="unknown_task",
                                detail=f"task: unknown {item.task!r}; known: {sorted(TASKS)}")
        size = len(item.completion.encode("utf-8", "surrogatepass"))
        if size > self.max_completion_bytes:
            return invalid(f"completion: {size} bytes exceeds max_completion_bytes={self.max_completion_bytes}")
        try:
            meta = json.dumps(item.metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            return invalid(f"metadata: expected JSON-serialisable values without NaN/Inf ({exc})")
        return self.cache_key(item.task, item.completion, item.ground_truth, meta), float(deadline_s)

    def cache_key(self, task: str, completion: str, ground_truth: str, metadata_json: str) -> str:
        """sha256 over (task, completion, ground_truth, canonical metadata JSON, version)."""
        h = hashlib.sha256()
        for part in (task, completion, ground_truth, metadata_json, self.version):
            data = part.encode("utf-8", "surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
        return h.hexdigest()

    def _cache_get(self, key: str) -> tuple[float, str, str] | None:
        if self.cache_size == 0:
            return None
        with self._cache_lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _cache_put(self, key: str, value: tuple[float, str, str]) -> None:
        if self.cache_size == 0:
            return
        with self._cache_lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def cache_clear(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    # ---------------------------------------------------------------- the pool loop

    def _run(self, jobs: list[tuple[str, tuple, float]]) -> list[tuple[str, float, str]]:
        """Score ``jobs`` on the pool; returns ``(status, reward, detail)`` per job, in order."""
        out: list[tuple[str, float, str] | None] = [None] * len(jobs)
        pending = collections.deque(range(len(jobs)))
        retried: set[int] = set()
        failed_starts = 0

        def finish(j: int, status: str, reward: float, detail: str) -> None:
            out[j] = (status, reward, detail)
            if status in ("timeout", "error"):
                self.stats[status + "s"] += 1

        while pending or any(w.job is not None for w in self._pool):
            # Hand work to idle, ready workers. The deadline clock starts here.
            for i, w in enumerate(self._pool):
                if not (w.ready and w.job is None and pending):
                    continue
                j = pending.popleft()
                key, payload, deadline_s = jobs[j]
                try:
                    w.conn.send((j, *payload))
                except (OSError, ValueError):  # died while idle: retry the job elsewhere
                    pending.appendleft(j)
                    self._replace(i)
                    continue
                w.job, w.started, w.deadline_at = j, False, time.monotonic() + deadline_s

            now = time.monotonic()
            horizons = [w.deadline_at if w.job is not None else w.spawned_at + WORKER_START_TIMEOUT_S
                        for w in self._pool if w.job is not None or not w.ready]
            timeout = max(0.0, min(horizons) - now) if horizons else None
            handles = [w.conn for w in self._pool] + [w.proc.sentinel for w in self._pool]
            ready = set(wait(handles, timeout))

            for i, w in enumerate(self._pool):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    if msg is None:  # the pipe closed: the process is gone
                        failed_starts += not w.ready
                        self._worker_died(i, finish, pending, retried)
                    elif msg[0] == "ready":
                        w.ready, failed_starts = True, 0
                    elif msg[0] == "started" and msg[1] == w.job:
                        w.started = True
                    elif msg[0] == "done" and msg[1] == w.job:
                        finish(w.job, msg[2], msg[3], msg[4])
                        w.job = None
                elif w.proc.sentinel in ready:
                    failed_starts += not w.ready
                    self._worker_died(i, finish, pending, retried)

            now = time.monotonic()
            for i, w in enumerate(self._pool):
                if w.job is not None and now >= w.deadline_at:
                    deadline_s = jobs[w.job][2]
                    finish(w.job, "timeout", 0.0,
                           f"no result within deadline_s={deadline_s:g}; worker killed and replaced")
                    self._replace(i)
                elif not w.ready and w.job is None and now - w.spawned_at > WORKER_START_TIMEOUT_S:
                    failed_starts += 1
                    self._replace(i)
            if failed_starts >= MAX_FAILED_STARTS * len(self._pool):
                while pending:
                    finish(pending.popleft(), "error", 0.0, "reward workers failed to start")
        return out  # type: ignore[return-value]

    def _worker_died(self, i: int, finish, pending: collections.deque, retried: set[int]) -> None:
        """A worker is gone. Its job fails with "error" if the worker had started it; a job it
        never acknowledged (it died while idle) is requeued once."""
        w = self._pool[i]
        w.proc.join(timeout=5)
        if w.job is not None:
            if not w.started and w.job not in retried:
                retried.add(w.job)
                pending.appendleft(w.job)
            else:
                finish(w.job, "error", 0.0, f"worker process died (exit code {w.proc.exitcode})")
        self._replace(i)


def _valid_deadline(value) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and 0 < value <= MAX_DEADLINE_S)
