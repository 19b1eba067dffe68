"""RL math as pure tensor functions: masked statistics, whitening, GAE, KL-shaped rewards,
the EOS penalty and the rollout metrics (PPO); group and leave-one-out advantages, the
sequence KL penalty and the overlong penalty (GRPO, RLOO).

The math, in words: docs/ppo.md (what the paper's PPO runs computed, and where this port
differs) and docs/data.md (position ids).

Every function here is safe inside a compiled XLA graph: tensors in, tensors out, static
shapes (no boolean-mask indexing, no ``nonzero``), no host syncs (no ``.item()``, no Python
``if`` on a tensor). Python branches only ever look at Python arguments (``gamma``,
``penalty``, ...), which are fixed per run, so they pick one graph and never cause recompiles.

Notation: ``B`` rows, ``T`` (= ``CL``) continuation positions, ``L`` (= ``PL + CL``) full
sequence positions. Masks may be bool, int or float 0/1 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "discounted_cumsum",
    "gae",
    "kl_penalized_rewards",
    "last_token_index",
    "position_ids_from_mask",
    "apply_eos_penalty",
    "scale_scores",
    "ppo_rollout_stats",
    "equal_reward_groups",
    "group_advantages",
    "rloo_advantages",
    "sequence_kl_penalty",
    "overlong_penalty",
]


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask in ``like``'s floating dtype (bool/int masks are common inputs)."""
    dtype = like.dtype if like.is_floating_point() else torch.float32
    return mask.to(dtype)


def _check_same_shape(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    # Shape checks read Python ints only: free, no host sync, fine inside a traced graph.
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {list(t.shape)} but {ref_name} has shape {list(ref.shape)}; "
            "they must match"
        )


# ----------------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------------


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask)`` over ``dim`` (all elements when ``dim`` is None).

    Shapes: ``x`` and ``mask`` broadcastable (usually both ``[B, T]``); returns a scalar,
    or ``x`` reduced over ``dim``.
    """
    m = _float_mask(mask, x)
    if dim is None:
        return (x * m).sum()
    return (x * m).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)`` over ``dim`` (all elements when ``dim`` is None).

    The denominator is clamped to at least 1, so an all-zero mask gives 0 instead of NaN
    (for 0/1 masks this changes nothing else). Shapes as :func:`masked_sum`.
    """
    m = _float_mask(mask, x)
    if dim is None:
        return (x * m).sum() / m.sum().clamp(min=1.0)
    return (x * m).sum(dim=dim) / m.sum(dim=dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked elements of ``x`` (all dims together), a scalar.

    ``var = masked_mean((x - masked_mean(x))**2)``, times the Bessel correction
    ``n / (n - 1)`` with ``n = sum(mask)`` when ``unbiased`` (as the JAX code and TRL).
    ``n - 1`` is clamped to at least 1: a single masked element gives variance 0, not NaN.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _float_mask(mask, x).sum()
        var = var * n / (n - 1.0).clamp(min=1.0)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Whiten ``x`` with statistics of its masked elements (docs/ppo.md).

    ``(x - mean) / sqrt(var_unbiased + eps)``; with ``shift_mean=False`` the mean is added
    back afterwards (the ``whiten_rewards`` option: scale without re-centering).
    Mean and variance are taken over ALL masked elements (whole batch, not per row).
    Padded positions are transformed too (not zeroed): callers mask them later.
    Shapes: ``x``, ``mask`` ``[B, T]`` -> ``[B, T]``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) / torch.sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


# ----------------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------------


