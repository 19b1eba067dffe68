"""Tests for torchxla_rlhf.algos.losses: hand-computed values and gradients (arithmetic in the
comments) and one run on the XLA device without host syncs."""

from __future__ import annotations

import math

import pytest
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.algos.losses import (
    dpo_loss,
    label_logps,
    pairwise_reward_loss,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logps,
    token_logps,
)

# torch's autograd engine sizes its per-device queues at the first backward() of the process:
# a CPU backward before the XLA runtime exists makes every later XLA backward fail with
# "device_ready_queues_ ... INTERNAL ASSERT FAILED". So start the runtime at collection time,
# before any test (in this file or another) runs a CPU backward.
runtime.init()

LN = math.log
SP1 = LN(1 + math.exp(-1))  # -logsigmoid(1) = 0.3132617
SPM1 = LN(1 + math.exp(1))  # -logsigmoid(-1) = 1.3132617 (= SP1 + 1)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# ---------------------------------------------------------------------------- log-probs


def tiny_logits():
    # B=1, L=3, V=2. logits[0] = [ln 3, 0] -> probs [3/4, 1/4]; logits[1] = [0, 0] -> [1/2, 1/2];
    # logits[2] predicts past the end and is never used.
    logits = torch.tensor([[[LN(3.0), 0.0], [0.0, 0.0], [7.0, -7.0]]])
    input_ids = torch.tensor([[1, 0, 1]])
    return logits, input_ids


def test_token_logps_by_hand():
    logits, input_ids = tiny_logits()
    # position 0: 0; position 1: token 0 from logits[0] -> ln(3/4); position 2: token 1 from
    # logits[1] -> ln(1/2)
    close(token_logps(logits, input_ids), [[0.0, LN(0.75), LN(0.5)]])
    # sequence sum with loss mask [0, 1, 1]: ln(3/4) + ln(1/2) = ln(3/8) = -0.9808293
    close(sequence_logps(logits, input_ids, torch.tensor([[0, 1, 1]])), [LN(3 / 8)])
    # only the last token counts: ln(1/2)
    close(sequence_logps(logits, input_ids, torch.tensor([[1, 0, 1]])), [LN(0.5)])


def test_token_logps_matches_log_softmax_and_is_float32_for_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 7), generator=g)
    ref = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    out = token_logps(logits, ids)
    assert out.shape == (3, 7) and out.dtype == torch.float32
    close(out[:, 0], torch.zeros(3))
    close(out[:, 1:], ref, atol=1e-5)
    # bf16 logits: the result is float32 and equals the float32 math on the bf16 values
    lb = logits.bfloat16()
    ref_b = torch.log_softmax(lb.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    out_b = token_logps(lb, ids)
    assert out_b.dtype == torch.float32
    close(out_b[:, 1:], ref_b, atol=1e-5)
    # unshifted version used for PPO continuations
    close(label_logps(logits[:, :-1], ids[:, 1:]), ref, atol=1e-5)


def test_logps_shape_errors():
    logits, input_ids = tiny_logits()
    with pytest.raises(ValueError, match="token_logps: expected logits"):
        token_logps(logits, input_ids[:, :2])
    with pytest.raises(ValueError, match="loss_mask has shape"):
        sequence_logps(logits, input_ids, torch.ones(1, 2))


# ---------------------------------------------------------------------------- DPO


def dpo_example():
    # element 0: pi ratio (-1) - (-3) = 2, ref ratio (-2) - (-2) = 0 -> z = 2
    # element 1: everything -2 -> z = 0
    pi_c = torch.tensor([-1.0, -2.0], requires_grad=True)
    pi_r = torch.tensor([-3.0, -2.0], requires_grad=True)
    ref_c = torch.tensor([-2.0, -2.0], requires_grad=True)
    ref_r = torch.tensor([-2.0, -2.0], requires_grad=True)
    return pi_c, pi_r, ref_c, ref_r


def test_dpo_sigmoid_by_hand():
    pi_c, pi_r, ref_c, ref_r = dpo_example()
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5)
    # beta*z = [1, 0]: losses [ln(1 + e^-1), ln 2] = [0.3132617, 0.6931472]; mean 0.5032045
    close(loss, (SP1 + LN(2)) / 2)
    # chosen rewards 0.5 * (pi_c - ref_c) = [0.5, 0]; rejected 0.5 * (pi_r - ref_r) = [-0.5, 0]
    close(m["reward_accuracy"], 0.5)  # 0.5 > -0.5 yes, 0 > 0 no
    close(m["score_chosen"], 0.25)
    close(m["score_rejected"], -0.25)
    close(m["score_margin"], 0.5)  # mean of [1, 0]
    close(m["loss"], loss.detach())
    assert all(not v.requires_grad for v in m.values())
    loss.backward()
    # dL/dpi_c = -beta * sigmoid(-beta*z) / B: [-0.5 * 0.2689414 / 2, -0.5 * 0.5 / 2]
    s = 1 / (1 + math.e)
    close(pi_c.grad, [-0.5 * s / 2, -0.125])
    close(pi_r.grad, [0.5 * s / 2, 0.125])
    assert ref_c.grad is None and ref_r.grad is None  # frozen reference: detached


