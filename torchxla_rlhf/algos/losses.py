"""Losses as pure tensor functions: token log-probs, DPO/cDPO/IPO/length-normalized DPO/SimPO,
pairwise reward-model loss, PPO policy and value losses, the GRPO and RLOO policy losses.

The math, in words: docs/dpo.md, docs/reward.md and docs/ppo.md.

Each function takes tensors and returns tensors (losses return ``(loss, metrics)`` with
detached scalar metric tensors). Nothing here syncs with the host or has data-dependent
shapes, so all of it can run inside one compiled XLA graph. Python ``if``s only look at
Python arguments (``use_ipo``, ``margin is None``), which are fixed per run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchxla_rlhf.algos.rl import masked_mean

__all__ = [
    "label_logps",
    "token_logps",
    "sequence_logps",
    "dpo_loss",
    "pairwise_reward_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "DPO_LOSS_TYPES",
    "GRPO_LOSS_TYPES",
    "k3_kl",
    "grpo_policy_loss",
    "rloo_policy_loss",
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



DPO_LOSS_TYPES = ("dpo", "ipo", "dpo_norm", "simpo")
"""Preference objectives of :func:`dpo_loss`; ``simpo`` is reference-free."""


def dpo_loss(
    pi_chosen_logps: torch.Tensor,
    pi_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    use_ipo: bool = False,
    loss_type: str = "dpo",
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss (docs/dpo.md), batch mean. Log-prob inputs ``[B]`` are sequence SUMS.

    ::

        dpo:      z = (pi_c - pi_r) - (ref_c - ref_r)
                  -(1 - ls) * logsigmoid(beta * z) - ls * logsigmoid(-beta * z)   (cDPO: ls > 0)
        ipo:      (z - 1 / (2 * beta)) ** 2                     (``use_ipo`` is an alias)
        dpo_norm: as dpo, every log-prob divided by its response length first
                  (pi_c / n_c, ref_c / n_c, ...): open-instruct's ``dpo_norm``, Tulu 3's DPO
        simpo:    z = pi_c / n_c - pi_r / n_r  (no reference)
                  -(1 - ls) * logsigmoid(beta * z - gamma) - ls * logsigmoid(-(beta * z - gamma))

    ``gamma`` is SimPO's target reward margin (open-instruct's ``gamma_beta_ratio`` is
    ``gamma / beta``). ``chosen_lengths``/``rejected_lengths`` ``[B]`` are the response token
    counts (needed by ``dpo_norm`` and ``simpo``); ``simpo`` takes ``None`` references.

    Metrics (detached scalars): ``loss``; with ``chosen = beta * (pi_chosen - ref_chosen)``
    and ``rejected = beta * (pi_rejected - ref_rejected)`` (length-normalized for dpo_norm;
    ``beta * pi`` for simpo; no gradient): ``reward_accuracy`` = mean(chosen > rejected),
    ``score_chosen``, ``score_rejected``, ``score_margin`` = mean(chosen - rejected).
    Reference log-probs are detached (the reference is frozen).
    """
    if use_ipo:
        if loss_type not in ("dpo", "ipo"):
            raise ValueError(f"dpo_loss: use_ipo=True contradicts loss_type={loss_type!r}")
        loss_type = "ipo"
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r}, expected one of {DPO_LOSS_TYPES}")
    reference_free = loss_type == "simpo"
    refs = {} if reference_free else {"ref_chosen_logps": ref_chosen_logps,
                                      "ref_rejected_logps": ref_rejected_logps}
    if not reference_free and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} needs reference log-probs")
    _check_shapes("dpo_loss", "B", pi_chosen_logps=pi_chosen_logps,
                  pi_rejected_logps=pi_rejected_logps, **refs)
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta={beta!r}, expected beta > 0")
    # At 0.5 the loss no longer depends on z (no gradient): the config's bound, too.
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"dpo_loss: label_smoothing={label_smoothing!r}, expected 0 <= label_smoothing < 0.5"
        )
    if loss_type == "ipo" and label_smoothing != 0.0:
        raise ValueError("dpo_loss: label_smoothing applies to the sigmoid loss, not to IPO")
    pi_chosen, pi_rejected = pi_chosen_logps, pi_rejected_logps
    ref_chosen = None if reference_free else ref_chosen_logps.detach()
    ref_rejected = None if reference_free else ref_rejected_logps.detach()
    if loss_type in ("dpo_norm", "simpo"):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"dpo_loss: loss_type={loss_type!r} needs the response lengths")
        n_c = chosen_lengths.to(pi_chosen.dtype)
        n_r = rejected_lengths.to(pi_rejected.dtype)
        pi_chosen, pi_rejected = pi_chosen / n_c, pi_rejected / n_r
        if not reference_free:
            ref_chosen, ref_rejected = ref_chosen / n_c, ref_rejected / n_r

    if reference_free:
        logits = beta * (pi_chosen - pi_rejected) - gamma
    else:
        z = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        logits = beta * z
    if loss_type == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(logits)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-logits)
    loss = losses.mean()

    if reference_free:
        chosen_rewards = beta * pi_chosen.detach()
        rejected_rewards = beta * pi_rejected.detach()
    else:
        chosen_rewards = beta * (pi_chosen.detach() - ref_chosen)
        rejected_rewards = beta * (pi_rejected.detach() - ref_rejected)
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


