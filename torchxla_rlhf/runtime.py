"""The one module that talks to the torch_xla runtime: device, SPMD mesh, sharding calls,
compiled functions, graph cuts, host transfers and compilation counters.

Everything XLA-specific that the rest of the library needs goes through here, so that the
library can move to torch_xla's successor by changing one file. Model code stays plain HF.

Order matters: :func:`init` must run before any tensor is put on the XLA device, because
``use_spmd()`` has to be switched on first. :func:`init` is idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torchxla_rlhf.errors import UserError

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
        if t.ndim > 1 and t.shape[0] % mesh.batch_parallel:
            raise ValueError(
                f"batch field {key!r}: {t.shape[0]} rows are not divisible by "
                f"dp*fsdp={mesh.batch_parallel} (mesh {mesh.shape})"
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
    import torch_xla

    return [int(name.rsplit(":", 1)[1]) for name in torch_xla._XLAC._xla_get_runtime_devices()]


def _global_from_local_shards(
    tensor: torch.Tensor, mesh: MeshInfo, spec: PartitionSpec, ordinals: Sequence[int]
) -> torch.Tensor:
    """One global sharded device tensor from the host copy of the whole tensor, uploading
    only the shards of the devices in ``ordinals`` (this host's)."""
    import torch_xla

    grid = np.asarray(mesh.mesh.device_ids).reshape(mesh.dp, mesh.fsdp, mesh.mp)
    shards = [
        tensor[shard_slices(tuple(tensor.shape), spec, mesh.shape, device_coords(grid, o))]
        .contiguous()
        for o in ordinals
    ]
    op_sharding = mesh.mesh.get_op_sharding(tuple(spec))
    return torch_xla._XLAC._global_tensor_from_cpu_shards(shards, op_sharding, list(tensor.shape))


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
    the seed's DPO case.)"""
    return 0, 1


def topology() -> tuple[int, int, int]:
    """``(devices, processes, devices per process)`` of this run, for the start-up checks."""
    init()
    import torch_xla.runtime as xr

    return (xr.global_runtime_device_count(), xr.process_count(),
            xr.addressable_runtime_device_count())


# ----------------------------------------------------------------------------------------
# Graphs, syncs and counters
# ----------------------------------------------------------------------------------------


def compile(fn: Callable, name: str | None = None, full_graph: bool = True) -> Callable:
    """Wrap ``fn`` so that each call traces it and runs it as one XLA graph.

    With ``full_graph=True`` a host sync inside ``fn`` (``.item()``, ``if tensor``, a CPU
    fallback that executes) raises instead of silently splitting the graph.

    ``torch_xla.compile`` first flushes pending work with a sync. Any sync waits for the
    device to finish the graph it is running (it takes the device lock), so that opening sync
    stops the host from tracing step t+1 while the device runs step t. So when no live tensor
    holds pending work (the usual case between steps) the wrapper skips it: trace with
    execution disallowed (the same ``full_graph`` check), then one asynchronous sync that
    launches the graph. When work is pending it goes through ``torch_xla.compile`` as is, so
    that the pending work stays its own graph and the step's graph (and its compiled
    executable) is the same either way.
    """
    import torch_xla

    checked = torch_xla.compile(fn, full_graph=full_graph, name=name)

    def run(*args: Any, **kwargs: Any) -> Any:
        # One bool per live XLA tensor (C++ walk; microseconds for thousands of tensors).
        if any(torch_xla._XLAC._check_device_tensor_need_materialization("")):
            return checked(*args, **kwargs)
        return _trace_then_launch(fn, full_graph, name, args, kwargs)

    return run


def _trace_then_launch(
    fn: Callable, full_graph: bool, name: str | None, args: tuple, kwargs: dict
) -> Any:
    """``torch_xla.compile``'s body without its opening sync: trace ``fn`` (a host sync raises
    if ``full_graph``), then launch the graph asynchronously."""
    import torch_xla

    xlac = torch_xla._XLAC
    saved = (xlac._get_allow_execution(), xlac._get_current_graph_name())
    if name is not None:
        xlac._set_current_graph_name(name)
    xlac._set_allow_execution(not full_graph)
    try:
        out = fn(*args, **kwargs)
    finally:
        xlac._set_allow_execution(saved[0])
        torch_xla.sync()
        xlac._set_current_graph_name(saved[1])
    _READER.deliver()
    return out


def sync() -> None:
    """Cut the graph and launch it (asynchronous: does not wait for the result)."""
    import torch_xla

    torch_xla.sync()
    _READER.deliver()


def wait() -> None:
    """Block until the device has finished all queued work (a host sync; for timing), and
    until every :func:`read_scalars_after_step` callback queued so far has run."""
    import torch_xla.core.xla_model as xm

    xm.wait_device_ops()
    _READER.drain()


def drain_scalar_reads() -> None:
    """Run every :func:`read_scalars_after_step` callback queued so far (waiting for their
    reads; no wait for other device work): what a tracker does before it closes its files."""
    _READER.drain()


class _BackgroundReader:
    """One worker thread that copies finished device tensors to the host in submission order,
    so that the training loop never waits on a read; the callbacks then run on the MAIN
    thread, at the next :func:`sync`, :func:`wait` or submission (trackers need not be
    thread-safe). ``_xla_get_cpu_tensors`` releases the GIL while it waits for the device.
    """

    def __init__(self) -> None:
        self._queue: Any = None
        self._ready: Any = None  # (callback, host tensors | exception), in order

    def submit(self, tensors: list[torch.Tensor], callback: Callable[[list], None]) -> None:
        self.deliver()
        if self._queue is None:
            import collections
            import queue
            import threading

            self._queue, self._ready = queue.Queue(), collections.deque()
            threading.Thread(target=self._loop, name="xla-metric-reader", daemon=True).start()
        self._queue.put((tensors, callback))

    def drain(self) -> None:
        """Wait for every submitted copy, then run the callbacks."""
        if self._queue is not None:
            self._queue.join()
        self.deliver()

    def deliver(self) -> None:
        """Run the callbacks whose copies are done (main thread)."""
        while self._ready:
            callback, host = self._ready.popleft()
            if isinstance(host, BaseException):
                raise RuntimeError("reading metrics from the device failed") from host
            callback(host)

    def _loop(self) -> None:
        import torch_xla

        while True:
            tensors, callback = self._queue.get()
            try:
                host: Any = torch_xla._XLAC._xla_get_cpu_tensors(tensors) if tensors else []
            except Exception as e:  # noqa: BLE001 (raised on the main thread by deliver)
                host = e
            self._ready.append((callback, host))
            self._queue.task_done()


_READER = _BackgroundReader()


@dataclass(frozen=True)
class PackedScalar:
    """One named metric of a vector of scalar metrics stacked inside a graph
    (:func:`pack_scalars`): ``vector[index]``."""

    vector: torch.Tensor
    index: int


def pack_scalars(values: Mapping[str, Any]) -> dict[str, Any]:
    """Call at the end of a traced step: stack the 0-dim tensors of ``values`` into ONE float32
    vector (so the graph has one metrics output instead of one per metric, and a logged step
    reads one buffer per graph) and return ``values`` with each of them replaced by a
    :class:`PackedScalar`; other entries are returned unchanged. Only for values that are
    logged (read by :func:`read_scalars_after_step` or :func:`host_float`), not for tensors a
    later graph computes with."""
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor) and v.ndim == 0]
    if not names:
        return dict(values)
    vector = torch.stack([values[k].detach().float() for k in names])
    out = dict(values)
    out.update({k: PackedScalar(vector, i) for i, k in enumerate(names)})
    return out


