"""Reward tasks: pure functions ``(completion, ground_truth, metadata) -> (reward, detail)``.

Every task is deterministic and has no side effects (no signals, no I/O), so it can run in a
worker process, in a thread or inline. None of them is time-guarded on its own: the
:class:`covrl.rewards.Verifier` pool enforces deadlines by killing the worker.

A task raises :class:`InvalidAnswer` for input it refuses to look at (a bad ``ground_truth`` or
``metadata`` field, an answer that is too long or too deeply nested); the verifier turns that into
status ``"invalid"``. A wrong answer is not invalid: it is status ``"ok"`` with reward 0.0.

Tasks (see docs/rewards.md for the full rules):

- ``math``: final answer checked with math-verify against ``ground_truth``; 1.0 / 0.0.
- ``arithmetic``: final number must equal the integer/decimal ``ground_truth`` exactly.
- ``countdown``: an equation over ``metadata["numbers"]`` (each used exactly once by default)
  that evaluates to ``metadata["target"]`` (or ``ground_truth``).
- ``format``: ``<think>..</think><answer>..</answer>`` (default), ``<answer>..</answer>`` or a
  ``\\boxed{}`` answer, chosen by ``metadata["format"]``.

:func:`score_one` adds the optional composition ``metadata["format_weight"] = w``:
reward = task reward + w * format reward.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Any

__all__ = ["InvalidAnswer", "TASKS", "score_one", "extract_math_answer", "last_boxed"]

MAX_ANSWER_CHARS = 10_000  # an extracted final answer longer than this is refused
MAX_NESTING = 200  # brackets nested deeper than this are refused (sympy would recurse)
TAIL_CHARS = 2_000  # with no marked answer, math-verify sees only the completion's tail


class InvalidAnswer(ValueError):
    """The item cannot be scored as given; the verifier reports status ``"invalid"``."""


# --------------------------------------------------------------------------------------------
# Extraction helpers
# --------------------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting of ( [ { in ``text`` (iterative: safe on any input)."""
    depth = best = 0
    for ch in text:
        if ch in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif ch in ")]}":
            depth = max(depth - 1, 0)
    return best


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at ``text[start] == '{'``; None if unbalanced."""
    depth = 0
    i = start
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\" and i + 1 < n and text[i + 1] in "{}":
            i += 2  # an escaped brace is literal
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``) in ``text``."""
    for m in reversed(list(_BOXED.finditer(text))):
        j = m.end()
        if j < len(text) and text[j] == "{":
            content = _braced(text, j)
            if content is not None:
                return content
        elif m.group(0).endswith((" ", "\t")):  # "\boxed 5"
            tok = re.match(r"[^\s$]+", text[j:])
            if tok:
                return tok.group(0)
    return None


_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*([^\n]+)", re.IGNORECASE)


def extract_math_answer(completion: str) -> tuple[str, str]:
    """``(answer, how)``: the last ``\\boxed{}``, else the last ``#### x`` / ``answer is x``,
    else the completion's tail (``how`` is ``"boxed"``, ``"####"``, ``"answer is"``, ``"tail"``)."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip(), "boxed"
    for how, pattern in (("####", _HASHES), ("answer is", _ANSWER_IS)):
        hits = pattern.findall(completion)
        if hits:
            ans = hits[-1].strip()
            ans = re.sub(r"[.\s]+$", "", ans)  # "The answer is 5." -> "5"
            if ans.startswith("$") and ans.endswith("$") and len(ans) > 1:
                ans = ans.strip("$").strip()
            if ans:
                return ans, how
    return completion[-TAIL_CHARS:], "tail"


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_ANSWER_CHARS:
        raise InvalidAnswer(f"{what} is {len(text)} characters; at most {MAX_ANSWER_CHARS} are checked")
    depth = _nesting_depth(text)
    if depth > MAX_NESTING:
        raise InvalidAnswer(f"{what} nests brackets {depth} deep; at most {MAX_NESTING} allowed")


def _short(text: str, n: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= n else text[: n - 3] + "..."


def _require_str(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidAnswer(f"{field}: expected a string, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------
# math
# --------------------------------------------------------------------------------------------


class _DropNoTimeoutWarning(logging.Filter):
    """math-verify warns on every call made with its own (signal) timeout off; deadlines are
    enforced by the verifier pool instead, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropNoTimeoutWarning())


