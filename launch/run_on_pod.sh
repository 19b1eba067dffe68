#!/usr/bin/env bash
# Run one command on every worker of a TPU pod, from the repository directory on each worker.
# Under SPMD there is one process per host; PJRT finds the topology, so the command is the
# same on every worker (torch_xla's xla_dist launcher no longer exists).
#
#   launch/run_on_pod.sh NAME ZONE "python -m torchxla_rlhf.dpo --config configs/dpo_13b.yaml output_dir=gs://BUCKET/run"
#
# Environment passed through to the workers when set here: HF_TOKEN, WANDB_API_KEY,
# LIBTPU_INIT_ARGS (defaults to the seed's flags below), REPO_DIR (default: ~/torchxla_rlhf).
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE COMMAND" >&2
  exit 2
fi
NAME=$1; ZONE=$2; shift 2
CMD=$*
REPO_DIR=${REPO_DIR:-~/torchxla_rlhf}
LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-"--xla_jf_spmd_threshold_for_windowed_einsum_mib=0 --xla_tpu_spmd_threshold_for_allgather_cse=10000 --xla_tpu_spmd_rewrite_einsum_with_reshape=true --xla_tpu_enable_latency_hiding_scheduler=true TPU_MEGACORE=MEGACORE_DENSE"}
ENVS="export PJRT_DEVICE=TPU; export LIBTPU_INIT_ARGS='$LIBTPU_INIT_ARGS';"
[ -n "${HF_TOKEN:-}" ] && ENVS="$ENVS export HF_TOKEN='$HF_TOKEN';"
[ -n "${WANDB_API_KEY:-}" ] && ENVS="$ENVS export WANDB_API_KEY='$WANDB_API_KEY';"
exec gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all \
  --command="cd $REPO_DIR && $ENVS . .venv/bin/activate && $CMD"
