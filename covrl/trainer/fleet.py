"""The rollout fleet: which rollout servers are healthy, failover of a step's shards, re-admission.

A step's prompts are split into one shard per configured server (shard ``i`` keeps its
prompts and its seed whichever server runs it, so a re-sent shard samples exactly what
the lost one would have). :meth:`RolloutFleet.run` sends each shard to a healthy server;
a server that fails or times out is marked down and its shard goes to the healthy ones
within the same step. A result sampled from older weights than the fleet's
``target_version`` (the version last published) is refused the same way: no stale sample
enters a batch.

A down server is re-admitted in the background (a watcher thread runs :meth:`readmit`
when its backoff of 0.5 s doubling to 5 s is over):
the trainer's ``admit(server, target)`` probes it, restarts it when it is a dead local
one, pushes the current weights and returns the version it then holds; only a server at
``target_version`` becomes healthy again. With no healthy server a step waits for one,
and fails with :class:`NoRolloutServer` after ``grace_s``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from covrl.client.channel import ClientError
from covrl.trainer.relay import WeightRelay

# Status codes after which a shard is re-sent elsewhere; any other code is a request bug.
FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                  grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED}


class NoRolloutServer(RuntimeError):
    """No rollout server was healthy for longer than ``failover.rollout_grace_s``."""


@dataclasses.dataclass(eq=False)
class Server:
    """One rollout server of the fleet."""

    index: int
    client: object  # covrl.client.RolloutClient
    local_name: str | None = None  # the LocalServices instance name, for a locally started one
    healthy: bool = False
    reason: str = "not admitted yet"
    admitting: bool = False
    retry_at: float = 0.0
    backoff_s: float = 0.5
    in_flight: int = 0
    floor: int = -1  # after a learner restart: the version it held, newer than the learner's (not admissible)
    dtype: str | None = None  # its engine's dtype from GetInfo, cached by push_dtype; cleared when it goes down
    epoch: int = 0  # +1 each time it goes down or is admitted: the late failure of an older call is ignored

    @property
    def address(self) -> str:
        return self.client.address


BUDGET_SLACK_S = 5.0  # added to every call budget: thread scheduling, not network


def call_budget_s(client, timeout_s: float, probe_timeout_s: float = 0.0) -> float:
    """The longest a call through ``client`` may take while every deadline holds: each try of
    its retry on UNAVAILABLE (``max_attempts``, sleeping up to ``max_backoff_s`` between), then,
    with ``probe_timeout_s``, the same for the GetInfo probe after a failed push; plus
    ``BUDGET_SLACK_S``."""
    attempts, backoff = int(getattr(client, "max_attempts", 1)), float(getattr(client, "max_backoff_s", 0.0))
    probe = attempts * (probe_timeout_s + backoff) if probe_timeout_s else 0.0
    return attempts * (timeout_s + backoff) + probe + BUDGET_SLACK_S


@dataclasses.dataclass(eq=False)
class _Push:
    """One server's push of one publish (see :meth:`RolloutFleet.start_publish`)."""

    server: Server
    epoch: int  # the server's epoch when the push started
    version: int
    budget_s: float  # call_budget_s: it must have returned by then
    future: object
    deadline: float = 0.0  # time.monotonic() + budget_s at the start

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget_s


