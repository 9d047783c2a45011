"""Failure handling of a run: step snapshots, bringing a service back, redoing steps, stopping.

* **Snapshot.** Before each step the trainer keeps what the step changes (data cursor,
  controller, loss overrides, entropy history, Python RNG, learner version, prefetched
  batch): :func:`take_snapshot` / :func:`restore_snapshot`.
* **Reward lost.** Stateless: a local one is restarted, a remote one waited for
  (``failover.service_wait_s``), then the same Score request is sent again
  (:func:`bring_back`).
* **Learner lost.** A local one is restarted from the latest checkpoint under
  ``RUN_DIR/checkpoints`` (``checkpoint.every``), a remote one waited for. The trainer then
  asks its weight version and goes back to the state of that version: the snapshot of
  the interrupted step (the step is redone), the run's start, or a checkpoint's
  ``trainer_state.json``; metrics of the steps after it are dropped from metrics.jsonl,
  so each step is there once (:func:`recover_learner`).
* **Rollout servers.** :func:`admit` is the fleet's admission: restart a dead local
  server, probe, push the current weights, return the version it holds.
* **Stop.** :class:`StopSignals` turns SIGINT / SIGTERM into :class:`RunStopped` in the
  main thread; :func:`checkpoint_on_stop` saves the last completed step when the learner
  is not in the middle of an update.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import threading
import time

import grpc

from covrl.client.channel import ClientError
from covrl.logging_utils import truncate_after
from covrl.trainer.checkpoint import TRAINER_STATE, restore, save_checkpoint
from covrl.trainer.local_services import _log, wait_ready

LOST_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
LEARNER_METHODS = {"SubmitRollouts", "Train", "GetWeights", "Checkpoint", "RegisterRolloutServer"}


class RunStopped(Exception):
    """SIGINT or SIGTERM reached the trainer."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def lost_learner(exc: BaseException) -> bool:
    """Whether ``exc`` says the learner is unreachable (not a request error)."""
    return isinstance(exc, ClientError) and exc.method in LEARNER_METHODS and exc.code in LOST_CODES


# -- snapshots ------------------------------------------------------------------------------


def take_snapshot(tr, step: int) -> dict:
    """The trainer state at the start of ``step`` (= after step - 1)."""
    return {"step": step, "sampler": tr.sampler.state_dict(),
            "controller": copy.deepcopy(tr.controller.state_dict()) if tr.controller else None,
            "loss_overrides": dict(tr._loss_overrides), "history": copy.deepcopy(tr.history),
            "rng": random.getstate(), "learner_version": tr.learner_version, "pending_batch": tr._pending_batch}


def restore_snapshot(tr, snap: dict) -> None:
    tr.sampler.load_state_dict(snap["sampler"])
    if tr.controller is not None and snap["controller"]:
        tr.controller.load_state_dict(copy.deepcopy(snap["controller"]))
    tr._loss_overrides = dict(snap["loss_overrides"])
    tr.history = copy.deepcopy(snap["history"])
    random.setstate(snap["rng"])
    tr.learner_version = snap["learner_version"]
    tr._pending_batch = snap["pending_batch"]


def drop_pending(tr) -> None:
    """Wait for (and discard) a prefetch still running: it belongs to a step that is redone."""
    if tr.pending is not None:
        try:
            tr.pending.result(timeout=tr.cfg.rollout.timeout_s)
        except Exception:  # noqa: BLE001 - discarded anyway
            pass
        tr.pending = None


# -- services back --------------------------------------------------------------------------


