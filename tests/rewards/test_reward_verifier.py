"""The Verifier: worker pool, deadlines, bombs, cache, crash recovery, input validation."""

import os
import signal
import threading

import pytest

from covrl.rewards import STATUSES, VERIFIER_VERSION, RewardItem, RewardResult, Verifier, score_one

BOMB_DEADLINE_S = 1.5


@pytest.fixture(scope="module")
def verifier():
    with Verifier(workers=2, default_deadline_s=30.0) as v:
        yield v


def item(task, completion, gt="", deadline_s=None, **metadata):
    return RewardItem(task=task, prompt="p", completion=completion, ground_truth=gt,
                      metadata=metadata, deadline_s=deadline_s)


GOOD = [
    item("math", r"\boxed{\frac{1}{2}}", "0.5"),
    item("math", r"\boxed{2x+1}", "1+2x"),
    item("math", r"\boxed{3}", "4"),
    item("arithmetic", "it is 42", "42"),
    item("countdown", "<answer>25 + 3 * 4</answer>", "", numbers=[25, 3, 4], target=37),
    item("countdown", "<answer>25 + 25 - 13</answer>", "", numbers=[25, 3, 4], target=37),
    item("format", "<think>a</think><answer>1</answer>"),
]
GOOD_REWARDS = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]


def test_scores_in_order_and_match_in_process(verifier):
    verifier.cache_clear()
    items = GOOD + GOOD[::-1]
    results = verifier.score(items)
    assert [r.reward for r in results] == GOOD_REWARDS + GOOD_REWARDS[::-1]
    assert all(r.status == "ok" for r in results)
    for it, r in zip(items, results, strict=True):
        assert (r.status, r.reward, r.detail) == score_one(it.task, it.completion, it.ground_truth, it.metadata)
    # the second half repeats the first: scored once, reported as cached
    assert [r.cached for r in results] == [False] * len(GOOD) + [True] * len(GOOD)


def test_bombs_are_cut_while_the_rest_of_the_batch_scores(verifier):
    bombs = [
        item("math", "so the value is 9**9**9**9", "1", deadline_s=BOMB_DEADLINE_S),  # Python power tower
        item("math", r"$10^{10^{10^{10}}}$", "1", deadline_s=BOMB_DEADLINE_S),  # LaTeX power tower
        item("math", "(" * 10_000 + "1" + ")" * 10_000, "1", deadline_s=BOMB_DEADLINE_S),
        item("math", "\\boxed{" + "[" * 10_000 + "}", "1", deadline_s=BOMB_DEADLINE_S),
        item("math", "1" * 1_000_001, "1"),  # over max_completion_bytes
    ]
    items = [GOOD[0], bombs[0], GOOD[3], bombs[1], GOOD[4], bombs[2], bombs[3], bombs[4], GOOD[6]]
    verifier.cache_clear()
    restarts = verifier.stats["worker_restarts"]
    results = verifier.score(items)
    by_pos = dict(enumerate(results))
    for pos, want in ((0, 1.0), (2, 1.0), (4, 1.0), (8, 1.0)):
        assert (by_pos[pos].status, by_pos[pos].reward) == ("ok", want), by_pos[pos]
    for pos in (1, 3):
        assert by_pos[pos].status == "timeout", by_pos[pos]
        assert by_pos[pos].reward == 0.0 and "deadline_s=1.5" in by_pos[pos].detail
    for pos in (5, 6, 7):
        assert by_pos[pos].status == "invalid" and by_pos[pos].reward == 0.0, by_pos[pos]
    assert "max_completion_bytes" in by_pos[7].detail
    assert verifier.stats["worker_restarts"] >= restarts + 2
    # timeouts are not cached: the next call runs the bomb again (and times out again)
    again = verifier.score([bombs[1], GOOD[0]])
    assert (again[0].status, again[0].cached) == ("timeout", False)
    assert (again[1].status, again[1].cached) == ("ok", True)


def test_pool_survives_a_worker_killed_while_idle(verifier):
    for pid in verifier.worker_pids():
        os.kill(pid, signal.SIGKILL)
    verifier.cache_clear()
    results = verifier.score(GOOD)
    assert [r.reward for r in results] == GOOD_REWARDS
    assert all(r.status == "ok" for r in results)


