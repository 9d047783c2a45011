"""``python -m covrl.experiments.entropy``: the same as ``covrl experiment entropy``."""

from covrl.experiments.entropy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
