"""Reward model (docs/reward.md): a Llama backbone with a bias-free scalar ``score`` head read
at the last real token, trained with ``-logsigmoid(r_chosen - r_rejected [- margin])``.

The model is transformers' ``LlamaForSequenceClassification`` (``num_labels=1``), started from
a causal-LM checkpoint (backbone kept, LM head dropped, head drawn fresh) or from a reward
model, and saved as an ordinary HF sequence-classifier directory.
"""

from __future__ import annotations

from torchxla_rlhf.models import llama
from torchxla_rlhf.algos.losses import pairwise_reward_loss
from torchxla_rlhf.trainers.pairs import PairTrainer, pair_rows


class RewardTrainer(PairTrainer):
    def build_model(self):
        cfg = self.cfg
        return llama.load_sequence_classifier(
            cfg.model, self.ctx.mesh, pad_token_id=cfg.tokenizer_pad_token_id,
            head_seed=cfg.head_seed, role="reward model being trained",
        )

    def pair_loss(self, batch):
        ids, mask, _ = pair_rows(batch)
        with self.autocast():
            scores = llama.sequence_classifier_scores(self.model, ids, mask)  # [2B]
        half = ids.shape[0] // 2
        margin = batch["margin"] if self.cfg.use_margin else None
        return pairwise_reward_loss(scores[:half], scores[half:], margin)
