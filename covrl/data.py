"""Prompts and ground truths for RL: files (JSONL / Parquet, verl's layout too) and built-in tasks.

* :func:`load_file` reads JSONL or Parquet (``pyarrow`` needed for Parquet only). A row
  needs a prompt (a string, or a list of chat messages ``{"role", "content"}`` as in
  verl) and a ground truth (``data.answer_key``, or verl's ``reward_model.ground_truth``).
  ``data_source`` (or ``data.reward_task_key``) names the verifier task of the row.
* A bad row raises :class:`DataError` naming the file, the line (1-based; the row number
  for Parquet) and the field; with ``data.on_bad_row=skip`` it is dropped and counted in
  :attr:`Dataset.skipped` instead (the trainer logs the count).
* :func:`synthetic` generates the built-in ``arithmetic`` and ``countdown`` tasks from a
  seed, with a held-out split disjoint from the training split.
* :class:`PromptSampler` walks a shuffled order epoch by epoch; its ``state_dict`` is the
  data cursor that checkpoints save, so a resumed run sees the same prompts.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

from covrl.config import DataConfig


class DataError(ValueError):
    """A dataset row or file is unusable; the message names the file, line and field."""


@dataclass
class Example:
    """One prompt. ``prompt`` is a string or chat messages; ``task`` names the reward verifier."""

    uid: str
    prompt: str | list[dict]
    ground_truth: str
    task: str
    meta: dict = field(default_factory=dict)  # where the row came from (not sent anywhere)
    reward_meta: dict = field(default_factory=dict)  # metadata for the verifier (countdown: numbers)

    def messages(self, system_prompt: str = "") -> list[dict]:
        if isinstance(self.prompt, str):
            msgs = [{"role": "user", "content": self.prompt}]
        else:
            msgs = [dict(m) for m in self.prompt]
        if system_prompt and not any(m.get("role") == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": system_prompt})
        return msgs

    def text(self) -> str:
        """The prompt as plain text (the user turns), for the reward service."""
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(m["content"] for m in self.prompt if m.get("role") != "system")


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------
# files


def _iter_rows(path: str):
    """Yield ``(line_number, row_dict_or_error_string)`` for a JSONL or Parquet file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if path.endswith((".parquet", ".pq")):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or convert the file to JSONL"
            ) from None
        table = pq.read_table(path)
        for i, row in enumerate(table.to_pylist(), start=1):
            yield i, row
        return
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, f"not valid JSON ({e.msg} at column {e.colno})"
                continue
            yield i, row


def _get_path(row: dict, dotted: str):
    node: Any = row
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_row(row: Any, *, where: str, cfg: DataConfig, default_task: str, uid: str) -> Example:
    """Turn one raw row into an :class:`Example`; raise :class:`DataError` naming ``where`` and the field."""
    if isinstance(row, str):
        raise DataError(f"{where}: {row}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object per row, got {type(row).__name__}")
    prompt = _get_path(row, cfg.prompt_key)
    if prompt is None:
        raise DataError(f"{where}: field '{cfg.prompt_key}' is missing (the prompt: a string or chat messages)")
    if hasattr(prompt, "tolist"):  # numpy arrays from parquet
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError(f"{where}: field '{cfg.prompt_key}' is an empty string")
    elif isinstance(prompt, list):
        if not prompt:
            raise DataError(f"{where}: field '{cfg.prompt_key}' is an empty message list")
        for j, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: field '{cfg.prompt_key}[{j}]': expected "
                                f"{{'role': str, 'content': str}}, got {m!r:.80}")
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        raise DataError(f"{where}: field '{cfg.prompt_key}': expected a string or a list of chat "
                        f"messages, got {type(prompt).__name__}")
    answer_field = cfg.answer_key
    gt = _get_path(row, cfg.answer_key)
    if gt is None:
        for alt in ("reward_model.ground_truth", "ground_truth", "answer", "solution"):
            gt = _get_path(row, alt)
            if gt is not None:
                answer_field = alt
                break
    if gt is None:
        raise DataError(f"{where}: field '{cfg.answer_key}' is missing (the ground truth; verl's "
                        f"'reward_model.ground_truth' is accepted too)")
    if isinstance(gt, (int, float)) and not isinstance(gt, bool):
        gt = str(gt)
    elif isinstance(gt, (dict, list)):
        gt = json.dumps(gt)
    if not isinstance(gt, str) or not gt.strip():
        raise DataError(f"{where}: field '{answer_field}': expected a non-empty string or number, got {gt!r:.80}")
    task = _get_path(row, cfg.reward_task_key) if cfg.reward_task_key else None
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: field '{cfg.reward_task_key}': expected a string, got {type(task).__name__}")
    extra = _get_path(row, "extra_info")
    reward_meta = extra if isinstance(extra, dict) else {}
    return Example(uid=uid, prompt=prompt, ground_truth=gt, task=task or default_task,
                   meta={"source": where}, reward_meta=reward_meta)


def load_file(path: str, cfg: DataConfig, default_task: str) -> tuple[list[Example], int, list[str]]:
    """Read every row; return ``(examples, n_skipped, skip_reasons)`` (skips only with on_bad_row=skip)."""
    out: list[Example] = []
    skipped, reasons = 0, []
    base = os.path.basename(path)
    for line, row in _iter_rows(path):
        where = f"{path}:{line}"
        try:
            out.append(parse_row(row, where=where, cfg=cfg, default_task=default_task, uid=f"{base}:{line}"))
        except DataError as e:
            if cfg.on_bad_row == "error":
                raise
            skipped += 1
            if len(reasons) < 20:
                reasons.append(str(e))
    if not out:
        raise DataError(f"{path}: no usable rows ({skipped} bad)")
    return out, skipped, reasons