def test_dpo_label_smoothing_and_ipo_by_hand():
    pi_c, pi_r, ref_c, ref_r = dpo_example()
    # cDPO, ls = 0.1, beta*z = [1, 0]:
    #   element 0: 0.9 * ln(1 + e^-1) + 0.1 * ln(1 + e) = 0.2819356 + 0.1313262 = 0.4132617
    #   element 1: 0.9 * ln 2 + 0.1 * ln 2 = ln 2
    loss, _ = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, label_smoothing=0.1)
    close(loss, (0.9 * SP1 + 0.1 * SPM1 + LN(2)) / 2)
    # IPO, beta 0.25 -> 1/(2 beta) = 2; z = [2, 0]: (2-2)^2 = 0, (0-2)^2 = 4 -> mean 2
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.25, use_ipo=True)
    close(loss, 2.0)
    # rewards with beta 0.25: chosen [0.25, 0], rejected [-0.25, 0]
    close(m["score_chosen"], 0.125)
    close(m["score_margin"], 0.25)
    loss.backward()
    # dL/dpi_c = 2 (z - 2) / B = [0, -2]
    close(pi_c.grad, [0.0, -2.0])


def test_dpo_bad_arguments():
    pi_c, pi_r, ref_c, ref_r = dpo_example()
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.0)
    with pytest.raises(ValueError, match="IPO"):
        dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.1, use_ipo=True)
    with pytest.raises(ValueError, match=r"label_smoothing < 0.5"):  # the config's bound
        dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1, label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"dpo_loss: expected tensors of equal shape \[B\]"):
        dpo_loss(pi_c, pi_r[:1], ref_c, ref_r, beta=0.1)


# ---------------------------------------------------------------------------- reward model


def test_pairwise_reward_loss_by_hand():
    rc = torch.tensor([2.0, 0.0], requires_grad=True)
    rr = torch.tensor([1.0, 1.0])
    loss, m = pairwise_reward_loss(rc, rr)
    # diff [1, -1]: losses [ln(1+e^-1), ln(1+e)] = [0.3132617, 1.3132617] -> mean 0.8132617
    close(loss, (SP1 + SPM1) / 2)
    close(m["accuracy"], 0.5)
    close(m["chosen_reward_mean"], 1.0)
    close(m["chosen_reward_std"], 1.0)  # population std of [2, 0]
    close(m["rejected_reward_mean"], 1.0)
    close(m["rejected_reward_std"], 0.0)
    close(m["margin_mean"], 0.0)  # mean of [1, -1]
    loss.backward()
    # dL/drc = -sigmoid(-diff) / B = [-0.2689414 / 2, -0.7310586 / 2]
    close(rc.grad, [-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-1)) / 2])

    # with margin [0.5, -1]: logits [1 - 0.5, -1 + 1] = [0.5, 0]
    #   losses [ln(1 + e^-0.5), ln 2] = [0.4740770, 0.6931472] -> mean 0.5836121
    loss, m = pairwise_reward_loss(rc, rr, margin=torch.tensor([0.5, -1.0]))
    close(loss, (LN(1 + math.exp(-0.5)) + LN(2)) / 2)
    close(m["accuracy"], 0.5)  # the margin does not change the accuracy
    with pytest.raises(ValueError, match="margin"):
        pairwise_reward_loss(rc, rr, margin=torch.tensor([0.5]))


# ---------------------------------------------------------------------------- PPO


