"""The one module that talks to the torch_xla runtime: device, SPMD mesh, sharding calls,
compiled functions, graph cuts, host transfers and compilation counters.

Everything XLA-specific that the rest of the library needs goes through here, so that the
library can move to torch_xla's successor by changing one file. Model code stays plain HF.

Order matters: :func:`init` must run before any tensor is put on the XLA device, because
``use_spmd()`` has to be switched on first. :func:`init` is idempotent.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

MESH_AXES = ("dp", "fsdp", "mp")
"""Mesh axis names, in the order of the seed's ``--mesh_dim='dp,fsdp,mp'``."""

BATCH_AXES = ("dp", "fsdp")
"""Mesh axes the batch dimension is split over."""

_STATE: dict[str, Any] = {"initialized": False}


def init() -> torch.device:
    """Set up PJRT and SPMD once per process and return the XLA device.

    ``PJRT_DEVICE`` defaults to ``TPU`` when libtpu is importable and to ``CPU`` otherwise
    (said once in the log). Must run before any tensor reaches the XLA device.
    """
    if _STATE["initialized"]:
        return _STATE["device"]
    if "PJRT_DEVICE" not in os.environ:
        try:
            import libtpu  # noqa: F401

            os.environ["PJRT_DEVICE"] = "TPU"
        except ImportError:
            os.environ["PJRT_DEVICE"] = "CPU"
            logger.warning("No TPU found (libtpu not installed): running on XLA:CPU.")
    import torch_xla
    import torch_xla.runtime as xr

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


# ----------------------------------------------------------------------------------------
# Mesh
# ----------------------------------------------------------------------------------------


class MeshError(ValueError):
    """A mesh that cannot be built on the available devices."""


