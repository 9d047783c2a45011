#!/usr/bin/env bash
# Start the covrl learner on this host. NPROC > 1 runs it under torchrun with FSDP2
# (rank 0 serves gRPC, the other ranks follow it).
set -euo pipefail
CONFIG=${CONFIG:-$(dirname "$0")/config.example.yaml}
NPROC=${NPROC:-1}
PY=${PYTHON:-python}
if [ "$NPROC" -gt 1 ]; then
  exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m covrl.services.learner --config "$CONFIG" "$@"
fi
exec "$PY" -m covrl.services learner --config "$CONFIG" "$@"
