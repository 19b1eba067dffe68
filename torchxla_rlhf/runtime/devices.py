"""The device and the processes: PJRT/SPMD start-up, device counts, this host's index.

Order matters: :func:`init` must run before any tensor is put on the XLA device, because
``use_spmd()`` has to be switched on first. :func:`init` is idempotent.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

logger = logging.getLogger("torchxla_rlhf.runtime")

_STATE: dict[str, Any] = {"initialized": False}


def init() -> torch.device:
    """Set up PJRT and SPMD once per process and return the XLA device.

    ``PJRT_DEVICE`` defaults to ``TPU`` on a host with TPU chips and libtpu
    (:func:`tpu_found`) and to ``CPU`` otherwise (said once in the log). Must run before any tensor reaches the XLA device.
    """
    if _STATE["initialized"]:
        return _STATE["device"]
    if "PJRT_DEVICE" not in os.environ:
        found = tpu_found()
        os.environ["PJRT_DEVICE"] = "TPU" if found is None else "CPU"
        if found is not None:
            logger.warning("No TPU found (%s): running on XLA:CPU.", found)
    if os.environ["PJRT_DEVICE"] == "TPU":
        from torchxla_rlhf.libtpu_flags import drop_unknown_init_args

        drop_unknown_init_args()  # an unknown flag can abort the TPU client's start-up
    import torch_xla
    import torch_xla.runtime as xr
    # Checks the private entry points: a torch_xla that lacks one fails here, in one line.
    from torchxla_rlhf.runtime import _xlac  # noqa: F401

    xr.use_spmd()
    device = torch_xla.device()
    _STATE.update(initialized=True, device=device)
    logger.info(
        "XLA runtime: %s, %d device(s), process %d of %d",
        xr.device_type(),
        xr.global_runtime_device_count(),
        xr.process_index(),
        xr.process_count(),
    )
    return device


def tpu_found() -> str | None:
    """None when this host has TPU chips and libtpu to drive them, else why not. libtpu
    alone is no TPU: the ``aot`` extra installs it on CPU machines for the TPU compiler
    (``plan --compile``), and a run there must stay on XLA:CPU."""
    import glob
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        return "libtpu not installed"
    if not (glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
        return "libtpu is installed, but this host has no TPU chips (/dev/accel*, /dev/vfio)"
    return None


def device() -> torch.device:
    """The XLA device (one virtual device spanning all chips under SPMD)."""
    return init()


def device_type() -> str:
    """``"TPU"``, ``"CPU"``, ... as PJRT reports it."""
    init()
    import torch_xla.runtime as xr

    return xr.device_type()


def device_count() -> int:
    """Number of devices across all hosts (the mesh must use exactly this many)."""
    init()
    import torch_xla.runtime as xr

    return xr.global_runtime_device_count()


def process_index() -> int:
    """This host's index (0 on a single host). Only process 0 writes files."""
    init()
    import torch_xla.runtime as xr

    return xr.process_index()


def process_count() -> int:
    """Number of host processes (one per TPU VM worker)."""
    init()
    import torch_xla.runtime as xr

    return xr.process_count()


def is_main_process() -> bool:
    """True on the process that writes checkpoints, metrics and logs."""
    return process_index() == 0


def topology() -> tuple[int, int, int]:
    """``(devices, processes, devices per process)`` of this run, for the start-up checks."""
    init()
    import torch_xla.runtime as xr

    return (xr.global_runtime_device_count(), xr.process_count(),
            xr.addressable_runtime_device_count())
