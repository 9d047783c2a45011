"""Profile of one learner step of the demo (SmolLM2-135M-Instruct, fp32, 16 trajectories) on this CPU.

The batch is the demo's: 4 arithmetic prompts as covrl renders them (chat template, ~45
tokens) x 4 completions, one of each group at the 64-token cap and the others 15-39 tokens
(random ids: the cost does not depend on which tokens they are). Each variant is a fresh
``LearnerCore`` in this process, stepped ``--steps`` times on new batches; the rounds
interleave the variants. Per step the stages are timed by wrapping the learner's functions:

- ``scoring``: the no-grad scoring pass before the update (old log-probs, 80/20);
- ``selection``: the extra no-grad forward of Clip-Cov / KL-Cov's batch-wide selection
  (only with several micro-batches);
- ``fwd`` / ``bwd``: the training forwards (to log-probs and entropies) and backwards;
- ``optim``: gradient clipping + AdamW;
- ``diag``: the no-grad forward after the update (``measure_entropy_change``).

Then one step's operator profile (torch.profiler, top operators by self time) and the
forward / backward of one micro-batch of 16 through the learner's forward in fp32 against
``autocast_dtype=bfloat16`` (LM head and, on CPU, attention kept in fp32), with the log-prob
difference autocast makes. Writes ``benchmarks/results/learner_step_cpu.md``.

    .venv/bin/python benchmarks/bench_learner_step.py --rounds 2 --steps 3
    .venv/bin/python benchmarks/bench_learner_step.py --variants "the demo now,autocast" --out /tmp/l.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import random
import statistics
import subprocess
import time

import torch
from machine_info import cpu, write_results

from covrl.learner import policy, step
from covrl.learner.batch import Trajectory
from covrl.learner.core import LearnerCore

STAGES = ("scoring", "selection", "fwd", "bwd", "optim", "diag", "total")
BASE = dict(lr=2e-5, loss_mode="kl_cov", kl_cov_fraction=0.002, kl_coef=1.0)
VARIANTS = {
    "micro 8 (the demo before)": dict(micro_batch_size=8),
    "micro 16 (the demo now)": dict(micro_batch_size=16),
    "micro 16, no diagnostic": dict(micro_batch_size=16, measure_entropy_change=False),
    "micro 16, padding_free": dict(micro_batch_size=16, padding_free=True),
    "micro 16, recompute old: from the forward": dict(micro_batch_size=16, recompute_old_logprobs=True),
    "micro 16, recompute old: scoring pass": dict(micro_batch_size=16, recompute_old_logprobs=True,
                                                  _scoring_pass=True),
    "micro 16, recompute old, bf16 autocast": dict(micro_batch_size=16, recompute_old_logprobs=True,
                                                   autocast_dtype="bfloat16"),
    "micro 16, recompute old, bf16 autocast, LM head on every position": dict(
        micro_batch_size=16, recompute_old_logprobs=True, autocast_dtype="bfloat16", _full_head=True),
    "micro 16, recompute old, bf16 autocast, foreach AdamW": dict(
        micro_batch_size=16, recompute_old_logprobs=True, autocast_dtype="bfloat16", _foreach_adamw=True),
    "micro 16, recompute old, bf16 autocast, LM head on every position, foreach AdamW (before)": dict(
        micro_batch_size=16, recompute_old_logprobs=True, autocast_dtype="bfloat16", _full_head=True,
        _foreach_adamw=True),
    "micro 16, recompute old, bf16 autocast, padding_free": dict(micro_batch_size=16, recompute_old_logprobs=True,
                                                                 autocast_dtype="bfloat16", padding_free=True),
}


def demo_prompts(model: str) -> list[list[int]]:
    from transformers import AutoTokenizer

    from covrl.config import load_config
    from covrl.data import encode_prompt, synthetic

    cfg = load_config("configs/demo.yaml", [])
    tok = AutoTokenizer.from_pretrained(model)
    train, _ = synthetic(cfg.data)
    return [encode_prompt(e, tok, cfg.data) for e in train[:64]]


def make_batch(rng: random.Random, prompts: list[list[int]], vocab: int) -> list[Trajectory]:
    out = []
    for g in range(4):
        prompt = rng.choice(prompts)
        for k in range(4):
            n = 64 if k == 0 else rng.randrange(15, 40)
            out.append(Trajectory(prompt, [rng.randrange(vocab) for _ in range(n)], [-3.0] * n,
                                  float(rng.random() < 0.5), group_id=str(g)))
    return out


class Timers:
    """Wraps the learner's stage functions; ``t`` holds this step's seconds per stage."""

    def __init__(self):
        self.t: dict[str, float] = {}
        self.in_diag = False

    def add(self, key: str, s: float) -> None:
        self.t[key] = self.t.get(key, 0.0) + s

    def install(self) -> None:
        def wrap(mod, name, key_fn):
            f = getattr(mod, name)

            @functools.wraps(f)
            def w(*a, **k):
                t0 = time.perf_counter()
                try:
                    return f(*a, **k)
                finally:
                    key = key_fn()
                    if key:
                        self.add(key, time.perf_counter() - t0)
            setattr(mod, name, w)

        wrap(step, "scoring_pass", lambda: "scoring")
        wrap(step, "optimizer_step", lambda: "optim")

        real_diag = step.entropy_change

        def diag(*a, **k):
            t0 = time.perf_counter()
            try:
                return real_diag(*a, **k)
            finally:
                self.add("diag", time.perf_counter() - t0)
        step.entropy_change = diag

        real_lle = step.logits_lp_ent

        def lle(core, pk):
            t0 = time.perf_counter()
            r = real_lle(core, pk)
            self.add("fwd" if torch.is_grad_enabled() else "selection", time.perf_counter() - t0)
            return r
        step.logits_lp_ent = lle

        real_bw = torch.Tensor.backward

        def bw(tensor, *a, **k):
            t0 = time.perf_counter()
            try:
                return real_bw(tensor, *a, **k)
            finally:
                self.add("bwd", time.perf_counter() - t0)
        torch.Tensor.backward = bw


def run_variant(model: str, kw: dict, steps: int, prompts, timers: Timers, seed: int) -> list[dict]:
    kw = dict(kw)
    scoring = kw.pop("_scoring_pass", False)
    full_head = kw.pop("_full_head", False)
    foreach = kw.pop("_foreach_adamw", False)
    real_off, real_rows = step.old_from_forward, policy.head_on_rows
    if scoring:
        step.old_from_forward = lambda cfg, split: False
    if full_head:  # the LM head on all B x C positions, padding included (covrl before head_on_rows)
        policy.head_on_rows = lambda model, keep: contextlib.nullcontext(False)
    try:
        core = LearnerCore(dict(model=model, **BASE, **kw))
        if foreach:  # torch's default AdamW (covrl before fused_adamw), same settings
            core.optimizer = torch.optim.AdamW(core.policy.parameters(), lr=BASE["lr"], weight_decay=0.0,
                                               foreach=True)
        rng = random.Random(seed)
        rows = []
        for _ in range(steps + 1):  # the first step warms up (allocations, oneDNN kernels)
            core.submit(make_batch(rng, prompts, core.vocab_size))
            timers.t = {}
            t0 = time.perf_counter()
            core.train_step()
            timers.t["total"] = time.perf_counter() - t0
            rows.append(dict(timers.t))
        return rows[1:]
    finally:
        step.old_from_forward, policy.head_on_rows = real_off, real_rows


def op_profile(model: str, prompts) -> str:
    from torch.profiler import ProfilerActivity, profile

    core = LearnerCore(dict(model=model, **BASE, micro_batch_size=16, recompute_old_logprobs=True,
                            autocast_dtype="bfloat16"))  # the learner of configs/demo.yaml
    rng = random.Random(7)
    core.submit(make_batch(rng, prompts, core.vocab_size))
    core.train_step()
    core.submit(make_batch(rng, prompts, core.vocab_size))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        core.train_step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    lines = ["| operator | self CPU s | share |", "|---|---|---|"]
    for e in rows[:10]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | {100 * e.self_cpu_time_total / total:.0f}% |")
    return "\n".join(lines)


def autocast_check(model: str, prompts, repeats: int) -> list[dict]:
    """fwd / bwd of one micro-batch of 16 through the learner's own forward, fp32 and with
    ``autocast_dtype=bfloat16`` (LM head and, on CPU, attention in float32)."""
    from covrl.learner.batch import pack
    from covrl.learner.policy import logits_lp_ent  # the learner's own, not the timed wrapper

    cores = {amp: LearnerCore(dict(model=model, **BASE, micro_batch_size=16,
                                   autocast_dtype="bfloat16" if amp else "none")) for amp in (False, True)}
    batch = make_batch(random.Random(3), prompts, cores[False].vocab_size)
    pk = pack(batch, cores[False].device)

    def once(amp: bool):
        c = cores[amp]
        t0 = time.perf_counter()
        lp, ent = logits_lp_ent(c, pk)
        fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        (lp[pk.mask].sum() + ent[pk.mask].sum()).backward()
        bwd = time.perf_counter() - t0
        c.policy.zero_grad(set_to_none=True)
        return fwd, bwd, lp.detach()[pk.mask]

    once(False), once(True)  # warm-up
    res = {False: [], True: []}
    for _ in range(repeats):
        for amp in (False, True):
            res[amp].append(once(amp))
    ref = res[False][0][2]
    out = []
    for amp in (False, True):
        out.append({"mode": "autocast_dtype=bfloat16 (LM head, attention fp32)" if amp else "fp32",
                    "fwd": statistics.median(r[0] for r in res[amp]), "bwd": statistics.median(r[1] for r in res[amp]),
                    "dlp": float((res[amp][0][2] - ref).abs().mean()), "dlp_max": float((res[amp][0][2] - ref).abs().max())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (after 1 warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="", help="comma-separated names (or parts of names) to run; "
                    "default all; the first one run is the ratios' baseline")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "learner_step_cpu.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from covrl.demo_model import ensure_demo_model

    model = ensure_demo_model()
    prompts = demo_prompts(model)
    load_before = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    timers = Timers()
    timers.install()
    wanted = [w.strip() for w in args.variants.split(",") if w.strip()]
    variants = {k: v for k, v in VARIANTS.items() if not wanted or any(w in k for w in wanted)}
    if not variants:
        ap.error(f"--variants: none of {wanted} names a variant; known: {list(VARIANTS)}")
    rows: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, kw in variants.items():
            rows[name] += run_variant(model, kw, args.steps, prompts, timers, seed=r)
            print(f"[bench_learner_step] round {r + 1} {name}: "
                  f"{statistics.median(x['total'] for x in rows[name]):.2f} s", flush=True)
    ops = op_profile(model, prompts)
    amp = autocast_check(model, prompts, repeats=3)
    load_after = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    write(args, rows, ops, amp, load_before, load_after)


def write(args, rows, ops, amp, load_before: str, load_after: str) -> None:
    base_name = next(iter(rows))
    base = statistics.median(x["total"] for x in rows[base_name])
    lines = [
        "# One learner step of the demo on CPU: where the time goes",
        "",
        f"Machine: {cpu()}, no GPU, torch {torch.__version__}, {args.threads} threads; "
        f"{datetime.date.today().isoformat()}. Load: before `{load_before}`; after `{load_after}`.",
        f"Command: `python benchmarks/bench_learner_step.py --rounds {args.rounds} --steps {args.steps}"
        + (f" --variants '{args.variants}'" if args.variants else "") + "`; "
        "SmolLM2-135M-Instruct fp32, KL-Cov, 16 trajectories (the demo's prompts, one completion per "
        "group at the 64-token cap, the others 15-39), the variants interleaved per round; medians "
        f"over {args.rounds * args.steps} steps each (after one warm-up step per variant and round).",
        "",
        f"| variant | scoring s | selection s | fwd s | bwd s | optim s | diag s | total s | vs {base_name} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in rows.items():
        med = {k: statistics.median(x.get(k, 0.0) for x in rs) for k in STAGES}
        lines.append(f"| {name} | " + " | ".join(f"{med[k]:.2f}" for k in STAGES)
                     + f" | {med['total'] / base:.2f} |")
    lines += ["", "Per-step totals (s): " + "; ".join(
        f"{name}: {[round(x['total'], 1) for x in rs]}" for name, rs in rows.items()), "",
        "## Operators of one step (configs/demo.yaml's learner: micro 16, bf16 autocast, old log-probs from the forward; torch.profiler, self time)", "", ops, "",
        "## One micro-batch of 16: fp32 against bf16 autocast", "",
        "| mode | fwd s | bwd s | mean abs log-prob change vs fp32 | max |", "|---|---|---|---|---|"]
    for a in amp:
        lines.append(f"| {a['mode']} | {a['fwd']:.2f} | {a['bwd']:.2f} | {a['dlp']:.4f} | {a['dlp_max']:.3f} |")
    lines.append("")
    write_results(args.out, lines)


if __name__ == "__main__":
    main()
