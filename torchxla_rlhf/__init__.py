"""torchxla_rlhf: SFT, DPO, reward-model, PPO and GRPO training for HF LLaMA models on PyTorch/XLA SPMD.

Importing the package starts nothing: the XLA runtime is set up by
:func:`torchxla_rlhf.runtime.init` when a trainer (or a test) asks for it.
"""

__version__ = "0.1.0"
