"""Run logging: one JSON line per step (``metrics.jsonl``), TensorBoard scalars, a progress bar.

``MetricsLogger(run_dir, total_steps, start_step=...)`` appends to ``RUN_DIR/metrics.jsonl``;
on resume it first drops lines past the checkpoint's step so the file stays one line
per step. TensorBoard (``RUN_DIR/tb``) and the bar (tqdm, else a plain line) are optional.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"


def enable_stack_dumps() -> bool:
    """After this, ``kill -USR1 PID`` prints every thread's Python stack to stderr and the
    process goes on: what a trainer or service that seems stuck is waiting for. The CLI and
    ``python -m covrl.services`` call it. False where there is no SIGUSR1, off the main thread,
    or when no stderr has a file descriptor (captured output: the process's own stderr then)."""
    import faulthandler
    import io
    import signal
    import threading

    if not hasattr(signal, "SIGUSR1") or threading.current_thread() is not threading.main_thread():
        return False
    for stream in (sys.stderr, sys.__stderr__):
        try:
            stream.fileno()
        except (AttributeError, ValueError, io.UnsupportedOperation):
            continue
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True)
        return True
    return False


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible instead of dropping the key
    return v


def read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a torn last line after a crash
    return out


def read_metrics(run_dir: str) -> list[dict]:
    return read_jsonl(os.path.join(run_dir, METRICS_FILE))


def truncate_after(path: str, step: int) -> None:
    """Keep only the records with ``record["step"] <= step`` (resume)."""
    rows = [r for r in read_jsonl(path) if int(r.get("step", 0)) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


class MetricsLogger:
    def __init__(self, run_dir: str, total_steps: int, *, start_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, print_every: int = 0):
        os.makedirs(run_dir, exist_ok=True)
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.start_step = start_step
        self.print_every = print_every
        self.path = os.path.join(run_dir, METRICS_FILE)
        self.eval_path = os.path.join(run_dir, EVAL_FILE)
        for p in (self.path, self.eval_path):
            if start_step and os.path.exists(p):
                truncate_after(p, start_step)
            elif not start_step and os.path.exists(p):
                os.remove(p)
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=start_step + 1 if start_step else None)
            except Exception as e:  # tensorboard missing: say so once, keep going
                print(f"[covrl] TensorBoard disabled ({e}); metrics still go to {self.path}", file=sys.stderr)
        self._bar = None
        self._t0 = time.monotonic()
        if progress:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total_steps, initial=start_step, desc="covrl", unit="step",
                                 dynamic_ncols=True, file=sys.stderr)
            except ImportError:
                self._bar = None
        self._plain_progress = progress and self._bar is None
        if progress:
            self.write("[covrl] progress: reward = mean reward of the step's samples, H = policy entropy "
                       "(nats/token), cov = Cov(log pi, A), t = wall seconds of the last step")
        self._last_log = time.monotonic()
        self._stage_fn = None
        self._watch_stop = None
        self._watch_s = 30.0

    def watch(self, stage_fn, every_s: float = 30.0) -> None:
        """Say what the run is doing when a phase runs long: every ``every_s`` seconds without a
        logged step, one line naming ``stage_fn()`` (generate, score, train, eval, ...) and the time."""
        import threading

        self._stage_fn, self._watch_s = stage_fn, every_s
        self._watch_stop = threading.Event()
        threading.Thread(target=self._watch_loop, name="covrl-progress", daemon=True).start()

    def _watch_loop(self) -> None:
        last_note = time.monotonic()
        while not self._watch_stop.wait(min(1.0, self._watch_s / 4)):
            now = time.monotonic()
            if now - max(self._last_log, last_note) < self._watch_s:
                continue
            last_note = now
            try:
                stage = self._stage_fn()
            except Exception:  # noqa: BLE001 - a progress note must never fail the run
                stage = "?"
            if stage in (None, "between"):
                continue
            step = self._steps_done + self.start_step + 1
            first = " (the first step also warms up the model)" if self._steps_done == 0 else ""
            self.write(f"[covrl] step {step}/{self.total_steps}: {stage} running, "
                       f"{now - self._last_log:.0f}s since the last step{first}")

    _steps_done = 0

    def log(self, step: int, metrics: dict) -> None:
        self._steps_done += 1
        self._last_log = time.monotonic()
        rec = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k.replace(".", "/"), v, step)
        self._progress(step, rec)

    def log_eval(self, step: int, metrics: dict) -> None:
        rec = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.eval_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"eval/{k}", v, step)
        self.write(f"[eval step {step}] " + " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _progress(self, step: int, rec: dict) -> None:
        summary = {"reward": rec.get("reward/mean"), "H": rec.get("actor/entropy"),
                   "cov": rec.get("actor/cov"), "t": rec.get("time/step_s")}
        text = " ".join(f"{k}={_fmt(v)}{'s' if k == 't' else ''}" for k, v in summary.items() if v is not None)
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.update(1)
        elif self._plain_progress:
            done = step - self.start_step
            el = time.monotonic() - self._t0
            eta = el / max(done, 1) * (self.total_steps - step)
            print(f"[covrl] step {step}/{self.total_steps} {text} eta={eta:.0f}s", file=sys.stderr, flush=True)
        if self.print_every and step % self.print_every == 0 and self._bar is not None and not sys.stderr.isatty():
            # tqdm redraws poorly into log files; leave one plain line per step there.
            self._bar.write(f"step {step}: {text}", file=sys.stderr)

    def close(self) -> None:
        if self._watch_stop is not None:
            self._watch_stop.set()
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
