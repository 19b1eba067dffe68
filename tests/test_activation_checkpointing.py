"""Activation checkpointing whose recompute waits for the backward's gradient: the same loss
and gradients, bit for bit, as torch_xla's own checkpoint, and the recompute really runs on
gradient-dependent inputs and parameters (what keeps a compiler from merging it with the
forward)."""

from functools import partial

import pytest
import torch
import torch_xla.utils.checkpoint as xla_checkpoint

from torchxla_rlhf import runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.sections import ModelConfig
from torchxla_rlhf.runtime.numerics import negative_zero_from


@pytest.fixture(scope="module")
def mesh():
    return runtime.make_mesh("1,1,1")


def _loss_and_grads(model, ids, mask):
    loss = llama.causal_lm_logits(model, ids, mask).float().logsumexp(-1).mean()
    loss.backward()
    runtime.sync()  # one graph for the loss and all gradients
    return runtime.to_cpu(loss), {n: runtime.to_cpu(p.grad) for n, p in model.named_parameters()}


def test_same_bits_as_torch_xla_checkpoint(mesh):
    dev = runtime.device()
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(3)).to(dev)
    mask = torch.ones_like(ids)
    plain = llama.load_causal_lm(ModelConfig(compute_dtype="float32"), mesh)
    plain._set_gradient_checkpointing(
        enable=True, gradient_checkpointing_func=partial(xla_checkpoint.checkpoint, use_reentrant=True))
    ours = llama.load_causal_lm(
        ModelConfig(compute_dtype="float32", gradient_checkpointing=True), mesh)
    loss_plain, grads_plain = _loss_and_grads(plain, ids, mask)
    loss_ours, grads_ours = _loss_and_grads(ours, ids, mask)
    assert torch.equal(loss_ours, loss_plain)
    assert grads_ours.keys() == grads_plain.keys()
    for name, g in grads_plain.items():
        assert torch.equal(grads_ours[name], g), name
    assert grads_ours["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_recompute_reads_gradient_dependent_inputs_and_weights(mesh):
    """The forward runs on ``p + z`` with ``z`` from the layer's input (no gradient), the
    backward's recompute on ``p + z`` with ``z`` from the incoming gradient (gradients flow
    to ``p``), and every parameter is put back afterwards."""
    model = llama.load_causal_lm(
        ModelConfig(compute_dtype="float32", gradient_checkpointing=True), mesh)
    layer = model.model.layers[0]
    weight = layer.self_attn.q_proj.weight
    seen = []
    hook = layer.self_attn.q_proj.register_forward_pre_hook(
        lambda m, args: seen.append((m.weight is weight, m.weight.requires_grad)))
    ids = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(4)).to(runtime.device())
    try:
        llama.causal_lm_logits(model, ids, torch.ones_like(ids)).float().sum().backward()
    finally:
        hook.remove()
    runtime.sync()
    assert seen == [(False, False), (False, True)]  # the forward, then the recompute
    assert layer.self_attn.q_proj.weight is weight
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_negative_zero_is_negative_zero_whatever_the_source():
    for source in ([3.0, -7.0], [-2.0], [float("nan"), 1.0], [float("inf")], [0.0]):
        z = negative_zero_from(torch.tensor(source))
        assert z.item() == 0.0 and torch.signbit(z), source
    x = torch.tensor([0.0, -0.0, 1.5, -2.25, float("inf")])
    assert torch.equal(torch.signbit(x + z), torch.signbit(x)) and torch.equal(x + z, x)


def test_frozen_model_gives_the_same_bits(mesh):
    """A frozen model's layers gather their weights per layer (``p + z``): the logits equal
    those of the same weights without the hooks."""
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(5)).to(runtime.device())
    mask = torch.ones_like(ids)
    plain = llama.load_causal_lm(ModelConfig(compute_dtype="float32"), mesh).eval()
    frozen = llama.freeze(llama.load_causal_lm(ModelConfig(compute_dtype="float32"), mesh))
    with torch.no_grad():
        want = runtime.to_cpu(llama.causal_lm_logits(plain, ids, mask))
        got = runtime.to_cpu(llama.causal_lm_logits(frozen, ids, mask))
    assert torch.equal(got, want)


def test_a_checkpointed_step_with_a_frozen_reference_compiles_once(mesh):
    """The hooks are trace-time only: once the optimizer holds its state (step 2; step 1 runs
    without gradients from before), the step's graph is never compiled again."""
    from torchxla_rlhf.configs.sections import AdamWConfig
    from torchxla_rlhf.algos.optim import AdamW, Schedule

    cfg = ModelConfig(compute_dtype="float32", gradient_checkpointing=True)
    policy = llama.load_causal_lm(cfg, mesh).train()
    reference = llama.freeze(llama.load_causal_lm(cfg, mesh), cfg, mesh)
    opt = AdamW(policy.parameters(), AdamWConfig(), Schedule(1e-3, 1e-3, 0, 10, decay=False))

    def step(ids, mask):
        with torch.no_grad():
            ref = llama.causal_lm_logits(reference, ids, mask).float().logsumexp(-1)
        (llama.causal_lm_logits(policy, ids, mask).float().logsumexp(-1) - ref).mean().backward()
        return opt.step()

    compiled = runtime.compile(step, name="checkpointed_step")
    gen = torch.Generator().manual_seed(6)
    for i in range(4):
        ids = torch.randint(3, 250, (2, 12), generator=gen).to(runtime.device())
        compiled(ids, torch.ones_like(ids))
        runtime.sync()
        if i == 1:
            after_first = runtime.compile_count()
    assert runtime.compile_count() == after_first
