"""Graphs: compiled steps, graph cuts (sync), waiting for the device, and
:class:`DeviceLoop` (a loop that runs on the device as one XLA ``While``)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchxla_rlhf.runtime.readback import _READER


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
    from torchxla_rlhf.runtime._xlac import xlac

    checked = torch_xla.compile(fn, full_graph=full_graph, name=name)

    def run(*args: Any, **kwargs: Any) -> Any:
        # One bool per live XLA tensor (C++ walk; microseconds for thousands of tensors).
        if any(xlac._check_device_tensor_need_materialization("")):
            return checked(*args, **kwargs)
        return _trace_then_launch(fn, full_graph, name, args, kwargs)

    return run


def _trace_then_launch(
    fn: Callable, full_graph: bool, name: str | None, args: tuple, kwargs: dict
) -> Any:
    """``torch_xla.compile``'s body without its opening sync: trace ``fn`` (a host sync raises
    if ``full_graph``), then launch the graph asynchronously."""
    import torch_xla
    from torchxla_rlhf.runtime._xlac import xlac

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
    trace nothing. (torch_xla's own ``while_loop``/``fori_loop`` wrappers cannot hold a
    model in 2.9; ``generation.py`` says why.)

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
        self, carry: Sequence[torch.Tensor], n: int, invariants: Sequence[torch.Tensor] = (),
        invariants_key: Any = None,
    ) -> torch.Tensor:
        """``invariants_key``: when given, the loop is cached by it (and the invariants'
        shapes and dtypes) instead of by the invariant tensors' identities, so a later call
        may pass NEW tensors in the same positions (a rollout's weight copy, made anew every
        rollout) and traces nothing; they must have the same shapes, dtypes and shardings."""
        from torchxla_rlhf.runtime._xlac import xlac

        carry, invariants = list(carry), list(invariants)
        inv = (tuple(id(t) for t in invariants) if invariants_key is None else
               (invariants_key, tuple((tuple(t.shape), t.dtype) for t in invariants)))
        # The autocast state is traced into the body (bf16 matmuls under PPO's rollouts).
        key = (int(n), tuple((tuple(t.shape), t.dtype) for t in carry), inv,
               torch.is_autocast_enabled("xla") and torch.get_autocast_dtype("xla"))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._capture(carry, invariants, int(n))
        computation, invariant_slots, frozen = plan
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
        import torch_xla.core.xla_builder as xb
        from torchxla_rlhf.runtime._xlac import xlac

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
        allowed, cast_cache = xlac._get_allow_execution(), torch.is_autocast_cache_enabled()
        xlac._set_allow_execution(False)  # a host sync inside the body raises
        # Autocast caches its bf16 casts of trainable weights for the whole autocast region;
        # casts made earlier (by the prefill) are device data by now, and the body would
        # freeze them as constants: a later call would decode with the capture's weights.
        torch.set_autocast_cache_enabled(False)
        try:
            out = list(self.body([t.clone() for t in shadows]))
        finally:
            xlac._set_allow_execution(allowed)
            torch.set_autocast_cache_enabled(cast_cache)
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
