"""Scoring throughput of the reward verifier on math answers.

Baseline: ``TASKS["math"]`` called serially in this process (no pool, no deadline, no cache).
Measured in the same run: ``Verifier`` with 1 and 2 workers (cache off, so every item is
verified), and the cached path (a second pass over the same items with the cache on).

    .venv/bin/python benchmarks/bench_reward.py [--n 400] [--out benchmarks/results/reward_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from importlib import metadata

from machine_info import cpu

from covrl.rewards import TASKS, RewardItem, Verifier


def math_items(n: int, seed: int = 0) -> list[RewardItem]:
    """A mix of correct and wrong answers in LaTeX, numeric and symbolic form, all distinct."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(1, 99), rng.randint(2, 99)
        wrong = i % 3 == 2
        kind = i % 4
        if kind == 0:  # fraction vs decimal
            gt = f"{a / b:.6f}".rstrip("0")
            shown = f"\\frac{{{a}}}{{{b + wrong}}}"
            completion = f"We divide {a} by {b}, so the result is $\\boxed{{{shown}}}$."
        elif kind == 1:  # plain number after "The answer is"
            gt = str(a * b)
            completion = f"Multiplying gives {a} times {b}.\nThe answer is {a * b + wrong}."
        elif kind == 2:  # symbolic, reordered
            gt = f"{b} + {a}x"
            completion = f"Collecting terms: \\boxed{{{a}x + {b + wrong}}}"
        else:  # sqrt / nested LaTeX
            gt = f"\\frac{{\\sqrt{{{a}}}}}{{{b}}}"
            completion = f"Rationalising, #### \\sqrt{{{a + wrong}}}/{b}"
        items.append(RewardItem(task="math", prompt=f"q{i}", completion=completion, ground_truth=gt))
    return items


def serial_baseline(items: list[RewardItem]) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    rewards = [TASKS["math"](it.completion, it.ground_truth, it.metadata)[0] for it in items]
    return time.perf_counter() - t0, rewards


def timed_score(v: Verifier, items: list[RewardItem], batch: int) -> tuple[float, list]:
    t0 = time.perf_counter()
    results = []
    for k in range(0, len(items), batch):
        results += v.score(items[k : k + batch])
    return time.perf_counter() - t0, results


def machine() -> str:
    return (f"{cpu()}, no GPU; "
            f"Python {platform.python_version()}, math-verify {metadata.version('math-verify')}")


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="items per measurement")
    ap.add_argument("--batch", type=int, default=64, help="items per Verifier.score call")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()

    items = math_items(args.n)
    trivial = [RewardItem("arithmetic", "", f"so {i}", str(i)) for i in range(args.n)]
    load_start = load_average()
    # warm the in-process parser (sympy / LaTeX grammar load lazily), then measure
    serial_baseline(items[:8])
    startup = {}
    pools = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        pools[workers] = Verifier(workers=workers, cache_size=0)
        pools[workers].score(items[:workers])  # waits for the workers to be ready
        startup[workers] = time.perf_counter() - t0
    cached = Verifier(workers=2)
    timed_score(cached, items, args.batch)  # fill the cache

    names = ["serial in-process `TASKS['math']` (baseline)", "`Verifier(workers=1)`, cache off",
             "`Verifier(workers=2)`, cache off", "`Verifier(workers=2)`, all cache hits",
             "`Verifier(workers=1)`, trivial arithmetic items (pool overhead)"]
    times: dict[str, list[float]] = {name: [] for name in names}
    expected = [0.0 if i % 3 == 2 else 1.0 for i in range(len(items))]
    try:
        # rounds interleave the paths, so a change in the host's load hits all of them alike
        for _ in range(args.rounds):
            t, rewards = serial_baseline(items)
            assert rewards == expected, "item design drifted"
            times[names[0]].append(t)
            for name, v in ((names[1], pools[1]), (names[2], pools[2])):
                t, results = timed_score(v, items, args.batch)
                bad = [r for r in results if r.status != "ok"]
                assert not bad and [r.reward for r in results] == expected, f"pool disagrees: {bad[:3]}"
                times[name].append(t)
            t, results = timed_score(cached, items, args.batch)
            assert all(r.cached for r in results) and [r.reward for r in results] == expected
            times[names[3]].append(t)
            t, results = timed_score(pools[1], trivial, args.batch)
            assert all(r.reward == 1.0 for r in results)
            times[names[4]].append(t)
    finally:
        for v in (*pools.values(), cached):
            v.close()
    rows = [(name, statistics.median(ts)) for name, ts in times.items()]
    t_serial = rows[0][1]

    n = len(items)
    lines = [
        "# Reward verifier throughput (math answers)",
        "",
        f"Machine: {machine()}. The host is shared with other jobs: 1-minute load average "
        f"{load_start:.1f} at the start, {load_average():.1f} at the end (on an idle host, 2 workers "
        "should approach 2x the 1-worker rate; under this load they cannot).",
        "",
        f"{n} distinct math items (fraction vs decimal, plain numbers, symbolic, sqrt; 1/3 wrong), "
        f"`score()` called in batches of {args.batch}; median of {args.rounds} interleaved rounds. "
        "Same run, same items; every path's rewards are checked equal to the baseline's. The last "
        "row scores trivial arithmetic items, so its time is the pool's own per-item cost "
        f"({1e3 * rows[4][1] / n:.2f} ms/item). Worker start-up (excluded below): "
        + ", ".join(f"{w} worker(s) {s:.2f} s" for w, s in startup.items()) + ".",
        "",
        "| path | seconds | items/s | vs serial baseline |",
        "|---|---:|---:|---:|",
    ]
    for name, t in rows:
        ratio = "n/a (other items)" if name == names[4] else f"{t_serial / t:.2f}x"
        lines.append(f"| {name} | {t:.3f} | {n / t:,.0f} | {ratio} |")
    lines += [
        "",
        "Reproduce: `.venv/bin/python benchmarks/bench_reward.py --out benchmarks/results/reward_cpu.md`.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
