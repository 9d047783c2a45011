"""The ``covrl`` command.

    covrl train --config CFG.yaml [key=value ...] [--resume RUN_DIR]
    covrl serve rollout|reward|learner --host H --port P --config CFG.yaml
    covrl plot RUN_DIR
    covrl eval --checkpoint DIR [--config CFG.yaml] [key=value ...]
    covrl experiment entropy [...]
    covrl demo-model [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _train(args) -> int:
    from covrl.config import ConfigError, describe, load_config
    from covrl.trainer import format_summary, train

    if args.help_config:
        print(describe())
        return 0
    config = args.config
    if not config and not args.resume:
        print("covrl train: no --config given: training with the built-in defaults (see --help-config; "
              "e.g. 20 steps of the arithmetic task into runs/default unless overridden). For the demo: "
              "covrl train --config configs/demo.yaml", file=sys.stderr, flush=True)
    if args.resume and not config:
        config = os.path.join(args.resume, "config.yaml")
        if not os.path.exists(config):
            print(f"covrl train: --resume {args.resume}: no config.yaml there; pass --config", file=sys.stderr)
            return 2
    try:
        cfg = load_config(config, args.overrides)
    except ConfigError as e:
        print(f"covrl train: config error: {e}", file=sys.stderr)
        return 2
    from covrl.data import DataError

    try:
        summary = train(cfg, resume_dir=args.resume)
    except (ConfigError, DataError) as e:  # found once the run starts (model directory, data files)
        print(f"covrl train: {'config' if isinstance(e, ConfigError) else 'data'} error: {e}", file=sys.stderr)
        return 2
    plots: list[str] = []
    try:
        from covrl.plot import plot_run

        plots = plot_run(summary["run_dir"])
    except Exception as e:  # noqa: BLE001 - plots are a convenience, the run is done
        print(f"covrl train: plotting failed: {e}", file=sys.stderr)
    summary["plots"] = plots
    print(format_summary(summary))
    return 0


def _serve(args) -> int:
    try:
        from covrl.services.__main__ import main as serve_main
    except ImportError as e:
        print(f"covrl serve: the service launcher is not available ({e})", file=sys.stderr)
        return 2
    argv = [args.service, "--host", args.host, "--port", str(args.port)]
    if args.config:
        argv += ["--config", args.config]
    if args.token_env:
        argv += ["--token-env", args.token_env]
    if args.insecure:
        argv.append("--insecure")
    return serve_main(argv) or 0


def _plot(args) -> int:
    from covrl.plot import plot_run

    try:
        paths = plot_run(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"covrl plot: {e}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def _eval(args) -> int:
    from covrl.config import ConfigError, load_config
    from covrl.data import DataError
    from covrl.trainer import evaluate_checkpoint

    try:
        cfg = load_config(args.config, args.overrides)
        result = evaluate_checkpoint(cfg, args.checkpoint, compare_untrained=args.compare_untrained)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"covrl eval: {e}", file=sys.stderr)
        return 2
    if args.compare_untrained:
        print(format_comparison(result, args.checkpoint))
    else:
        print(json.dumps(result, indent=2))
    return 0


def format_comparison(result: dict, checkpoint: str) -> str:
    """The untrained model beside the trained checkpoint, then where the run's outputs are."""
    before = result.get("untrained", {})
    keys = [k for k in result if k.startswith("pass@")]
    lines = [f"held-out eval ({result.get('n_prompts', '?')} prompts, same prompts and seeds)",
             f"{'':<10}{'untrained':>12}{'trained':>12}"]
    lines += [f"{k:<10}{before.get(k, float('nan')):>12.3f}{result[k]:>12.3f}" for k in keys]
    run = os.path.abspath(checkpoint)
    if os.path.isdir(os.path.join(run, "plots")):
        lines.append(f"plots:      {os.path.join(run, 'plots')}")
    lines.append(f"checkpoint: {result.get('checkpoint')}")
    if os.path.isdir(os.path.join(run, "tb")):
        lines.append(f"tensorboard: tensorboard --logdir {os.path.join(run, 'tb')}")
    return "\n".join(lines)


def _experiment(args, rest: list[str]) -> int:
    if args.name != "entropy":
        print(f"covrl experiment: unknown experiment {args.name!r}; available: entropy", file=sys.stderr)
        return 2
    try:
        from covrl.experiments.entropy import main as entropy_main
    except ImportError as e:
        print(f"covrl experiment entropy: not available in this install ({e})", file=sys.stderr)
        return 2
    return entropy_main(rest) or 0


def _demo_model(args) -> int:
    from covrl.demo_model import ensure_demo_model

    print(ensure_demo_model(args.cache_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="covrl", description="RL for reasoning LLMs with entropy control.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run RL training")
    t.add_argument("--config", help="YAML config file")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    t.add_argument("--help-config", action="store_true", help="list every config field and exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. algo.kl_cov_fraction=2e-4")
    t.set_defaults(fn=_train)

    s = sub.add_parser("serve", help="run one service (delegates to python -m covrl.services)")
    s.add_argument("service", choices=("rollout", "reward", "learner"))
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=0)
    s.add_argument("--config")
    s.add_argument("--token-env", metavar="NAME",
                   help="require the shared token held by environment variable NAME (server.token_env)")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without TLS or a token (logs a warning)")
    s.set_defaults(fn=_serve)

    pl = sub.add_parser("plot", help="write PNGs of a run's metrics")
    pl.add_argument("run_dir")
    pl.add_argument("--out", help="output directory (default RUN_DIR/plots)")
    pl.set_defaults(fn=_plot)

    e = sub.add_parser("eval", help="pass@1 / pass@k of a checkpoint on the held-out split")
    e.add_argument("--checkpoint", required=True,
                   help="a run directory (its latest checkpoint), a run checkpoint directory or an HF model directory")
    e.add_argument("--config", help="YAML config (data/eval settings); default: the run's config.yaml if found")
    e.add_argument("--compare-untrained", action="store_true",
                   help="also evaluate the untrained model (model.path) on the same prompts; print both")
    e.add_argument("overrides", nargs="*", metavar="key=value")
    e.set_defaults(fn=_eval)

    x = sub.add_parser("experiment", help="run a packaged experiment (entropy)")
    x.add_argument("name")
    x.set_defaults(fn=None)

    d = sub.add_parser("demo-model", help="fetch the demo model once and print its path")
    d.add_argument("--cache-dir", default=None)
    d.set_defaults(fn=_demo_model)
    return p


def main(argv: list[str] | None = None) -> int:
    import warnings

    from covrl.logging_utils import enable_stack_dumps

    enable_stack_dumps()  # kill -USR1 PID: every thread's stack to stderr

    # covrl's own deprecations (renamed config keys) are shown; Python hides DeprecationWarning by default.
    warnings.filterwarnings("default", category=DeprecationWarning, message="covrl:")
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["experiment"]:
        args, rest = parser.parse_known_args(argv[:2])
        return _experiment(args, argv[2:])
    args = parser.parse_args(argv)
    if args.command == "eval" and not args.config:
        args.config = _find_run_config(args.checkpoint)
    return args.fn(args)


def _find_run_config(path: str) -> str | None:
    """The run's config.yaml for a checkpoint inside RUN_DIR/checkpoints/step_N[/learner]."""
    p = os.path.abspath(path)
    for _ in range(4):
        cand = os.path.join(p, "config.yaml")
        if os.path.exists(cand):
            return cand
        p = os.path.dirname(p)
    return None


if __name__ == "__main__":
    raise SystemExit(main())
