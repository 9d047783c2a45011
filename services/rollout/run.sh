#!/usr/bin/env bash
# Launch the covrl rollout service on this host.
#   services/rollout/run.sh [config.yaml] [extra args, e.g. --host 0.0.0.0 --port 50051]
# Uses $COVRL_PYTHON (default: python3) with covrl installed. Stops gracefully on SIGTERM.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-$here/config.example.yaml}"
shift || true
exec "${COVRL_PYTHON:-python3}" -m covrl.services rollout --config "$config" "$@"
