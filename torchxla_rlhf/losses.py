"""Losses as pure tensor functions: token log-probs, DPO/cDPO/IPO, pairwise reward-model
loss, PPO policy and value losses.

The math, in words: docs/dpo.md, docs/reward.md and docs/ppo.md.

Each function takes tensors and returns tensors (losses return ``(loss, metrics)`` with
detached scalar metric tensors). Nothing here syncs with the host or has data-dependent
shapes, so all of it can run inside one compiled XLA graph. Python ``if``s only look at
Python arguments (``use_ipo``, ``margin is None``), which are fixed per run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchxla_rlhf.rl import masked_mean

__all__ = [
    "label_logps",
    "token_logps",
    "sequence_logps",
    "dpo_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
]


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[label]`` per position, without shifting, in float32.

    ``logits[b, t]`` scores ``labels[b, t]`` directly; PPO uses this on the continuation
    slice ``logits[:, PL-1:-1]`` with ``labels = sequences[:, PL:]``.

    Computed as ``logits[label] - logsumexp(logits)``: only the ``[B, T]`` results and the
    reduction are needed, no ``[B, T, V]`` log-softmax is formed. The upcast to float32
    happens before the reduction, so bf16 logits still get a float32 log-normalizer (under
    XLA the convert fuses into the reduce and the gather; eager PyTorch makes one float32
    copy of the logits).

    Shapes: ``logits [B, T, V]``, ``labels [B, T]`` (valid ids in ``[0, V)``; mask unwanted
    positions with a loss mask, not with -100) -> ``[B, T]`` float32.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"label_logps: expected logits [B, T, V] and labels [B, T], got logits "
            f"{list(logits.shape)} and labels {list(labels.shape)}"
        )
    logits = logits.float()
    picked = logits.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``log p(input_ids[t] | input_ids[<t])`` from ``logits[t-1]``; position 0 gets 0.

    Shapes: ``logits [B, L, V]`` (causal-LM output for ``input_ids``), ``input_ids [B, L]``
    -> ``[B, L]`` float32 (also for bf16 logits). See :func:`label_logps` for the cost.
    """
    if logits.ndim != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"token_logps: expected logits [B, L, V] and input_ids [B, L], got logits "
            f"{list(logits.shape)} and input_ids {list(input_ids.shape)}"
        )
    shifted = label_logps(logits[:, :-1], input_ids[:, 1:])  # [B, L-1]
    return F.pad(shifted, (1, 0), value=0.0)


def sequence_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """``sum_t loss_mask[t] * log p(input_ids[t] | <t)`` per row (docs/dpo.md: a sum, not a mean).

    ``loss_mask`` is aligned with ``input_ids`` (1 on the response tokens that count).
    Shapes: ``logits [B, L, V]``, ``input_ids``, ``loss_mask`` ``[B, L]`` -> ``[B]`` float32.
    """
    if loss_mask.shape != input_ids.shape:
        raise ValueError(
            f"sequence_logps: loss_mask has shape {list(loss_mask.shape)} but input_ids has "
            f"{list(input_ids.shape)}; they must match"
        )
    return (token_logps(logits, input_ids) * loss_mask.float()).sum(dim=-1)