class RolloutFleet:
    """Healthy / down rollout servers; ``admit(server, target_version) -> version`` brings one back."""

    def __init__(self, servers: list[Server], *, admit: Callable[[Server, int], int], grace_s: float,
                 report: Callable[[str], None]):
        self.servers = servers
        self._admit = admit
        self.grace_s = grace_s
        self._report = report
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 3 * len(servers)), thread_name_prefix="covrl-fleet")
        self.target_version = 0
        self.resent_shards = 0  # shards re-sent to another server (cumulative)
        self.readmissions = 0
        self._none_since: float | None = time.monotonic()
        self._closed = False
        self._watcher: threading.Thread | None = None  # started by the first readmit()

    def _watch(self) -> None:
        """Re-admission in the background: each down server is tried again when its backoff is over."""
        while True:
            with self._cond:
                if self._closed:
                    return
                due = [s.retry_at for s in self.servers if not s.healthy and not s.admitting]
                self._cond.wait(timeout=max(0.05, min(due) - time.monotonic()) if due else None)
            self.readmit()

    # -- state ----------------------------------------------------------------------------

    @property
    def healthy(self) -> list[Server]:
        with self._cond:
            return [s for s in self.servers if s.healthy]

    def metrics(self) -> dict:
        return {"rollout/servers_healthy": len(self.healthy), "rollout/servers_total": len(self.servers),
                "failover/resent_shards": self.resent_shards, "failover/readmissions": self.readmissions}

    def _line(self, what: str) -> None:
        n = sum(s.healthy for s in self.servers)
        self._report(f"rollout fleet: {n}/{len(self.servers)} healthy ({what})")

    def mark_down(self, srv: Server, reason: str, *, epoch: int | None = None) -> None:
        """Take ``srv`` out of the fleet; with ``epoch`` only if it has not gone down or come back since."""
        with self._cond:
            if not srv.healthy or (epoch is not None and epoch != srv.epoch):
                return
            srv.epoch += 1
            srv.healthy, srv.reason, srv.dtype = False, reason, None
            srv.retry_at, srv.backoff_s = time.monotonic() + 0.5, 0.5
            if not any(s.healthy for s in self.servers):
                self._none_since = time.monotonic()
            self._line(f"lost {srv.address}: {reason}")
            self._cond.notify_all()

    def set_target(self, version: int) -> None:
        """The version every healthy server must hold from now on (the one just published)."""
        with self._cond:
            self.target_version = int(version)

    def mark_stale(self, current: Callable[[Server], int]) -> None:
        """Mark down every healthy server whose version (``current(server)``) is not the target."""
        for s in self.healthy:
            try:
                v = current(s)
            except Exception as e:  # noqa: BLE001 - unreachable counts as down
                self.mark_down(s, f"{type(e).__name__}: {e}")
                continue
            if v != self.target_version:
                self.mark_down(s, f"holds weight version {v}, the learner {self.target_version}")

    # -- re-admission -----------------------------------------------------------------------

    def readmit(self) -> None:
        """Start an admission attempt for every down server whose retry time has come (non-blocking)."""
        now = time.monotonic()
        with self._cond:
            if self._closed:
                return
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="covrl-fleet-readmit", daemon=True)
                self._watcher.start()
            due = [s for s in self.servers if not s.healthy and not s.admitting and s.retry_at <= now]
            for s in due:
                s.admitting = True
        for s in due:
            self._pool.submit(self._admit_one, s)

    def _admit_one(self, srv: Server) -> None:
        target = self.target_version
        try:
            version = self._admit(srv, target)
            why = f"holds weight version {version}, the fleet needs {self.target_version}"
        except Exception as e:  # noqa: BLE001 - any failure leaves it down, retried with backoff
            version, why = None, f"{type(e).__name__}: {e}"
        with self._cond:
            srv.admitting = False
            if version is not None and version == self.target_version:
                srv.healthy, srv.reason = True, ""
                srv.epoch += 1
                self._none_since = None
                self.readmissions += 1
                self._line(f"admitted {srv.address} at weight version {version}")
            else:
                srv.reason = why
                srv.retry_at = time.monotonic() + srv.backoff_s
                srv.backoff_s = min(srv.backoff_s * 2, 5.0)
            self._cond.notify_all()

    def wait_for_a_server(self) -> None:
        """Block until a server is healthy; NoRolloutServer after ``grace_s`` without one."""
        while True:
            self.readmit()
            with self._cond:
                if any(s.healthy for s in self.servers):
                    return
                if self._none_since is None:
                    self._none_since = time.monotonic()
                left = self.grace_s - (time.monotonic() - self._none_since)
                if left <= 0 or self._closed:
                    reasons = "; ".join(f"{s.address}: {s.reason}" for s in self.servers)
                    raise NoRolloutServer(
                        f"no rollout server was healthy for {self.grace_s:g}s (failover.rollout_grace_s): {reasons}")
                # woken by an admission attempt's end, or when the next retry is due
                soonest = min((s.retry_at for s in self.servers if not s.admitting), default=time.monotonic() + 1)
                self._cond.wait(timeout=max(0.05, min(left, soonest - time.monotonic(), 1.0)))

    # -- one step's shards ------------------------------------------------------------------

    def run(self, shards: list[tuple[int, object]], call: Callable[[object, object], object],
            accept: Callable[[object], str | None], *, timeout_s: float | None = None) -> dict[int, object]:
        """``{shard key: call(client, payload)}`` for every shard, each on some healthy server.

        ``accept(result)`` returns None or why the result is refused (stale weights); a
        refused or failed shard is re-sent to another healthy server. ``timeout_s``: the
        deadline ``call`` gives its RPC; a call still running past :func:`call_budget_s` of it
        counts as failed (its thread is left behind).
        """
        self.readmit()
        todo = list(shards)
        running: dict = {}
        results: dict[int, object] = {}
        while todo or running:
            healthy = self.healthy
            while todo and healthy:
                srv = min(healthy, key=lambda s: s.in_flight)
                key, payload = todo.pop(0)
                srv.in_flight += 1
                deadline = time.monotonic() + call_budget_s(srv.client, timeout_s) if timeout_s else float("inf")
                running[self._pool.submit(call, srv.client, payload)] = (key, payload, srv, srv.epoch, deadline)
            if not running:
                self.wait_for_a_server()
                continue
            soonest = min(r[4] for r in running.values())
            done, _ = wait(list(running), timeout=None if soonest == float("inf") else
                           max(0.0, soonest - time.monotonic()), return_when=FIRST_COMPLETED)
            for fut in [f for f, r in running.items() if f not in done and r[4] <= time.monotonic()]:
                key, payload, srv, epoch, _ = running.pop(fut)  # outlived its deadlines: left behind
                srv.in_flight -= 1
                self.mark_down(srv, f"a call did not return within its deadlines "
                                    f"({call_budget_s(srv.client, timeout_s):.0f}s)", epoch=epoch)
                self.resent_shards += 1
                todo.append((key, payload))
            for fut in done:
                key, payload, srv, epoch, _ = running.pop(fut)
                srv.in_flight -= 1
                try:
                    res = fut.result()
                    why = accept(res)
                except ClientError as e:
                    if e.code not in FAILOVER_CODES:
                        raise
                    why = f"{e.code.name}: {e.details}"
                if why is None:
                    results[key] = res
                    continue
                self.mark_down(srv, why, epoch=epoch)
                self.resent_shards += 1
                todo.append((key, payload))
        return results

    def generate(self, ids: list[list[int]], params: Callable[[int], object], *, timeout_s: float) -> list:
        """[(prompt indices, PromptResults)] of each shard: shard ``si`` holds prompts si, si + S, ...
        (S = the configured servers) and samples with ``params(si)``, whichever server runs it."""
        n_shards, floor = len(self.servers), self.target_version

        def one(client, si):
            idx = list(range(si, len(ids), n_shards))
            return idx, client.generate([ids[i] for i in idx], params(si), prompt_ids=[str(i) for i in idx],
                                        timeout_s=timeout_s)

        def fresh(result) -> str | None:  # no sample from weights older than the published ones
            old = [p.weight_version for p in result[1] if p.weight_version < floor]
            return f"sampled with weight version {min(old)}, the fleet holds {floor}" if old else None

        done = self.run([(si, si) for si in range(min(n_shards, len(ids)))], one, fresh, timeout_s=timeout_s)
        return [done[k] for k in sorted(done)]

    def push_dtype(self, probe_timeout_s: float) -> str:
        """The dtype to fetch the learner's weights in for :meth:`publish`: the healthy servers'
        engine dtype when all of them run the same one below float32 (half the bytes on both
        hops, learner -> trainer -> servers, and the engines cast to it anyway), else ``""``
        (as trained). A server that does not answer GetInfo gives ``""``; the push then finds it."""
        kinds = set()
        for srv in self.healthy:
            if srv.dtype is None:
                try:
                    srv.dtype = srv.client.get_info(timeout_s=probe_timeout_s).dtype
                except ClientError:
                    return ""
            kinds.add(srv.dtype)
        return kinds.pop() if len(kinds) == 1 and kinds <= {"bfloat16", "float16"} else ""

    def publish(self, version: int, tensors: dict, *, timeout_s: float, probe_timeout_s: float) -> None:
        """Push weights ``version`` to every healthy server in parallel; one that fails is marked down."""
        self.finish_publish(self.start_publish(version, lambda c, t: c.update_weights(tensors, version, timeout_s=t),
                                               timeout_s=timeout_s, probe_timeout_s=probe_timeout_s))

    def publish_relayed(self, relay: WeightRelay, source, *, timeout_s: float, probe_timeout_s: float) -> int:
        """Relay the learner's serialized weight chunks (``source``) to every healthy server as
        they arrive (:class:`~covrl.trainer.relay.WeightRelay`); returns the version. A server
        whose push fails is marked down; when the learner's stream fails, no server is (none
        took the update), the target version stays the previous one and the learner's error
        is raised."""
        before = self.target_version
        pushes: list[_Push] = []

        def start(version: int) -> None:
            pushes.extend(self.start_publish(
                version, lambda c, t: c.update_weights_encoded(relay.reader, timeout_s=t),
                timeout_s=timeout_s, probe_timeout_s=probe_timeout_s, excused=lambda: relay.failed))

        try:
            version = relay.feed(source, start)
        except BaseException:
            self.finish_publish(pushes)
            self.set_target(before)
            raise
        self.finish_publish(pushes)
        return version

    def start_publish(self, version: int, push: Callable, *, timeout_s: float, probe_timeout_s: float,
                      excused: Callable[[], bool] = lambda: False) -> list[_Push]:
        """Set the target to ``version`` and start ``push(client, timeout_s)`` on every healthy
        server; a server whose push fails, unless ``excused()`` (its source failed), or that
        then holds another version is marked down. Returns the pushes for :meth:`finish_publish`."""
        self.set_target(version)

        def one(srv: Server, epoch: int) -> None:
            try:
                got = push(srv.client, timeout_s).weight_version
            except ClientError as e:
                if excused():
                    return
                try:  # FAILED_PRECONDITION: it already holds this version (an admission got there first)
                    got = srv.client.get_info(timeout_s=probe_timeout_s).weight_version
                except ClientError:
                    got = f"{e.code.name}: {e.details}"
            if got != version:
                self.mark_down(srv, f"weight push of version {version} failed ({got})", epoch=epoch)

        with self._cond:
            targets = [(s, s.epoch) for s in self.servers if s.healthy]
        return [_Push(srv, epoch, version, call_budget_s(srv.client, timeout_s, probe_timeout_s),
                      self._pool.submit(one, srv, epoch)) for srv, epoch in targets]

    def finish_publish(self, pushes: list[_Push]) -> None:
        """Wait for the pushes of :meth:`start_publish`. One that has not returned by its budget
        (:func:`call_budget_s`: every deadline it was given has passed) is marked down and left
        behind, so a call that outlives its gRPC deadline cannot stall the run; a push's own
        exception (not a ClientError) is raised."""
        for p in pushes:
            try:
                p.future.result(timeout=max(0.0, p.deadline - time.monotonic()))
            except FutureTimeout:
                self.mark_down(p.server, f"weight push of version {p.version} did not return within its deadlines "
                                         f"({p.budget_s:.0f}s)", epoch=p.epoch)

    def close(self) -> None:
        """Cancel in-flight calls (closing the channels) and stop the admission threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for s in self.servers:
            s.client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