def discounted_cumsum(x: torch.Tensor, discount: float) -> torch.Tensor:
    """Reverse discounted cumulative sum along the last dim:
    ``y_t = sum_{j >= t} discount**(j - t) * x_j``, i.e. ``y_t = x_t + discount * y_{t+1}``.

    Computed with a fixed number of whole-tensor steps, not a loop over ``T``: a log-depth
    (Hillis-Steele) scan. After the step with shift ``s`` each ``y_t`` covers
    ``x_t .. x_{t+2s-1}``; ``ceil(log2 T)`` steps (11 for T=2048) cover the row. Each step is
    one shifted multiply-add on ``[..., T]``, so the graph is small and the same for every
    call with the same ``T``. This is exact float32 elementwise math: unlike a ``[T, T]``
    discount-matrix product it needs no ``T*T`` memory and does not depend on the TPU's
    default (bf16-pass) float32 matmul precision. ``discount**s`` is a Python float that
    underflows harmlessly to 0 for long horizons; ``discount == 0`` returns ``x`` and
    ``discount == 1`` gives the plain reverse cumsum.
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discounted_cumsum: discount={discount!r}, expected 0 <= discount <= 1")
    T = x.shape[-1]
    y = x
    shift = 1
    while shift < T:
        factor = discount**shift
        if factor == 0.0:  # Python float: longer shifts add nothing
            break
        shifted = F.pad(y[..., shift:], (0, shift))  # y_{t+shift}, 0 beyond the end
        y = y + factor * shifted
        shift *= 2
    return y


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the continuation (docs/ppo.md), NOT whitened.

    With ``r = rewards * mask`` and ``v = values * mask``::

        delta_t = r_t + gamma * v_{t+1} - v_t        (v beyond the last position is 0)
        A_t     = delta_t + gamma * lam * A_{t+1}
        returns = A + v

    Whitening of the advantages (``masked_whiten(A, mask)``) and the optional
    ``whiten_rewards`` (``masked_whiten(r, mask, shift_mean=False)`` before this) are left
    to the caller, which decides over which batch to whiten.

    Shapes: ``rewards``, ``values``, ``mask`` ``[B, T]`` -> ``(advantages [B, T],
    returns [B, T])``. Masked positions of a right-padded row get ``A = returns = 0``.
    Fixed-size computation (see :func:`discounted_cumsum`), no loop over ``T``.
    """
    _check_same_shape("values", values, "rewards", rewards)
    _check_same_shape("mask", mask, "rewards", rewards)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gae: gamma={gamma!r}, expected 0 <= gamma <= 1")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"gae: lam={lam!r}, expected 0 <= lam <= 1")
    m = _float_mask(mask, rewards)
    r = rewards * m
    v = values * m
    next_v = F.pad(v[:, 1:], (0, 1))  # v_{t+1}; 0 past the last position
    delta = r + gamma * next_v - v
    advantages = discounted_cumsum(delta, gamma * lam)
    returns = advantages + v
    return advantages, returns


