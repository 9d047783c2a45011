"""The pure task functions, called in-process (no pool, no deadline)."""

import pytest

from covrl.rewards import TASKS, InvalidAnswer, score_one
from covrl.rewards.tasks import extract_math_answer, last_boxed


def reward(task, completion, ground_truth="", **metadata):
    return TASKS[task](completion, ground_truth, metadata)[0]


# ------------------------------------------------------------------ extraction


def test_last_boxed_takes_the_last_balanced_group():
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b}}") == r"\frac{a}{b}"
    assert last_boxed(r"\boxed{\{1,2\}}") == r"\{1,2\}"
    assert last_boxed(r"\boxed 7 done") == "7"
    assert last_boxed(r"\boxed{unclosed") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize("text, answer, how", [
    (r"so \boxed{3} and finally \boxed{4}", "4", "boxed"),
    ("work\n#### 72\n", "72", "####"),
    ("The answer is $\\frac{1}{2}$.", r"\frac{1}{2}", "answer is"),
    ("just 5", "just 5", "tail"),
])
def test_extract_math_answer(text, answer, how):
    assert extract_math_answer(text) == (answer, how)


# ------------------------------------------------------------------ math


@pytest.mark.parametrize("completion, gt", [
    (r"\boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2x+1}", "1+2x"),
    (r"Thus \boxed{x^2+2x+1}.", "(x+1)^2"),
    (r"\boxed{3}", r"\frac{6}{2}"),
    ("The answer is 72.", "72"),
    ("#### 1,000", "1000"),
    (r"\boxed{\sqrt{2}/2}", r"\frac{\sqrt{2}}{2}"),
])
def test_math_correct(completion, gt):
    assert reward("math", completion, gt) == 1.0


@pytest.mark.parametrize("completion, gt", [
    (r"\boxed{\frac{1}{3}}", "0.5"),
    (r"\boxed{2x-1}", "1+2x"),
    (r"\boxed{4} though I first thought \boxed{3}", "4"),  # the LAST box counts
    (r"\boxed{}", "1"),
    ("no answer at all", "17"),
    (r"\boxed{9**9**9**9}", "1"),
])
def test_math_wrong(completion, gt):
    assert reward("math", completion, gt) == 0.0


def test_math_refuses_deep_nesting_and_long_answers():
    deep = "\\boxed{" + "(" * 10_000 + "1" + ")" * 10_000 + "}"
    with pytest.raises(InvalidAnswer, match="characters"):
        TASKS["math"](deep, "1", {})
    with pytest.raises(InvalidAnswer, match="nests brackets"):
        TASKS["math"]("\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}", "1", {})
    with pytest.raises(InvalidAnswer, match="nests brackets"):  # unboxed: the tail is checked
        TASKS["math"]("(" * 5000 + "1", "1", {})


# ------------------------------------------------------------------ arithmetic


def test_arithmetic():
    assert reward("arithmetic", "so it is 1,234.50", "1234.5") == 1.0
    assert reward("arithmetic", r"\boxed{-7} then 8 steps", "-7") == 1.0  # boxed beats last number
    assert reward("arithmetic", "3 apples and 12 pears: 15", "15") == 1.0
    assert reward("arithmetic", "15.01", "15") == 0.0
    assert reward("arithmetic", "3 + 4 = 7, so 8", "7") == 0.0  # the final number counts
    assert reward("arithmetic", "no digits", "7") == 0.0
    with pytest.raises(InvalidAnswer, match="ground_truth"):
        TASKS["arithmetic"]("7", "seven", {})


# ------------------------------------------------------------------ countdown

NUMS = {"numbers": [25, 3, 4], "target": 37}


@pytest.mark.parametrize("completion", [
    "<think>try</think><answer>25 + 3 * 4</answer>",
    "<answer>(4 * 3) + 25</answer>",
    "blah\n25 + 3 * 4 = 37",
    "37 = 25 + 4 * 3",
    "<answer>25 + 3 × 4</answer>",
])
def test_countdown_correct(completion):
    assert reward("countdown", completion, "", **NUMS) == 1.0


@pytest.mark.parametrize("completion, why", [
    ("<answer>25 + 25 - 13</answer>", "must use exactly"),       # reuses 25, uses 13
    ("<answer>25 + 12</answer>", "must use exactly"),           # a number not given
    ("<answer>25 + 3 + 4</answer>", "target 37"),               # wrong value
    ("<answer>25 + 3 ** 4</answer>", "unexpected"),             # no power operator
    ("<answer>__import__('os')</answer>", "disallowed character"),
    ("<answer>25 + 3 * 4.0</answer>", "disallowed character"),  # integers only
    ("<answer>(25 + 3 * 4</answer>", "unbalanced"),
    ("<answer></answer>", "no equation"),
])
def test_countdown_violations(completion, why):
    r, detail = TASKS["countdown"](completion, "", NUMS)
    assert r == 0.0 and why in detail, detail


