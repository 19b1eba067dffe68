"""torchxla_rlhf: DPO, reward-model and PPO training for HF LLaMA models on PyTorch/XLA SPMD.

Importing the package starts nothing: the XLA runtime is set up by
:func:`torchxla_rlhf.runtime.init` when a trainer (or a test) asks for it.
"""

__version__ = "0.1.0"

PREEMPTED_EXIT_CODE = 75
"""Exit code of a trainer that stopped because the pod is being preempted (after saving):
EX_TEMPFAIL, "try again". The launcher relaunches on it with ``--restart-on-preemption``."""
