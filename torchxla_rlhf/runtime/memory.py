"""Device memory for the start-up memory check: what one device has, what one device holds of
a sharded tensor, and zeros that keep a tensor's sharding."""

from __future__ import annotations

import math
import os

import torch
from torchxla_rlhf.runtime.devices import device, init


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

    from torchxla_rlhf.runtime._xlac import xlac

    spec = xlac._get_xla_sharding_spec(tensor)
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
    from torchxla_rlhf.runtime._xlac import xlac

    out = torch.zeros_like(tensor)
    op_sharding = xlac._get_xla_op_sharding(tensor)
    if op_sharding is not None:
        xlac._xla_mark_sharding(out, op_sharding)
    return out
