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
import time
from importlib import metadata

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
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu}), no GPU; "
            f"Python {platform.python_version()}, math-verify {metadata.version('math-verify')}; "
            f"1-min load average at start {load:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="items per measurement")
    ap.add_argument("--batch", type=int, default=64, help="items per Verifier.score call")
    ap.add_argument("--out", default=None, help="write a markdown table here")
    args = ap.parse_args()

    items = math_items(args.n)
    # warm the in-process parser (sympy / LaTeX grammar load lazily), then measure
    serial_baseline(items[:8])
    t_serial, expected = serial_baseline(items)
    assert expected == [0.0 if i % 3 == 2 else 1.0 for i in range(len(items))], "item design drifted"
    rows = [("serial in-process `TASKS['math']` (baseline)", t_serial)]
    startup = {}
    for workers in (1, 2):
        t0 = time.perf_counter()
        with Verifier(workers=workers, cache_size=0) as v:
            v.score(items[:workers])  # waits for the workers to be ready
            startup[workers] = time.perf_counter() - t0
            t, results = timed_score(v, items, args.batch)
        got = [r.reward for r in results]
        bad = [r for r in results if r.status != "ok"]
        assert not bad and got == expected, f"pool disagrees with the baseline: {bad[:3]}"
        rows.append((f"`Verifier(workers={workers})`, cache off", t))
    with Verifier(workers=2) as v:
        timed_score(v, items, args.batch)  # fill the cache
        t, results = timed_score(v, items, args.batch)
        assert all(r.cached for r in results) and [r.reward for r in results] == expected
        rows.append(("`Verifier(workers=2)`, all cache hits", t))

    n = len(items)
    lines = [
        "# Reward verifier throughput (math answers)",
        "",
        f"Machine: {machine()}.",
        "",
        f"{n} distinct math items (fraction vs decimal, plain numbers, symbolic, sqrt; 1/3 wrong), "
        f"`score()` called in batches of {args.batch}. Same run, same items; every path's rewards "
        "are checked equal to the baseline's. Worker start-up (excluded below): "
        + ", ".join(f"{w} worker(s) {s:.2f} s" for w, s in startup.items()) + ".",
        "",
        "| path | seconds | items/s | vs serial baseline |",
        "|---|---:|---:|---:|",
    ]
    for name, t in rows:
        lines.append(f"| {name} | {t:.3f} | {n / t:,.0f} | {t_serial / t:.2f}x |")
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
