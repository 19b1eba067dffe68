"""Graph capture: trace a run's graphs at full width without memory and without running them.

Inside :class:`GraphCapture` every graph launch (the step marker of ``runtime.sync`` and
``runtime.compile``, the :class:`~torchxla_rlhf.runtime.graphs.DeviceLoop` launch) records the
graph's HLO module instead of executing it: what the compiler of another device (the TPU
compiler, ``preflight/tpu_compiler.py``) needs to compile the same program. Weights, optimizer
state and every graph's results are *placeholders*: device data of the right shape and dtype
that holds no buffer (``xla_builder.create_placeholder_tensor``), so a 13B-wide layer costs the
host nothing. Placeholders carry no sharding of their own in torch_xla 2.9 (marking one needs
its data); each remembers the sharding it stands for, and a recorded graph lists it per entry
parameter, for the compiling side to set on the module's arguments
(:attr:`CapturedGraph.arg_shardings`).

What a launch records is what torch_xla would compile at that point: every live XLA tensor
with pending operations (the step marker) or the given tensors (``_xla_sync_multi``). Each
of them is then replaced by a placeholder, so the next graph takes it as an input parameter,
as it would take the executed buffer. A result that updated a placeholder in place (a
parameter after the optimizer step, the KV cache after the decode loop) is listed as donated
(:attr:`CapturedGraph.donors`): torch_xla aliases such an input to its output.

Nothing may read a value inside a capture (``.item()``, a host copy): placeholders hold none.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from torchxla_rlhf.runtime.mesh import MeshInfo, PartitionSpec, mark_sharding


@dataclass
class CapturedGraph:
    """One graph a capture recorded."""

    name: str
    hlo: bytes
    """Serialized ``HloModuleProto`` (torch_xla's SPMD module before partitioning)."""
    arg_shardings: dict[int, str] = field(default_factory=dict)
    """Entry parameter -> HLO sharding (``{devices=[...]...}``) of the placeholder it reads."""
    donors: list[int] = field(default_factory=list)
    """Entry parameters whose buffers the graph updates in place (donated to an output)."""


class GraphCapture:
    """Record graphs instead of running them (module docstring). Use as a context manager;
    make weights and state with :meth:`placeholder`; read :attr:`graphs` afterwards."""

    def __init__(self, mesh: MeshInfo):
        self.mesh = mesh
        self.graphs: list[CapturedGraph] = []
        self._known: dict[int, tuple[Any, torch.Tensor, str]] = {}
        """``id`` of a tensor -> (the tensor, its data-node shadow, its sharding text)."""
        self._spec_text: dict[tuple, str] = {}
        self._saved: tuple | None = None

    # -- placeholders ---------------------------------------------------------------------

    def sharding_text(self, spec: PartitionSpec | None, rank: int) -> str:
        """The HLO sharding a partition spec gives on the mesh (``""``: replicated), read from
        a small real tensor marked with it (the mesh's own device order, as torch_xla
        computes it)."""
        from torchxla_rlhf.runtime._xlac import xlac

        if spec is None or all(a is None for a in spec):
            return ""
        key = (tuple(spec), rank)
        if key not in self._spec_text:
            sizes = self.mesh.sizes

            def ways(axes: Any) -> int:
                if axes is None:
                    return 1
                axes = axes if isinstance(axes, tuple) else (axes,)
                out = 1
                for a in axes:
                    out *= sizes[a]
                return out

            probe = torch.zeros([ways(a) for a in spec], device="xla")
            mark_sharding(probe, self.mesh, spec)
            self._spec_text[key] = xlac._get_xla_sharding_spec(probe)
            del probe
        return self._spec_text[key]

    def placeholder(self, shape: Sequence[int], dtype: torch.dtype,
                    spec: PartitionSpec | None = None) -> torch.Tensor:
        """A tensor of ``shape`` and ``dtype`` with no buffer, standing for one sharded
        ``spec`` over the mesh (``None``: replicated)."""
        import torch_xla.core.xla_builder as xb

        t = xb.create_placeholder_tensor(tuple(shape), dtype)
        self._register(t, self.sharding_text(spec, len(shape)))
        return t

    def placeholder_like(self, tensor: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
        """A placeholder of ``tensor``'s shape and dtype with the sharding of ``like`` (a
        tensor this capture made; default ``tensor`` itself)."""
        t = self._blank(tensor)
        self._register(t, self.sharding_of(like if like is not None else tensor))
        return t

    def sharding_of(self, tensor: torch.Tensor) -> str:
        """The sharding ``tensor`` has or stands for (``""``: replicated)."""
        from torchxla_rlhf.runtime._xlac import xlac

        known = self._known.get(id(tensor))
        annotated = xlac._get_xla_sharding_spec(tensor)
        return annotated or (known[2] if known is not None else "")

    def _blank(self, like: torch.Tensor) -> torch.Tensor:
        import torch_xla.core.xla_builder as xb

        return xb.create_placeholder_tensor(tuple(like.shape), like.dtype)

    def adopt(self, t: torch.Tensor, text: str) -> torch.Tensor:
        """Track ``t`` (device data, e.g. an ``nn.Parameter`` over a placeholder) as standing
        for the sharding ``text``; returns it."""
        self._register(t, text)
        return t

    def _register(self, t: torch.Tensor, text: str) -> None:
        from torchxla_rlhf.runtime._xlac import xlac

        _, shadows = xlac._get_tensors_xla_device_data_node([t])
        self._known[id(t)] = (t, shadows[0], text)

    # -- launches -------------------------------------------------------------------------

    def __enter__(self) -> "GraphCapture":
        from torchxla_rlhf.runtime._xlac import xlac

        self._saved = (xlac._xla_step_marker, xlac._xla_sync_multi, xlac._xla_mark_sharding)
        mark = xlac._xla_mark_sharding

        def mark_sharding(t: torch.Tensor, op_sharding: Any) -> None:
            # A placeholder has no data to reshard: it keeps standing for the sharding it was
            # made with (re-annotating a weight with its own spec: models.freeze).
            if id(t) in self._known and not xlac._check_tensor_need_materialization([t])[0]:
                return
            mark(t, op_sharding)

        def step_marker(*args: Any, **kwargs: Any) -> None:
            self.record(live_xla_tensors())

        def sync_multi(tensors: Sequence[torch.Tensor], *args: Any, **kwargs: Any) -> None:
            self.record(list(tensors))

        xlac._xla_step_marker, xlac._xla_sync_multi = step_marker, sync_multi
        xlac._xla_mark_sharding = mark_sharding
        return self

    def __exit__(self, *exc: Any) -> None:
        from torchxla_rlhf.runtime._xlac import xlac

        xlac._xla_step_marker, xlac._xla_sync_multi, xlac._xla_mark_sharding = self._saved

    def record(self, tensors: Sequence[torch.Tensor], name: str | None = None) -> CapturedGraph | None:
        """Record the graph that computes the pending ones of ``tensors``, then replace each
        by a placeholder (module docstring). Returns the graph (None: nothing pending)."""
        from torchxla_rlhf.runtime._xlac import xlac

        # Python tensors that share one XLA tensor (a Parameter over a placeholder) are one
        # result, and each of them is replaced below.
        groups: dict[int, list[torch.Tensor]] = {}
        flags = xlac._check_tensor_need_materialization(list(tensors)) if tensors else []
        for t, p in zip(tensors, flags):
            if p:
                group = groups.setdefault(xlac._xla_get_tensor_id(t), [])
                if all(o is not t for o in group):
                    group.append(t)
        pending = [g[0] for g in groups.values()]
        if not pending:
            return None
        name = name or xlac._get_current_graph_name() or f"graph_{len(self.graphs)}"
        ctx = xlac.lowering.LoweringContext()
        ctx.set_name_string(name)
        ctx.build(pending)
        graph = CapturedGraph(name, ctx.hlo())
        for _, shadow, text in self._known.values():
            pid = ctx.tensor_parameter_id(shadow)
            if pid >= 0 and text:
                graph.arg_shardings[pid] = text
        for group in groups.values():
            for t in group:
                known = self._known.get(id(t))
                pid = ctx.tensor_parameter_id(known[1]) if known is not None else -1
                if pid >= 0:
                    graph.donors.append(pid)
                    break
        del ctx
        for group in groups.values():
            text = next((x for x in map(self.sharding_of, group) if x), "")
            for t in group:
                xlac._replace_xla_tensor(t, self._blank(t))
                self._register(t, text)
        self.graphs.append(graph)
        return graph


def live_xla_tensors() -> list[torch.Tensor]:
    """Every live tensor on the XLA device (what a step marker would look at)."""
    return [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == "xla"]
