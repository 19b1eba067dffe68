"""Tests for torchxla_rlhf.generation: sampling math on fixed logits, greedy equality with HF
``generate`` (early-eos rows included), seeds, compilation/host-sync counts on XLA:CPU, and a
4-device (1,2,2) mesh in a subprocess."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.sections import TinyModelConfig
from torchxla_rlhf.generation import (
    GenerationOutput,
    Generator,
    SamplingConfig,
    additive_mask,
    gumbel_noise,
    hash_uniform,
    prefill_mask,
    process_logits,
    sample_next_token,
)
from torchxla_rlhf.models.llama import tiny_llama_config
from torchxla_rlhf.algos.rl import position_ids_from_mask

EOS, PAD = 2, 0
REPO = Path(__file__).resolve().parents[1]


def tiny_config() -> transformers.LlamaConfig:
    cfg = tiny_llama_config(TinyModelConfig(max_position_embeddings=512), pad_token_id=PAD)
    cfg._attn_implementation = "eager"
    return cfg


def tiny_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    """The tiny model, seeded, with q/k projections scaled up x8: at the default init
    (std 0.02) attention is nearly uniform, so wrong positions or masks would go unnoticed."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def left_padded(lengths: list[int], pl: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts (ids 3..319) of the given lengths, left-padded to ``pl``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), pl), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), pl, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, pl - n :] = torch.randint(3, 320, (n,), generator=g)
        mask[i, pl - n :] = 1
    return ids, mask


def hf_greedy(model, ids, mask, cl: int) -> torch.Tensor:
    """HF greedy continuation ``[B, CL]`` (HF stops when all rows are done: pad to CL)."""
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=cl,
        pad_token_id=PAD,
        eos_token_id=EOS,
    )[:, ids.shape[1] :]
    return torch.nn.functional.pad(out, (0, cl - out.shape[1]), value=PAD)


@pytest.fixture(scope="module")
def dev():
    return runtime.init()


@pytest.fixture(scope="module")
def eos_model():
    """Tiny model whose eos row of the LM head is 1.05 x the row of a token X that greedy
    decoding emits in some rows but not in others, so those rows now end early with eos."""
    model = tiny_model(0)
    ids, mask = left_padded([10, 7, 3, 9, 1, 5], 10, seed=1)
    cont = hf_greedy(model, ids, mask, 16)
    rows_with = {t: int((cont == t).any(dim=1).sum()) for t in cont.unique().tolist()}
    first = {
        t: int((cont == t).int().argmax(dim=1)[(cont == t).any(dim=1)].min()) for t in rows_with
    }
    candidates = [t for t, n in rows_with.items() if 1 <= n <= 3 and first[t] >= 1]
    x = min(candidates, key=lambda t: (first[t], t))
    with torch.no_grad():
        model.lm_head.weight[EOS] = 1.05 * model.lm_head.weight[x]
    return model, ids, mask


# ----------------------------------------------------------------------------------------
# Pure functions
# ----------------------------------------------------------------------------------------


