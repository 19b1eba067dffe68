"""Reading results back without stalling the loop: metrics packed into one vector per graph,
copied to the host by a background thread after the graph runs, host closures, and the
compilation / host-sync / CPU-fallback counters the tests assert on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


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
        from torchxla_rlhf.runtime._xlac import xlac

        while True:
            tensors, callback = self._queue.get()
            try:
                host: Any = xlac._xla_get_cpu_tensors(tensors) if tensors else []
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


def compile_count() -> int:
    """Number of XLA compilations so far in this process (``CompileTime`` samples)."""
    data = metric_data("CompileTime")
    return int(data[0]) if data else 0


def host_sync_count() -> int:
    """Number of ``.item()``-style transfers of a device scalar to the host so far."""
    import torch_xla.debug.metrics as met

    return int(met.counter_value("aten::_local_scalar_dense") or 0)


def metric_data(name: str) -> tuple | None:
    """torch_xla's debug metric ``name`` (``CompileTime``, ``ExecuteTime``,
    ``TensorsGraphSize``...) as ``(samples, accumulated, recent samples)``, or None if it was
    never recorded. Times are in nanoseconds."""
    import torch_xla.debug.metrics as met

    return met.metric_data(name)


def cpu_fallback_counts() -> dict[str, int]:
    """Operators that fell back to the CPU (``aten::*`` counters), with their counts."""
    import torch_xla.debug.metrics as met

    return {
        name: int(met.counter_value(name))
        for name in met.counter_names()
        if name.startswith("aten::")
    }