def _check_shapes(fn: str, dims: str, **tensors: torch.Tensor) -> None:
    """All ``tensors`` of one shape with the named dims (``"B"``, ``"B, T"``)."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != len(dims.split(",")) or any(s != first for s in shapes.values()):
        raise ValueError(f"{fn}: expected tensors of equal shape [{dims}], got {shapes}")


def _check_nonnegative(fn: str, **values: float) -> None:
    for name, value in values.items():
        if not value >= 0:  # NaN fails too
            raise ValueError(f"{fn}: {name}={value!r}, expected >= 0")



def dpo_loss(
    pi_chosen_logps: torch.Tensor,
    pi_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    use_ipo: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO loss (docs/dpo.md), batch mean. All inputs ``[B]`` sequence log-prob sums.

    ::

        z = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        sigmoid (default, cDPO with ls = label_smoothing):
            -(1 - ls) * logsigmoid(beta * z) - ls * logsigmoid(-beta * z)
        IPO (use_ipo):  (z - 1 / (2 * beta)) ** 2

    Metrics (detached scalars): ``loss``; with ``chosen = beta * (pi_chosen - ref_chosen)``
    and ``rejected = beta * (pi_rejected - ref_rejected)`` (no gradient):
    ``reward_accuracy`` = mean(chosen > rejected), ``score_chosen`` = mean(chosen),
    ``score_rejected`` = mean(rejected), ``score_margin`` = mean(chosen - rejected).
    Reference log-probs are detached (the reference is frozen).
    """
    _check_shapes("dpo_loss", "B", pi_chosen_logps=pi_chosen_logps,
                  pi_rejected_logps=pi_rejected_logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps)
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta={beta!r}, expected beta > 0")
    # At 0.5 the loss no longer depends on z (no gradient): the config's bound, too.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"dpo_loss: label_smoothing={label_smoothing!r}, expected 0 <= label_smoothing < 0.5"
        )
    if use_ipo and label_smoothing != 0.0:
        raise ValueError("dpo_loss: label_smoothing applies to the sigmoid loss, not to IPO")
    ref_chosen = ref_chosen_logps.detach()
    ref_rejected = ref_rejected_logps.detach()
    z = (pi_chosen_logps - pi_rejected_logps) - (ref_chosen - ref_rejected)
    if use_ipo:
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * z)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * z)
    loss = losses.mean()

    chosen_rewards = beta * (pi_chosen_logps.detach() - ref_chosen)
    rejected_rewards = beta * (pi_rejected_logps.detach() - ref_rejected)
    metrics = {
        "loss": loss.detach(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().mean(),
        "score_chosen": chosen_rewards.mean(),
        "score_rejected": rejected_rewards.mean(),
        "score_margin": (chosen_rewards - rejected_rewards).mean(),
    }
    return loss, metrics


def pairwise_reward_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry reward-model loss (docs/reward.md), batch mean.

    ``-logsigmoid(r_chosen - r_rejected)``, or with ``margin`` (``use_margin``)
    ``-logsigmoid(r_chosen - r_rejected - margin)``. Shapes: all ``[B]``.

    Metrics (detached scalars): ``loss``, ``accuracy`` = mean(r_chosen > r_rejected)
    (margin not involved), ``chosen_reward_mean``/``_std``, ``rejected_reward_mean``/``_std``
    (population std, as ``jnp.std``; 0 for B=1), ``margin_mean`` = mean(r_chosen - r_rejected).
    """
    margins = {} if margin is None else {"margin": margin}
    _check_shapes("pairwise_reward_loss", "B", r_chosen=r_chosen, r_rejected=r_rejected, **margins)
    diff = r_chosen - r_rejected
    logits = diff if margin is None else diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(logits).mean()
    rc, rr, d = r_chosen.detach(), r_rejected.detach(), diff.detach()
    metrics = {
        "loss": loss.detach(),
        "accuracy": (rc > rr).float().mean(),
        "chosen_reward_mean": rc.mean(),
        "chosen_reward_std": rc.std(correction=0),
        "rejected_reward_mean": rr.mean(),
        "rejected_reward_std": rr.std(correction=0),
        "margin_mean": d.mean(),
    }
    return loss, metrics



def ppo_policy_loss(
    pi_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss (docs/ppo.md). Shapes: all ``[B, T]``; loss a scalar.

    ::

        ratio   = exp(pi_logps - old_logps)
        pg_loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - cliprange, 1 + cliprange)), m)

    ``old_logps`` and ``advantages`` are detached here: in the interleaved mode the "old"
    log-probs come from the same forward pass as ``pi_logps`` (ratio exactly 1), and only a
    detached copy gives the right gradient ``-A * m / sum(m)``.

    Metrics (detached scalars): ``ppo/loss/policy``; ``ppo/policy/ratios_mean`` (masked
    mean of ratio); ``ppo/policy/clipfrac`` (masked fraction of tokens where the clipped
    term is the larger, i.e. the gradient is cut); ``ppo/policy/approxkl`` =
    ``0.5 * masked_mean((pi - old)**2)``; ``ppo/policy/policykl`` = ``masked_mean(old - pi)``.
    """
    _check_shapes("ppo_policy_loss", "B, T", pi_logps=pi_logps, old_logps=old_logps,
                  advantages=advantages, mask=mask)
    _check_nonnegative("ppo_policy_loss", cliprange=cliprange)
    old = old_logps.detach()
    adv = advantages.detach()
    log_ratio = pi_logps - old
    ratio = torch.exp(log_ratio)
    pg_losses = -adv * ratio
    pg_losses_clipped = -adv * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.maximum(pg_losses, pg_losses_clipped), mask)

    log_ratio_d = log_ratio.detach()
    metrics = {
        "ppo/loss/policy": pg_loss.detach(),
        "ppo/policy/ratios_mean": masked_mean(ratio.detach(), mask),
        "ppo/policy/clipfrac": masked_mean(
            (pg_losses_clipped.detach() > pg_losses.detach()).to(log_ratio_d.dtype), mask
        ),
        "ppo/policy/approxkl": 0.5 * masked_mean(log_ratio_d**2, mask),
        "ppo/policy/policykl": masked_mean(-log_ratio_d, mask),
    }
    return pg_loss, metrics


def ppo_value_loss(
    phi_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange_value: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss (docs/ppo.md). Shapes: all ``[B, T]``; loss a scalar.

    ::

        v_clipped = old_v + clip(phi_v - old_v, -cliprange_value, cliprange_value)
        vf_loss   = 0.5 * masked_mean(max((phi_v - returns)**2, (v_clipped - returns)**2), m)

    ``old_values`` and ``returns`` are detached (constants of the update, also in the
    interleaved mode where they come from the current value model).

    Metrics (detached scalars): ``ppo/loss/value``; ``ppo/val/vpred`` (masked mean of the
    new values); ``ppo/val/error`` = ``masked_mean((phi_v - returns)**2)``;
    ``ppo/val/clipfrac`` (masked fraction where the clipped term is the larger).
    """
    _check_shapes("ppo_value_loss", "B, T", phi_values=phi_values, old_values=old_values,
                  returns=returns, mask=mask)
    _check_nonnegative("ppo_value_loss", cliprange_value=cliprange_value)
    old = old_values.detach()
    ret = returns.detach()
    v_clipped = old + torch.clamp(phi_values - old, -cliprange_value, cliprange_value)
    vf_losses = (phi_values - ret) ** 2
    vf_losses_clipped = (v_clipped - ret) ** 2
    vf_loss = 0.5 * masked_mean(torch.maximum(vf_losses, vf_losses_clipped), mask)

    metrics = {
        "ppo/loss/value": vf_loss.detach(),
        "ppo/val/vpred": masked_mean(phi_values.detach(), mask),
        "ppo/val/error": masked_mean(vf_losses.detach(), mask),
        "ppo/val/clipfrac": masked_mean(
            (vf_losses_clipped.detach() > vf_losses.detach()).to(vf_losses.dtype), mask
        ),
    }
    return vf_loss, metrics