def test_position_ids_and_prefill_mask():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]
    bias = prefill_mask(mask, total_len=6, dtype=torch.float32)
    assert bias.shape == (2, 1, 4, 6)
    allowed = (bias[:, 0] == 0).int().tolist()
    # row 0: keys 2,3 only, causally; pad queries 0,1 see nothing; cache slots 4,5 empty
    assert allowed[0] == [[0] * 6, [0] * 6, [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert allowed[1][3] == [1, 1, 1, 1, 0, 0] and allowed[1][0] == [1, 0, 0, 0, 0, 0]
    neg = additive_mask(torch.tensor([[[True, False]]]), torch.float32)
    assert neg.tolist() == [[[[0.0, torch.finfo(torch.float32).min]]]]


def test_hash_uniform_is_a_pure_function_of_seed_and_step():
    s, t = torch.tensor(7), torch.tensor(3)
    u = hash_uniform(s, t, 64, 1000)
    assert u.shape == (64, 1000) and u.min() > 0 and u.max() < 1
    assert torch.equal(u, hash_uniform(torch.tensor(7), torch.tensor(3), 64, 1000))
    assert not torch.equal(u, hash_uniform(torch.tensor(8), t, 64, 1000))
    assert not torch.equal(u, hash_uniform(s, torch.tensor(4), 64, 1000))
    # 64000 uniforms: mean 0.5 +- 4 sigma (sigma = sqrt(1/12/64000) = 0.00114)
    assert abs(u.mean().item() - 0.5) < 0.0046
    # decile counts: chi-square with 9 dof, 99.9% quantile 27.9
    counts = torch.histc(u, bins=10, min=0, max=1)
    chi2 = ((counts - 6400) ** 2 / 6400).sum().item()
    assert chi2 < 27.9


def _chi2(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * samples.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def test_samples_follow_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    n = 20000
    cfg = SamplingConfig(temperature=0.7, top_k=0)
    tok = sample_next_token(logits.expand(n, -1), cfg, torch.tensor(11), torch.tensor(5))
    # 8 categories -> 7 dof; 99.9% quantile of chi2(7) is 24.3
    assert _chi2(tok, torch.softmax(logits / 0.7, -1)) < 24.3
    # the same samples are far from the untempered distribution (the test has power)
    assert _chi2(tok, torch.softmax(logits, -1)) > 200


def test_top_k_never_leaves_the_top_k():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2000, 320, generator=g) * 3
    tok = sample_next_token(
        logits, SamplingConfig(temperature=1.0, top_k=5), torch.tensor(1), torch.tensor(0)
    )
    top5 = torch.topk(logits, 5).indices
    assert (top5 == tok[:, None]).any(dim=1).all()
    assert (top5[:, 1:] == tok[:, None]).any(dim=1).float().mean() > 0.2  # not just argmax


def test_process_logits_matches_hf_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 320, generator=g) * 2
    cfg = SamplingConfig(temperature=0.7, top_k=50, top_p=0.9)
    ours = process_logits(logits, cfg)
    ref = TemperatureLogitsWarper(0.7)(None, logits.clone())
    ref = TopKLogitsWarper(50)(None, ref)
    ref = TopPLogitsWarper(0.9)(None, ref)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    assert torch.allclose(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])
    assert (~torch.isinf(ours)).sum(-1).max() < 50  # top-p removed something beyond top-k


def test_top_k_candidate_path_equals_full_vocabulary_form():
    """sample_next_token works on the top-k candidates only; it must pick exactly what the
    reference form argmax(process_logits(logits) + gumbel_noise) picks."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 320, generator=g) * 2
    for cfg in (SamplingConfig(), SamplingConfig(temperature=1.3, top_k=7, top_p=0.8)):
        for step in range(3):
            s, t = torch.tensor([9]), torch.tensor(step)
            full = torch.argmax(process_logits(logits, cfg) + gumbel_noise(s, t, 64, 320), dim=-1)
            assert torch.equal(sample_next_token(logits, cfg, s, t), full)


def test_top_p_hand_computed():
    # probs 0.5, 0.3, 0.15, 0.05; ascending cumsum 0.05, 0.2, 0.5, 1.0; p=0.7 removes c <= 0.3
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    cfg = SamplingConfig(temperature=1.0, top_k=0, top_p=0.7)
    z = process_logits(logits[None], cfg)[0]
    assert torch.isinf(z).tolist() == [False, False, True, True]
    tok = sample_next_token(logits.expand(8000, -1), cfg, torch.tensor(2), torch.tensor(0))
    assert _chi2(tok[tok < 2], torch.tensor([0.625, 0.375])) < 10.8 and (tok < 2).all()


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="stop_check_every"):
        SamplingConfig(stop_check_every=-2)
    SamplingConfig(temperature=0.0, greedy=True)  # fine: greedy ignores temperature


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------


def expected_continuation_mask(cont: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first eos, 0 after."""
    eos_before = torch.cumsum((cont == EOS).long(), dim=1) - (cont == EOS).long()
    return (eos_before == 0).long()