# ----------------------------------------------------------------------------------------
# Critic-free policy losses (GRPO and its variants, RLOO)
# ----------------------------------------------------------------------------------------

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
"""Loss aggregations of :func:`grpo_policy_loss`, with TRL GRPOTrainer's meaning."""


def k3_kl(pi_logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of ``KL(pi || ref)``: ``exp(ref - pi) - (ref - pi) - 1`` (>= 0).
    Shapes: ``[B, T]`` -> ``[B, T]``; ``ref_logps`` is detached (frozen reference)."""
    d = ref_logps.detach() - pi_logps
    return torch.exp(d) - d - 1.0


def grpo_policy_loss(
    pi_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    importance_sampling_level: str = "token",
    loss_type: str = "dapo",
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO clipped-ratio loss and its aggregations (TRL GRPOTrainer's ``_compute_loss``).

    Shapes: ``pi_logps``, ``old_logps``, ``mask``, ``ref_logps`` ``[B, T]``; ``advantages [B]``.
    ::

        log_w = pi - old                                        importance_sampling_level=token
        log_w = sum_t m_t (pi - old) / max(sum_t m_t, 1)  [B,1]  =sequence (GSPO)
        w = exp(log_w);   e_lo = epsilon, e_hi = epsilon_high or epsilon
        l_t = -min(w * A, clip(w, 1 - e_lo, 1 + e_hi) * A)  (+ beta * k3_t when beta > 0)
        grpo:    mean_b( sum_t m l / max(sum_t m, 1) )        (per-sequence mean, then rows)
        bnpo:    sum m l / max(sum m, 1)                      (token mean over the batch)
        dr_grpo: sum m l / (B * max_completion_length)        (default T)
        dapo:    sum m l / num_items                          (default max(sum m, 1))

    ``dapo``'s ``num_items`` is the token count the trainer normalizes by: TRL divides by the
    generation batch's token count spread over its optimizer steps, i.e. the mean token count
    of one micro-batch when each micro-batch's loss is then divided by the accumulation steps.
    ``k3_t`` is :func:`k3_kl`. ``old_logps`` (detached) are the log-probs the completions were
    sampled with; with one pass over each generation they equal ``pi`` (ratio 1).

    Metrics (detached scalars): ``grpo/loss/policy``, ``grpo/kl`` (masked mean of k3; 0 when
    ``beta == 0``), ``grpo/clip_ratio/low_mean``, ``/high_mean``, ``/region_mean`` (masked
    fraction of tokens -- of rows for sequence level -- where the clip cut the gradient),
    ``grpo/ratio_mean``.
    """
    _check_shapes("grpo_policy_loss", "B, T", pi_logps=pi_logps, old_logps=old_logps, mask=mask)
    if advantages.shape != pi_logps.shape[:1]:
        raise ValueError(f"grpo_policy_loss: advantages {list(advantages.shape)}, expected "
                         f"[B] = [{pi_logps.shape[0]}]")
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"grpo_policy_loss: loss_type={loss_type!r}, expected one of "
                         f"{GRPO_LOSS_TYPES}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"grpo_policy_loss: importance_sampling_level="
                         f"{importance_sampling_level!r}, expected 'token' or 'sequence'")
    e_lo = epsilon
    e_hi = epsilon if epsilon_high is None else epsilon_high
    _check_nonnegative("grpo_policy_loss", epsilon=e_lo, epsilon_high=e_hi, beta=beta)
    m = mask.to(pi_logps.dtype)
    adv = advantages.detach().to(pi_logps.dtype)[:, None]
    log_ratio = pi_logps - old_logps.detach()
    if importance_sampling_level == "token":
        log_w = log_ratio
    else:
        log_w = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0))[:, None]
    w = torch.exp(log_w)
    w_clipped = torch.clamp(w, 1.0 - e_lo, 1.0 + e_hi)
    per_token = -torch.minimum(w * adv, w_clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_policy_loss: beta > 0 needs ref_logps")
        kl = k3_kl(pi_logps, ref_logps)
        per_token = per_token + beta * kl
    per_token = per_token.expand_as(m)
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        T = m.shape[1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (m.shape[0] * T)
    else:
        denom = m.sum().clamp(min=1.0) if num_items is None else num_items
        loss = (per_token * m).sum() / denom

    # Clip metrics at the importance weight's own level (per row for GSPO), as TRL logs them.
    level_mask = m if importance_sampling_level == "token" else (m.sum(-1, keepdim=True) > 0).to(m.dtype)
    w_d = w.detach()
    low = ((w_d < 1.0 - e_lo) & (adv < 0)).to(m.dtype)
    high = ((w_d > 1.0 + e_hi) & (adv > 0)).to(m.dtype)
    metrics = {
        "grpo/loss/policy": loss.detach(),
        "grpo/kl": masked_mean(kl.detach(), m) if kl is not None else torch.zeros_like(loss.detach()),
        "grpo/clip_ratio/low_mean": masked_mean(low.expand_as(level_mask), level_mask),
        "grpo/clip_ratio/high_mean": masked_mean(high.expand_as(level_mask), level_mask),
        "grpo/clip_ratio/region_mean": masked_mean(
            torch.maximum(low, high).expand_as(level_mask), level_mask),
        "grpo/ratio_mean": masked_mean(w_d.expand_as(level_mask), level_mask),
    }
    return loss, metrics


def rloo_policy_loss(
    pi_logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO's sequence-level clipped loss (TRL RLOOTrainer's ``_compute_loss``).

    Shapes: ``[B, T]`` log-probs and mask, ``advantages [B]``::

        w   = exp(sum_t m_t pi_t - sum_t m_t old_t)
        l_b = -min(w * A, clip(w, 1 - epsilon, 1 + e_hi) * A)
        loss = mean_b(l_b)  (+ beta * mean_b(sum_t m k3_t / max(sum_t m, 1)) when the KL is in the loss)

    Pass ``beta > 0`` and ``ref_logps`` only when the KL goes into the loss (``kl_in: loss``);
    with the KL in the reward (TRL's only choice) it is part of ``advantages`` already.
    Metrics as :func:`grpo_policy_loss` (row level), under ``grpo/``.
    """
    _check_shapes("rloo_policy_loss", "B, T", pi_logps=pi_logps, old_logps=old_logps, mask=mask)
    e_hi = epsilon if epsilon_high is None else epsilon_high
    _check_nonnegative("rloo_policy_loss", epsilon=epsilon, epsilon_high=e_hi, beta=beta)
    m = mask.to(pi_logps.dtype)
    adv = advantages.detach().to(pi_logps.dtype)
    log_w = (pi_logps * m).sum(-1) - (old_logps.detach() * m).sum(-1)
    w = torch.exp(log_w)
    w_clipped = torch.clamp(w, 1.0 - epsilon, 1.0 + e_hi)
    loss = (-torch.minimum(w * adv, w_clipped * adv)).mean()
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("rloo_policy_loss: beta > 0 needs ref_logps")
        kl = k3_kl(pi_logps, ref_logps)
        loss = loss + beta * masked_mean(kl, m, dim=1).mean()
    w_d = w.detach()
    low = ((w_d < 1.0 - epsilon) & (adv < 0)).to(m.dtype)
    high = ((w_d > 1.0 + e_hi) & (adv > 0)).to(m.dtype)
    metrics = {
        "grpo/loss/policy": loss.detach(),
        "grpo/kl": masked_mean(kl.detach(), m) if kl is not None else torch.zeros_like(loss.detach()),
        "grpo/clip_ratio/low_mean": low.mean(),
        "grpo/clip_ratio/high_mean": high.mean(),
        "grpo/clip_ratio/region_mean": torch.maximum(low, high).mean(),
        "grpo/ratio_mean": w_d.mean(),
    }
    return loss, metrics
