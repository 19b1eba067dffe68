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


def read_scalars_after_step(
    values: Mapping[str, Any], callback: Callable[[dict[str, float]], None]
) -> None:
    """Hand ``callback`` the host floats of ``values`` once the current graph has run, without
    blocking the caller (the callback runs on this thread at a later :func:`sync` or
    :func:`wait`).

    ``values``: name -> a scalar device tensor, a Python number, or a list/tuple of those (one
    per micro-batch or update: the mean is reported). All device tensors are copied in ONE
    batched transfer on a background thread (instead of one blocking ``.item()`` per value
    per micro-batch: ~200 reads per PPO step at the 13B shapes), after the graph that
    computes them was launched. The tensors must not hold pending operations when the graph
    is launched: call this after the step's sync, or before the next one (the copy is queued
    by a step closure that runs right after the next sync's launch).
    """
    names: list[str] = []
    groups: list[list[Any]] = []
    for name, v in values.items():
        names.append(name)
        groups.append(list(v) if isinstance(v, (list, tuple)) else [v])
    tensors = [x for g in groups for x in g if isinstance(x, torch.Tensor)]

    def finish(host: list[torch.Tensor]) -> None:
        it = iter(host)
        floats = {}
        for name, g in zip(names, groups):
            xs = [float(next(it)) if isinstance(x, torch.Tensor) else float(x) for x in g]
            floats[name] = sum(xs) / max(len(xs), 1)
        callback(floats)

    def enqueue() -> None:
        _READER.submit(tensors, finish)

    if tensors and tensors[0].device.type == "xla":
        add_step_closure(enqueue)
    else:
        finish([t.detach().cpu() for t in tensors])


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