def test_greedy_matches_hf_generate(eos_model, dev):
    model, ids, mask = eos_model
    cl = 16
    ref = hf_greedy(model, ids, mask, cl)
    ended = (ref == EOS).any(dim=1)
    assert 1 <= int(ended.sum()) <= ids.shape[0] - 2  # some rows end early, others do not
    assert ((ref == PAD).sum(dim=1) > 0).any()

    cpu_out = Generator(
        model, SamplingConfig(greedy=True), eos_token_id=EOS, pad_token_id=PAD
    ).generate(ids, mask, cl)
    assert torch.equal(cpu_out.continuation, ref)

    xla_model = copy.deepcopy(model).to(dev)
    out = Generator(
        xla_model, SamplingConfig(greedy=True), eos_token_id=EOS, pad_token_id=PAD
    ).generate(ids.to(dev), mask.to(dev), cl)
    assert isinstance(out, GenerationOutput) and out.prompt_length == 10
    seq, am, cm = out.sequences.cpu(), out.attention_mask.cpu(), out.continuation_mask.cpu()
    assert seq.shape == (6, 26) and am.shape == (6, 26) and cm.shape == (6, 16)
    assert torch.equal(seq[:, :10], ids) and torch.equal(seq[:, 10:], ref)
    assert torch.equal(cm, expected_continuation_mask(ref))
    assert torch.equal(am, torch.cat([mask, cm], dim=1))


def test_top_k_1_equals_greedy_and_seeds_reproduce(eos_model, dev):
    model, ids, mask = eos_model
    xla_model = copy.deepcopy(model).to(dev)
    x_ids, x_mask = ids.to(dev), mask.to(dev)

    def run(sampling: SamplingConfig, seed: int, m=xla_model, i=x_ids, a=x_mask) -> torch.Tensor:
        gen = Generator(m, sampling, eos_token_id=EOS, pad_token_id=PAD)
        return gen.generate(i, a, 8, seed=seed).sequences.cpu()

    greedy = run(SamplingConfig(greedy=True), 0, model, ids, mask)  # eager CPU
    assert torch.equal(run(SamplingConfig(temperature=0.7, top_k=1), 123), greedy)

    sampled = run(SamplingConfig(), 7)
    assert torch.equal(run(SamplingConfig(), 7), sampled)
    assert not torch.equal(sampled, greedy)
    # the noise is a pure function of the seed: eager CPU draws the same tokens
    assert torch.equal(run(SamplingConfig(), 7, model, ids, mask), sampled)
    assert not torch.equal(run(SamplingConfig(), 8, model, ids, mask), sampled)


def test_compile_counts_fixed_and_no_host_syncs(dev):
    """Observed: 2 graphs (prefill, decode loop) on the first call, whatever CL; then 0."""
    model = tiny_model(1).to(dev)
    gen = Generator(model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD)
    fallbacks = runtime.cpu_fallback_counts()  # process-wide counters: compare, don't assume 0
    # (B, PL) = (5, 13) is used by no other test, so no graph is cached already
    for cl, seed in ((16, 0), (64, 1)):
        ids, mask = left_padded([13, 4, 8, 1, 11], 13, seed=seed)
        c0, s0 = runtime.compile_count(), runtime.host_sync_count()
        gen.generate(ids.to(dev), mask.to(dev), cl, seed=seed)
        runtime.wait()
        assert (runtime.compile_count() - c0, runtime.host_sync_count() - s0) == (2, 0), cl
        ids2, mask2 = left_padded([2, 13, 6, 9, 3], 13, seed=seed + 10)
        x_ids, x_mask = ids2.to(dev), mask2.to(dev)
        c0 = runtime.compile_count()
        out = gen.generate(x_ids, x_mask, cl, seed=seed + 1)
        runtime.wait()
        assert (runtime.compile_count() - c0, runtime.host_sync_count() - s0) == (0, 0), cl
        assert out.sequences.shape == (5, 13 + cl)
        gen.generate(x_ids, x_mask, cl, seed=0)  # the very same input tensors again
        runtime.wait()
        assert (runtime.compile_count() - c0, runtime.host_sync_count() - s0) == (0, 0), cl
    assert runtime.cpu_fallback_counts() == fallbacks


def test_stop_check_every_stops_early(dev):
    model = tiny_model(0)
    # eos wins every step: every row ends with its first token
    model.lm_head.register_forward_hook(
        lambda m, i, o: o.index_fill(-1, torch.tensor([EOS], device=o.device), 1e4)
    )
    model.to(dev)
    ids, mask = left_padded([5, 3, 7], 7, seed=2)
    ids, mask = ids.to(dev), mask.to(dev)
    s0 = runtime.host_sync_count()
    full = Generator(model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD).generate(
        ids, mask, 20
    )
    assert runtime.host_sync_count() == s0
    early = Generator(model, SamplingConfig(stop_check_every=4), eos_token_id=EOS, pad_token_id=PAD)
    out = early.generate(ids, mask, 20)
    assert runtime.host_sync_count() == s0  # the check runs on the device
    assert int(out.decode_steps.cpu()) == 0 and int(full.decode_steps.cpu()) == 19
    assert torch.equal(out.sequences.cpu(), full.sequences.cpu())
    assert out.continuation_mask.cpu().tolist() == [[1] + [0] * 19] * 3


