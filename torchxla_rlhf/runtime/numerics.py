"""Numerics on the device: autocast, the device RNG seed, activation checkpointing."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch


def negative_zero_from(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim fp32 ``-0.0`` that the compiler sees as computed from ``t``: ``-(|s| * 0)``
    with ``s`` the largest entry of ``t`` (0 where that is not finite). ``x + (-0.0) == x``
    bit for bit for every ``x`` (``-0.0`` and NaN included), and XLA does not fold ``y * 0``
    for floats (NaN), so whatever is computed from ``x + z`` must wait for ``t`` and cannot
    be merged with the same computation on ``x``. Costs one max over ``t`` (and over the
    devices it is sharded on)."""
    s = t.detach().max().float()
    return -(torch.where(torch.isfinite(s), s, torch.zeros_like(s)).abs() * 0.0)


@contextlib.contextmanager
def parameters_plus(module: torch.nn.Module | None, zero: torch.Tensor):
    """Within the block, every parameter ``p`` of ``module`` (and its submodules) reads as
    ``p + zero``: with ``zero`` from :func:`negative_zero_from` the same bits, computed after
    ``zero``'s source, so that under FSDP the weights' all-gathers are new ones, made then.
    Gradients flow through the add to ``p`` unchanged; the parameters are put back after."""
    slots = [] if module is None else [
        (m, name, p) for m in module.modules() for name, p in m._parameters.items() if p is not None]
    try:
        for m, name, p in slots:
            m._parameters[name] = p + zero.to(p.dtype)
        yield
    finally:
        for m, name, p in slots:
            m._parameters[name] = p


def gather_weights_per_layer(layers) -> list:
    """Make each of ``layers`` (decoder layers; their first positional input is the hidden
    state) run on ``p + z`` for its parameters, ``z`` from :func:`negative_zero_from` of its
    input: under FSDP a compiler is then unable to issue every layer's weight all-gathers at the
    top of the graph (XLA:CPU's scheduler does, so a device held the whole model over ``mp``),
    each layer is gathered when its input is ready. The same bits; costs one max over the
    layer's input and one add over its weight shards. Returns the hook handles."""
    entered: dict = {}

    def before(layer: torch.nn.Module, args: tuple) -> None:
        block = parameters_plus(layer, negative_zero_from(args[0]))
        block.__enter__()
        entered[layer] = block

    def after(layer: torch.nn.Module, args: tuple, output) -> None:
        block = entered.pop(layer, None)
        if block is not None:
            block.__exit__(None, None, None)

    handles = []
    for layer in layers:
        handles.append(layer.register_forward_pre_hook(before))
        handles.append(layer.register_forward_hook(after, always_call=True))
    return handles


def _module_of(function: Callable) -> torch.nn.Module | None:
    """The module a checkpointed callable runs: a bound method's owner, or the module a
    ``functools.partial`` passes first (HF's ``partial(forward, layer, **kwargs)``)."""
    owner = getattr(function, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return owner
    args = getattr(function, "args", ())
    if args and isinstance(args[0], torch.nn.Module):
        return args[0]
    return _module_of(function.func) if hasattr(function, "func") else None


class _GradientTap(torch.autograd.Function):
    """Identity on a checkpointed layer's output whose backward hands the incoming gradient
    to the layer's recompute (which runs right after it) before passing it on unchanged."""

    @staticmethod
    def forward(ctx, cell: dict, x: torch.Tensor) -> torch.Tensor:
        ctx.cell = cell
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.cell["zero"] = negative_zero_from(grad)
        return None, grad


def _recompute_after_gradient(checkpoint: Callable) -> Callable:
    """``checkpoint`` whose backward recompute cannot merge with the original forward.

    torch_xla's checkpoint keeps the two apart with optimization barriers, and a compiler may
    drop them (XLA:CPU does, before it schedules): the recompute is then the forward's own
    common subexpression, every layer's activations stay alive until backward, and
    checkpointing saves nothing. Here the recompute runs on ``x + z`` for every floating
    tensor input ``x``, with ``z = -0.0`` computed from the layer's incoming gradient
    (:func:`negative_zero_from`): the forward pass sees ``x`` as is, the values and the
    gradients are the same bits, and no pass can hoist the recompute ahead of the backward of
    the layers after it. Costs per layer: one max over the output gradient and one
    elementwise add over the layer's input and its parameters' shards.

    The layer's parameters get the same ``+ z`` during the recompute (:func:`parameters_plus`):
    otherwise the backward reuses the forward's FSDP all-gathers (one computation to a
    compiler), and every layer's gathered weights stay alive from the forward to its
    backward; with it each layer is gathered again when it is recomputed, as FSDP intends."""

    def run(function: Callable, *args, **kwargs):
        cell: dict = {}

        def replay(*inputs):
            zero = cell.pop("zero", None)
            if zero is None:  # the forward: weights wait for the layer's input
                with parameters_plus(_module_of(function), negative_zero_from(inputs[0])):
                    return function(*inputs)
            inputs = tuple(x + zero.to(x.dtype) if torch.is_tensor(x) and x.is_floating_point()
                           else x for x in inputs)
            with parameters_plus(_module_of(function), zero):
                return function(*inputs)

        out = checkpoint(replay, *args, **kwargs)
        if torch.is_tensor(out):
            return _GradientTap.apply(cell, out)
        if isinstance(out, tuple) and out and torch.is_tensor(out[0]):
            return (_GradientTap.apply(cell, out[0]),) + out[1:]
        return out

    return run


def activation_checkpoint_fn() -> Callable:
    """torch_xla's reentrant activation checkpoint (``torch.utils.checkpoint`` crashes on XLA
    tensors), for HF's gradient-checkpointing hook, with the recompute made to depend on the
    backward's incoming gradient (:func:`_recompute_after_gradient`) so that it holds
    whatever the compiler does with torch_xla's optimization barriers."""
    from functools import partial

    import torch_xla.utils.checkpoint as xla_checkpoint

    return _recompute_after_gradient(partial(xla_checkpoint.checkpoint, use_reentrant=True))


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
