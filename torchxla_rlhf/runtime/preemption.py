"""Multi-host agreement: every process stops at the same step after a preemption notice, and
a barrier after saves."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import numpy as np
import torch
from torchxla_rlhf.runtime.devices import device_count, init, process_count, process_index
from torchxla_rlhf.runtime.mesh import Mesh, MeshInfo, shard_to_device

logger = logging.getLogger("torchxla_rlhf.runtime")

COORDINATOR_ENV = "TORCHXLA_RLHF_COORDINATOR"
"""``host:port`` of a coordinator for :func:`start_preemption_sync` when PJRT does not provide
one (several single-host CPU processes in the tests); with ``TORCHXLA_RLHF_PROCESS_ID`` and
``TORCHXLA_RLHF_NUM_PROCESSES``."""

_PREEMPTION: dict[str, Any] = {"mode": None, "flag": False, "previous": None, "stop_step": None,
                               "group": (0, 1), "previous_int": None, "interrupted": False}


def _preemption_group() -> tuple[int, int, str, str] | None:
    """``(process id, process count, coordinator address, port)`` of the processes that must
    agree, or None for a single process."""
    addr = os.environ.get(COORDINATOR_ENV)
    if addr:
        host, _, port = addr.rpartition(":")
        try:
            pid = int(os.environ["TORCHXLA_RLHF_PROCESS_ID"])
            count = int(os.environ["TORCHXLA_RLHF_NUM_PROCESSES"])
        except (KeyError, ValueError):
            raise ValueError(f"{COORDINATOR_ENV}={addr!r} needs TORCHXLA_RLHF_PROCESS_ID and "
                             "TORCHXLA_RLHF_NUM_PROCESSES (integers)") from None
        if not host or not port.isdigit():
            raise ValueError(f"{COORDINATOR_ENV}={addr!r}: expected host:port")
        return pid, count, host, port
    if process_count() > 1:
        import torch_xla.runtime as xr

        return process_index(), process_count(), xr.get_master_ip(), "8547"
    return None


def start_preemption_sync() -> str:
    """Arrange for every process to stop at the same step after a preemption notice.

    Each host receives its own SIGTERM, at its own moment; a host that stops alone leaves the
    others waiting in a collective forever. On several processes this starts torch_xla's
    preemption sync manager (TSL's, over the distributed runtime coordinator): it catches
    SIGTERM itself and :func:`should_stop` then returns True on every process at the same
    step. On one process a plain SIGTERM flag does the same job. Returns the mode
    (``"sync"``/``"local"``); idempotent.
    """
    if _PREEMPTION["mode"] is not None:
        return _PREEMPTION["mode"]
    init()
    group = _preemption_group()
    _install_interrupt_handler(sync=group is not None)
    if group is None:
        def handler(signum, frame):
            _PREEMPTION["flag"] = True

        try:
            _PREEMPTION["previous"] = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave SIGTERM as it is
            _PREEMPTION["previous"] = None
        _PREEMPTION["mode"] = "local"
        return "local"
    from torchxla_rlhf.runtime._xlac import xlac

    pid, count, host, port = group
    xlac._ensure_xla_coordinator_initialized(pid, count, host, port)
    xlac._activate_preemption_sync_manager()
    _PREEMPTION.update(mode="sync", group=(pid, count))
    logger.info("preemption sync: process %d of %d (coordinator %s:%s)", pid, count, host, port)
    return "sync"


def _install_interrupt_handler(sync: bool) -> None:
    """Ctrl-C (SIGINT) as SIGTERM: the first one saves at the next step boundary and stops;
    a second one raises ``KeyboardInterrupt`` at once (the command line prints one line; a
    checkpoint being written is never published half-done)."""
    def handler(signum, frame):
        if _PREEMPTION["interrupted"]:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        _PREEMPTION["interrupted"] = True
        logger.warning("Ctrl-C: saving at the next step boundary, then stopping "
                       "(press Ctrl-C again to stop at once, without saving)")
        if sync:  # the sync manager owns SIGTERM: every host then stops at the same step
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            _PREEMPTION["flag"] = True

    try:
        _PREEMPTION["previous_int"] = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave SIGINT as it is
        _PREEMPTION["previous_int"] = None


def should_stop(step: int) -> bool:
    """True when training must save and stop after ``step`` (call once per step on every
    process, with the same increasing ``step``): the same answer on every process. Latches."""
    if _PREEMPTION["stop_step"] is not None:
        return True
    mode = _PREEMPTION["mode"]
    if mode == "sync":
        from torchxla_rlhf.runtime._xlac import xlac

        stop = bool(xlac._sync_point_reached(int(step)))
    else:
        stop = bool(_PREEMPTION["flag"])
    if stop:
        _PREEMPTION["stop_step"] = int(step)
    return stop

def stop_preemption_sync() -> None:
    """Undo :func:`start_preemption_sync`'s SIGTERM handler (local mode) and forget the
    preemption (a later run in the same process starts clean).

    In sync mode the coordinator stays up until the process exits. Its leader (process 0)
    must exit last: a follower whose coordinator disappears aborts. So process 0 lingers
    ``TORCHXLA_RLHF_LEADER_LINGER_S`` seconds (default 10) at exit; the others have passed the
    save barrier by then and exit at once.
    """
    if _PREEMPTION["mode"] == "local" and _PREEMPTION["previous"] is not None:
        signal.signal(signal.SIGTERM, _PREEMPTION["previous"])
    if _PREEMPTION.get("previous_int") is not None:
        signal.signal(signal.SIGINT, _PREEMPTION["previous_int"])
    _PREEMPTION.update(previous_int=None, interrupted=False)
    if _PREEMPTION["mode"] == "sync":
        if _PREEMPTION["group"][0] == 0 and not _PREEMPTION.get("linger"):
            import atexit
            import time

            atexit.register(time.sleep, float(os.environ.get("TORCHXLA_RLHF_LEADER_LINGER_S", "10")))
            _PREEMPTION["linger"] = True
        # The sync manager stays active: deactivating and reactivating it is not supported.
        _PREEMPTION.update(flag=False, stop_step=None)
        return
    _PREEMPTION.update(mode=None, flag=False, previous=None, stop_step=None)


def barrier() -> None:
    """Block until every process has reached this point (after a save: no host exits, or
    starts reading a checkpoint, while process 0 is still writing it). A no-op on one process.

    Under SPMD the processes share no host-side channel that torch_xla exposes, so the
    barrier is a tiny all-device reduction read back to the host: every process must take
    part before any can return. Compiled once (a few ms), then cached.
    """
    if process_count() == 1:
        return
    import torch_xla.distributed.spmd as xs

    n = device_count()
    flat = MeshInfo(mesh=xs.Mesh(np.arange(n), (n,), ("all",)), axes=Mesh(1, n, 1))
    t = shard_to_device(torch.ones(n, dtype=torch.int32), flat, ("all",))
    total = int(t.sum().cpu())  # deliberate host sync: this is the barrier
    if total != n:
        raise RuntimeError(f"barrier: {total} of {n} devices answered")