def parse_mesh_dim(mesh_dim: str | Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Resolve EasyLM's ``"dp,fsdp,mp"`` spelling (one ``-1`` takes the remaining devices).

    >>> parse_mesh_dim("-1,2,2", 8)
    (2, 2, 2)
    """
    if isinstance(mesh_dim, str):
        try:
            dims = [int(x) for x in mesh_dim.split(",")]
        except ValueError:
            raise MeshError(
                f"mesh_dim={mesh_dim!r}: expected three comma-separated integers 'dp,fsdp,mp' "
                "(one of them may be -1)"
            ) from None
    else:
        dims = [int(x) for x in mesh_dim]
    if len(dims) != 3:
        raise MeshError(f"mesh_dim={mesh_dim!r}: expected 3 axes (dp,fsdp,mp), got {len(dims)}")
    if dims.count(-1) > 1:
        raise MeshError(f"mesh_dim={mesh_dim!r}: at most one axis may be -1")
    if any(d == 0 or d < -1 for d in dims):
        raise MeshError(f"mesh_dim={mesh_dim!r}: axes must be positive integers or -1")
    known = math.prod(d for d in dims if d != -1)
    if -1 in dims:
        if num_devices % known:
            raise MeshError(
                f"mesh_dim={mesh_dim!r} does not fit {num_devices} device(s): the fixed axes "
                f"multiply to {known}, which does not divide {num_devices}. "
                f"{_mesh_suggestion(num_devices)}"
            )
        dims[dims.index(-1)] = num_devices // known
    if math.prod(dims) != num_devices:
        raise MeshError(
            f"mesh_dim={mesh_dim!r} uses {math.prod(dims)} device(s) but {num_devices} are "
            f"available: dp*fsdp*mp must equal the device count. {_mesh_suggestion(num_devices)}"
        )
    return tuple(dims)  # type: ignore[return-value]


def _mesh_suggestion(num_devices: int) -> str:
    return f"For example mesh_dim='1,{num_devices},1' (pure FSDP) or '-1,1,1' (pure data parallel)."


@dataclass(frozen=True)
class MeshInfo:
    """The SPMD mesh and its axis sizes."""

    mesh: Any  # torch_xla.distributed.spmd.Mesh
    dp: int
    fsdp: int
    mp: int

    @property
    def shape(self) -> dict[str, int]:
        return {"dp": self.dp, "fsdp": self.fsdp, "mp": self.mp}

    @property
    def batch_parallel(self) -> int:
        """How many ways the batch dimension is split (dp * fsdp)."""
        return self.dp * self.fsdp


def make_mesh(mesh_dim: str | Sequence[int]) -> MeshInfo:
    """Build the ``(dp, fsdp, mp)`` mesh over all devices; errors say what would fit."""
    init()
    import torch_xla.distributed.spmd as xs

    n = device_count()
    dp, fsdp, mp = parse_mesh_dim(mesh_dim, n)
    mesh = xs.Mesh(np.arange(n), (dp, fsdp, mp), MESH_AXES)
    logger.info("Mesh dp=%d fsdp=%d mp=%d over %d device(s)", dp, fsdp, mp, n)
    return MeshInfo(mesh=mesh, dp=dp, fsdp=fsdp, mp=mp)


PartitionSpec = tuple  # of axis names, None, or tuples of axis names; one entry per tensor dim


def mark_sharding(tensor: torch.Tensor, mesh: MeshInfo, spec: PartitionSpec) -> torch.Tensor:
    """Annotate an XLA tensor with a partition spec on the mesh (in place; returns it)."""
    import torch_xla.distributed.spmd as xs

    xs.mark_sharding(tensor, mesh.mesh, tuple(spec))
    return tensor


def shard_to_device(tensor: torch.Tensor, mesh: MeshInfo, spec: PartitionSpec) -> torch.Tensor:
    """Upload a host tensor straight into its shards: each device receives only its own
    piece (``.to(device)`` followed by ``mark_sharding`` would first place the whole tensor on
    every device). Used to load weights one tensor at a time."""
    import torch_xla

    # The same sharding arguments mark_sharding computes (Mesh._get_op_sharding_args handles
    # axes a spec leaves out; xs.ShardingSpec does not, in 2.9).
    tile, groups, replication, kind = mesh.mesh._get_op_sharding_args(tuple(spec))
    sharding = torch_xla._XLAC.XlaShardingSpec(tensor, tile, groups, replication, int(kind), False)
    return torch_xla._XLAC._xla_tensors_from_aten([tensor], [str(device())], [sharding])[0]


def batch_spec(ndim: int) -> PartitionSpec:
    """Partition spec of a batch tensor: dim 0 over (dp, fsdp), the rest replicated."""
    return (BATCH_AXES,) + (None,) * (ndim - 1)


def batch_to_device(batch: Mapping[str, Any], mesh: MeshInfo) -> dict[str, Any]:
    """Move this host's share of a batch (dict of CPU tensors; other values pass through)
    onto the device as one global batch whose dim 0 is sharded over ``(dp, fsdp)``.

    On one host the share is the whole batch. On several hosts each process passes its own
    rows (see :func:`data_share`) and torch_xla's ``minibatch`` input sharding assembles the
    global batch; each host uploads only its shards. There, 1-D tensors travel as ``[B, 1]``
    (the 2.9 ``ShardingSpec`` mishandles specs without a ``None`` entry) and are squeezed back.
    """
    import torch_xla.core.xla_model as xm
    import torch_xla.distributed.spmd as xs

    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for key, t in tensors.items():
        if t.ndim == 0:
            raise ValueError(f"batch field {key!r} is a scalar; batches are per-example tensors")
        if (t.shape[0] * process_count()) % mesh.batch_parallel:
            raise ValueError(
                f"batch field {key!r}: global batch size {t.shape[0] * process_count()} is not "
                f"divisible by dp*fsdp={mesh.batch_parallel}"
            )
    multi_host = process_count() > 1
    out: dict[str, Any] = dict(batch)
    by_rank: dict[int, dict[str, torch.Tensor]] = {}
    for k, t in tensors.items():
        if t.ndim == 1 and not multi_host:
            # One host: transfer and annotate directly; no view op is left pending (a pending
            # squeeze would run as an extra small graph before the next step).
            out[k] = mark_sharding(t.to(device()), mesh, batch_spec(1))
        else:
            lifted = t.unsqueeze(-1) if t.ndim == 1 else t
            by_rank.setdefault(lifted.ndim, {})[k] = lifted
    for ndim, group in by_rank.items():
        spec = xs.ShardingSpec(mesh.mesh, batch_spec(ndim), minibatch=multi_host)
        out.update(xm.send_cpu_data_to_device(group, device(), input_sharding=spec))
    for k, t in tensors.items():
        if t.ndim == 1 and multi_host:
            out[k] = out[k].squeeze(-1)
    return out


def data_share(mesh: MeshInfo) -> tuple[int, int]:
    """``(index, count)`` of this host's share of each global batch: the loader on host
    ``index`` yields rows ``[index * B / count, (index + 1) * B / count)``."""
    return process_index(), process_count()


def to_device(tensor: torch.Tensor) -> torch.Tensor:
    """Put a CPU tensor on the XLA device (replicated)."""
    return tensor.to(device())


# ----------------------------------------------------------------------------------------
# Graphs, syncs and counters
# ----------------------------------------------------------------------------------------


def compile(fn: Callable, name: str | None = None, full_graph: bool = True) -> Callable:
    """Wrap ``fn`` so that each call traces it and runs it as one XLA graph.

    With ``full_graph=True`` a host sync inside ``fn`` (``.item()``, ``if tensor``, a CPU
    fallback that executes) raises instead of silently splitting the graph.
    """
    import torch_xla

    return torch_xla.compile(fn, full_graph=full_graph, name=name)


def sync() -> None:
    """Cut the graph and launch it (asynchronous: does not wait for the result)."""
    import torch_xla

    torch_xla.sync()


def wait() -> None:
    """Block until the device has finished all queued work (a host sync; for timing)."""
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()


def add_step_closure(fn: Callable, args: tuple = ()) -> None:
    """Run ``fn(*args)`` on the host after the current graph executes; tensors in ``args``
    are materialized by then, so ``.item()`` inside ``fn`` costs no extra sync."""
    import torch_xla.core.xla_model as xm

    xm.add_step_closure(fn, args=args, run_async=False)


def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Copy a (possibly sharded) XLA tensor to host memory.

    This is a host sync, and for a sharded tensor an all-gather: on several hosts every
    process must call it on the same tensors in the same order.
    """
    return tensor.detach().cpu()


def compile_count() -> int:
    """Number of XLA compilations so far in this process (``CompileTime`` samples)."""
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def host_sync_count() -> int:
    """Number of ``.item()``-style transfers of a device scalar to the host so far."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("aten::_local_scalar_dense") or 0)


def cpu_fallback_counts() -> dict[str, int]:
    """Operators that fell back to the CPU (``aten::*`` counters), with their counts."""
    import torch_xla.debug.metrics as met

    return {
        name: int(met.counter_value(name))
        for name in met.counter_names()
        if name.startswith("aten::")
    }


def activation_checkpoint_fn() -> Callable:
    """torch_xla's reentrant activation checkpoint (``torch.utils.checkpoint`` crashes on XLA
    tensors), for HF's gradient-checkpointing hook."""
    from functools import partial

    import torch_xla.utils.checkpoint as xla_checkpoint

    return partial(xla_checkpoint.checkpoint, use_reentrant=True)


