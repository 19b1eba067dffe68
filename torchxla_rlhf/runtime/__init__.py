"""The torch_xla boundary: the only package of the library that imports torch_xla.

Everything XLA-specific the rest of the library needs (device, SPMD mesh, sharding calls,
compiled functions, graph cuts, host transfers, metric read-back, preemption agreement,
counters) goes through here, so that the library can move to torch_xla's successor by changing
this package. Model code stays plain HF. Callers use the names re-exported below
(``from torchxla_rlhf import runtime; runtime.sync()``); the modules split them by concern:

- :mod:`.devices`: PJRT/SPMD start-up, device and process counts (:func:`init` first).
- :mod:`.mesh`: the ``(dp, fsdp, mp)`` mesh, partition specs, sharded uploads.
- :mod:`.transfer`: per-host batch feeding, host copies, local-shard I/O.
- :mod:`.graphs`: compiled steps, ``sync``/``wait``, :class:`DeviceLoop`.
- :mod:`.readback`: background metric reads, packed scalars, counters.
- :mod:`.numerics`: autocast, seeding, activation checkpointing.
- :mod:`.preemption`: hosts agreeing on a stop step, the barrier.
- :mod:`.memory`: device memory and per-device bytes of sharded tensors.
- :mod:`._xlac`: the one module that touches private torch_xla; it checks at import that the
  installed torch_xla has every private entry point the others use.

Importing this package loads no torch_xla (``--help`` stays fast, and :func:`init` chooses
``PJRT_DEVICE`` before torch_xla starts); the modules import it inside their functions.
"""

from torchxla_rlhf.runtime.devices import (
    device, device_count, device_type, init, is_main_process, process_count, process_index,
    topology,
)
from torchxla_rlhf.runtime.graphs import DeviceLoop, compile, sync, wait
from torchxla_rlhf.runtime.memory import (
    HBM_ENV, device_memory_bytes, shard_nbytes, zeros_like_sharded,
)
from torchxla_rlhf.runtime.mesh import (
    BATCH_AXES, GENERATION_AXES, MESH_AXES, LayoutMesh, MeshError, MeshInfo, PartitionSpec,
    batch_spec, device_coords, generation_mesh, generation_tp_choices, make_mesh,
    mark_sharding, parse_mesh_dim, shard_slices, shard_to_device,
)
from torchxla_rlhf.runtime.numerics import (activation_checkpoint_fn, autocast,
                                            gather_weights_per_layer, manual_seed)
from torchxla_rlhf.runtime.preemption import (
    COORDINATOR_ENV, barrier, should_stop, start_preemption_sync, stop_preemption_sync,
)
from torchxla_rlhf.runtime.readback import (
    PackedScalar, add_step_closure, cpu_fallback_counts, compile_count, drain_scalar_reads,
    host_float, host_sync_count, metric_data, pack_scalars, read_scalars_after_step,
)
from torchxla_rlhf.runtime.transfer import (
    Box, batch_to_device, data_share, host_rows, load_local_shards, local_device_ordinals,
    local_shard_boxes, local_shard_data, to_cpu,
)

__all__ = [
    "BATCH_AXES", "COORDINATOR_ENV", "GENERATION_AXES", "HBM_ENV", "LayoutMesh", "MESH_AXES",
    "Box", "DeviceLoop", "MeshError", "generation_mesh", "generation_tp_choices",
    "MeshInfo", "PackedScalar", "PartitionSpec", "activation_checkpoint_fn", "add_step_closure",
    "gather_weights_per_layer",
    "autocast", "barrier", "batch_spec", "batch_to_device", "compile", "compile_count",
    "cpu_fallback_counts", "data_share", "device", "device_coords", "device_count",
    "device_memory_bytes", "device_type", "drain_scalar_reads", "host_float", "host_rows",
    "host_sync_count", "init", "is_main_process", "load_local_shards", "local_device_ordinals",
    "local_shard_boxes", "local_shard_data", "make_mesh", "manual_seed", "mark_sharding",
    "metric_data", "pack_scalars", "parse_mesh_dim", "process_count", "process_index",
    "read_scalars_after_step", "shard_nbytes", "shard_slices", "shard_to_device", "should_stop",
    "start_preemption_sync", "stop_preemption_sync", "sync", "to_cpu", "topology", "wait",
    "zeros_like_sharded",
]