def host_float(value: Any) -> float:
    """A metric as a host float: a Python number, a scalar tensor or a :class:`PackedScalar`.
    A host sync for device values: for tests and benchmarks, never in the training loop."""
    if isinstance(value, PackedScalar):
        return float(value.vector.detach().cpu()[value.index])
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu())
    return float(value)


def read_scalars_after_step(
    values: Mapping[str, Any], callback: Callable[[dict[str, float]], None]
) -> None:
    """Hand ``callback`` the host floats of ``values`` once the current graph has run, without
    blocking the caller (the callback runs on this thread at a later :func:`sync` or
    :func:`wait`).

    ``values``: name -> a scalar device tensor, a :class:`PackedScalar`, a Python number, or a
    list/tuple of those (one per micro-batch or update: the mean is reported). All device
    buffers are copied in ONE batched transfer on a background thread (instead of one blocking
    ``.item()`` per value per micro-batch: ~200 reads per PPO step at the 13B shapes), after the
    graph that computes them was launched; the metrics a graph packed (:func:`pack_scalars`)
    are one buffer. The tensors must not hold pending operations when the graph is launched:
    call this after the step's sync, or before the next one (the copy is queued by a step
    closure that runs right after the next sync's launch).
    """
    names: list[str] = []
    groups: list[list[Any]] = []
    for name, v in values.items():
        names.append(name)
        groups.append(list(v) if isinstance(v, (list, tuple)) else [v])
    buffers: list[torch.Tensor] = []
    slot: dict[int, int] = {}  # id(device tensor) -> position in `buffers`
    for x in (x for g in groups for x in g):
        t = x.vector if isinstance(x, PackedScalar) else x
        if isinstance(t, torch.Tensor) and id(t) not in slot:
            slot[id(t)] = len(buffers)
            buffers.append(t)

    def finish(host: list[torch.Tensor]) -> None:
        def value(x: Any) -> float:
            if isinstance(x, PackedScalar):
                return float(host[slot[id(x.vector)]][x.index])
            if isinstance(x, torch.Tensor):
                return float(host[slot[id(x)]])
            return float(x)

        callback({name: sum(map(value, g)) / max(len(g), 1) for name, g in zip(names, groups)})

    def enqueue() -> None:
        _READER.submit(buffers, finish)

    if buffers and buffers[0].device.type == "xla":
        add_step_closure(enqueue)
    else:  # host (CPU) tensors: a copy, no device sync
        finish([t.detach().cpu() for t in buffers])


