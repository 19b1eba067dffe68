"""GRPO / RLOO / DPO-family math: hand-computed examples, and equality with TRL's GRPOTrainer
and RLOOTrainer (``trl==1.16.*``) and open-instruct's DPO formulas on the same inputs.

The losses are compared by calling TRL's own ``_compute_loss`` on a stand-in trainer object
(the model forward is replaced by the given per-token log-probs). TRL computes advantages inside
its generation method, which needs models, tokenizers and an accelerator; those few lines are
reproduced below from ``trl/trainer/grpo_trainer.py`` and ``rloo_trainer.py`` at 1.16.0
(``sum_then_normalize``, no unscorable rows), with TRL's own ``nanstd``.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F

from torchxla_rlhf.algos.losses import dpo_loss, grpo_policy_loss, k3_kl, rloo_policy_loss
from torchxla_rlhf.algos.rl import (
    equal_reward_groups,
    group_advantages,
    overlong_penalty,
    rloo_advantages,
    sequence_kl_penalty,
)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


# ---------------------------------------------------------------------------- by hand


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0])  # G=2: groups [1,0], [0,0], [2,2]
    # group [1, 0]: mean 0.5, unbiased std sqrt(0.5) = 0.70711; A = +-0.5 / (0.70711 + 1e-4)
    adv, equal = group_advantages(r, 2, scale_rewards="group")
    a = 0.5 / (0.5 ** 0.5 + 1e-4)
    close(adv, [a, -a, 0.0, 0.0, 0.0, 0.0])
    close(equal, [0, 0, 1, 1, 1, 1])
    # none (Dr. GRPO): r - mean only
    close(group_advantages(r, 2, scale_rewards="none")[0], [0.5, -0.5, 0, 0, 0, 0])
    # batch: mean 5/6, unbiased var = sum((r - 5/6)^2) / 5
    mean = 5 / 6
    std = (sum((x - mean) ** 2 for x in r.tolist()) / 5) ** 0.5
    close(group_advantages(r, 2, scale_rewards="batch")[0],
          [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0, 0, 0, 0])
    # the fraction of equal-reward groups: 2 of 3
    close(equal_reward_groups(r, 2).mean(), 2 / 3)


def test_rloo_advantages_by_hand():
    r = torch.tensor([3.0, 1.0, 2.0, 5.0, 5.0, 5.0])  # G=3
    # row 0: 3 - (1 + 2)/2 = 1.5; row 1: 1 - (3+2)/2 = -1.5; row 2: 2 - 2 = 0; group 2: all 0
    adv, equal = rloo_advantages(r, 3)
    close(adv, [1.5, -1.5, 0.0, 0.0, 0.0, 0.0])
    close(equal, [0, 0, 0, 1, 1, 1])


def test_group_sizes_must_divide():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale_rewards="row")


def test_k3_and_sequence_kl_by_hand():
    pi = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    # k3 at d = ref - pi = -0.5: exp(-0.5) + 0.5 - 1 = 0.10653; at d = 0: 0
    close(k3_kl(pi, ref), [[torch.exp(torch.tensor(-0.5)).item() - 0.5, 0.0]])
    # sum_t m (pi - ref) = 0.5 (second token masked out anyway 0) times beta 0.1
    close(sequence_kl_penalty(pi, ref, torch.tensor([[1, 1]]), beta=0.1), [0.05])


def test_overlong_penalty_by_hand():
    # max 10, cache 4: <= 6 -> 0; 8 -> (6 - 8)/4 = -0.5; 10 -> -1; 11 -> -1
    close(overlong_penalty(torch.tensor([3, 6, 8, 10, 11]), max_len=10, cache_len=4),
          [0.0, 0.0, -0.5, -1.0, -1.0])


def test_grpo_loss_by_hand_ratio_one():
    # ratio 1 (old == pi): l_t = -A on every token; grpo = mean of per-row token means = -mean(A)
    pi = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -2.0])
    loss, m = grpo_policy_loss(pi, pi, adv, mask, loss_type="grpo")
    close(loss, (-1.0 + 2.0) / 2)
    # bnpo: (-1 - 1 + 2) / 3 tokens = 0; dr_grpo: 0 / (2 * 3); dapo with num_items 4: 0
    close(grpo_policy_loss(pi, pi, adv, mask, loss_type="bnpo")[0], 0.0)
    # gradient of grpo wrt pi: -A_b / n_b on real tokens, / B rows
    p = pi.clone().requires_grad_(True)
    grpo_policy_loss(p, pi, adv, mask, loss_type="grpo")[0].backward()
    close(p.grad, [[-0.25, -0.25, 0.0], [1.0, 0.0, 0.0]])
    close(m["grpo/clip_ratio/region_mean"], 0.0)


def test_grpo_loss_clips_with_epsilon_high():
    # one token, A = 1, ratio e^0.5 = 1.6487 > 1 + 0.28: clipped at 1.28 -> loss -1.28
    pi, old = torch.tensor([[0.5]]), torch.tensor([[0.0]])
    loss, m = grpo_policy_loss(pi, old, torch.tensor([1.0]), torch.ones(1, 1), epsilon=0.2,
                               epsilon_high=0.28, loss_type="bnpo")
    close(loss, -1.28)
    close(m["grpo/clip_ratio/high_mean"], 1.0)


# ---------------------------------------------------------------------------- DPO family


def test_dpo_norm_and_simpo_by_hand():
    pc, pr = torch.tensor([-4.0]), torch.tensor([-9.0])
    rc, rr = torch.tensor([-6.0]), torch.tensor([-6.0])
    nc, nr = torch.tensor([2]), torch.tensor([3])
    # dpo_norm: z = (-2 - -3) - (-3 - -2) = 1 + 1 = 2; loss = -logsigmoid(0.5 * 2)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="dpo_norm",
                       chosen_lengths=nc, rejected_lengths=nr)
    close(loss, -F.logsigmoid(torch.tensor(1.0)))
    # simpo: beta * (-2 - -3) - gamma = 2 * 1 - 0.5 = 1.5
    loss, m = dpo_loss(pc, pr, None, None, beta=2.0, gamma=0.5, loss_type="simpo",
                       chosen_lengths=nc, rejected_lengths=nr)
    close(loss, -F.logsigmoid(torch.tensor(1.5)))
    close(m["score_margin"], 2.0)
    # use_ipo stays an alias of loss_type ipo
    a = dpo_loss(pc, pr, rc, rr, beta=0.5, use_ipo=True)[0]
    b = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo")[0]
    close(a, b)
    with pytest.raises(ValueError, match="needs reference"):
        dpo_loss(pc, pr, None, None, beta=0.5, loss_type="dpo_norm",
                 chosen_lengths=nc, rejected_lengths=nr)


def _oi_dpo_loss(pc, pr, rc, rr, beta, label_smoothing):
    """open-instruct ``dpo_utils.dpo_loss`` (reference_free=False), as written there."""
    pi_logratios = pc - pr
    ref_logratios = rc - rr
    logits = pi_logratios - ref_logratios
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


def _oi_simpo_loss(pc, pr, beta, gamma_beta_ratio, label_smoothing):
    """open-instruct ``dpo_utils.simpo_loss``, as written there."""
    pi_logratios = pc - pr
    logits = pi_logratios - gamma_beta_ratio
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_dpo_norm_and_simpo_equal_open_instruct(label_smoothing):
    """open-instruct's dpo_norm is ``dpo_loss`` on log-probs averaged over the response tokens
    (``_get_batch_logps(average_log_prob=True)``: sum / count), simpo is ``simpo_loss`` on
    those averages with margin ``gamma_beta_ratio`` inside ``beta * (.)``."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 7
    tok = {k: -torch.rand(B, T, generator=g) * 3 for k in ("pc", "pr", "rc", "rr")}
    mc = (torch.rand(B, T, generator=g) > 0.3).float()
    mr = (torch.rand(B, T, generator=g) > 0.3).float()
    mc[:, 0] = mr[:, 0] = 1.0
    sums = {k: (v * (mc if k[1] == "c" else mr)).sum(-1) for k, v in tok.items()}
    avgs = {k: sums[k] / (mc if k[1] == "c" else mr).sum(-1) for k in sums}
    nc, nr = mc.sum(-1).long(), mr.sum(-1).long()

    ours, _ = dpo_loss(sums["pc"], sums["pr"], sums["rc"], sums["rr"], beta=0.1,
                       label_smoothing=label_smoothing, loss_type="dpo_norm",
                       chosen_lengths=nc, rejected_lengths=nr)
    theirs = _oi_dpo_loss(avgs["pc"], avgs["pr"], avgs["rc"], avgs["rr"], 0.1, label_smoothing)
    close(ours, theirs.mean())

    beta, gamma_beta_ratio = 2.5, 0.3
    ours, _ = dpo_loss(sums["pc"], sums["pr"], None, None, beta=beta, gamma=gamma_beta_ratio * beta,
                       label_smoothing=label_smoothing, loss_type="simpo",
                       chosen_lengths=nc, rejected_lengths=nr)
    theirs = _oi_simpo_loss(avgs["pc"], avgs["pr"], beta, gamma_beta_ratio, label_smoothing)
    close(ours, theirs.mean())
    # plain dpo is open-instruct's dpo on sums
    ours, _ = dpo_loss(sums["pc"], sums["pr"], sums["rc"], sums["rr"], beta=0.1,
                       label_smoothing=label_smoothing)
    close(ours, _oi_dpo_loss(sums["pc"], sums["pr"], sums["rc"], sums["rr"], 0.1,
                             label_smoothing).mean())


