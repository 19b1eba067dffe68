"""The SPMD mesh and sharding annotations: ``(dp, fsdp, mp)`` meshes, partition specs, and
which piece of a tensor each device holds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchxla_rlhf.runtime.devices import device, device_count, init

logger = logging.getLogger("torchxla_rlhf.runtime")

MESH_AXES = ("dp", "fsdp", "mp")
"""Mesh axis names, in the order of EasyLM's ``--mesh_dim='dp,fsdp,mp'``."""

BATCH_AXES = ("dp", "fsdp")
"""Mesh axes the batch dimension is split over."""


from torchxla_rlhf.preflight.mesh import Mesh, MeshError, parse_mesh_dim  # noqa: E402 (the one parse)


@dataclass(frozen=True)
class MeshInfo:
    """torch_xla's SPMD mesh and its axis sizes. The sizes are the pre-flight's
    :class:`~torchxla_rlhf.preflight.mesh.Mesh` (``axes``), the one type that holds
    ``(dp, fsdp, mp)`` and the arithmetic on them; this adds only the device mesh."""

    mesh: Any  # torch_xla.distributed.spmd.Mesh
    axes: Mesh

    @property
    def dp(self) -> int:
        return self.axes.dp

    @property
    def fsdp(self) -> int:
        return self.axes.fsdp

    @property
    def mp(self) -> int:
        return self.axes.mp

    @property
    def sizes(self) -> dict[str, int]:
        return self.axes.sizes

    @property
    def batch(self) -> int:
        """How many ways the batch dimension is split (``dp * fsdp``)."""
        return self.axes.batch


def make_mesh(mesh_dim: str | Sequence[int]) -> MeshInfo:
    """Build the ``(dp, fsdp, mp)`` mesh over all devices; errors say what would fit."""
    init()
    import torch_xla.distributed.spmd as xs

    n = device_count()
    dp, fsdp, mp = parse_mesh_dim(mesh_dim, n)
    mesh = xs.Mesh(np.arange(n), (dp, fsdp, mp), MESH_AXES)
    logger.info("Mesh dp=%d fsdp=%d mp=%d over %d device(s)", dp, fsdp, mp, n)
    return MeshInfo(mesh=mesh, axes=Mesh(dp, fsdp, mp))


GENERATION_AXES = ("data", "tp")
"""Axes of the rollout's generation layout (:func:`generation_mesh`): rows split over
``data``, weights and heads over ``tp``."""


@dataclass(frozen=True)
class LayoutMesh:
    """A second mesh over the same devices as a :class:`MeshInfo`: ``(data, tp)``, used by
    the rollout's generation layout. Accepted wherever a mesh is (:func:`mark_sharding`)."""

    mesh: Any  # torch_xla.distributed.spmd.Mesh
    data: int
    tp: int

    @property
    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "tp": self.tp}


def generation_tp_choices(mesh: MeshInfo | Any) -> list[int]:
    """Tensor-parallel sizes a generation layout can take on ``mesh`` (anything with
    ``dp``, ``fsdp``, ``mp``): ``mp * f`` for every ``f`` dividing ``fsdp``, ascending. Each
    keeps every tp group a block of ``f`` whole mp groups (contiguous devices)."""
    return [mesh.mp * f for f in range(1, mesh.fsdp + 1) if mesh.fsdp % f == 0]


def generation_mesh(mesh: MeshInfo, tp: int) -> LayoutMesh:
    """The ``(data, tp)`` mesh over ``mesh``'s devices: devices ``arange(n)`` reshaped to
    ``[n / tp, tp]``. ``make_mesh`` lays devices out ``(dp, fsdp, mp)`` with ``mp`` fastest,
    so a row of ``tp = mp * f`` devices is ``f`` consecutive fsdp positions of one dp replica,
    each with its whole mp group."""
    choices = generation_tp_choices(mesh)
    if tp not in choices:
        raise MeshError(f"sampling.generation_tp={tp}: expected mp * f with f dividing fsdp on "
                        f"mesh dp={mesh.dp} fsdp={mesh.fsdp} mp={mesh.mp}: one of {choices}")
    import torch_xla.distributed.spmd as xs

    n = mesh.dp * mesh.fsdp * mesh.mp
    return LayoutMesh(mesh=xs.Mesh(np.arange(n), (n // tp, tp), GENERATION_AXES),
                      data=n // tp, tp=tp)


PartitionSpec = tuple  # of axis names, None, or tuples of axis names; one entry per tensor dim


def mark_sharding(tensor: torch.Tensor, mesh: MeshInfo | LayoutMesh,
                  spec: PartitionSpec) -> torch.Tensor:
    """Annotate an XLA tensor with a partition spec on the mesh (in place; returns it). On a
    tensor that holds pending operations (inside a traced graph) this annotates the graph's
    value: the graph computes it in that sharding."""
    import torch_xla.distributed.spmd as xs

    xs.mark_sharding(tensor, mesh.mesh, tuple(spec))
    return tensor


def shard_to_device(tensor: torch.Tensor, mesh: MeshInfo, spec: PartitionSpec) -> torch.Tensor:
    """Upload a host tensor straight into its shards: each device receives only its own
    piece (``.to(device)`` followed by ``mark_sharding`` would first place the whole tensor on
    every device). Used to load weights one tensor at a time."""
    from torchxla_rlhf.runtime._xlac import op_sharding_args, xlac

    # The same sharding arguments mark_sharding computes.
    tile, groups, replication, kind = op_sharding_args(mesh.mesh, spec)
    sharding = xlac.XlaShardingSpec(tensor, tile, groups, replication, int(kind), False)
    return xlac._xla_tensors_from_aten([tensor], [str(device())], [sharding])[0]


def batch_spec(ndim: int) -> PartitionSpec:
    """Partition spec of a batch tensor: dim 0 over (dp, fsdp), the rest replicated."""
    return (BATCH_AXES,) + (None,) * (ndim - 1)


def device_coords(grid: np.ndarray, ordinal: int) -> tuple[int, int, int]:
    """``(dp, fsdp, mp)`` coordinates of device ``ordinal`` in the mesh's device grid."""
    hits = np.argwhere(grid == ordinal)
    if len(hits) != 1:
        raise MeshError(f"device {ordinal} appears {len(hits)} times in the mesh")
    return tuple(int(c) for c in hits[0])  # type: ignore[return-value]


def shard_slices(
    shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int],
    coords: Sequence[int],
) -> tuple[slice, ...]:
    """The piece of a ``shape`` tensor that the device at mesh ``coords`` holds under
    ``spec``: pure index arithmetic (axes in a tuple are combined major to minor, as
    ``Mesh.get_op_sharding`` tiles them).

    >>> shard_slices((16, 4), (("dp", "fsdp"), None), {"dp": 1, "fsdp": 16, "mp": 16}, (0, 5, 3))
    (slice(5, 6, None), slice(0, 4, None))
    """
    position = dict(zip(MESH_AXES, coords))
    out = []
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        ways, block = 1, 0
        for name in names:
            ways *= axis_sizes[name]
            block = block * axis_sizes[name] + position[name]
        if size % ways:
            raise ValueError(f"dim {dim} of size {size} does not split {ways} ways ({names})")
        step = size // ways
        out.append(slice(block * step, (block + 1) * step))
    return tuple(out)