def test_worker_dying_mid_item_is_an_error_for_that_item_only(verifier):
    verifier.cache_clear()
    slow = item("math", r"$10^{10^{10^{10}}}$", "1", deadline_s=60.0)
    killed = []

    def kill_the_busy_worker():
        for w in list(verifier._pool):
            if w.job is not None and w.ready:
                killed.append(w.proc.pid)
                os.kill(w.proc.pid, signal.SIGKILL)

    # by then the quick items are long done and only the slow one occupies a worker
    timer = threading.Timer(2.0, kill_the_busy_worker)
    timer.start()
    try:
        results = verifier.score([GOOD[0], slow, GOOD[3]])
    finally:
        timer.cancel()
    assert killed, "no busy worker found to kill"
    assert results[1].status == "error" and "died" in results[1].detail
    assert [(r.status, r.reward) for r in (results[0], results[2])] == [("ok", 1.0), ("ok", 1.0)]
    assert verifier.score([GOOD[1]])[0].reward == 1.0  # and the pool keeps working


def test_cache_hits_version_and_lru():
    with Verifier(workers=1, cache_size=2) as v:
        assert v.version == VERIFIER_VERSION and v.version.startswith("covrl-verifier/1 math-verify/")
        first = v.score([GOOD[0]])[0]
        second = v.score([GOOD[0]])[0]
        assert (first.cached, second.cached) == (False, True)
        assert (first.reward, first.status, first.detail) == (second.reward, second.status, second.detail)
        # a different metadata (even key order aside) is a different entry; key order is canonical
        a = item("countdown", "<answer>25 + 3 * 4</answer>", "", numbers=[25, 3, 4], target=37)
        b = RewardItem("countdown", "other prompt", a.completion, "", {"target": 37, "numbers": [25, 3, 4]})
        assert v.score([a])[0].cached is False
        assert v.score([b])[0].cached is True  # prompt is not part of the key
        # LRU of size 2: GOOD[0], a are in; adding GOOD[3] evicts GOOD[0]
        v.score([GOOD[3]])
        assert v.score([GOOD[0]])[0].cached is False
        # the version is part of the key
        v.version = "covrl-verifier/test"
        assert v.score([GOOD[0]])[0].cached is False
        assert v.stats["cache_hits"] >= 1


def test_bad_items_never_raise(verifier):
    bad = [
        item("nope", "x"),
        item("math", "x", deadline_s=0),
        item("math", "x", deadline_s=float("nan")),
        RewardItem("math", "p", b"bytes", "1"),
        RewardItem("math", "p", "x", "1", metadata={"f": float("inf")}),
        RewardItem("math", "p", "x", "1", metadata={"obj": object()}),
        RewardItem("math", "p", "x", "1", metadata=[1]),
        {"task": "math"},
        item("countdown", "<answer>1+2</answer>", "", numbers="12"),
        item("arithmetic", "7", "seven"),
    ]
    results = verifier.score(bad + [GOOD[0]])
    statuses = [r.status for r in results]
    assert statuses == ["unknown_task"] + ["invalid"] * (len(bad) - 1) + ["ok"]
    assert all(isinstance(r, RewardResult) and r.status in STATUSES and r.detail for r in results)
    assert "deadline_s" in results[1].detail and "completion" in results[3].detail
    assert "metadata" in results[4].detail and "metadata.numbers" in results[8].detail
    assert verifier.score([]) == []


def test_constructor_and_call_validation():
    with pytest.raises(ValueError, match="workers"):
        Verifier(workers=0)
    with pytest.raises(ValueError, match="default_deadline_s"):
        Verifier(default_deadline_s=-1)
    with pytest.raises(ValueError, match="max_completion_bytes"):
        Verifier(max_completion_bytes=0)
    v = Verifier(workers=1, max_completion_bytes=10)
    try:
        with pytest.raises(TypeError, match="items"):
            v.score(GOOD[0])
        r = v.score([item("arithmetic", "the answer is 42", "42")])[0]
        assert r.status == "invalid" and "max_completion_bytes=10" in r.detail
    finally:
        v.close()
    v.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        v.score([GOOD[0]])


def test_concurrent_score_calls_from_threads(verifier):
    """A gRPC servicer calls score() from several threads; each caller gets its own results."""
    verifier.cache_clear()
    batches = [[item("arithmetic", f"so {k * 10 + j}", str(k * 10 + j if j % 2 else -1)) for j in range(6)]
               for k in range(4)]
    out = {}

    def run(k):
        out[k] = [r.reward for r in verifier.score(batches[k])]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert out == {k: [0.0, 1.0] * 3 for k in range(4)}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="the memory cap reads /proc (Linux)")
def test_worker_memory_cap_turns_a_huge_allocation_into_memoryerror():
    import subprocess
    import sys

    code = (
        "from covrl.rewards._worker import _limit_memory\n"
        "_limit_memory(64)\n"
        "try:\n"
        "    bytearray(1 << 30)\n"
        "    print('allocated')\n"
        "except MemoryError:\n"
        "    print('MemoryError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "MemoryError", out.stderr[-2000:]
