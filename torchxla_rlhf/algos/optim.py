"""AdamW with global-norm clipping and a learning-rate schedule evaluated inside the graph.

Why not ``torch.optim.AdamW``: under XLA every per-step Python scalar is a hazard. Its step
counter lives on the host, its learning rate is a Python float set per step (and 0.0 — the first
warmup step, or a frozen policy — is baked into the graph as a constant, i.e. a recompilation),
and its state appears lazily on the first step (a second graph). Here the state (moments and the
update counter) is allocated on the device up front, and the schedule is a function of the
device-side counter, so the optimizer step is one graph for the whole run and the training loop
hands the device no per-step number at all.

The math is optax's ``chain(clip_by_global_norm(max_grad_norm), adamw(...))``, as in the JAX
code (docs/training.md)::

    g      <- g * min(1, max_grad_norm / ||g||_2)         # global norm over all parameters
    m      <- b1 m + (1 - b1) g
    v      <- b2 v + (1 - b2) g^2
    m_hat  =  m / (1 - b1^t),  v_hat = v / (1 - b2^t)     # t = updates so far, incl. this one
    p      <- p - lr_k * (m_hat / (sqrt(v_hat) + eps) + wd * p)   # wd only on matrices

``lr_k`` is the schedule at ``k = t - 1`` updates done (so the first warmup update has lr 0,
as optax's schedules give).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch

from torchxla_rlhf.configs.sections import AdamWConfig

@dataclass(frozen=True)
class Schedule:
    """Learning rate as a function of ``k``, the number of updates done.

    ``lr(k) = 0`` for ``k < freeze_steps``; then with ``j = k - freeze_steps``: a linear ramp
    ``peak * j / warmup_steps`` for ``j < warmup_steps``; then, with ``decay``, a linear
    ``peak -> end`` over the remaining ``total_steps - freeze_steps - warmup_steps`` updates
    (``end`` once past them), or the constant ``peak`` without ``decay``.
    """

    peak: float
    end: float
    warmup_steps: int
    total_steps: int
    decay: bool = True
    freeze_steps: int = 0

    @classmethod
    def linear(cls, peak: float, end: float, warmup_ratio: float, total_steps: int) -> "Schedule":
        """DPO/RM: warmup over ``ceil(warmup_ratio * total)`` then linear decay to ``end``."""
        return cls(peak, end, math.ceil(warmup_ratio * total_steps), total_steps, decay=True)

    def __call__(self, k):
        """``k`` a Python number (host, for logs and tests) or a float tensor (in-graph)."""
        if isinstance(k, torch.Tensor):
            return self._tensor(k)
        if k < self.freeze_steps:
            return 0.0
        j = k - self.freeze_steps
        if j < self.warmup_steps:
            return self.peak * j / self.warmup_steps
        if not self.decay:
            return self.peak
        span = max(self.total_steps - self.freeze_steps - self.warmup_steps, 1)
        frac = min((j - self.warmup_steps) / span, 1.0)
        return self.peak + (self.end - self.peak) * frac

    def _tensor(self, k: torch.Tensor) -> torch.Tensor:
        j = k - self.freeze_steps
        warm = self.peak * j / max(self.warmup_steps, 1)
        if self.decay:
            span = max(self.total_steps - self.freeze_steps - self.warmup_steps, 1)
            frac = ((j - self.warmup_steps) / span).clamp(max=1.0)
            after = self.peak + (self.end - self.peak) * frac
        else:
            after = torch.full_like(k, self.peak)
        lr = torch.where(j < self.warmup_steps, warm, after)
        return torch.where(k < self.freeze_steps, torch.zeros_like(lr), lr)


class AdamW:
    """AdamW over a list of parameters with device-resident state (see module docstring).

    Call :meth:`step` inside a compiled function after the gradients are accumulated in
    ``p.grad``; it clips, updates the parameters in place, clears the gradients and returns
    metric tensors (``learning_rate``, ``gradient_norm`` before clipping, ``param_norm``).
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], cfg: AdamWConfig, schedule: Schedule):
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("AdamW: no trainable parameters")
        self.cfg = cfg
        self.schedule = schedule
        # The state is allocated now, on the parameters' devices and shardings, so the first
        # step traces the same graph as every later one. Plain zeros_like would drop the
        # sharding and leave the moments replicated on every device.
        self.exp_avg = [_zeros_like_sharded(p) for p in self.params]
        self.exp_avg_sq = [_zeros_like_sharded(p) for p in self.params]
        self.count = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        """Updates done so far (a device scalar)."""

    @torch.no_grad()
    def step(self) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        grads = [
            p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params
        ]
        grad_norm = global_norm(grads)
        if cfg.max_grad_norm > 0:
            # optax.clip_by_global_norm: g * max / ||g|| when ||g|| > max.
            scale = torch.clamp(cfg.max_grad_norm / (grad_norm + 1e-12), max=1.0)
            grads = [g * scale.to(g.dtype) for g in grads]
        lr = self.schedule(self.count)
        t = self.count + 1.0
        bias1 = 1.0 - cfg.b1**t
        bias2 = 1.0 - cfg.b2**t
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            g = g.to(m.dtype)
            m.mul_(cfg.b1).add_(g * (1.0 - cfg.b1))
            v.mul_(cfg.b2).add_(g * g * (1.0 - cfg.b2))
            update = (m / bias1) / (torch.sqrt(v / bias2) + cfg.eps)
            if cfg.weight_decay and p.ndim >= 2:
                update = update + cfg.weight_decay * p
            p.sub_((lr * update).to(p.dtype))
            p.grad = None
        self.count.add_(1.0)
        return {"learning_rate": lr, "gradient_norm": grad_norm, "param_norm": global_norm(self.params)}

    def state_dict(self) -> dict:
        """Moments and update count (device tensors; the caller decides how to save them)."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for dst, src in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
                dst.copy_(src)
            self.count.copy_(state["count"])


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``sqrt(sum_i ||t_i||^2)`` in float32, as one scalar tensor."""
    return torch.sqrt(sum(t.float().pow(2).sum() for t in tensors))


def _zeros_like_sharded(p: torch.Tensor) -> torch.Tensor:
    """Zeros with ``p``'s sharding on XLA (runtime.zeros_like_sharded); plain zeros on CPU."""
    if p.device.type != "xla":
        return torch.zeros_like(p)
    from torchxla_rlhf import runtime

    return runtime.zeros_like_sharded(p)