# ---------------------------------------------------------------------------------------
# built-in synthetic tasks


def _arithmetic(rng: random.Random, cfg: DataConfig) -> tuple[str, str]:
    nums = [rng.randint(0, cfg.max_operand) for _ in range(cfg.num_terms)]
    ops = [rng.choice("+-") for _ in range(cfg.num_terms - 1)]
    expr = str(nums[0])
    value = nums[0]
    for op, n in zip(ops, nums[1:], strict=True):
        expr += f" {op} {n}"
        value = value + n if op == "+" else value - n
    q = f"What is {expr}?"
    if cfg.instruction:
        q += " " + cfg.instruction
    return q, str(value), {}


def _countdown(rng: random.Random, cfg: DataConfig) -> tuple[str, str]:
    while True:
        nums = [rng.randint(1, 20) for _ in range(cfg.countdown_numbers)]
        order = nums[:]
        rng.shuffle(order)
        value = order[0]
        for n in order[1:]:
            op = rng.choice("+-*")
            value = value + n if op == "+" else value - n if op == "-" else value * n
        if 0 < value <= 200:
            break
    q = (f"Using the numbers {nums}, create an equation that equals {value}. Use each number exactly "
         f"once, with + - * / and parentheses. Give the equation inside <answer></answer>.")
    return q, str(value), {"numbers": nums, "target": value}


SYNTHETIC_TASKS = {"arithmetic": _arithmetic, "countdown": _countdown}


def synthetic(cfg: DataConfig, task: str | None = None) -> tuple[list[Example], list[Example]]:
    """``(train, held_out)`` problems of a built-in task from ``cfg.seed``; the splits share no prompt."""
    task = task or cfg.task
    if task not in SYNTHETIC_TASKS:
        raise DataError(f"data.task: unknown synthetic task {task!r}; expected one of {', '.join(SYNTHETIC_TASKS)}")
    gen = SYNTHETIC_TASKS[task]
    rng = random.Random(f"covrl-{task}-{cfg.seed}")
    want = cfg.train_size + cfg.eval_size
    seen: dict[str, tuple[str, dict]] = {}
    tries = 0
    while len(seen) < want and tries < want * 50:
        q, a, meta = gen(rng, cfg)
        seen.setdefault(q, (a, meta))
        tries += 1
    if len(seen) < want:
        raise DataError(f"data: the {task} task has only {len(seen)} distinct problems with these settings; "
                        f"lower data.train_size + data.eval_size ({want}) or widen the task "
                        f"(data.max_operand / data.num_terms)")
    items = list(seen.items())
    examples = [Example(uid=f"{task}-{cfg.seed}-{i}", prompt=q, ground_truth=a, task=task, reward_meta=meta)
                for i, (q, (a, meta)) in enumerate(items)]
    # The held-out split is the LAST eval_size problems: disjoint from training by construction.
    return examples[: cfg.train_size], examples[cfg.train_size:]


def build_dataset(cfg: DataConfig, reward_task: str) -> Dataset:
    """The training and held-out splits the config asks for."""
    if cfg.task != "file":
        train, held = synthetic(cfg)
        return Dataset(train=train, eval=held)
    for key in ("train_path", "eval_path"):
        path = getattr(cfg, key)
        if path and not os.path.isfile(path):
            raise DataError(f"data.{key}: file not found: {path}" + ("" if os.path.isabs(path) else
                                                                     f" (relative to {os.getcwd()})"))
    train, skipped, reasons = load_file(cfg.train_path, cfg, reward_task)
    if cfg.eval_path:
        held, s2, r2 = load_file(cfg.eval_path, cfg, reward_task)
        skipped += s2
        reasons += r2
    else:
        n = min(cfg.eval_size, max(0, len(train) - 1))
        order = list(range(len(train)))
        random.Random(f"covrl-holdout-{cfg.seed}").shuffle(order)
        held_idx = set(order[:n])
        held = [e for i, e in enumerate(train) if i in held_idx]
        train = [e for i, e in enumerate(train) if i not in held_idx]
    return Dataset(train=train, eval=held, skipped=skipped, skipped_reasons=reasons)


# ---------------------------------------------------------------------------------------
# prompts -> token ids


def encode_prompt(example: Example, tokenizer, cfg: DataConfig) -> list[int]:
    """Token ids of the prompt, chat template applied (with the generation prompt)."""
    if cfg.apply_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(example.messages(cfg.system_prompt), add_generation_prompt=True,
                                            tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        text = example.text()
        if cfg.system_prompt:
            text = cfg.system_prompt + "\n" + text
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if len(ids) > cfg.max_prompt_tokens:
        raise DataError(f"{example.meta.get('source', example.uid)}: field '{cfg.prompt_key}': the prompt has "
                        f"{len(ids)} tokens after the chat template, more than data.max_prompt_tokens="
                        f"{cfg.max_prompt_tokens}")
    return [int(t) for t in ids]


# ---------------------------------------------------------------------------------------
# the data cursor


class PromptSampler:
    """Shuffled passes over ``examples``; ``state_dict()`` is the resumable data cursor."""

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            raise DataError("data: the training split is empty")
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._order = self._make_order(0)

    def _make_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(f"covrl-sampler-{self.seed}-{epoch}").shuffle(order)
        return order

    def next_batch(self, k: int) -> list[Example]:
        out = []
        while len(out) < k:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._make_order(self.epoch)
            out.append(self.examples[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "n": len(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != len(self.examples) or state.get("seed") != self.seed:
            raise DataError(f"data cursor does not match this dataset (saved n={state.get('n')}, "
                            f"seed={state.get('seed')}; now n={len(self.examples)}, seed={self.seed}); "
                            f"resume with the same data settings")
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = self._make_order(self.epoch)