class GraphReplay:
    """Trace a function of XLA tensors once, then re-run its compiled graph on new inputs of
    the same shapes and shardings without running the Python code again.

    Why: lazy-tensor tracing re-runs every Python op of the model at every call (about 3 ms
    per LLaMA layer here), so a one-token decode step traced per token costs the host
    ``tokens x layers``. Replaying the cached executable costs one ``_run_cached_graph`` call.
    This is the mechanism torch_xla's dynamo bridge uses (``extract_graph_helper``:
    ``_get_graph_hash`` + ``_get_tensors_xla_device_data_node`` + ``_run_cached_graph``),
    without dynamo. (``torch_xla.experimental.scan`` / ``while_loop`` were tried first, see
    ``generation.py``.)

    Contract: ``fn(inputs) -> outputs``, flat lists of XLA tensors. On the first call (the
    capture) ``fn`` is traced with execution disallowed (a host sync inside raises, as
    ``full_graph=True`` does), then launched asynchronously. Inputs ``fn`` modifies in place
    must be among its outputs (the same objects); on a replay they receive the new values
    (``_replace_xla_tensor``), as the in-place op would have given them. Anything ``fn`` reads
    that is not in ``inputs`` (weights, constants) is frozen at its capture-time value: keep one
    instance per period in which those do not change (one rollout).

    Every call dispatches without waiting for the previous graph's result; the runtime
    launches it once the device is free (each launch takes the device lock).
    """

    def __init__(self, fn: Callable[[list], list], name: str, write_back: bool = True) -> None:
        """``write_back=False``: on replays, inputs updated in place are NOT updated; their
        outputs are new tensors and the old input tensors must not be used again (their
        buffers were donated). Saves one ``_replace_xla_tensor`` per such input per call, for
        a caller that threads the outputs into the next call (a decode loop's KV cache). The
        capture always writes back (the traced in-place ops must be resolved)."""
        self.fn = fn
        self.name = name
        self.write_back = write_back
        self._plan: Any = None

    @property
    def captured(self) -> bool:
        return self._plan is not None

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        inputs = list(inputs)
        if self._plan is None:
            return self._capture(inputs)
        return self._replay(inputs)

    def _capture(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch_xla

        xlac = torch_xla._XLAC
        pending = [i for i, p in enumerate(xlac._check_tensor_need_materialization(inputs)) if p]
        if pending:
            raise ValueError(
                f"GraphReplay({self.name}): inputs {pending} hold un-executed operations; "
                "call runtime.sync() first (graph inputs must be device data)"
            )
        slot_of = {xlac._xla_get_tensor_id(t): i for i, t in enumerate(inputs)}
        allowed = xlac._get_allow_execution()
        xlac._set_allow_execution(False)  # a host sync inside fn raises
        try:
            outputs = list(self.fn(inputs))
        finally:
            xlac._set_allow_execution(allowed)
        mutated = xlac._check_tensor_need_materialization(inputs)
        out_ids = {id(o) for o in outputs}
        lost = [i for i, m in enumerate(mutated) if m and id(inputs[i]) not in out_ids]
        if lost:
            raise ValueError(
                f"GraphReplay({self.name}): fn modified inputs {lost} in place without "
                "returning them; a replay would lose those updates"
            )
        input_pos = {id(t): i for i, t in enumerate(inputs)}
        needs = xlac._check_tensor_need_materialization(outputs)
        roots: list[torch.Tensor] = []
        root_pos: dict[int, int] = {}
        sources: list[tuple[str, Any]] = []  # per output: ("root", k) | ("input", i) | ("const", t)
        for out, need in zip(outputs, needs):
            if need:
                if id(out) not in root_pos:
                    root_pos[id(out)] = len(roots)
                    roots.append(out)
                sources.append(("root", root_pos[id(out)]))
            elif id(out) in input_pos:
                sources.append(("input", input_pos[id(out)]))
            else:
                sources.append(("const", out))
        ids, values = xlac._get_tensors_xla_device_data_node(roots)
        # Graph parameter j is input slot_of[id] when it is one of `inputs`, else a value frozen
        # now (a weight, a traced constant).
        params = [slot_of.get(tid, value) for tid, value in zip(ids, values)]
        write_back = [(input_pos[id(r)], k) for k, r in enumerate(roots) if id(r) in input_pos]
        # Inputs updated in place (a KV cache) donate their buffers, so that XLA updates them
        # in place instead of copying them every call (what a step-marker sync does for
        # in-place updates by itself; here the donation must be asked for).
        donated = {i for i, _ in write_back}
        for j, p in enumerate(params):
            if isinstance(p, int) and p in donated:
                xlac._set_buffer_donation(values[j], True)
        # Compile under the hash `_run_cached_graph` looks up (a plain sync caches the same
        # graph under another key), then run this first call through the replay path too: the
        # traced values of every parameter, inputs included, are `values` (in-place updates
        # traced on an input leave its original data in the graph's device-data node).
        saved = xlac._xla_get_enable_alias_with_buffer_donor_config()
        xlac._xla_set_enable_alias_with_buffer_donor_config(True)
        try:
            graph_hash = xlac._get_graph_hash(roots)
            xlac._xla_warm_up_cache(roots, [])
        finally:
            xlac._xla_set_enable_alias_with_buffer_donor_config(saved)
        self._plan = (graph_hash, params, sources, write_back)
        return self._launch(list(values), inputs, True)

    def _replay(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch_xla

        _, params, _, write_back = self._plan
        for i, _ in write_back:
            torch_xla._XLAC._set_buffer_donation(inputs[i], True)
        args = [inputs[p] if isinstance(p, int) else p for p in params]
        return self._launch(args, inputs, self.write_back)

    def _launch(
        self, args: list[torch.Tensor], inputs: list[torch.Tensor], write_back: bool
    ) -> list[torch.Tensor]:
        """Run the cached executable on ``args`` (asynchronously), write in-place results back
        into their input tensors (if ``write_back``) and assemble the outputs in ``fn``'s
        order."""
        import torch_xla

        graph_hash, _, sources, updated = self._plan
        results = list(torch_xla._XLAC._run_cached_graph(graph_hash, args))
        for i, k in updated if write_back else ():
            torch_xla._XLAC._replace_xla_tensor(inputs[i], results[k])
            results[k] = inputs[i]
        return [
            results[ref] if kind == "root" else inputs[ref] if kind == "input" else ref
            for kind, ref in sources
        ]