def ppo_policy_example():
    # ratios: row 0 [1.5, 0.5, 3 (masked)], row 1 [0.5, 1.1, 1]; old log-probs -1 everywhere
    old = torch.full((2, 3), -1.0)
    pi = (old + torch.tensor([[LN(1.5), LN(0.5), LN(3.0)], [LN(0.5), LN(1.1), 0.0]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 5.0], [1.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    return pi, old, adv, mask


def test_ppo_policy_loss_by_hand():
    pi, old, adv, mask = ppo_policy_example()
    loss, m = ppo_policy_loss(pi, old, adv, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   (0,0) r 1.5, A 1:  max(-1.5, -1.2) = -1.2  clipped
    #   (0,1) r 0.5, A -1: max( 0.5,  0.8) =  0.8  clipped
    #   (1,0) r 0.5, A 1:  max(-0.5, -0.8) = -0.5
    #   (1,1) r 1.1, A 2:  max(-2.2, -2.2) = -2.2
    #   (1,2) r 1,   A 0:  0
    # masked mean over 5 tokens: (-1.2 + 0.8 - 0.5 - 2.2 + 0) / 5 = -0.62
    close(loss, -0.62)
    close(m["ppo/loss/policy"], -0.62)
    close(m["ppo/policy/clipfrac"], 2 / 5)
    close(m["ppo/policy/ratios_mean"], (1.5 + 0.5 + 0.5 + 1.1 + 1.0) / 5)  # 0.92
    lr2 = LN(1.5) ** 2 + 2 * LN(0.5) ** 2 + LN(1.1) ** 2
    close(m["ppo/policy/approxkl"], 0.5 * lr2 / 5)  # 0.1134392
    close(m["ppo/policy/policykl"], -(LN(1.5) + 2 * LN(0.5) + LN(1.1)) / 5)  # 0.1771038
    loss.backward()
    # clipped and masked tokens get no gradient; others d(-A r)/d logp / 5 = -A r / 5:
    #   (1,0): -1 * 0.5 / 5 = -0.1;  (1,1): -2 * 1.1 / 5 = -0.44;  (1,2): A = 0 -> 0
    close(pi.grad, [[0.0, 0.0, 0.0], [-0.1, -0.44, 0.0]])


def test_ppo_policy_loss_interleaved_old_is_detached():
    # interleaved mode: "old" log-probs are the same tensor as the new ones, ratio exactly 1;
    # the gradient must be -A * m / sum(m), not 0
    pi, _, adv, mask = ppo_policy_example()
    loss, m = ppo_policy_loss(pi, pi, adv, mask, cliprange=0.2)
    # loss = -sum(A m) / 5 = -(1 - 1 + 1 + 2 + 0) / 5 = -0.6
    close(loss, -0.6)
    close(m["ppo/policy/ratios_mean"], 1.0)
    close(m["ppo/policy/clipfrac"], 0.0)
    loss.backward()
    close(pi.grad, -(adv * mask) / 5)


def test_ppo_value_loss_by_hand():
    phi = torch.tensor([[1.0, 0.0, 0.5, 10.0]], requires_grad=True)
    old = torch.tensor([[0.5, 0.1, 0.5, 0.0]])
    ret = torch.tensor([[2.0, -1.0, 0.0, -10.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # last token masked
    loss, m = ppo_value_loss(phi, old, ret, mask, cliprange_value=0.2)
    # t0: v_clip = 0.5 + clip(0.5) = 0.7;  (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    # t1: v_clip = 0.1 + clip(-0.1) = 0.0; (0+1)^2 = 1, (0+1)^2 = 1    -> 1
    # t2: v_clip = 0.5;                    0.25, 0.25                  -> 0.25
    # vf_loss = 0.5 * (1.69 + 1 + 0.25) / 3 = 0.49
    close(loss, 0.49)
    close(m["ppo/loss/value"], 0.49)
    close(m["ppo/val/vpred"], (1.0 + 0.0 + 0.5) / 3)
    close(m["ppo/val/error"], (1.0 + 1.0 + 0.25) / 3)
    close(m["ppo/val/clipfrac"], 1 / 3)
    loss.backward()
    # t0 clipped: 0; t1: (phi - ret) / 3 = 1/3; t2: 0.5 / 3 = 1/6; t3 masked: 0
    close(phi.grad, [[0.0, 1 / 3, 1 / 6, 0.0]])


def test_ppo_loss_shape_errors():
    pi, old, adv, mask = ppo_policy_example()
    with pytest.raises(ValueError, match=r"ppo_policy_loss: expected tensors of equal shape \[B, T\]"):
        ppo_policy_loss(pi, old[:, :2], adv, mask, cliprange=0.2)
    with pytest.raises(ValueError, match="cliprange_value"):
        ppo_value_loss(pi, old, adv, mask, cliprange_value=-1.0)


# ---------------------------------------------------------------------------- XLA device


def test_losses_trace_on_xla_without_host_syncs():
    dev = runtime.device()
    g = torch.Generator().manual_seed(0)
    B, L, V = 4, 6, 13
    logits = torch.randn(B, L, V, generator=g)
    ids = torch.randint(0, V, (B, L), generator=g)
    loss_mask = (torch.arange(L)[None, :] >= 2).long().expand(B, L)
    ref = torch.randn(B, generator=g) - 5
    adv = torch.randn(B // 2, L, generator=g)
    mask = torch.ones(B // 2, L)

    def step(logits, ids, loss_mask, ref, adv, mask):
        logits = logits.clone().requires_grad_()
        logps = sequence_logps(logits.bfloat16(), ids, loss_mask)  # bf16 in, float32 out
        dpo, dpo_m = dpo_loss(logps[:2], logps[2:], ref[:2], ref[2:], beta=0.1)
        tok = token_logps(logits, ids)[:2]
        pg, pg_m = ppo_policy_loss(tok, tok.detach() + 0.1, adv, mask, cliprange=0.2)
        vf, vf_m = ppo_value_loss(tok, tok.detach() * 0.9, adv, mask, cliprange_value=0.2)
        (dpo + pg + 0.1 * vf).backward()
        return logits.grad, {**dpo_m, **pg_m, **vf_m}

    args = (logits, ids, loss_mask, ref, adv, mask)
    cpu_grad, cpu_m = step(*args)
    syncs, fallbacks = runtime.host_sync_count(), runtime.cpu_fallback_counts()
    grad, metrics = step(*[t.to(dev) for t in args])
    runtime.sync()
    assert runtime.host_sync_count() == syncs
    assert runtime.cpu_fallback_counts() == fallbacks
    close(grad.cpu(), cpu_grad, atol=1e-4)
    for key, value in cpu_m.items():
        close(metrics[key].cpu(), value, atol=1e-4)
