#!/usr/bin/env bash
# Thin wrapper, kept for the old spelling: run COMMAND on every worker of a TPU pod through
# the launcher (background runs, per-worker logs, worker 0's log streamed, all workers stopped
# when one fails). See `python -m torchxla_rlhf.launch --help` and README "Run on a TPU pod".
#
#   launch/run_on_pod.sh NAME ZONE python -m torchxla_rlhf.dpo --config configs/dpo_13b.yaml output_dir=gs://BUCKET/run
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND ..." >&2
  exit 2
fi
NAME=$1; ZONE=$2; shift 2
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m torchxla_rlhf.launch --tpu "$NAME" --zone "$ZONE" -- "$@"