def _as_latex(text: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify reads it as LaTeX (``1+2x`` otherwise
    parses as ``1``)."""
    t = text.strip()
    if "$" in t or "\\boxed" in t or "\\(" in t or "\\[" in t:
        return t
    return f"${t}$"


def math_task(completion: str, ground_truth: str, metadata: dict) -> tuple[float, str]:
    """1.0 if the completion's final answer is equivalent to ``ground_truth`` (math-verify)."""
    try:
        from math_verify import parse, verify
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError("math-verify is not installed: pip install 'covrl[reward]'") from exc
    gt = _require_str(ground_truth, "ground_truth")
    _check_size(gt, "ground_truth")
    answer, how = extract_math_answer(completion)
    _check_size(answer, "answer")
    if how == "tail":  # the tail of "((((...1)))...)" is only closers: look at the whole text
        depth = _nesting_depth(completion)
        if depth > MAX_NESTING:
            raise InvalidAnswer(f"completion nests brackets {depth} deep; at most {MAX_NESTING} allowed")
    # Timeouts off: math-verify's own guard uses SIGALRM (main thread only, a side effect);
    # the verifier pool enforces the deadline instead.
    gold = parse(_as_latex(gt), parsing_timeout=None)
    if not gold:
        raise InvalidAnswer(f"ground_truth: math-verify could not parse {_short(gt)!r}")
    pred = parse(_as_latex(answer) if how != "tail" else answer, parsing_timeout=None)
    if not pred:
        return 0.0, f"no parsable answer ({how}: {_short(answer)!r})"
    ok = verify(gold, pred, timeout_seconds=None)
    shown = pred[-1] if isinstance(pred[-1], str) else str(pred[0])
    return (1.0 if ok else 0.0), f"{'correct' if ok else 'wrong'} ({how}: {_short(shown)!r})"


# --------------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?|-?\.\d+")


def _to_decimal(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def arithmetic_task(completion: str, ground_truth: str, metadata: dict) -> tuple[float, str]:
    """1.0 if the final number (in the last ``\\boxed{}``, else the last number in the text)
    equals the integer/decimal ``ground_truth`` exactly (``2.50`` equals ``2.5``)."""
    gt_text = _require_str(ground_truth, "ground_truth").strip()
    if len(gt_text) > 1000:
        raise InvalidAnswer("ground_truth: longer than 1000 characters")
    try:
        gt = _to_decimal(gt_text)
        if not gt.is_finite():
            raise InvalidOperation
    except InvalidOperation:
        raise InvalidAnswer(
            f"ground_truth: expected an integer or decimal, got {_short(gt_text)!r}"
        ) from None
    boxed = last_boxed(completion)
    where = "boxed" if boxed is not None else "last number"
    numbers = _NUMBER.findall(boxed if boxed is not None else completion)
    if not numbers:
        return 0.0, f"no number found ({where})"
    got = numbers[-1]
    if len(got) > 1000:
        return 0.0, f"final number has {len(got)} characters"
    ok = _to_decimal(got) == gt
    return (1.0 if ok else 0.0), f"{'correct' if ok else 'wrong'} ({where}: {got})"


# --------------------------------------------------------------------------------------------
# countdown
# --------------------------------------------------------------------------------------------

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")
MAX_EQUATION_CHARS = 1_000


class _Reject(Exception):
    """The equation breaks a countdown rule (reward 0, status ok)."""


class _Parser:
    """Recursive descent over + - * / ( ) and integer literals, evaluated with exact fractions.

    expr   := term (('+' | '-') term)*
    term   := unary (('*' | '/') unary)*
    unary  := '-' unary | atom
    atom   := INT | '(' expr ')'
    Nesting is capped by MAX_NESTING before parsing, so the recursion is bounded.
    """

    def __init__(self, tokens: list[tuple[str, str]]):
        self.tokens = tokens
        self.i = 0
        self.used: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()[1]
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()[1]
            rhs = self.unary()
            if op == "*":
                value = value * rhs
            elif rhs == 0:
                raise _Reject("division by zero")
            else:
                value = value / rhs
        return value

    def unary(self) -> Fraction:
        if self.peek() == "-":
            self.take()
            return -self.unary()
        return self.atom()

    def atom(self) -> Fraction:
        if self.peek() is None:
            raise _Reject("equation ends early")
        kind, text = self.take()
        if kind == "num":
            self.used.append(int(text))
            return Fraction(int(text))
        if text == "(":
            value = self.expr()
            if self.peek() != ")":
                raise _Reject("unbalanced parentheses")
            self.take()
            return value
        raise _Reject(f"unexpected {text!r}")


def _equation_text(completion: str) -> str:
    """The last ``<answer>..</answer>``, else the last non-empty line; with an ``=``, the side
    that holds the arithmetic (the first side that is not a bare number)."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        text = tags[-1]
    else:
        lines = [ln for ln in completion.splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    text = text.strip()
    if "=" in text:
        sides = [s.strip() for s in text.split("=") if s.strip()]
        exprs = [s for s in sides if not re.fullmatch(r"-?\d+", s)]
        text = exprs[0] if exprs else (sides[0] if sides else "")
    return text.replace("×", "*").replace("÷", "/").replace("\\times", "*").replace("\\div", "/")


def _int_field(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidAnswer(f"{field}: expected an integer, got {value!r}")
    try:
        as_int = int(value)
        if isinstance(value, float) and value != as_int:
            raise ValueError
    except (ValueError, OverflowError):
        raise InvalidAnswer(f"{field}: expected an integer, got {value!r}") from None
    return as_int


def countdown_task(completion: str, ground_truth: str, metadata: dict) -> tuple[float, str]:
    """1.0 if the equation uses the given numbers (each exactly once, TinyZero's rule; a subset
    with ``metadata["use_all"] = False``), only ``+ - * / ( )`` and evaluates to the target."""
    numbers_raw = metadata.get("numbers")
    if not isinstance(numbers_raw, (list, tuple)) or not numbers_raw or len(numbers_raw) > 64:
        raise InvalidAnswer("metadata.numbers: expected a list of 1 to 64 integers")
    numbers = [_int_field(v, "metadata.numbers[]") for v in numbers_raw]
    if "target" in metadata:
        target = _int_field(metadata["target"], "metadata.target")
    else:
        target = _int_field(_require_str(ground_truth, "ground_truth").strip(), "ground_truth")
    use_all = metadata.get("use_all", True)
    if not isinstance(use_all, bool):
        raise InvalidAnswer(f"metadata.use_all: expected a bool, got {use_all!r}")

    text = _equation_text(completion)
    if not text:
        return 0.0, "no equation found"
    if len(text) > MAX_EQUATION_CHARS:
        return 0.0, f"equation is {len(text)} characters (max {MAX_EQUATION_CHARS})"
    depth = _nesting_depth(text)
    if depth > MAX_NESTING:
        raise InvalidAnswer(f"equation nests brackets {depth} deep; at most {MAX_NESTING} allowed")
    tokens: list[tuple[str, str]] = []
    for m in _TOKEN.finditer(text):
        if m.group(1) is not None:
            tokens.append(("num", m.group(1)))
        elif m.group(2) is not None:
            if m.group(2) not in "+-*/()":
                return 0.0, f"disallowed character {m.group(2)!r} in {_short(text)!r}"
            tokens.append(("op", m.group(2)))
    parser = _Parser(tokens)
    try:
        value = parser.expr()
        if parser.i != len(tokens):
            raise _Reject(f"unexpected {tokens[parser.i][1]!r}")
    except _Reject as exc:
        return 0.0, f"{exc} in {_short(text)!r}"

    used, given = Counter(parser.used), Counter(numbers)
    if use_all and used != given:
        return 0.0, f"must use exactly {sorted(numbers)}, used {sorted(parser.used)}"
    if not use_all and used - given:
        return 0.0, f"uses numbers not available: {sorted((used - given).elements())}"
    ok = value == target
    shown = str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"
    return (1.0 if ok else 0.0), f"{_short(text)} = {shown}, target {target}"


# --------------------------------------------------------------------------------------------
# format
# --------------------------------------------------------------------------------------------

_THINK_ANSWER = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_ANSWER_ONLY = re.compile(r".*?<answer>(.*?)</answer>\s*", re.DOTALL)
FORMATS = ("think_answer", "answer", "boxed")


def format_task(completion: str, ground_truth: str, metadata: dict) -> tuple[float, str]:
    """1.0 if the completion follows ``metadata["format"]`` (default ``"think_answer"``):

    - ``think_answer``: the whole completion is ``<think>...</think><answer>...</answer>``
      (whitespace around allowed), each tag exactly once, non-empty answer.
    - ``answer``: it ends with one ``<answer>...</answer>`` holding a non-empty answer.
    - ``boxed``: it has a complete ``\\boxed{...}`` with non-empty content.
    """
    fmt = metadata.get("format", "think_answer")
    if fmt not in FORMATS:
        raise InvalidAnswer(f"metadata.format: expected one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "boxed":
        boxed = last_boxed(completion)
        ok = boxed is not None and bool(boxed.strip())
        return (1.0 if ok else 0.0), "boxed answer" if ok else "no complete \\boxed{} answer"
    tags = ("<think>", "</think>", "<answer>", "</answer>") if fmt == "think_answer" else (
        "<answer>", "</answer>")
    counts = {t: completion.count(t) for t in tags}
    if any(c != 1 for c in counts.values()):
        return 0.0, "tag counts " + ", ".join(f"{t}x{c}" for t, c in counts.items())
    m = (_THINK_ANSWER if fmt == "think_answer" else _ANSWER_ONLY).fullmatch(completion)
    if m is None:
        return 0.0, f"does not match the {fmt} layout"
    if not m.groups()[-1].strip():
        return 0.0, "empty <answer>"
    return 1.0, f"{fmt} format"


TASKS: dict[str, Callable[[str, str, dict], tuple[float, str]]] = {
    "math": math_task,
    "arithmetic": arithmetic_task,
    "countdown": countdown_task,
    "format": format_task,
}

def score_one(task: str, completion: str, ground_truth: str, metadata: dict) -> tuple[str, float, str]:
    """Run one task with the ``format_weight`` composition; never raises.

    Returns ``(status, reward, detail)`` with status ``"ok"``, ``"invalid"``, ``"error"`` or
    ``"unknown_task"``.
    """
    fn = TASKS.get(task)
    if fn is None:
        return "unknown_task", 0.0, f"task: unknown {task!r}; known: {sorted(TASKS)}"
    try:
        if not isinstance(metadata, dict):
            raise InvalidAnswer(f"metadata: expected a dict, got {type(metadata).__name__}")
        _require_str(completion, "completion")
        weight = metadata.get("format_weight", 0.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise InvalidAnswer(f"metadata.format_weight: expected a finite number, got {weight!r}")
        reward, detail = fn(completion, ground_truth, metadata)
        if weight and task != "format":
            fmt_reward, fmt_detail = format_task(completion, ground_truth, metadata)
            reward += weight * fmt_reward
            detail = f"{detail}; format {fmt_reward:g} x {weight:g} ({fmt_detail})"
        reward = float(reward)
        if not math.isfinite(reward):
            return "error", 0.0, f"task {task!r} produced a non-finite reward {reward!r}"
        return "ok", reward, detail
    except InvalidAnswer as exc:
        return "invalid", 0.0, str(exc)
    except RecursionError:
        return "invalid", 0.0, "answer too deeply nested (recursion limit)"
    except MemoryError:
        return "invalid", 0.0, "answer needs too much memory to check"
    except Exception as exc:  # a checker bug or a library failure: report, don't raise
        return "error", 0.0, f"{type(exc).__name__}: {_short(str(exc), 200)}"
