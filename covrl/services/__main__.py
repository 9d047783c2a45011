"""``python -m covrl.services <rollout|reward|learner> [--host H] [--port P] [--config cfg.yaml] [--token-env NAME] [--insecure]``."""

from __future__ import annotations

import argparse
import logging
import sys

from covrl.logging_utils import enable_stack_dumps
from covrl.malloc import retain_freed_memory
from covrl.services.launch import SERVICES, serve


def main(argv: list[str] | None = None) -> int:
    try:
        retain_freed_memory()  # before any handler thread allocates (see covrl.malloc); serve logs it
    except ValueError as e:
        print(f"python -m covrl.services: {e}", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog="python -m covrl.services", description="Run one covrl gRPC service.")
    ap.add_argument("service", choices=SERVICES)
    ap.add_argument("--host", default=None, help="bind address (default: server.host from the config, else 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="port (default: server.port from the config, else 0 = any)")
    ap.add_argument("--config", default=None, help="YAML config (see services/<name>/config.example.yaml)")
    ap.add_argument("--insecure", action="store_true",
                    help="allow a non-loopback --host without TLS or a token (logs a warning)")
    ap.add_argument("--token-env", default=None, metavar="NAME",
                    help="require the shared token held by environment variable NAME (server.token_env)")
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    enable_stack_dumps()  # kill -USR1 PID: every thread's stack to stderr (the service's log)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(args.service, args.host, args.port, args.config, insecure=args.insecure, token_env=args.token_env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