def add_step_closure(fn: Callable, args: tuple = ()) -> None:
    """Run ``fn(*args)`` on the host after the current graph executes. Tensors in ``args``
    are materialized by then: ``.item()`` inside ``fn`` is one device-to-host copy (counted
    by :func:`host_sync_count`) but runs no graph and never stalls the loop's dispatch."""
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


def autocast(compute_dtype: str, param_dtype: str):
    """Autocast to ``compute_dtype`` (bf16 matmuls over fp32 parameters) on the XLA device;
    a no-op when the dtypes agree or compute is float32."""
    if compute_dtype == param_dtype or compute_dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast("xla", dtype=getattr(torch, compute_dtype))


def manual_seed(seed: int) -> None:
    """Seed the XLA device RNG (and torch's CPU RNG)."""
    import torch_xla.core.xla_model as xm

    torch.manual_seed(seed)
    xm.set_rng_state(seed)


# ----------------------------------------------------------------------------------------
# Multi-host: agreeing on preemption, barriers
# ----------------------------------------------------------------------------------------

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
    import torch_xla

    pid, count, host, port = group
    torch_xla._XLAC._ensure_xla_coordinator_initialized(pid, count, host, port)
    torch_xla._XLAC._activate_preemption_sync_manager()
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
        import torch_xla

        stop = bool(torch_xla._XLAC._sync_point_reached(int(step)))
    else:
        stop = bool(_PREEMPTION["flag"])
    if stop:
        _PREEMPTION["stop_step"] = int(step)
    return stop


def preemption_step() -> int | None:
    """The step at which :func:`should_stop` first said stop (None: not preempted)."""
    return _PREEMPTION["stop_step"]


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
    flat = MeshInfo(mesh=xs.Mesh(np.arange(n), (n,), ("all",)), dp=1, fsdp=n, mp=1)
    t = shard_to_device(torch.ones(n, dtype=torch.int32), flat, ("all",))
    total = int(t.sum().cpu())  # deliberate host sync: this is the barrier
    if total != n:
        raise RuntimeError(f"barrier: {total} of {n} devices answered")


# ----------------------------------------------------------------------------------------
# Local shards: what this process holds of a sharded tensor (training state)
# ----------------------------------------------------------------------------------------

Box = tuple  # ((start, stop), ...) per dim: a shard's place in the global tensor


def local_shard_boxes(tensor: torch.Tensor) -> list[tuple[int, Box]]:
    """``(replica id, box)`` of each of this process's device shards of ``tensor``, in local
    device order, without moving data. Replica 0 of each distinct box exists exactly once
    across all processes (torch_xla numbers replicas globally), so "write replica 0" writes
    every piece once. An unsharded tensor is one replicated piece."""
    import torch_xla

    full = tuple((0, int(d)) for d in tensor.shape)
    if not torch_xla._XLAC._get_xla_sharding_spec(tensor):
        return [(0, full)]
    out = []
    for replica, indices in torch_xla._XLAC._get_local_shard_replica_and_indices([tensor])[0]:
        box = full if indices is Ellipsis else tuple((s.start, s.stop) for s in indices)
        out.append((int(replica), box))
    return out