def manual_seed(seed: int) -> None:
    """Seed the XLA device RNG (and torch's CPU RNG)."""
    import torch_xla.core.xla_model as xm

    torch.manual_seed(seed)
    xm.set_rng_state(seed)


# ----------------------------------------------------------------------------------------
# Device memory (issue 9: the start-up memory check)
# ----------------------------------------------------------------------------------------

HBM_ENV = "TORCHXLA_RLHF_HBM_GIB"
"""Environment variable that sets the memory per device (GiB) the start-up check uses,
overriding what PJRT reports (and giving one where it reports none)."""


def device_memory_bytes() -> int | None:
    """Memory of one device (``bytes_limit`` of PJRT's allocator stats), or None where the
    runtime keeps no allocator stats (XLA:CPU raises ``GetAllocatorStats is not supported``).
    Under SPMD the stats of the first physical device stand for all (they are identical)."""
    if os.environ.get(HBM_ENV):
        return int(float(os.environ[HBM_ENV]) * (1 << 30))
    init()
    import torch_xla.core.xla_model as xm

    try:
        info = xm.get_memory_info(device())
    except Exception:  # noqa: BLE001 - any runtime without allocator stats
        return None
    limit = info.get("bytes_limit") if isinstance(info, dict) else None
    return int(limit) if limit else None


def shard_nbytes(tensor: torch.Tensor) -> int:
    """Bytes one device holds of an XLA tensor: its shard under the tensor's sharding
    annotation (``{devices=[2,1,4]... last_tile_dim_replicate}``: dims split 2, 1 (and 4 ways
    replicated)); the whole tensor when replicated or unannotated."""
    import re

    import torch_xla

    spec = torch_xla._XLAC._get_xla_sharding_spec(tensor)
    m = re.search(r"devices=\[([\d,]+)\]", spec or "")
    shape = list(tensor.shape)
    if m:
        tiles = [int(x) for x in m.group(1).split(",")]
        if "last_tile_dim_replicate" in spec or len(tiles) > len(shape):
            tiles = tiles[: len(shape)]
        shape = [-(-d // t) for d, t in zip(shape, tiles)]
    return math.prod(shape) * tensor.element_size()


def zeros_like_sharded(tensor: torch.Tensor) -> torch.Tensor:
    """``torch.zeros_like`` with ``tensor``'s sharding annotation. Plain ``zeros_like`` drops
    it: once materialised the zeros are *replicated* (verified on XLA:CPU), which for AdamW
    moments means every device holds both moments of the whole model."""
    import torch_xla

    out = torch.zeros_like(tensor)
    op_sharding = torch_xla._XLAC._get_xla_op_sharding(tensor)
    if op_sharding is not None:
        torch_xla._XLAC._xla_mark_sharding(out, op_sharding)
    return out
