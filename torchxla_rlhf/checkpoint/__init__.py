"""Checkpoints: the manager a trainer saves and resumes through (:mod:`.manager`), and the
modules it uses: HF-format export (:mod:`.hf_export`), the sharded training state
(:mod:`.state`) and filesystem helpers with the atomic-publish recovery rule (:mod:`.fsio`)."""

from torchxla_rlhf.checkpoint.fsio import (
    COMPLETE_MARKER,
    is_complete_checkpoint,
    read_json,
    require_shared_output_dir,
    resolve_checkpoint,
    write_json,
)
from torchxla_rlhf.checkpoint.hf_export import plan_shards, save_hf_checkpoint, tensors_to_save
from torchxla_rlhf.checkpoint.manager import CheckpointManager, CheckpointSchedule, staged

__all__ = [
    "COMPLETE_MARKER", "CheckpointManager", "CheckpointSchedule", "is_complete_checkpoint",
    "plan_shards", "read_json", "require_shared_output_dir", "resolve_checkpoint",
    "save_hf_checkpoint", "staged", "tensors_to_save", "write_json",
]