def local_shard_data(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Host copies of this process's device shards of ``tensor`` (padded to the shard shape),
    in the order of :func:`local_shard_boxes`. No collective: each host copies its own."""
    import torch_xla

    # Deliberate host transfers, once per checkpoint save (never in the training loop).
    if not torch_xla._XLAC._get_xla_sharding_spec(tensor):
        return [tensor.detach().cpu()]
    return [data for data, _ in torch_xla._XLAC._get_local_shards([tensor])[0]]


def load_local_shards(tensor: torch.Tensor, shards: Sequence[torch.Tensor]) -> None:
    """Write host ``shards`` (padded shard shapes, order of :func:`local_shard_boxes`) into
    this process's devices of ``tensor``, in place (its sharding and identity are kept)."""
    import torch_xla

    full = tuple((0, int(d)) for d in tensor.shape)
    if all(box == full for _, box in local_shard_boxes(tensor)):
        # Unsharded or replicated (_load_local_shards refuses those): copy_ keeps the sharding.
        tensor.copy_(shards[0])
        return
    devices = torch_xla._XLAC._xla_get_runtime_devices()
    if len(devices) != len(shards):
        raise ValueError(f"{len(shards)} shard(s) for {len(devices)} local device(s)")
    torch_xla._XLAC._load_local_shards(tensor, list(shards), devices)


class DeviceLoop:
    """``carry = body(carry)`` repeated on the device inside ONE compiled XLA ``While``: the
    host traces ``body`` once, and a call costs the host the same whatever the trip count.

    Why: lazy-tensor tracing re-runs every Python op of the model at every call (about 3 ms
    per LLaMA layer here), so a one-token decode step traced per token costs the host
    ``tokens x layers``; even replaying a cached one-step executable costs one launch per
    token (~0.5 ms of host work each in torch_xla 2.9). The JAX code it replaces runs its
    decode in one ``while_loop``; this is the same, built from torch_xla's own pieces:
    ``body`` is traced once on the XLA device and lowered (``LoweringContext``) to an HLO
    computation, which ``xla_builder`` wraps in a ``While`` (with a trip counter and an
    optional early exit) and ``_xla_user_computation`` puts into the lazy graph as one op.
    The computation is cached: later calls with the same carry shapes and invariant tensors
    trace nothing. (torch_xla's ``while_loop``/``fori_loop`` wrappers were tried first; see
    ``generation.py`` for why they were not usable for a model.)

    Contract:
      * ``body(carry: list[Tensor]) -> list[Tensor]``: same length, shapes and dtypes. It must
        read the carry ONLY through its argument (the capture hands it fresh aliases) and
        must be free of host syncs (execution is disallowed while it is traced).
      * ``invariants``: tensors ``body`` reads that may hold other values at a later call (a
        policy's weights between PPO steps); they are passed in at every call. Anything else
        ``body`` reads (constants made while tracing) is frozen at the capture.
      * ``__call__`` launches the loop (asynchronously: it does not wait for the result) and
        updates the carry tensors IN PLACE with its results; their old buffers are donated to
        the outputs (a KV cache is updated in place, not copied), so no other tensor may share
        them. It returns the number of iterations run, a device ``int64`` scalar.
      * ``stop_slot``: index of a ``bool`` scalar in the carry; the loop also ends once it is
        true (checked on the device before every iteration, no host sync).
    """

    def __init__(self, body: Callable[[list], list], name: str, stop_slot: int | None = None):
        self.body = body
        self.name = name
        self.stop_slot = stop_slot
        self._plans: dict[Any, tuple] = {}

    @property
    def captures(self) -> int:
        """How many distinct loops were traced (one per trip count, carry signature, set of
        invariant tensors and autocast state)."""
        return len(self._plans)

    def __call__(
        self, carry: Sequence[torch.Tensor], n: int, invariants: Sequence[torch.Tensor] = ()
    ) -> torch.Tensor:
        import torch_xla

        carry, invariants = list(carry), list(invariants)
        # The autocast state is traced into the body (bf16 matmuls under PPO's rollouts).
        key = (int(n), tuple((tuple(t.shape), t.dtype) for t in carry),
               tuple(id(t) for t in invariants),
               torch.is_autocast_enabled("xla") and torch.get_autocast_dtype("xla"))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._capture(carry, invariants, int(n))
        computation, invariant_slots, frozen = plan
        xlac = torch_xla._XLAC
        args = carry + [invariants[j] for j in invariant_slots] + frozen
        for t in carry:
            xlac._set_buffer_donation(t, True)
        results = xlac._xla_user_computation(f"xla::{self.name}", args, computation)
        for t, r in zip(carry, results[1:]):
            t.copy_(r)
        steps = results[0]
        # Launch now (asynchronously), donating the carry's buffers to the loop's outputs so
        # that XLA updates them in place (a KV cache is not copied). The donation is asked for
        # explicitly (buffer-donor config, a non-step-marker sync of just these tensors): the
        # step marker's own in-place aliasing depends on which tensor last wrapped each buffer,
        # which the capture changes, so the first call would compile a different graph.
        saved = (xlac._xla_get_enable_alias_with_buffer_donor_config(),
                 xlac._get_current_graph_name())
        xlac._xla_set_enable_alias_with_buffer_donor_config(True)
        xlac._set_current_graph_name(self.name)
        try:
            xlac._xla_sync_multi(carry + [steps], [], wait=False, sync_xla_data=False)
        finally:
            xlac._xla_set_enable_alias_with_buffer_donor_config(saved[0])
            xlac._set_current_graph_name(saved[1])
        return steps

    def _capture(self, carry: list, invariants: list, n: int) -> tuple:
        import torch_xla
        import torch_xla.core.xla_builder as xb

        xlac = torch_xla._XLAC
        for what, ts in (("carry", carry), ("invariants", invariants)):
            pending = [i for i, p in enumerate(xlac._check_tensor_need_materialization(ts)) if p]
            if pending:
                raise ValueError(
                    f"DeviceLoop({self.name}): {what} {pending} hold un-executed operations; "
                    "call runtime.sync() first (loop inputs must be device data)"
                )
        # The body is traced on clones of shadows (new tensors over the carry's device
        # buffers): in-place updates inside the body (a StaticCache write) leave the shadows
        # plain device data, which identifies each body parameter, and nothing of the capture
        # lingers on the carry tensors themselves (clone() annotates its source; on the carry
        # that would make the first call's graph hash differ from later calls').
        # Deliberate wait, once per capture: reading a device buffer's bookkeeping while the
        # graph producing it still runs races with the runtime filling it in (a segfault was
        # seen with sharded placeholders on a 4-device mesh).
        wait()
        ids, shadows = xlac._get_tensors_xla_device_data_node(carry)
        if len(set(ids)) != len(carry):
            raise ValueError(f"DeviceLoop({self.name}): two carry tensors share a buffer")
        allowed = xlac._get_allow_execution()
        xlac._set_allow_execution(False)  # a host sync inside the body raises
        try:
            out = list(self.body([t.clone() for t in shadows]))
        finally:
            xlac._set_allow_execution(allowed)
        got = [(tuple(t.shape), t.dtype) for t in out]
        want = [(tuple(t.shape), t.dtype) for t in carry]
        if got != want:
            raise ValueError(
                f"DeviceLoop({self.name}): body returned {got}, expected the carry's {want}"
            )
        ctx = xlac.lowering.LoweringContext()
        ctx.set_name_string(f"{self.name}_body")
        ctx.build(out)
        del out  # pending IR: must not be executed by the next sync
        body = xb.computation_from_module_proto(f"{self.name}_body", ctx.hlo())
        params = ctx.device_parameter_id_tensor_mapping()  # body parameter id -> its value
        k = len(carry)
        # Loop-tuple position of every body parameter: [counter, carry..., invariants...,
        # frozen...]; invariants and frozen values ride along unchanged.
        where: dict[int, int] = {}
        for c, t in enumerate(shadows):
            pid = ctx.tensor_parameter_id(t)
            if pid >= 0:
                where[pid] = 1 + c
        invariant_slots = []
        for j, t in enumerate(invariants):
            pid = ctx.tensor_parameter_id(t)
            if pid >= 0 and pid not in where:
                where[pid] = 1 + k + len(invariant_slots)
                invariant_slots.append(j)
        frozen_ids = sorted(set(params) - set(where))
        for pid in frozen_ids:
            where[pid] = 1 + k + len(invariant_slots) + frozen_ids.index(pid)
        frozen = [params[pid] for pid in frozen_ids]
        args = carry + [invariants[j] for j in invariant_slots] + frozen
        n_body_params = len(params)
        stop = None if self.stop_slot is None else 1 + self.stop_slot

        def loop_body(*el: Any) -> list:
            r = xb.Op.call(body, [el[where[p]] for p in range(n_body_params)])
            new = [r.get_tuple_element(i) for i in range(k)]
            return [el[0] + el[0].scalar_like(1), *new, *el[1 + k:]]

        def loop_cond(*el: Any) -> Any:
            go = el[0] < el[0].scalar_like(n)
            return go if stop is None else go & el[stop].__not__()

        builder = xb.create_builder(self.name)
        ops = [xb.mkparam(builder, i, s) for i, s in enumerate(xb.tensor_shape(args))]
        counter = xb.Op.scalar(builder, 0, dtype=xb.Type.S64)
        loop = xb.Op.tuple([counter, *ops]).while_loop(loop_cond, loop_body)
        root = xb.Op.tuple([loop.get_tuple_element(i) for i in range(1 + k)])
        return root.build(self.name), invariant_slots, frozen


# ----------------------------------------------------------------------------------------
# Device memory (the start-up memory check)
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
