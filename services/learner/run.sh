#!/usr/bin/env bash
# Launch the covrl learner service on this host.
#   services/learner/run.sh [config.yaml] [extra args, e.g. --host 0.0.0.0 --port 50051]
# Uses $COVRL_PYTHON (default: python3) with covrl installed. Stops gracefully on SIGTERM.
# NPROC=N (N > 1) runs it under torchrun with FSDP2 over N local GPUs: rank 0 serves gRPC,
# the other ranks follow it (see docs/learner.md).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
config="${1:-$here/config.example.yaml}"
shift || true
py="${COVRL_PYTHON:-python3}"
if [ "${NPROC:-1}" -gt 1 ]; then
  exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m covrl.services learner --config "$config" "$@"
fi
exec "$py" -m covrl.services learner --config "$config" "$@"
