"""Tests for torchxla_rlhf.algos.rl: hand-computed examples (arithmetic in the comments), a
reverse-loop GAE reference on random data, and one run on the XLA device without host syncs."""

from __future__ import annotations

import math

import pytest
import torch

from torchxla_rlhf.algos.rl import (
    apply_eos_penalty,
    discounted_cumsum,
    gae,
    kl_penalized_rewards,
    last_token_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    position_ids_from_mask,
    ppo_rollout_stats,
    scale_scores,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


# ---------------------------------------------------------------------------- masked stats


def test_masked_sum_mean_var_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 1], [1, 0]])  # int mask; the 4 is masked out
    # sum = 1 + 2 + 3 = 6; mean = 6 / 3 = 2
    close(masked_sum(x, mask), 6.0)
    close(masked_mean(x, mask), 2.0)
    # per row: [1 + 2, 3] = [3, 3]; means [3/2, 3/1] = [1.5, 3]
    close(masked_sum(x, mask, dim=1), [3.0, 3.0])
    close(masked_mean(x, mask, dim=1), [1.5, 3.0])
    # biased var = ((1-2)^2 + 0 + (3-2)^2) / 3 = 2/3; unbiased = 2/3 * 3/2 = 1
    close(masked_var(x, mask, unbiased=False), 2.0 / 3.0)
    close(masked_var(x, mask), 1.0)


def test_masked_stats_degenerate_masks_give_zero_not_nan():
    x = torch.tensor([[5.0, 7.0]])
    # empty mask: 0 / clamp(0, min=1) = 0
    close(masked_mean(x, torch.zeros(1, 2)), 0.0)
    # one element: biased var 0, Bessel n/(n-1) = 1/clamp(0, min=1) -> 0
    close(masked_var(x, torch.tensor([[1.0, 0.0]])), 0.0)
    # empty row in a per-row mean
    close(masked_mean(x.expand(2, 2), torch.tensor([[1, 1], [0, 0]]), dim=1), [6.0, 0.0])


def test_masked_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # mean 2, unbiased var 1 (previous test): (x - 2) / sqrt(1 + 1e-6); the masked 4 -> 2/sqrt(..)
    s = math.sqrt(1.0 + 1e-6)
    close(masked_whiten(x, mask), [[-1 / s, 0.0], [1 / s, 2 / s]])
    # without re-centering: + mean (2) back
    close(masked_whiten(x, mask, shift_mean=False), [[2 - 1 / s, 2.0], [2 + 1 / s, 2 + 2 / s]])
    # whitened masked elements have mean 0 and unbiased var 1/(1+1e-6)
    w = masked_whiten(torch.randn(4, 9), torch.ones(4, 9))
    close(w.mean(), 0.0, atol=1e-5)
    close(w.var(), 1.0, atol=1e-4)


# ---------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, mask, gamma, lam):
    """The JAX code's reverse loop, in float64."""
    r = (rewards * mask).double()
    v = (values * mask).double()
    B, T = r.shape
    last = torch.zeros(B, dtype=torch.float64)
    adv = torch.zeros(B, T, dtype=torch.float64)
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t < T - 1 else torch.zeros(B, dtype=torch.float64)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = delta + gamma * lam * last
        adv[:, t] = last
    return adv, adv + v