def test_countdown_division_by_zero_and_fractions():
    r, detail = TASKS["countdown"]("<answer>7 / (3 - 3)</answer>", "", {"numbers": [7, 3, 3], "target": 1})
    assert r == 0.0 and "division by zero" in detail
    # exact fractions: a non-integer value never equals the integer target ...
    r, detail = TASKS["countdown"]("<answer>7 / 2</answer>", "", {"numbers": [7, 2], "target": 3})
    assert r == 0.0 and "7/2" in detail
    # ... but intermediate fractions are allowed (as in TinyZero's eval): (7/2)*2 = 7
    assert reward("countdown", "<answer>7 / 2 * 2</answer>", "", numbers=[7, 2, 2], target=7) == 1.0


def test_countdown_target_from_ground_truth_and_subset_rule():
    assert reward("countdown", "<answer>25 + 3 * 4</answer>", "37", numbers=[25, 3, 4]) == 1.0
    assert reward("countdown", "<answer>25 + 12</answer>", "37", numbers=[25, 12, 9]) == 0.0
    assert reward("countdown", "<answer>25 + 12</answer>", "37", numbers=[25, 12, 9], use_all=False) == 1.0
    assert reward("countdown", "<answer>25 + 25 + 12</answer>", "62", numbers=[25, 12], use_all=False) == 0.0


@pytest.mark.parametrize("metadata, field", [
    ({}, "metadata.numbers"),
    ({"numbers": "1,2"}, "metadata.numbers"),
    ({"numbers": [1, "x"]}, "metadata.numbers"),
    ({"numbers": [1, 2], "target": 1.5}, "metadata.target"),
    ({"numbers": [1, 2], "target": 3, "use_all": "yes"}, "metadata.use_all"),
])
def test_countdown_bad_metadata_names_the_field(metadata, field):
    with pytest.raises(InvalidAnswer, match=field.replace(".", r"\.")):
        TASKS["countdown"]("<answer>1 + 2</answer>", "", metadata)


def test_countdown_deep_nesting_is_invalid():
    eq = "<answer>" + "(" * 10_000 + "25 + 3 * 4" + ")" * 10_000 + "</answer>"
    assert score_one("countdown", eq, "37", NUMS)[0] == "ok"  # over MAX_EQUATION_CHARS: plain 0
    eq = "<answer>" + "(" * 300 + "25 + 3 * 4" + ")" * 300 + "</answer>"
    status, r, detail = score_one("countdown", eq, "37", NUMS)
    assert (status, r) == ("invalid", 0.0) and "nests" in detail


# ------------------------------------------------------------------ format and composition


@pytest.mark.parametrize("completion, fmt, expected", [
    ("<think>plan</think>\n<answer>5</answer>", "think_answer", 1.0),
    ("  <think>a</think><answer>5</answer>\n", "think_answer", 1.0),
    ("<think>a</think><answer> </answer>", "think_answer", 0.0),
    ("<answer>5</answer>", "think_answer", 0.0),
    ("<think>a</think><answer>5</answer> trailing", "think_answer", 0.0),
    ("<think>a</think><think>b</think><answer>5</answer>", "think_answer", 0.0),
    ("reasoning <answer>5</answer>", "answer", 1.0),
    ("<answer>5</answer> more", "answer", 0.0),
    (r"so \boxed{5}", "boxed", 1.0),
    (r"so \boxed{5", "boxed", 0.0),
])
def test_format(completion, fmt, expected):
    assert reward("format", completion, "", format=fmt) == expected


def test_format_weight_composition():
    good = r"<think>x</think><answer>\boxed{2}</answer>"
    assert score_one("math", good, "2", {"format_weight": 0.5})[:2] == ("ok", 1.5)
    assert score_one("math", r"\boxed{2}", "2", {"format_weight": 0.5})[:2] == ("ok", 1.0)
    assert score_one("math", good, "3", {"format_weight": 0.5})[:2] == ("ok", 0.5)
    assert score_one("math", good, "2", {"format_weight": float("nan")})[0] == "invalid"
    assert score_one("format", "<answer>1</answer>", "", {"format": "nope"})[0] == "invalid"


def test_score_one_never_raises():
    assert score_one("nope", "x", "1", {})[0] == "unknown_task"
    assert score_one("math", "x", "1", "not a dict")[0] == "invalid"
    assert score_one("math", None, "1", {})[0] == "invalid"
    assert score_one("math", r"\boxed{1}", None, {})[0] == "invalid"