# ----------------------------------------------------------------------------------------
# Rewards and scores
# ----------------------------------------------------------------------------------------


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of ``attention_mask [B, L]`` -> ``[B]`` (int64).

    ``max(mask * arange(L))``: no data-dependent shapes. A row of zeros gives 0. Same as the
    JAX code's ``argmax(position_ids)``.
    """
    L = attention_mask.shape[-1]
    positions = torch.arange(L, device=attention_mask.device, dtype=torch.long)
    return (attention_mask.long() * positions).amax(dim=-1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """``clip(cumsum(attention_mask) - 1, min=0)`` along the sequence (docs/data.md), int64.

    The first real token gets position 0 whether the row is left- or right-padded.
    Shapes: ``[B, L]`` -> ``[B, L]``.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def kl_penalized_rewards(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    scores: torch.Tensor,
    *,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards shaped by the KL penalty (docs/ppo.md).

    ``kl_t = (logp_t - ref_logp_t) * m_t``; ``r_t = -kl_coef * kl_t``, plus ``scores`` at
    the last real continuation token (index of the last 1 in ``mask``; a row with no real
    token gets its score at position 0, where GAE masks it away).

    Shapes: ``logps``, ``ref_logps``, ``mask`` ``[B, T]``, ``scores [B]`` ->
    ``(rewards [B, T], kl [B, T])``, both zero at masked positions (except that
    empty-row case). The non-score part is ``-kl_coef * kl``.
    """
    _check_same_shape("ref_logps", ref_logps, "logps", logps)
    _check_same_shape("mask", mask, "logps", logps)
    if scores.shape != logps.shape[:1]:
        raise ValueError(
            f"scores has shape {list(scores.shape)}, expected [B] = [{logps.shape[0]}] "
            f"(one score per row of logps {list(logps.shape)})"
        )
    m = _float_mask(mask, logps)
    kl = (logps - ref_logps) * m
    non_score = -kl_coef * kl
    T = logps.shape[-1]
    last = last_token_index(mask)  # [B]
    at_last = torch.arange(T, device=logps.device)[None, :] == last[:, None]  # [B, T] one-hot
    rewards = non_score + at_last.to(non_score.dtype) * scores[:, None].to(non_score.dtype)
    return rewards, kl


def apply_eos_penalty(
    scores: torch.Tensor,
    sequences: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    eos_token_id: int,
    penalty: float | None,
) -> torch.Tensor:
    """Replace the score of a cut-off answer by ``penalty`` (docs/ppo.md; the paper used -10).

    A row is cut off when its last real token (last 1 of ``attention_mask``) is not
    ``eos_token_id``. ``penalty=None`` disables this and returns ``scores`` unchanged.
    Apply before :func:`scale_scores`.

    Shapes: ``scores [B]``, ``sequences``, ``attention_mask`` ``[B, L]`` -> ``[B]``.
    """
    _check_same_shape("attention_mask", attention_mask, "sequences", sequences)
    if scores.shape != sequences.shape[:1]:
        raise ValueError(
            f"scores has shape {list(scores.shape)}, expected [B] = [{sequences.shape[0]}] "
            f"(one score per row of sequences {list(sequences.shape)})"
        )
    if penalty is None:
        return scores
    last = last_token_index(attention_mask)  # [B]
    last_token = sequences.gather(1, last[:, None]).squeeze(1)  # [B]
    return torch.where(last_token == eos_token_id, scores, torch.full_like(scores, penalty))


def scale_scores(scores: torch.Tensor, gain: float, bias: float) -> torch.Tensor:
    """``scores * gain + bias`` (``reward_gain``/``reward_bias``, docs/ppo.md), after the EOS
    penalty. Shapes: ``[B]`` -> ``[B]``."""
    return scores * gain + bias


# ----------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------


def ppo_rollout_stats(
    *,
    scores: torch.Tensor,
    kl: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    returns: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    reward: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The rollout metrics of docs/ppo.md, as detached device tensors (no host sync).

    Inputs: ``scores [B]`` (after penalty/gain/bias), ``kl``, ``rewards``, ``values``,
    ``returns``, ``advantages``, ``mask`` ``[B, T]``; ``reward [B]`` optional, the raw RM
    reward after the EOS penalty and before gain/bias (gives ``env/reward_mean``).

    As the JAX code logged them: ``objective/kl`` = mean over rows of the per-row KL sum;
    ``objective/kl_per_token`` = masked mean of kl; ``ppo/mean_scores``; ``ppo/std_scores``
    (population std, ``jnp.std``); ``ppo/mean_non_score_reward`` = masked mean of
    ``-kl_coef * kl`` (per token) and ``ppo/mean_non_score_reward_sum`` (per row, mean over
    rows); ``ppo/mean_score_total`` = mean over rows of the row sum of ``rewards``;
    ``ppo/returns/mean``, ``ppo/val/mean``, ``ppo/policy/advantages_mean`` (masked means);
    ``tokens/responses_len_mean`` (mean of ``sum(mask)`` per row).
    """
    m = _float_mask(mask, kl)
    non_score = -kl_coef * kl
    stats = {
        "objective/kl": masked_sum(kl, m, dim=1).mean(),
        "objective/kl_per_token": masked_mean(kl, m),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": scores.std(correction=0),
        "ppo/mean_non_score_reward": masked_mean(non_score, m),
        "ppo/mean_non_score_reward_sum": masked_sum(non_score, m, dim=1).mean(),
        "ppo/mean_score_total": masked_sum(rewards, m, dim=1).mean(),
        "ppo/returns/mean": masked_mean(returns, m),
        "ppo/val/mean": masked_mean(values, m),
        "ppo/policy/advantages_mean": masked_mean(advantages, m),
        "tokens/responses_len_mean": m.sum(dim=1).mean(),
    }
    if reward is not None:
        stats["env/reward_mean"] = reward.mean()
    return {k: v.detach() for k, v in stats.items()}


# ----------------------------------------------------------------------------------------
# Critic-free advantages (GRPO, RLOO) and reward shaping
# ----------------------------------------------------------------------------------------

SCALE_REWARDS = ("group", "batch", "none")


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``rewards [N]`` viewed as ``[N / G, G]`` (the G completions of a prompt are adjacent)."""
    if rewards.ndim != 1:
        raise ValueError(f"rewards has shape {list(rewards.shape)}, expected [N]")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must be >= 2 and divide the {rewards.shape[0]} rewards"
        )
    return rewards.view(-1, group_size)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[N]`` float 0/1: 1 on the rows whose group's rewards are all equal (``max == min``).

    Such a group has no learning signal; the advantage functions give its rows exactly 0
    (a ``where`` over a mask: the rows stay, the shapes stay static). Its mean over the rows is
    the fraction of such groups (every group has G rows), the ``frac_reward_zero_std`` metric.
    """
    g = _groups(rewards, group_size)
    flat = (g.amax(dim=1) == g.amin(dim=1)).to(rewards.dtype)  # [N / G]
    return flat.repeat_interleave(group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    scale_rewards: str = "group",
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of ``rewards [N]`` (G = ``group_size`` adjacent rows per prompt).

    ::

        A_i = r_i - mean_group(r)                       scale_rewards = none (Dr. GRPO)
        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)   scale_rewards = group
        A_i = (r_i - mean_group(r)) / (std_batch(r) + eps)   scale_rewards = batch
        A_i = 0 where the group's rewards are all equal

    ``std`` is the unbiased (Bessel, ``n - 1``) standard deviation, ``eps`` 1e-4: exactly TRL's
    GRPOTrainer. Returns ``(advantages [N], equal_groups [N])`` (see
    :func:`equal_reward_groups`).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}: expected one of {SCALE_REWARDS}")
    g = _groups(rewards, group_size)
    centered = (g - g.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        centered = centered / (g.std(dim=1, correction=1).repeat_interleave(group_size) + eps)
    elif scale_rewards == "batch":
        centered = centered / (rewards.std(correction=1) + eps)
    equal = equal_reward_groups(rewards, group_size)
    return torch.where(equal > 0, torch.zeros_like(centered), centered), equal


def rloo_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    normalize: bool = False,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO advantages: each completion's reward minus the mean of its G - 1 siblings'.

    ::

        A_i = r_i - (sum_group(r) - r_i) / (G - 1)
        normalize:  A = (A - mean(A)) / (std(A) + eps)       (over the batch, unbiased std)

    Equal-reward groups give ``A_i = 0`` before the optional normalization (exactly, by the
    mask); normalization then shifts every row by the batch mean, as TRL's RLOOTrainer
    (``normalize_advantages``) does. Returns ``(advantages [N], equal_groups [N])``.
    """
    g = _groups(rewards, group_size)
    baseline = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    adv = (g - baseline).reshape(-1)
    equal = equal_reward_groups(rewards, group_size)
    adv = torch.where(equal > 0, torch.zeros_like(adv), adv)
    if normalize:
        adv = (adv - adv.mean()) / (adv.std(correction=1) + eps)
    return adv, equal


def sequence_kl_penalty(
    logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, *, beta: float
) -> torch.Tensor:
    """RLOO's KL in the reward: ``beta * sum_t m_t * (logp_t - ref_logp_t)`` per row ``[B]``.

    The first-order log-ratio (can be negative per token), summed over the completion, as the
    RLOO paper and TRL's RLOOTrainer; subtract it from the rewards before the advantages.
    Shapes: ``[B, T]`` -> ``[B]``.
    """
    _check_same_shape("ref_logps", ref_logps, "logps", logps)
    _check_same_shape("mask", mask, "logps", logps)
    return beta * masked_sum(logps - ref_logps, mask, dim=1)


def overlong_penalty(
    lengths: torch.Tensor, *, max_len: int, cache_len: int
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the reward (``[B]`` -> ``[B]``)::

        0                                   if L <= max_len - cache_len
        (max_len - cache_len - L) / cache_len   if max_len - cache_len < L <= max_len
        -1                                  if L > max_len

    ``lengths`` are completion token counts; ``max_len`` the completion length limit. Equal
    to TRL's ``get_soft_overlong_punishment(max_len, cache_len)`` reward function.
    """
    if not 0 < cache_len <= max_len:
        raise ValueError(
            f"overlong_penalty: cache_len={cache_len} must be in (0, max_len={max_len}]"
        )
    L = lengths.float()
    start = float(max_len - cache_len)
    ramp = (start - L) / float(cache_len)
    return torch.where(L <= start, torch.zeros_like(L),
                       torch.where(L <= max_len, ramp, torch.full_like(L, -1.0)))
