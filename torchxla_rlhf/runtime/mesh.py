"""The SPMD mesh and sharding annotations: ``(dp, fsdp, mp)`` meshes, partition specs, and
which piece of a tensor each device holds."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchxla_rlhf.errors import UserError
from torchxla_rlhf.runtime.devices import device, device_count, init

logger = logging.getLogger("torchxla_rlhf.runtime")

MESH_AXES = ("dp", "fsdp", "mp")
"""Mesh axis names, in the order of the seed's ``--mesh_dim='dp,fsdp,mp'``."""

BATCH_AXES = ("dp", "fsdp")
"""Mesh axes the batch dimension is split over."""


class MeshError(UserError, ValueError):
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
    # No fixed example: whether a mesh fits also depends on the model and the batch ('-1,1,1'
    # leaves large weights replicated, '1,N,1' may not divide the batch); the start-up checks
    # try every mesh on these devices and list the ones that pass.
    return (f"The start-up checks (torchxla_rlhf.startup) list the meshes on {num_devices} "
            "device(s) that fit the model and the batch.")


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