def test_training_mode_restored_and_no_grad(dev):
    model = tiny_model(0).to(dev).train()
    ids, mask = left_padded([4, 2], 4, seed=0)
    out = Generator(model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD).generate(
        ids.to(dev), mask.to(dev), 3
    )
    assert model.training and all(m.training for m in model.modules())
    assert not out.sequences.requires_grad


def test_bad_inputs_raise_clear_errors():
    model = tiny_model(0)
    gen = Generator(model, eos_token_id=EOS, pad_token_id=PAD)
    ids, mask = left_padded([3, 2], 4, seed=0)
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 3\)"):
        gen.generate(ids, mask[:, :3], 4)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, PL\]"):
        gen.generate(ids[0], mask[0], 4)
    with pytest.raises(ValueError, match="max_position_embeddings=512"):
        gen.generate(ids, mask, 509)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        gen.generate(ids, mask, 0)
    cfg = tiny_config()
    cfg._attn_implementation = "flex_attention"
    bad = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        Generator(bad, eos_token_id=EOS, pad_token_id=PAD)


def test_new_weights_reach_the_next_rollout(dev):
    """The decode loop takes the model's weights as inputs at every call (it is traced once),
    so an in-place weight update (an optimizer step) shows in the next rollout, with no
    recompilation and no re-trace."""
    model = tiny_model(3)
    ids, mask = left_padded([6, 2, 5], 6, seed=4)
    xla_model = copy.deepcopy(model).to(dev)
    gen = Generator(xla_model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD)
    first = gen.generate(ids.to(dev), mask.to(dev), 12, seed=2).sequences.cpu()
    with torch.no_grad():
        for m in (model, xla_model):
            m.lm_head.weight.mul_(-1.0)  # reverses every logit ranking
    runtime.sync()
    c0 = runtime.compile_count()
    second = gen.generate(ids.to(dev), mask.to(dev), 12, seed=2).sequences.cpu()
    runtime.wait()
    assert runtime.compile_count() == c0 and gen._loop.captures == 1
    ref = Generator(model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD).generate(
        ids, mask, 12, seed=2
    )
    assert torch.equal(second, ref.sequences) and not torch.equal(second, first)


def test_decode_loop_recaptured_under_autocast(dev):
    """The autocast state is traced into the decode loop, so a call under bf16 autocast gets
    its own loop (PPO's rollouts), and the plain call's loop is reused afterwards."""
    model = tiny_model(2).to(dev)
    ids, mask = left_padded([5, 3], 5, seed=6)
    ids, mask = ids.to(dev), mask.to(dev)
    gen = Generator(model, SamplingConfig(), eos_token_id=EOS, pad_token_id=PAD)
    plain = gen.generate(ids, mask, 4, seed=1).sequences.cpu()
    with torch.autocast("xla", dtype=torch.bfloat16):
        gen.generate(ids, mask, 4, seed=1)
    assert gen._loop.captures == 2
    assert torch.equal(gen.generate(ids, mask, 4, seed=1).sequences.cpu(), plain)
    assert gen._loop.captures == 2


