"""Regenerate covrl/_proto/ from protos/covrl/v1/*.proto (run by ``make protos``).

Uses the installed grpcio-tools (pinned to 1.84.0 in the dev extra, so the generated
``*_pb2_grpc.py`` import with grpcio >= 1.84). protoc names modules after the proto path
(``covrl.v1.rollout_pb2``); covrl ships them as ``covrl._proto.v1``, so the generated
``from covrl.v1 import ...`` lines are rewritten to ``from covrl._proto.v1 import ...``.

    python protos/generate.py              # write covrl/_proto/v1/
    python protos/generate.py --check      # exit 1 if the committed code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import pathlib
import re
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "covrl" / "_proto" / "v1"
IMPORT_RE = re.compile(r"^from covrl\.v1 import ", re.MULTILINE)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc into ``out_dir``; return the generated files."""
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / "covrl" / "v1").glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *[str(p.relative_to(PROTO_ROOT)) for p in protos],
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((pathlib.Path(tmp) / "covrl" / "v1").iterdir()):
            text = IMPORT_RE.sub("from covrl._proto.v1 import ", src.read_text())
            dst = out_dir / src.name
            dst.write_text(text)
            written.append(dst)
    (out_dir / "__init__.py").write_text('"""Generated from protos/covrl/v1 by protos/generate.py; do not edit."""\n')
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed code, write nothing")
    args = ap.parse_args(argv)
    if not args.check:
        for old in OUT.glob("*"):
            if old.name.endswith(GENERATED_SUFFIXES):
                old.unlink()
        for path in generate(OUT):
            print(path.relative_to(ROOT))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(pathlib.Path(tmp))
        stale = [p.name for p in fresh if not (OUT / p.name).exists() or not filecmp.cmp(p, OUT / p.name, shallow=False)]
        extra = sorted(
            p.name for p in OUT.glob("*") if p.name.endswith(GENERATED_SUFFIXES) and not (pathlib.Path(tmp) / p.name).exists()
        )
    if stale or extra:
        print(f"covrl/_proto/v1 is stale (changed: {stale}, extra: {extra}); run `make protos`", file=sys.stderr)
        return 1
    print("covrl/_proto/v1 is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
