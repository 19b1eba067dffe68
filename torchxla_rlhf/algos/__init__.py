"""The algorithm side, as pure functions and small classes (no torch_xla at import):

- :mod:`~torchxla_rlhf.algos.losses`: DPO and its variants, the reward-model loss, the PPO,
  GRPO and RLOO policy losses, token log-probs (the math in each docstring).
- :mod:`~torchxla_rlhf.algos.rl`: masked statistics, whitening, GAE, KL-shaped rewards, group
  and leave-one-out advantages.
- :mod:`~torchxla_rlhf.algos.optim`: AdamW with global-norm clipping and an in-graph schedule.
- :mod:`~torchxla_rlhf.algos.verifiers`: verifiable rewards (GSM8K, MATH, IFEval) computed on
  the host from decoded completions.
"""