def bring_back(tr, kind: str, why: BaseException) -> None:
    """Restart a local ``kind`` ("reward" / "learner") or wait for a remote one; reconnect."""
    fo = tr.cfg.failover
    tr.recoveries += 1
    if tr.recoveries > fo.max_restarts:
        raise RuntimeError(f"the {kind} service was lost again ({why}) after {fo.max_restarts} recoveries "
                           f"(failover.max_restarts); giving up") from why
    t0 = time.monotonic()
    local = tr.local is not None and kind in tr.local.procs
    if local and fo.restart_local:
        config = None
        if kind == "learner":
            config = dict(tr.local.configs["learner"])
            config.pop("resume_from", None)
            ckpt = latest_learner_checkpoint(tr)
            if ckpt:
                config["resume_from"] = ckpt
            _log(f"lost the local learner ({why}); restarting it from {ckpt or 'its initial weights'}")
        else:
            _log(f"lost the local {kind} service ({why}); restarting it")
        address = tr.local.restart(kind, config)
        client = tr.ch.reconnect(kind, address)
        wait_ready(client.channel, kind, address, tr.cfg.services.start_timeout_s,
                   alive=lambda: tr.local.check(kind))
    else:
        client = getattr(tr.ch, kind)
        _log(f"lost the {kind} service at {client.address} ({why}); waiting up to {fo.service_wait_s:g}s "
             f"(failover.service_wait_s)")
        client = tr.ch.reconnect(kind, client.address)
        wait_ready(client.channel, kind, client.address, fo.service_wait_s)
    tr.recovery_s.append(time.monotonic() - t0)
    _log(f"the {kind} service is back after {tr.recovery_s[-1]:.1f}s")


def retry_lost(tr, kind: str, call):
    """``call()``; each time it finds service ``kind`` lost, bring it back and call again."""
    while True:
        try:
            return call()
        except ClientError as e:
            if e.code not in LOST_CODES:
                raise
            bring_back(tr, kind, e)


def latest_learner_checkpoint(tr) -> str:
    """The learner part of the newest complete checkpoint of the run (or the one it resumed from)."""
    from covrl.trainer.checkpoint import latest_checkpoint, learner_part

    ckpt = latest_checkpoint(tr.run_dir)
    return learner_part(ckpt) if ckpt else (tr.resume_checkpoint or "")


def learner_version(tr) -> int:
    """The learner's weight version (asked through a registration, which the learner answers with it)."""
    srv = tr.fleet.servers[0]
    resp = tr.ch.learner.register_rollout_server(srv.address, use_tls=bool(tr.cfg.services.tls_ca),
                                                 root_certificates=tr.cfg.services.tls_ca or None,
                                                 token=tr.ch.token, push_now=False, timeout_s=60)
    return int(resp.weight_version)


def recover_learner(tr, why: BaseException, step: int, snap: dict, logged: bool) -> int:
    """Bring the learner back and put the trainer in the state of its weight version; the next step to run."""
    drop_pending(tr)
    bring_back(tr, "learner", why)
    v = learner_version(tr)
    if logged and v == tr.learner_version:  # lost after the step: nothing to redo
        _log(f"the learner kept step {step} (weight version {v}); continuing with step {step + 1}")
        return step + 1
    if v == snap["learner_version"]:
        restore_snapshot(tr, snap)
        state_step = step - 1
    elif v == tr.initial["learner_version"]:
        restore_snapshot(tr, tr.initial)
        state_step = tr.initial["step"] - 1
    else:
        state_step = _restore_checkpoint_with_version(tr, v)
    tr.learner_version = v
    truncate_metrics(tr, state_step)
    reset_fleet_versions(tr, v)
    tr.redone_steps += step - state_step
    _log(f"redoing from step {state_step + 1} (learner weight version {v}); metrics after step {state_step} "
         f"are dropped and written again")
    return state_step + 1


def _restore_checkpoint_with_version(tr, version: int) -> int:
    root = os.path.join(tr.run_dir, "checkpoints")
    for name in sorted(os.listdir(root) if os.path.isdir(root) else [], reverse=True):
        path = os.path.join(root, name, TRAINER_STATE)
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            if int(state.get("learner_version", -1)) == version:
                restore(tr, state)
                return int(state["step"])
    raise RuntimeError(f"the learner came back at weight version {version}, but the trainer has no state for "
                       f"that version (last version {tr.learner_version}, no checkpoint with it under {root}); "
                       f"restart the learner from the run's latest checkpoint")


def truncate_metrics(tr, step: int) -> None:
    """metrics.jsonl (and eval.jsonl) keep only the steps <= ``step``."""
    lg = tr.logger
    lg._f.close()
    for p in (lg.path, lg.eval_path):
        if os.path.exists(p):
            truncate_after(p, step)
    lg._f = open(lg.path, "a")  # noqa: SIM115 - the logger owns it and closes it