def test_device_loop_semantics_and_checks(dev):
    """carry = body(carry) n times in one XLA While: results equal the Python loop, integer
    vector carries and in-place updates of the carry work, invariants are read fresh at every
    call and closed-over values are frozen at capture; one compilation, none on later calls
    (other values, same shapes); early exit on a device bool; bad uses raise."""
    w = torch.randn(8, 8).to(dev)
    scale = torch.full((8,), 0.25).to(dev)  # closed over, not an invariant: frozen at capture

    def body(c):
        x, idx, acc = c
        x = torch.tanh(x @ w) * scale
        acc.add_(x)  # in place on the carried buffer
        return [x, idx + x.argmax(-1), acc]

    loop = runtime.DeviceLoop(body, name="test_loop")
    compiles = 0
    for call in range(-1, 3):
        # Updated in place before every call, as an optimizer step would. torch_xla annotates
        # a fresh tensor `{replicated}` over its first in-place updates (which changes the
        # hash of graphs reading it); a trainer's weights are annotated at load, so the
        # warm-up (call -1) brings these to that steady state first.
        with torch.no_grad():
            w.mul_(-1.0)  # an invariant: every call sees the current weights
            scale.mul_(2.0)  # frozen at capture (1.0): no effect on later calls
        runtime.sync()
        if call < 0:
            continue
        g = torch.Generator().manual_seed(call)
        x0, i0 = torch.randn(4, 8, generator=g), torch.randint(0, 5, (4,), generator=g)
        x, idx, acc = x0.to(dev), i0.to(dev), torch.zeros(4, 8).to(dev)
        runtime.sync()
        c0 = runtime.compile_count()
        steps = loop([x, idx, acc], 5, invariants=[w])
        compiles += runtime.compile_count() - c0
        ex, ei, ea = x0, i0, torch.zeros(4, 8)
        wc, sc = w.cpu(), torch.full((8,), 1.0)
        for _ in range(5):
            ex = torch.tanh(ex @ wc) * sc
            ea = ea + ex
            ei = ei + ex.argmax(-1)
        torch.testing.assert_close(x.cpu(), ex, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acc.cpu(), ea, rtol=1e-5, atol=1e-5)
        assert torch.equal(idx.cpu(), ei) and int(steps.cpu()) == 5
    assert compiles == 1 and loop.captures == 1

    # early exit: the loop stops once the bool slot is true
    stop = runtime.DeviceLoop(lambda c: [c[0] + 1, c[0] + 1 >= 3], name="test_stop", stop_slot=1)
    n, done = torch.zeros((), dtype=torch.long).to(dev), torch.zeros((), dtype=torch.bool).to(dev)
    runtime.sync()
    steps = stop([n, done], 10)
    assert (int(n.cpu()), bool(done.cpu()), int(steps.cpu())) == (3, True, 3)

    pending = torch.ones(3).to(dev) * 2
    with pytest.raises(ValueError, match="un-executed"):
        runtime.DeviceLoop(lambda c: [c[0] + 1], name="t")([pending], 2)
    runtime.sync()
    with pytest.raises(ValueError, match="expected the carry"):
        runtime.DeviceLoop(lambda c: [c[0].sum()], name="t")([torch.ones(3).to(dev)], 2)
    runtime.sync()
    with pytest.raises(RuntimeError):  # a host sync inside the traced body
        runtime.DeviceLoop(lambda c: [c[0] * float(c[0].sum().item())], name="t")(
            [torch.ones(3).to(dev)], 2
        )
    runtime.sync()


def test_runtime_compile_without_opening_sync_keeps_graphs_and_checks(dev):
    """Calls with nothing pending skip torch_xla.compile's (waiting) opening sync; pending
    work before a call still runs as its own graph, so the step graph never recompiles; a
    host sync inside raises on every path."""
    w = torch.randn(16, 16).to(dev)
    x = torch.randn(4, 16).to(dev)
    runtime.sync()
    step = runtime.compile(lambda t: (t @ w).tanh(), name="test_step")
    c0 = runtime.compile_count()
    for i in range(4):
        x = step(x)
        if i == 1:
            x1, extra = x, x * 2  # pending before the next call: flushed as its own graph
    assert runtime.compile_count() - c0 == 2
    torch.testing.assert_close(extra.cpu(), 2 * x1.cpu())
    bad = runtime.compile(lambda t: t * float(t.sum().item()), name="test_bad")
    runtime.sync()
    with pytest.raises(RuntimeError, match="Unexpected execution"):
        bad(x)  # nothing pending: the trace-then-launch path
    runtime.sync()
    pending = x + 1
    with pytest.raises(RuntimeError, match="Unexpected execution"):
        bad(pending)  # pending work: the torch_xla.compile path
    runtime.sync()