# ---------------------------------------------------------------------------- TRL equality

trl = pytest.importorskip("trl", reason="TRL is in the 'bench' extra; the equality tests need it")


def _trl_nanstd():
    from trl.trainer.utils import nanstd

    return nanstd


def _trl_group_advantages(rewards, G, scale_rewards):
    """grpo_trainer.py 1.16.0, ``_generate_and_score_completions``, sum_then_normalize."""
    nanstd = _trl_nanstd()
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return torch.nan_to_num(advantages, nan=0.0), is_std_zero


def _trl_rloo_advantages(rewards, G, normalize):
    """rloo_trainer.py 1.16.0, ``_generate_and_score_completions`` (after the KL penalty)."""
    nanstd = _trl_nanstd()
    grouped_rewards = rewards.view(-1, G)
    counts = (~torch.isnan(grouped_rewards)).sum(dim=1, keepdim=True)
    grouped_sum = torch.nansum(grouped_rewards, dim=1, keepdim=True)
    baselines = ((grouped_sum - grouped_rewards) / (counts - 1)).view(-1)
    advantages = rewards - baselines
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def _rewards(g, P, G):
    # Mixed groups and all-equal groups (0/1 rewards, plus a constant group of 0.5s).
    r = torch.randint(0, 2, (P, G), generator=g).float()
    r[0] = 1.0
    r[1] = 0.5
    r[2] = torch.tensor([1.0] + [0.0] * (G - 1))
    r[3] = torch.rand(G, generator=g) * 4 - 2
    return r.view(-1)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale_rewards):
    g = torch.Generator().manual_seed(1)
    r = _rewards(g, 6, 4)
    ours, equal = group_advantages(r, 4, scale_rewards=scale_rewards)
    theirs, std_zero = _trl_group_advantages(r, 4, scale_rewards)
    close(ours, theirs)
    if scale_rewards != "batch":  # TRL's zero-std flag is per group except with batch scaling
        close(equal, std_zero.float())


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_trl(normalize):
    g = torch.Generator().manual_seed(2)
    r = _rewards(g, 5, 3)
    close(rloo_advantages(r, 3, normalize=normalize)[0], _trl_rloo_advantages(r, 3, normalize))


