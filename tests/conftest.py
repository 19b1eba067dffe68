"""Test setup: everything runs on XLA:CPU, offline.

The XLA device count is fixed when the runtime starts, so this process has one device; tests
that need a multi-device mesh start a subprocess with ``CPU_NUM_DEVICES`` set (see
``tests/helpers.py``).
"""

import os

os.environ.setdefault("PJRT_DEVICE", "CPU")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Start the XLA runtime before any test runs a CPU backward(): once autograd has run on the
# CPU, a later XLA backward() in the same process fails an internal assert.
from torchxla_rlhf import runtime  # noqa: E402

runtime.init()