def test_read_scalars_after_step(dev):
    """Metrics arrive (list entries averaged) only after a sync, in one background read."""
    a = torch.tensor(2.0).to(dev) * 3
    parts = [torch.tensor(1.0).to(dev) + 0, torch.tensor(4.0).to(dev) + 0]
    got = []
    runtime.read_scalars_after_step({"a": a, "parts": parts, "host": 0.5}, got.append)
    assert got == []
    s0 = runtime.host_sync_count()
    runtime.sync()
    runtime.wait()
    assert got == [{"a": 6.0, "parts": 2.5, "host": 0.5}]
    assert runtime.host_sync_count() == s0


def test_pack_scalars_one_buffer_per_graph(dev, monkeypatch):
    """A step's scalar metrics leave its graph as ONE vector, read as one buffer per call;
    the reader averages packed entries over calls; non-scalar entries are left alone."""
    def step(x):
        return runtime.pack_scalars(
            {"sum": x.sum(), "max": x.max(), "rows": x.sum(-1), "lr": torch.tensor(0.5).to(dev)}
        )

    traced = runtime.compile(step, name="test_pack")
    outs = [traced(torch.full((2, 3), float(i + 1)).to(dev)) for i in range(2)]
    for out in outs:
        assert isinstance(out["sum"], runtime.PackedScalar)
        assert out["sum"].vector is out["max"].vector is out["lr"].vector
        assert isinstance(out["rows"], torch.Tensor) and out["rows"].shape == (2,)
    got, submitted = [], []
    reader = runtime.readback._READER
    submit = reader.submit
    monkeypatch.setattr(
        reader, "submit", lambda ts, cb: (submitted.append(len(ts)), submit(ts, cb))
    )
    runtime.read_scalars_after_step(
        {k: [o[k] for o in outs] for k in ("sum", "max", "lr")}, got.append
    )
    runtime.sync()
    runtime.wait()
    assert got == [{"sum": 9.0, "max": 1.5, "lr": 0.5}]
    assert submitted == [2]  # two calls, one buffer each (not 2 x 3 scalars)
    assert runtime.host_float(outs[1]["sum"]) == 12.0
    assert runtime.host_float(outs[0]["rows"][0]) == 3.0 and runtime.host_float(2) == 2.0


# ----------------------------------------------------------------------------------------
# 4-device mesh (subprocess: the device count is fixed per process)
# ----------------------------------------------------------------------------------------

MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {tests_dir!r})
    from test_generation import left_padded, tiny_model, EOS, PAD
    from torchxla_rlhf import runtime
    from torchxla_rlhf.generation import Generator, SamplingConfig

    dev = runtime.init()
    model = tiny_model(0)
    ids, mask = left_padded([10, 3, 7, 1, 9, 5, 10, 2], 10, seed=1)
    configs = [SamplingConfig(greedy=True), SamplingConfig()]
    ref = [Generator(model, c, eos_token_id=EOS, pad_token_id=PAD).generate(ids, mask, 6, seed=5)
           .sequences.tolist() for c in configs]
    model.to(dev)
    mesh = runtime.make_mesh("1,2,2")
    for name, p in model.named_parameters():
        if p.ndim == 2:
            row = any(k in name for k in ("o_proj", "down_proj", "embed_tokens"))
            runtime.mark_sharding(p, mesh, ("fsdp", "mp") if row else ("mp", "fsdp"))
    batch = runtime.batch_to_device({{"ids": ids, "mask": mask}}, mesh)
    res = {{"devices": runtime.device_count(), "ref": ref, "xla": [], "counts": []}}
    for c in configs:
        gen = Generator(model, c, eos_token_id=EOS, pad_token_id=PAD, mesh=mesh)
        c0, s0 = runtime.compile_count(), runtime.host_sync_count()
        out = gen.generate(batch["ids"], batch["mask"], 6, seed=5)
        runtime.wait()
        res["counts"].append([runtime.compile_count() - c0, runtime.host_sync_count() - s0])
        res["xla"].append(runtime.to_cpu(out.sequences).tolist())
    print("RESULT " + json.dumps(res))
    """
)


@pytest.mark.multiprocess
def test_sharded_mesh_matches_single_device():
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
    script = MESH_SCRIPT.format(tests_dir=str(REPO / "tests"))
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT ") :])
    assert res["devices"] == 4
    assert res["xla"][0] == res["ref"][0]  # greedy, sharded == unsharded
    assert res["xla"][1] == res["ref"][1]  # sampled with the same seed, too
    assert res["counts"] == [[2, 0], [2, 0]]
