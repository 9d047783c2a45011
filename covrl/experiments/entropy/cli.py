"""The entropy-mechanism study: ``covrl experiment entropy [--steps N --seed S --out DIR]``.

:func:`build_parser` (one flag per :class:`Config` field) and :func:`main`: run, analyse, write
figures, ``report.md`` and ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from covrl.experiments.entropy.analysis import analyse
from covrl.experiments.entropy.config import Config
from covrl.experiments.entropy.report import write_figures, write_report
from covrl.experiments.entropy.run import run_all


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covrl experiment entropy", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, default=f.default, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, help=f.metadata["help"])
    p.add_argument("--reanalyse", action="store_true",
                   help="re-analyse OUT/results.json and rewrite the report and figures (no training)")
    return p


def _reported_command(path: str) -> str:
    """The ``Command:`` line of an earlier report (runs stored before the command was)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("Command: `"):
                    return line[len("Command: `"):].split("`")[0]
    except OSError:
        pass
    return "(not recorded)"


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    args = build_parser().parse_args(argv)
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    try:
        cfg.validate()
    except ValueError as exc:
        print(f"covrl experiment entropy: {exc}", file=sys.stderr)
        return 2
    os.makedirs(cfg.out, exist_ok=True)
    command = "covrl experiment entropy " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.reanalyse:  # the stored run, analysed and reported by this code (no training)
        with open(os.path.join(cfg.out, "results.json")) as fh:
            result = json.load(fh)["result"]
        ran = result.get("command") or _reported_command(os.path.join(cfg.out, "report.md"))
        command = f"{ran}` (analysis and report re-run by `{command}`)"
    else:
        result = run_all(cfg)
        result["command"] = command
    analysis = analyse(result)
    figures = write_figures(result, analysis, cfg.out)
    write_report(result, analysis, cfg.out, command, figures)
    with open(os.path.join(cfg.out, "results.json"), "w") as fh:
        json.dump({"result": result, "analysis": analysis}, fh, default=float)
    # the per-state probe arrays are for the figure only

    for c in analysis["claims"]:
        tag = "----" if c["pass"] is None else ("PASS" if c["pass"] else "MISS")
        print(f"[{tag}] {c['claim']}: {c['achieved']}")
    print(f"report: {os.path.join(cfg.out, 'report.md')} ({result['wall_s']:.0f} s)")
    return 0
