"""The device mesh a config asks for, and the TPU pods it may run on (as PJRT sees them).

``mesh_dim`` is parsed here and nowhere else: the runtime builds its SPMD mesh from the
:class:`Mesh` this returns, the start-up checks and the memory plan size their terms with it.
No torch, no torch_xla.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from torchxla_rlhf.errors import UserError

GIB = 1 << 30


class MeshError(UserError, ValueError):
    """A ``mesh_dim`` that is malformed or does not fit the devices."""


class Mesh(NamedTuple):
    """``(dp, fsdp, mp)`` axis sizes (a tuple, so ``dp, fsdp, mp = mesh`` unpacks)."""

    dp: int
    fsdp: int
    mp: int

    @property
    def devices(self) -> int:
        return self.dp * self.fsdp * self.mp

    @property
    def batch(self) -> int:
        """How many ways a batch's rows split: ``dp * fsdp``."""
        return self.dp * self.fsdp

    @property
    def sizes(self) -> dict[str, int]:
        return {"dp": self.dp, "fsdp": self.fsdp, "mp": self.mp}

    def __str__(self) -> str:
        return f"{self.dp},{self.fsdp},{self.mp}"


def _dims(mesh_dim: str | Sequence[int]) -> list[int]:
    """The three axes as written (one may be -1), validated; no device count needed."""
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
    return dims


def parse_mesh_dim(mesh_dim: str | Sequence[int], num_devices: int) -> Mesh:
    """Resolve EasyLM's ``"dp,fsdp,mp"`` spelling (one ``-1`` takes the remaining devices).

    >>> parse_mesh_dim("-1,2,2", 8)
    Mesh(dp=2, fsdp=2, mp=2)
    """
    dims = _dims(mesh_dim)
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
    return Mesh(*dims)


def fixed_devices(mesh_dim: str | Sequence[int]) -> int | None:
    """The device count a ``mesh_dim`` without ``-1`` names; None when one axis is ``-1``."""
    dims = _dims(mesh_dim)
    return None if -1 in dims else math.prod(dims)


def _mesh_suggestion(num_devices: int) -> str:
    # No fixed example: whether a mesh fits also depends on the model and the batch ('-1,1,1'
    # leaves large weights replicated, '1,N,1' may not divide the batch); the start-up checks
    # try every mesh on these devices and list the ones that pass.
    return (f"The start-up checks list the meshes on {num_devices} device(s) that fit the "
            f"model and the batch (python -m torchxla_rlhf plan --devices {num_devices}).")


# ----------------------------------------------------------------------------------------
# TPU pods as PJRT sees them
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TpuGeneration:
    cores_per_device: int
    """TensorCores behind one PJRT device: 1 on v3 (each core is a device), 2 on the megacore
    chips v4 and v5p (one device per chip)."""
    hbm_gib: float
    """HBM of one PJRT device."""
    devices_per_host: int
    """PJRT devices of one TPU VM host."""


TPU_GENERATIONS = {
    "v3": TpuGeneration(cores_per_device=1, hbm_gib=16, devices_per_host=8),
    "v4": TpuGeneration(cores_per_device=2, hbm_gib=32, devices_per_host=4),
    "v5p": TpuGeneration(cores_per_device=2, hbm_gib=95, devices_per_host=4),
}
"""A TPU type's number counts TensorCores (v3-128: 128 cores on 64 chips). v3 chips hold two
cores of 16 GiB each, and PJRT shows each core as a device; v4 (32 GiB) and v5p (95 GiB) chips
are megacore: one device per chip, so a v4-64 has 32 devices and a v5p-32 has 16."""


class TpuError(UserError, ValueError):
    """A ``--tpu`` type that is not a known pod (``v3-128``, ``v4-64``, ``v5p-32`` ...)."""


@dataclass(frozen=True)
class Pod:
    """A pod as the runtime sees it: devices, hosts and memory per device."""

    name: str
    devices: int
    hosts: int
    hbm_bytes: int

    @property
    def devices_per_host(self) -> int:
        return self.devices // self.hosts


def tpu_pod(name: str) -> Pod:
    """``v3-128`` -> 128 devices of 16 GiB on 16 hosts; ``v4-64`` -> 32 of 32 GiB on 8;
    ``v5p-32`` -> 16 of 95 GiB on 4."""
    m = re.fullmatch(r"(v\d+p?)-(\d+)", name.strip().lower())
    gen = TPU_GENERATIONS.get(m.group(1)) if m else None
    cores = int(m.group(2)) if m else 0
    if gen is None or cores < 8 or cores % 8:
        raise TpuError(
            f"--tpu {name!r}: expected a TPU type GENERATION-CORES with GENERATION one of "
            f"{', '.join(TPU_GENERATIONS)} and CORES a multiple of 8 (v3-128, v3-256, v4-64, v5p-32)"
        )
    devices = cores // gen.cores_per_device
    return Pod(name, devices, max(1, devices // gen.devices_per_host), int(gen.hbm_gib * GIB))
