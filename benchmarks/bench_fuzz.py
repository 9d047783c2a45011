"""Fuzz every RPC of the rollout, reward and learner servers through reflection (issue 13).

Starts the three servers with tiny models on 127.0.0.1:0 (``covrl.services.fuzz_targets``),
sends ``--requests`` random, mutated and garbled requests spread evenly over every method
they list (``covrl.services.fuzz``) from a working directory that must stay empty, and
writes the counts per status code per RPC. Goals: 0 UNKNOWN / INTERNAL, 0 crashes, every
INVALID_ARGUMENT names its field, 0 writes outside the learner's checkpoint_dir.

    python benchmarks/bench_fuzz.py [--requests 10000] [--seed 0] [--out benchmarks/results/fuzz.md]

Exit status 1 when a goal is missed (the report says which requests).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from machine_info import cpu  # noqa: E402

from covrl.services.fuzz_targets import fuzz_session  # noqa: E402

CODES = ["OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "PERMISSION_DENIED", "NOT_FOUND",
         "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNAUTHENTICATED", "UNKNOWN", "INTERNAL"]


def render(res, args) -> str:
    rep = res.report
    codes = [c for c in CODES if any(rep.counts[p][c] for p in rep.counts)]
    codes += sorted({c for p in rep.counts for c in rep.counts[p]} - set(codes))
    total = rep.codes()
    lines = [
        "# Fuzz: every RPC of the three servers through reflection",
        "",
        f"Machine: {cpu()}, torch {torch.__version__}; {datetime.date.today().isoformat()}; "
        f"`python benchmarks/bench_fuzz.py --requests {args.requests} --seed {args.seed}`",
        "",
        f"{rep.requests} requests in {res.seconds:.0f} s ({', '.join(f'{k} {v}' for k, v in sorted(rep.kinds.items()))}); "
        "servers: rollout, reward (real verifier, 1 worker), learner, all with tiny models on 127.0.0.1:0.",
        "",
        "| RPC | " + " | ".join(codes) + " | s |",
        "|---|" + "---:|" * (len(codes) + 1),
    ]
    for path in sorted(rep.counts):
        c = rep.counts[path]
        lines.append(f"| `{path.lstrip('/')}` | " + " | ".join(str(c[k]) for k in codes) + f" | {rep.seconds[path]:.1f} |")
    lines.append("| **all** | " + " | ".join(f"**{total[k]}**" for k in codes) + f" | {res.seconds:.0f} |")
    ok = not rep.violations and not res.fs_changes and not res.bad_checkpoints and \
        set(res.health.values()) == {"SERVING"}
    lines += [
        "",
        f"- UNKNOWN / INTERNAL answers: {total['UNKNOWN'] + total['INTERNAL']}",
        f"- INVALID_ARGUMENT not naming a request field: "
        f"{sum(1 for v in rep.violations if v[2].startswith('INVALID_ARGUMENT'))}",
        f"- servers answering health after the run: {res.health}",
        f"- files created / changed outside the learner's checkpoint_dir: {len(res.fs_changes)}"
        + (f" ({res.fs_changes[:10]})" if res.fs_changes else ""),
        f"- checkpoint_dir entries that are not checkpoint names: {len(res.bad_checkpoints)}",
        f"- **goals {'met' if ok else 'MISSED'}**",
    ]
    if rep.violations:
        lines += ["", "Violations (first 20):", ""]
        lines += [f"- `{p}` ({kind}): {why}" for p, kind, why in rep.violations[:20]]
    lines += ["", "`s`: seconds spent in that RPC's calls. DEADLINE_EXCEEDED on GetMetrics is its normal end: the "
              "stream waits for new steps and the fuzzer gives it 0.2 s. NOT_FOUND is the health service's answer "
              "for an unknown service name. Kinds: random (fields of every type at random), mutated (1-3 fields "
              "of a valid request changed; streams with a chunk changed, dropped, repeated or reordered), garbled "
              "(serialized bytes truncated, flipped or spliced), empty, valid (a seed as is, so state moves on).", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "fuzz.md"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="covrl-fuzz-") as root:
        res = fuzz_session(root, args.requests, seed=args.seed)
    text = render(res, args)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0 if "goals met" in text else 1


if __name__ == "__main__":
    sys.exit(main())
