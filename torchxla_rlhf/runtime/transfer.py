"""Host <-> device data: per-host batch uploads (each host sends only its own devices'
shards), host copies, and the local-shard I/O of the training state."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchxla_rlhf.runtime.devices import init
from torchxla_rlhf.runtime.mesh import (
    BATCH_AXES, MESH_AXES, MeshInfo, PartitionSpec, batch_spec, device_coords, shard_slices,
)


def batch_to_device(batch: Mapping[str, Any], mesh: MeshInfo) -> dict[str, Any]:
    """Upload a global batch (dict of CPU tensors; other values pass through): tensors of
    rank >= 2 (per-row tokens and masks) with dim 0 sharded over ``(dp, fsdp)``, 1-D
    per-example values (index, margin, cached log-probs: a few numbers) replicated.

    Every host calls this with the same global batch (the loaders build it from the same
    seeded order, see :func:`data_share`) and uploads only the shards of its own addressable
    devices (:func:`_global_from_local_shards`). There is no single-host branch: one host is
    the case where every device is addressable. This works for any mesh, including mp > 1,
    and for global batches smaller than the number of hosts.
    """
    tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    for key, t in tensors.items():
        if t.ndim == 0:
            raise ValueError(f"batch field {key!r} is a scalar; batches are per-example tensors")
        if t.ndim > 1 and t.shape[0] % mesh.batch:
            raise ValueError(
                f"batch field {key!r}: {t.shape[0]} rows are not divisible by "
                f"dp*fsdp={mesh.batch} (mesh {mesh.axes})"
            )
    ordinals = local_device_ordinals()
    out: dict[str, Any] = dict(batch)
    for k, t in tensors.items():
        spec = batch_spec(t.ndim) if t.ndim > 1 else (None,)
        out[k] = _global_from_local_shards(t, mesh, spec, ordinals)
    return out


def local_device_ordinals() -> list[int]:
    """Global ordinals of this process's addressable devices, in the runtime's order (the
    order ``_global_tensor_from_cpu_shards`` expects its shards in)."""
    init()
    from torchxla_rlhf.runtime._xlac import xlac

    return [int(name.rsplit(":", 1)[1]) for name in xlac._xla_get_runtime_devices()]


def _global_from_local_shards(
    tensor: torch.Tensor, mesh: MeshInfo, spec: PartitionSpec, ordinals: Sequence[int]
) -> torch.Tensor:
    """One global sharded device tensor from the host copy of the whole tensor, uploading
    only the shards of the devices in ``ordinals`` (this host's)."""
    from torchxla_rlhf.runtime._xlac import xlac

    grid = np.asarray(mesh.mesh.device_ids).reshape(mesh.dp, mesh.fsdp, mesh.mp)
    shards = [
        tensor[shard_slices(tuple(tensor.shape), spec, mesh.sizes, device_coords(grid, o))]
        .contiguous()
        for o in ordinals
    ]
    op_sharding = mesh.mesh.get_op_sharding(tuple(spec))
    return xlac._global_tensor_from_cpu_shards(shards, op_sharding, list(tensor.shape))



def host_rows(
    rows: int, mesh_shape: Sequence[int], device_ids: Sequence[int], ordinals: Sequence[int]
) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges of a ``rows``-row batch that a host owning devices
    ``ordinals`` uploads, merged and sorted: what per-host feeding sends from that host.
    ``device_ids`` is the mesh's device order (``np.arange(n)`` here)."""
    grid = np.asarray(device_ids).reshape(tuple(mesh_shape))
    sizes = dict(zip(MESH_AXES, mesh_shape))
    spans = sorted(
        {(s[0].start, s[0].stop)
         for s in (shard_slices((rows,), (BATCH_AXES,), sizes, device_coords(grid, o))
                   for o in ordinals)}
    )
    merged: list[tuple[int, int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def data_share(mesh: MeshInfo) -> tuple[int, int]:
    """``(index, count)`` of this host's share of each global batch for the loaders:
    ``(0, 1)`` on every host, i.e. each host builds the whole global batch from the same
    seeded order and :func:`batch_to_device` uploads only its own devices' shards. (Splitting
    rows between hosts would need the batch to divide the host count, and with mp > 1 the
    hosts' devices do not own disjoint row blocks; a global batch of 16 rows over 32 hosts is
    the paper's DPO case.)"""
    return 0, 1



def to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """Copy a (possibly sharded) XLA tensor to host memory.

    This is a host sync, and for a sharded tensor an all-gather: on several hosts every
    process must call it on the same tensors in the same order.
    """
    return tensor.detach().cpu()


Box = tuple  # ((start, stop), ...) per dim: a shard's place in the global tensor


def local_shard_boxes(tensor: torch.Tensor) -> list[tuple[int, Box]]:
    """``(replica id, box)`` of each of this process's device shards of ``tensor``, in local
    device order, without moving data. Replica 0 of each distinct box exists exactly once
    across all processes (torch_xla numbers replicas globally), so "write replica 0" writes
    every piece once. An unsharded tensor is one replicated piece."""
    import torch_xla.core.xla_model as xm
    from torchxla_rlhf.runtime._xlac import xlac

    full = tuple((0, int(d)) for d in tensor.shape)
    if not xlac._get_xla_sharding_spec(tensor):
        return [(0, full)]
    # Deliberate wait (checkpoint save/load only, never in the loop): reading the shards'
    # bookkeeping while the graph producing the tensor still runs fails ("Trying to access XLA
    # data ... while an async operation is in flight") when the read wins the race. Free when
    # the device is idle.
    xm.wait_device_ops()
    out = []
    for replica, indices in xlac._get_local_shard_replica_and_indices([tensor])[0]:
        box = full if indices is Ellipsis else tuple((s.start, s.stop) for s in indices)
        out.append((int(replica), box))
    return out


def local_shard_data(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of this process's device shards of ``tensor`` (padded to the shard shape),
    in the order of :func:`local_shard_boxes`. No collective: each host copies its own."""
    from torchxla_rlhf.runtime._xlac import xlac

    # Deliberate host transfers, once per checkpoint save (never in the training loop).
    if not xlac._get_xla_sharding_spec(tensor):
        return [tensor.detach().cpu()]
    return [data for data, _ in xlac._get_local_shards([tensor])[0]]


def load_local_shards(tensor: torch.Tensor, shards: Sequence[torch.Tensor]) -> None:
    """Write host ``shards`` (padded shard shapes, order of :func:`local_shard_boxes`) into
    this process's devices of ``tensor``, in place (its sharding and identity are kept)."""
    from torchxla_rlhf.runtime._xlac import xlac

    full = tuple((0, int(d)) for d in tensor.shape)
    if all(box == full for _, box in local_shard_boxes(tensor)):
        # Unsharded or replicated (_load_local_shards refuses those): copy_ keeps an annotation
        # the tensor has, but an unannotated one (AdamW's update count) comes from the host
        # without any, where a graph's output would carry `{replicated}`: the step graph that
        # updates it in place would then differ from the next one (a compilation after the
        # first resumed step). Annotate it as the graph would.
        annotated = bool(xlac._get_xla_sharding_spec(tensor))
        tensor.copy_(shards[0])
        if not annotated:
            from torch_xla.distributed.spmd import ShardingType

            xlac._xla_mark_sharding(tensor, xlac.OpSharding([], [], [], ShardingType.REPLICATED))
        return
    devices = xlac._xla_get_runtime_devices()
    if len(devices) != len(shards):
        raise ValueError(f"{len(shards)} shard(s) for {len(devices)} local device(s)")
    xlac._load_local_shards(tensor, list(shards), devices)
