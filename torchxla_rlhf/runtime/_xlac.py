"""The one module that touches torch_xla's private API.

The runtime needs entry points torch_xla exposes only privately: its C++ binding
``torch_xla._XLAC`` (per-host shard uploads and reads, the trace-then-launch step, the
on-device ``While`` of :class:`~torchxla_rlhf.runtime.graphs.DeviceLoop`, the preemption sync
manager...) and ``Mesh._get_op_sharding_args``. None of them carries a stability promise: a
different torch_xla may rename or drop any of them, and the failure would otherwise surface in
the middle of a run (at the first checkpoint save, the first rollout). Importing this module
checks all of them once and fails with one line naming the installed version and what is
missing; the other runtime modules reach private torch_xla only through :data:`xlac` and the
functions here.

Imported lazily (inside functions, never when the ``runtime`` package is imported): torch_xla
must not load before :func:`~torchxla_rlhf.runtime.devices.init` has chosen ``PJRT_DEVICE``,
and ``--help`` loads no torch_xla.
"""

from __future__ import annotations

import logging
from typing import Any

import torch_xla
import torch_xla.distributed.spmd as xs
from torchxla_rlhf.errors import UserError

logger = logging.getLogger("torchxla_rlhf.runtime")

PINNED = "2.9.0"
"""The torch_xla release the project is built and tested against (pinned in ``setup.cfg``)."""

ENTRY_POINTS = (
    # host -> device: sharded uploads
    "XlaShardingSpec", "_xla_tensors_from_aten", "_global_tensor_from_cpu_shards",
    "_xla_get_runtime_devices", "_get_xla_op_sharding", "_xla_mark_sharding",
    "_get_xla_sharding_spec",
    # local shards of the training state (a loaded unannotated tensor is marked replicated)
    "_get_local_shard_replica_and_indices", "_get_local_shards", "_load_local_shards",
    "OpSharding",
    # graphs: trace then launch, background metric reads
    "_check_device_tensor_need_materialization", "_get_allow_execution", "_set_allow_execution",
    "_get_current_graph_name", "_set_current_graph_name", "_xla_get_cpu_tensors",
    # DeviceLoop: one lowered body inside an XLA While
    "_check_tensor_need_materialization", "_get_tensors_xla_device_data_node", "lowering",
    "_xla_user_computation", "_set_buffer_donation", "_xla_sync_multi",
    "_xla_get_enable_alias_with_buffer_donor_config",
    "_xla_set_enable_alias_with_buffer_donor_config",
    # preemption agreement between hosts
    "_ensure_xla_coordinator_initialized", "_activate_preemption_sync_manager",
    "_sync_point_reached",
    # graph capture (runtime/capture.py): placeholders, launches recorded instead of run
    "_xla_create_placeholder_tensor", "_replace_xla_tensor", "_xla_get_tensor_id",
    "_xla_step_marker",
)
"""Every ``torch_xla._XLAC`` attribute the runtime uses."""

MESH_METHODS = ("_get_op_sharding_args",)
"""Private methods of ``torch_xla.distributed.spmd.Mesh`` the runtime uses."""


class TorchXLAMismatch(UserError):
    """The installed torch_xla lacks a private entry point the runtime needs."""


def missing() -> list[str]:
    """The required private entry points the installed torch_xla does not have."""
    gone = [f"torch_xla._XLAC.{name}" for name in ENTRY_POINTS
            if not hasattr(torch_xla._XLAC, name)]
    if not hasattr(getattr(torch_xla._XLAC, "lowering", None), "LoweringContext"):
        gone.append("torch_xla._XLAC.lowering.LoweringContext")
    gone += [f"torch_xla.distributed.spmd.Mesh.{name}" for name in MESH_METHODS
             if not hasattr(xs.Mesh, name)]
    return sorted(set(gone))


def check() -> None:
    """Raise :class:`TorchXLAMismatch` (one line) if an entry point is absent; warn once if the
    version differs from :data:`PINNED` but everything needed is there."""
    version = getattr(torch_xla, "__version__", "unknown")
    gone = missing()
    if gone:
        raise TorchXLAMismatch(
            f"torch_xla {version} lacks {', '.join(gone)}: torchxla_rlhf needs "
            f"torch_xla=={PINNED} (pip install torch=={PINNED} 'torch_xla[tpu]=={PINNED}')"
        )
    if version.split("+")[0] != PINNED:
        logger.warning("torch_xla %s is installed; torchxla_rlhf is tested with %s",
                       version, PINNED)


check()

xlac: Any = torch_xla._XLAC
"""torch_xla's C++ binding, checked above."""


def op_sharding_args(mesh: Any, spec: tuple) -> tuple:
    """``(tile, groups, replication, kind)`` of ``spec`` on ``mesh`` (an ``xs.Mesh``): what
    ``xs.mark_sharding`` computes; it handles mesh axes a spec leaves out, which
    ``xs.ShardingSpec`` does not in 2.9."""
    return mesh._get_op_sharding_args(tuple(spec))
