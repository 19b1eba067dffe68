#!/usr/bin/env bash
# Install torchxla_rlhf on one TPU VM worker; the launcher runs it on every worker:
#   python -m torchxla_rlhf.launch --tpu NAME --zone ZONE --setup -- true
# Needs Python 3.11 (torch_xla 2.9 wheels): $PYTHON, else python3.11, else python3 if it is 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$candidate; break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "setup_tpu_vm.sh: no Python 3.11 on this VM (torch_xla 2.9 needs it). Install it, e.g." >&2
  echo "  sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get install -y python3.11 python3.11-venv" >&2
  echo "or set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -d .venv ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --upgrade pip
.venv/bin/python -m pip install -e ".[tpu]"
.venv/bin/python -c "import torch_xla.runtime as xr; print('devices:', xr.global_runtime_device_count())"