def _stand_in(cls, **attrs):
    """An object on which TRL's ``cls._compute_loss`` runs: the forward returns given log-probs,
    the accelerator is one process, metrics go to a dict."""
    ident = lambda x, **_: x  # noqa: E731
    accelerator = types.SimpleNamespace(num_processes=1, gather=ident, reduce=ident,
                                        gather_for_metrics=ident, sync_gradients=True)
    args = types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1)
    self = types.SimpleNamespace(
        accelerator=accelerator, args=args, model=types.SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, **attrs)
    return self


def _trl_inputs(pi, mask):
    B, T = pi.shape
    logps = pi

    def forward(*_args, **_kwargs):
        return logps, torch.zeros_like(logps), None

    inputs = {"prompt_ids": torch.ones(B, 2, dtype=torch.long),
              "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.ones(B, T, dtype=torch.long), "completion_mask": mask}
    return forward, inputs


def _random_case(seed, B=8, T=6):
    g = torch.Generator().manual_seed(seed)
    pi = -torch.rand(B, T, generator=g) * 2
    old = pi + (torch.rand(B, T, generator=g) - 0.5) * 0.8  # ratios in about [0.67, 1.5]
    ref = pi + (torch.rand(B, T, generator=g) - 0.5) * 0.5
    mask = (torch.rand(B, T, generator=g) > 0.25).long()
    mask[:, 0] = 1
    adv = torch.randn(B, generator=g)
    return pi, old, ref, mask, adv


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_grpo_loss_equals_trl(loss_type, level, beta, epsilon_high):
    from trl.trainer.grpo_trainer import GRPOTrainer

    pi, old, ref, mask, adv = _random_case(3)
    B, T = pi.shape
    eps_hi = 0.2 if epsilon_high is None else epsilon_high
    forward, inputs = _trl_inputs(pi, mask)
    num_items = mask.sum().float()
    inputs.update(advantages=adv, old_per_token_logps=old, ref_per_token_logps=ref,
                  num_items_in_batch=num_items)
    self = _stand_in(GRPOTrainer, importance_sampling_level=level, beta=beta, loss_type=loss_type,
                     epsilon_low=0.2, epsilon_high=eps_hi, max_completion_length=T,
                     _get_per_token_logps_and_entropies=forward)
    theirs = GRPOTrainer._compute_loss(self, None, inputs)

    ours, metrics = grpo_policy_loss(pi, old, adv, mask, epsilon=0.2, epsilon_high=epsilon_high,
                                     importance_sampling_level=level, loss_type=loss_type,
                                     beta=beta, ref_logps=ref, max_completion_length=T,
                                     num_items=num_items)
    close(ours, theirs)
    trl_m = self._metrics["train"]
    for key in ("low_mean", "high_mean", "region_mean"):
        close(metrics[f"grpo/clip_ratio/{key}"], trl_m[f"clip_ratio/{key}"][-1])
    if beta:
        close(metrics["grpo/kl"], trl_m["kl"][-1])

    # and the gradient wrt the policy log-probs
    p1 = pi.clone().requires_grad_(True)
    forward, inputs2 = _trl_inputs(p1, mask)
    inputs2.update({k: inputs[k] for k in ("advantages", "old_per_token_logps",
                                           "ref_per_token_logps", "num_items_in_batch")})
    self._get_per_token_logps_and_entropies = forward
    GRPOTrainer._compute_loss(self, None, inputs2).backward()
    p2 = pi.clone().requires_grad_(True)
    grpo_policy_loss(p2, old, adv, mask, epsilon=0.2, epsilon_high=epsilon_high,
                     importance_sampling_level=level, loss_type=loss_type, beta=beta,
                     ref_logps=ref, max_completion_length=T, num_items=num_items)[0].backward()
    close(p2.grad, p1.grad)


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
def test_rloo_loss_equals_trl(epsilon_high):
    from trl.trainer.rloo_trainer import RLOOTrainer

    pi, old, _, mask, adv = _random_case(4)
    # sequence-level ratios of summed log-probs: keep them near 1 so that some rows clip, some not
    old = pi + (old - pi) * 0.1
    eps_hi = 0.2 if epsilon_high is None else epsilon_high
    forward, inputs = _trl_inputs(pi, mask)
    inputs.update(advantages=adv, old_logps=(old * mask).sum(1))
    self = _stand_in(RLOOTrainer, epsilon_low=0.2, epsilon_high=eps_hi,
                     _get_per_token_logps_and_entropies=forward)
    theirs = RLOOTrainer._compute_loss(self, None, inputs)
    ours, metrics = rloo_policy_loss(pi, old, adv, mask, epsilon=0.2, epsilon_high=epsilon_high)
    close(ours, theirs)
    close(metrics["grpo/clip_ratio/region_mean"], self._metrics["train"]["clip_ratio/region_mean"][-1])


def test_rloo_kl_in_reward_equals_trl():
    """TRL RLOO: ``rewards - beta * sum_t m (old - ref)`` before the leave-one-out baseline."""
    pi, old, ref, mask, _ = _random_case(5, B=6)
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    shaped = scores - sequence_kl_penalty(old, ref, mask, beta=0.05)
    theirs_rewards = scores - 0.05 * ((old - ref) * mask).sum(-1)
    close(shaped, theirs_rewards)
    close(rloo_advantages(shaped, 3)[0], _trl_rloo_advantages(theirs_rewards, 3, False))


def test_overlong_penalty_equals_trl():
    from trl.rewards import get_soft_overlong_punishment

    fn = get_soft_overlong_punishment(max_completion_len=12, soft_punish_cache=5)
    lengths = list(range(0, 15))
    theirs = fn([[1] * n for n in lengths])
    close(overlong_penalty(torch.tensor(lengths), max_len=12, cache_len=5), theirs)
