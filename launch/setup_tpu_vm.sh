#!/usr/bin/env bash
# Install torchxla_rlhf on one TPU VM worker (run it on all of them with run_on_pod.sh):
#   launch/run_on_pod.sh NAME ZONE "bash launch/setup_tpu_vm.sh"
# Needs python3.11 on the VM; torch, torch_xla (with libtpu) come pinned from setup.cfg.
set -euo pipefail
cd "$(dirname "$0")/.."
python3.11 -m venv .venv
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e ".[tpu]"
.venv/bin/python -c "import torch_xla.runtime as xr; print('devices:', xr.global_runtime_device_count())"