def reset_fleet_versions(tr, version: int) -> None:
    """After a learner restart: the fleet's target is its version; servers holding another one are down."""
    tr.fleet.set_target(version)

    def current(srv) -> int:
        v = srv.client.get_info(timeout_s=tr.cfg.failover.probe_timeout_s).weight_version
        if v > version:
            srv.floor = v  # holds weights the restarted learner never made: refused until a newer push
        return v

    tr.fleet.mark_stale(current)


# -- rollout admission ----------------------------------------------------------------------


def admit(tr, srv, target: int) -> int:
    """Bring ``srv`` to the current weights; return the version it then holds (the fleet checks it)."""
    fo = tr.cfg.failover
    if srv.local_name and tr.local is not None and tr.local.check(srv.local_name):
        _log(f"the local rollout server {srv.local_name} exited; restarting it")
        tr.local.restart(srv.local_name)
        srv.floor = -1
        raise RuntimeError("restarted; not ready yet")
    v = srv.client.get_info(timeout_s=fo.probe_timeout_s).weight_version
    if srv.floor >= 0 and v == srv.floor and target <= v:
        if srv.local_name and tr.local is not None:
            tr.local.restart(srv.local_name)
            srv.floor = -1
            raise RuntimeError("restarted (it held weights from before the learner's restart)")
        raise RuntimeError(f"holds weight version {v} from before the learner's restart; admitted once the "
                           f"learner passes it")
    if v > target and srv.floor < 0:
        raise RuntimeError(f"holds weight version {v}, newer than the learner's {target}")
    if v != target and tr.ch.learner is not None:
        s = tr.cfg.services
        resp = tr.ch.learner.register_rollout_server(srv.address, use_tls=bool(s.tls_ca),
                                                     root_certificates=s.tls_ca or None, token=tr.ch.token,
                                                     push_now=True, timeout_s=fo.push_timeout_s)
        if resp.push is not None and not resp.push.ok and resp.weight_version > 0:
            raise RuntimeError(f"weight push failed: {resp.push.error}")
        v = srv.client.get_info(timeout_s=fo.probe_timeout_s).weight_version
    if v > srv.floor:
        srv.floor = -1
    return v


# -- stopping -------------------------------------------------------------------------------


class StopSignals:
    """Within ``with``: SIGINT / SIGTERM raise :class:`RunStopped` once in the main thread; later ones
    are only noted, so the shutdown that follows is not cut short."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handler(self, signum, _frame):
        if self.signum is None:
            self.signum = signum
            raise RunStopped(signum)
        _log(f"{signal.Signals(signum).name} again: already stopping")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        return False

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def stop_run(tr, e: RunStopped) -> None:
    """SIGINT / SIGTERM: cancel the running calls, checkpoint the last completed step if possible."""
    stage = tr._stage
    _log(f"{e}: stopping (last completed step {tr.completed_step}, interrupted in {stage})")
    if tr.fleet is not None:
        tr.fleet.close()  # cancels in-flight generation: the servers stop sampling at once
    checkpoint_on_stop(tr, stage, tr._snapshot)
    _log(f"stopped; resume with: covrl train --resume {tr.run_dir}")


def checkpoint_on_stop(tr, stage: str, snap: dict | None) -> None:
    """Checkpoint the last completed step when the learner holds exactly it (stopped while sampling / scoring)."""
    fo = tr.cfg.failover
    done = tr.completed_step
    if not fo.checkpoint_on_stop or tr.cfg.algo.max_staleness != 0 or tr.ch is None or tr.ch.learner is None:
        return
    if done <= tr.start_step or done == tr.checkpointed_step or stage not in ("generate", "score", "between"):
        return
    if stage != "between" and snap is not None:
        restore_snapshot(tr, snap)
    try:
        path = save_checkpoint(tr, done, timeout_s=fo.stop_timeout_s)
        tr.checkpointed_step = done
        _log(f"checkpointed step {done} in {path}")
    except Exception as e:  # noqa: BLE001 - stopping anyway; the metrics are already written
        _log(f"could not checkpoint step {done} on stop ({e}); resume from the latest checkpoint")