def test_gae_three_tokens_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.2], [0.5, 0.4, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1: last position is padding (5, 9 ignored)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0 (gamma 1, gamma*lam 0.5):
    #   delta_2 = 1 + 0 - 0.2 = 0.8;  delta_1 = 0 + 0.2 - 0.4 = -0.2;  delta_0 = 0 + 0.4 - 0.5 = -0.1
    #   A_2 = 0.8;  A_1 = -0.2 + 0.5 * 0.8 = 0.2;  A_0 = -0.1 + 0.5 * 0.2 = 0.0
    #   returns = A + v = [0.5, 0.6, 1.0]
    # row 1 (masked r = [0, 1, 0], v = [0.5, 0.4, 0]):
    #   delta_2 = 0;  delta_1 = 1 + 0 - 0.4 = 0.6;  delta_0 = 0 + 0.4 - 0.5 = -0.1
    #   A = [-0.1 + 0.5 * 0.6, 0.6, 0] = [0.2, 0.6, 0];  returns = [0.7, 1.0, 0]
    close(adv, [[0.0, 0.2, 0.8], [0.2, 0.6, 0.0]])
    close(ret, [[0.5, 0.6, 1.0], [0.7, 1.0, 0.0]])

    # gamma enters delta: gamma 0.5, lam 1 (gamma*lam 0.5), row 0:
    #   delta_2 = 1 - 0.2 = 0.8;  delta_1 = 0.5 * 0.2 - 0.4 = -0.3;  delta_0 = 0.5 * 0.4 - 0.5 = -0.3
    #   A_1 = -0.3 + 0.5 * 0.8 = 0.1;  A_0 = -0.3 + 0.5 * 0.1 = -0.25
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    close(adv, [[-0.25, 0.1, 0.8]])
    close(ret, [[0.25, 0.5, 1.0]])


@pytest.mark.parametrize(
    "T,gamma,lam",
    [(37, 1.0, 0.95), (37, 0.9, 0.8), (37, 1.0, 1.0), (37, 1.0, 0.0), (37, 0.0, 0.95), (1, 1.0, 0.95), (300, 1.0, 0.95)],
)
def test_gae_matches_reverse_loop(T, gamma, lam):
    g = torch.Generator().manual_seed(T)
    B = 6
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    # right-padded rows of different lengths, including a full and an empty row
    lengths = torch.tensor([T, 1, max(T // 2, 1), 0, max(T - 3, 1), max(T // 3, 1)])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    adv, ret = gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    # float32 vs float64; with gamma*lam = 1 and T = 300 sums of ~300 terms
    atol = 1e-4 if T > 100 else 2e-5
    close(adv, ref_adv, atol=atol)
    close(ret, ref_ret, atol=atol)
    # padded positions: A = returns = 0
    assert torch.all(adv[mask == 0] == 0) and torch.all(ret[mask == 0] == 0)


def test_discounted_cumsum_edges_and_bad_args():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])
    close(discounted_cumsum(x, 0.0), x)  # gamma*lam = 0: A = delta
    close(discounted_cumsum(x, 1.0), [[15.0, 14.0, 12.0, 9.0, 5.0]])  # reverse cumsum
    # discount 0.5: y_4 = 5, y_3 = 4 + 2.5 = 6.5, y_2 = 3 + 3.25 = 6.25, y_1 = 2 + 3.125 = 5.125,
    # y_0 = 1 + 2.5625 = 3.5625
    close(discounted_cumsum(x, 0.5), [[3.5625, 5.125, 6.25, 6.5, 5.0]])
    with pytest.raises(ValueError, match="discount"):
        discounted_cumsum(x, 1.5)
    with pytest.raises(ValueError, match="lam"):
        gae(x, x, x, gamma=1.0, lam=-0.1)
    with pytest.raises(ValueError, match="values has shape"):
        gae(x, x[:, :3], x, gamma=1.0, lam=0.9)


# ---------------------------------------------------------------------------- rewards, scores


def test_last_token_index_and_position_ids():
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
    # last 1 at: 1, 3, none (-> 0), 2
    assert last_token_index(mask).tolist() == [1, 3, 0, 2]
    assert last_token_index(mask.bool()).dtype == torch.long
    # cumsum - 1, clipped at 0:
    #   [1,2,2,2]-1 = [0,1,1,1];  [0,0,1,2]-1 -> [0,0,0,1];  all -1 -> 0;  [1,1,2,2]-1 = [0,0,1,1]
    assert position_ids_from_mask(mask).tolist() == [
        [0, 1, 1, 1],
        [0, 0, 0, 1],
        [0, 0, 0, 0],
        [0, 0, 1, 1],
    ]


def test_kl_penalized_rewards_by_hand():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref_logps = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = kl_penalized_rewards(logps, ref_logps, mask, scores, kl_coef=0.1)
    # kl = (logp - ref) * m = [[0.5, 0, -1], [1, 0, (6 masked) 0]]
    close(kl, [[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    # r = -0.1 * kl = [[-0.05, 0, 0.1], [-0.1, 0, 0]]; score at last real token (2 and 1):
    #   row 0: 0.1 + 2 = 2.1;  row 1: 0 + (-1) = -1
    close(rewards, [[-0.05, 0.0, 2.1], [-0.1, -1.0, 0.0]])
    with pytest.raises(ValueError, match="scores has shape"):
        kl_penalized_rewards(logps, ref_logps, mask, scores[:1], kl_coef=0.1)


def test_eos_penalty_then_gain_and_bias():
    eos, pad = 2, 0
    sequences = torch.tensor(
        [
            [5, 6, eos, pad],  # right-padded, ends with eos
            [pad, 5, 6, 7],  # left-padded, cut off (no eos)
            [pad, pad, 5, eos],  # left-padded, ends with eos
            [5, eos, 7, pad],  # eos in the middle, last real token 7: cut off
        ]
    )
    attention_mask = (sequences != pad).long()
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0])
    penalized = apply_eos_penalty(scores, sequences, attention_mask, eos_token_id=eos, penalty=-10.0)
    close(penalized, [1.0, -10.0, 3.0, -10.0])
    # None disables the penalty
    close(apply_eos_penalty(scores, sequences, attention_mask, eos_token_id=eos, penalty=None), scores)
    # gain 2, bias 0.5 after the penalty: [2.5, -19.5, 6.5, -19.5]
    close(scale_scores(penalized, 2.0, 0.5), [2.5, -19.5, 6.5, -19.5])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        apply_eos_penalty(scores, sequences, attention_mask[:, :3], eos_token_id=eos, penalty=-10.0)


# ---------------------------------------------------------------------------- stats


def rollout_stats_example():
    kl = torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return dict(
        scores=torch.tensor([2.0, -1.0]),
        kl=kl,
        rewards=torch.tensor([[-0.05, 0.0, 2.1], [-0.1, -1.0, 0.0]]),
        values=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]]),
        returns=torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 100.0]]),
        advantages=torch.tensor([[1.0, -1.0, 0.5], [0.5, -1.0, 100.0]]),
        mask=mask,
        kl_coef=0.1,
        reward=torch.tensor([3.0, 1.0]),
    )


def test_ppo_rollout_stats_by_hand():
    stats = ppo_rollout_stats(**rollout_stats_example())
    # kl row sums: 0.5 + 0 - 1 = -0.5 and 1 + 0 = 1 -> mean 0.25
    close(stats["objective/kl"], 0.25)
    # per token: (0.5 + 0 - 1 + 1 + 0) / 5 = 0.1
    close(stats["objective/kl_per_token"], 0.1)
    # scores [2, -1]: mean 0.5, population std sqrt(((1.5)^2 + (1.5)^2) / 2) = 1.5
    close(stats["ppo/mean_scores"], 0.5)
    close(stats["ppo/std_scores"], 1.5)
    # non-score reward -0.1 * kl: per token -0.01, per row sum mean -0.025
    close(stats["ppo/mean_non_score_reward"], -0.01)
    close(stats["ppo/mean_non_score_reward_sum"], -0.025)
    # rewards row sums: -0.05 + 0 + 2.1 = 2.05 and -0.1 - 1 = -1.1 -> mean 0.475
    close(stats["ppo/mean_score_total"], 0.475)
    # masked means over 5 tokens: returns (0+1+2+3+4)/5 = 2, values (1+2+3+4+5)/5 = 3,
    # advantages (1 - 1 + 0.5 + 0.5 - 1)/5 = 0
    close(stats["ppo/returns/mean"], 2.0)
    close(stats["ppo/val/mean"], 3.0)
    close(stats["ppo/policy/advantages_mean"], 0.0)
    # lengths 3 and 2 -> 2.5
    close(stats["tokens/responses_len_mean"], 2.5)
    close(stats["env/reward_mean"], 2.0)


# ---------------------------------------------------------------------------- XLA device


def test_rollout_math_traces_on_xla_without_host_syncs():
    from torchxla_rlhf import runtime

    runtime.init()
    dev = runtime.device()
    g = torch.Generator().manual_seed(0)
    B, PL, CL = 4, 3, 8
    logps = -torch.rand(B, CL, generator=g)
    ref_logps = -torch.rand(B, CL, generator=g)
    values = torch.randn(B, CL, generator=g)
    cont_mask = (torch.arange(CL)[None, :] < torch.tensor([8, 1, 5, 3])[:, None]).long()
    sequences = torch.randint(3, 50, (B, PL + CL), generator=g)
    sequences[1, PL] = 2  # row 1 ends with eos
    sequences[:, PL:] = torch.where(cont_mask == 1, sequences[:, PL:], 0)
    attention_mask = torch.cat([torch.ones(B, PL, dtype=torch.long), cont_mask], dim=1)
    raw = torch.randn(B, generator=g)

    def pipeline(raw, sequences, attention_mask, logps, ref_logps, values, cont_mask):
        reward = apply_eos_penalty(raw, sequences, attention_mask, eos_token_id=2, penalty=-10.0)
        scores = scale_scores(reward, 2.0, 0.5)
        rewards, kl = kl_penalized_rewards(logps, ref_logps, cont_mask, scores, kl_coef=0.05)
        rewards = masked_whiten(rewards, cont_mask, shift_mean=False)
        adv, ret = gae(rewards, values, cont_mask, gamma=1.0, lam=0.95)
        adv = masked_whiten(adv, cont_mask)
        stats = ppo_rollout_stats(
            scores=scores, kl=kl, rewards=rewards, values=values, returns=ret,
            advantages=adv, mask=cont_mask, kl_coef=0.05, reward=reward,
        )
        return adv, ret, stats

    args = (raw, sequences, attention_mask, logps, ref_logps, values, cont_mask)
    cpu_adv, cpu_ret, cpu_stats = pipeline(*args)
    # the penalty acted on the rows without eos (all but row 1)
    assert cpu_stats["env/reward_mean"].item() == pytest.approx((raw[1].item() - 30.0) / 4)

    dev_args = [t.to(dev) for t in args]
    syncs, fallbacks = runtime.host_sync_count(), runtime.cpu_fallback_counts()
    adv, ret, stats = pipeline(*dev_args)
    runtime.sync()
    assert runtime.host_sync_count() == syncs
    assert runtime.cpu_fallback_counts() == fallbacks
    close(adv.cpu(), cpu_adv, atol=1e-5)
    close(ret.cpu(), cpu_ret, atol=1e-5)
    for key, value in cpu_stats.items():
        close(stats[key].cpu(), value, atol=1e-5)

