"""Supervised fine-tuning: the assistant-only loss mask, packing, the packed loss against the
unpacked one, and tiny SFT end to end (XLA:CPU)."""

import json
import os

import numpy as np
import pytest
import torch

from torchxla_rlhf import runtime
from torchxla_rlhf.configs.sft import SFTConfig
from torchxla_rlhf.data.chat import DataError
from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data.tokenizers import load_tokenizer
from torchxla_rlhf.trainers.sft import (SFTDataset, effective_loss_mask, pack_best_fit,
                                        packed_attention_mask, sft_loss)

from helpers import REPO, read_metrics, tiny_config

TRAIN = os.path.join(REPO, "data", "tiny", "preference_train.jsonl")


def tok():
    return load_tokenizer("tiny", 0)


def tiny_cfg(out, *overrides):
    return tiny_config(SFTConfig, "sft", out, *overrides)


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def conversations(n):
    with open(TRAIN) as f:
        return [{"messages": json.loads(line)["chosen"]} for _, line in zip(range(n), f)]


# ------------------------------------------------------------------------- host side


def test_loss_mask_covers_every_assistant_turn_and_nothing_else(tmp_path):
    t = tok()
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Ok then"}]}])
    ds = SFTDataset.build(DatasetConfig(path=path, seq_length=128, batch_size=1), t)
    b = ds.get([0])
    ids, mask = b["input_ids"][0], b["loss_mask"][0].bool()
    n = int((b["segment_ids"][0] > 0).sum())
    assert t.decode(ids[:n]) == ("<s><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nYo</s>\n"
                                 "<|user|>\nMore\n<|assistant|>\nOk then</s>")
    # Both assistant turns (content, eos; the newline closing a turn that is not the last).
    assert t.decode(ids[mask]) == "Yo</s>\nOk then</s>"
    assert b["position_ids"][0, :n].tolist() == list(range(n))


def test_best_fit_packs_every_conversation_once_within_the_row():
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.lognormal(3.5, 0.8, size=500).astype(int) + 2, 256)
    rows = pack_best_fit(lengths, 256)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(lengths[r].sum() <= 256 for r in rows)
    # Within 5 % of the lower bound on the number of rows.
    assert len(rows) <= 1.05 * np.ceil(lengths.sum() / 256) + 1


def test_packed_rows_restart_positions_and_keep_the_masks(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", conversations(40))
    cfg = DatasetConfig(path=path, seq_length=256, batch_size=2)
    packed = SFTDataset.build(cfg, tok(), packing=True)
    plain = SFTDataset.build(cfg, tok(), packing=False)
    assert len(plain) == 40 and len(packed) < 20
    b = packed.get(np.arange(len(packed)))
    p = plain.get(np.arange(40))
    # The same tokens and loss tokens, conversation by conversation.
    for r, row in enumerate(packed.rows):
        for k, i in enumerate(row, start=1):
            at = (b["segment_ids"][r] == k).nonzero().flatten()
            n = int((p["segment_ids"][i] > 0).sum())
            assert len(at) == n and at.tolist() == list(range(int(at[0]), int(at[0]) + n))
            assert torch.equal(b["input_ids"][r, at], p["input_ids"][i, :n])
            assert torch.equal(b["loss_mask"][r, at], p["loss_mask"][i, :n])
            assert b["position_ids"][r, at].tolist() == list(range(n))
            assert b["loss_mask"][r, at[0]] == 0  # a conversation's first token is never scored


def test_bad_records_fail_in_one_line_naming_file_line_and_key(tmp_path):
    good = conversations(1)[0]
    cases = [
        ({"text": "hi"}, "missing field 'messages'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
        ({"messages": [{"role": "bot", "content": "hi"}]}, "'messages[0].role' is 'bot'"),
        ('{"messages": [', "malformed JSON line"),
    ]
    for record, expected in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
        with pytest.raises(DataError) as e:
            SFTDataset.build(DatasetConfig(path=path, seq_length=128, batch_size=1), tok())
        msg = str(e.value)
        assert msg.startswith(f"{path}:2: ") and expected in msg and "\n" not in msg, msg


def test_masks_of_packed_rows():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    allowed = packed_attention_mask(seg)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)
    # A host mask claiming every token: the first of each conversation and the padding drop.
    m = effective_loss_mask(torch.ones_like(seg), seg)
    assert m.tolist() == [[0, 1, 0, 1, 1, 0]]


def test_sft_loss_is_the_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    seg = torch.tensor([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]])
    loss, metrics = sft_loss(logits, ids, mask, seg)
    logp = torch.log_softmax(logits, -1)
    terms = [-logp[b, t - 1, ids[b, t]] for b, t in [(0, 1), (0, 2), (0, 4), (1, 2), (1, 3)]]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert metrics["loss_tokens"] == 5


# ----------------------------------------------------------------------------- device


def test_packed_loss_equals_unpacked_and_no_loss_crosses_a_boundary(tmp_path):
    """The same 12 conversations, packed into a few rows and one per row: the same loss (the
    attention stays inside each conversation, the positions restart); changing one
    conversation's tokens changes nothing scored in its row-neighbours."""
    from torchxla_rlhf.trainers.sft import SFTTrainer

    path = write_jsonl(tmp_path / "c.jsonl", conversations(12))
    trainer = SFTTrainer(tiny_cfg(str(tmp_path / "run"), f"train_dataset.path={path}",
                                  "eval_dataset=null", "train_dataset.batch_size=1", "messages_key=messages",
                                  "total_steps=1"))
    data = {}
    for packing in (True, False):
        ds = SFTDataset.build(DatasetConfig(path=path, seq_length=256, batch_size=1), tok(),
                              packing=packing)
        data[packing] = ds

    def loss_of(batch):
        batch = runtime.batch_to_device(batch, trainer.ctx.mesh)
        with torch.no_grad():
            loss, metrics = trainer.pair_loss(batch)
        return runtime.to_cpu(loss).item(), runtime.to_cpu(metrics["loss_tokens"]).item()

    packed = data[True].get(np.arange(len(data[True])))
    plain = data[False].get(np.arange(12))
    assert len(data[True]) < 6
    lp, np_ = loss_of(packed)
    lu, nu = loss_of(plain)
    assert np_ == nu == int(plain["loss_mask"].sum())
    assert abs(lp - lu) <= 1e-5 * abs(lu), (lp, lu)

    # Leak check: scramble the first conversation of a row holding several; the per-token
    # log-probs of the others do not move.
    from torchxla_rlhf.algos.losses import token_logps

    r = next(i for i, row in enumerate(data[True].rows) if len(row) >= 2)
    one = data[True].get([r])
    other = dict(one, input_ids=one["input_ids"].clone())
    first = one["segment_ids"][0] == 1
    other["input_ids"][0, first] = torch.randint(3, 200, (int(first.sum()),))

    def logps(batch):
        batch = runtime.batch_to_device(batch, trainer.ctx.mesh)
        with torch.no_grad():
            return runtime.to_cpu(token_logps(trainer.logits(batch), batch["input_ids"]))[0]

    # Every position of the later conversations that can carry loss (not a conversation's
    # first token: its logit comes from the previous conversation and is never scored).
    scored = effective_loss_mask(torch.ones_like(one["segment_ids"]), one["segment_ids"])[0]
    rest = (one["segment_ids"][0] >= 2) & scored.bool()
    assert int(rest.sum()) > 10
    torch.testing.assert_close(logps(one)[rest], logps(other)[rest], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logps(one)[first][1:], logps(other)[first][1:])
    trainer.close()


def test_sft_trains_end_to_end_without_recompiling(tmp_path):
    from transformers import AutoModelForCausalLM

    from torchxla_rlhf.trainers.sft import SFTTrainer

    out = str(tmp_path / "run")
    trainer = SFTTrainer(tiny_cfg(out, "total_steps=4", "optimizer.accumulate_gradient_steps=2",
                                  "eval_dataset.max_samples=40", "eval_freq=2"))
    before = {k: runtime.to_cpu(v).clone() for k, v in trainer.policy.state_dict().items()}
    trainer.train()
    trainer.close()
    assert trainer.compiles_after_first_step == 0
    after = {k: runtime.to_cpu(v) for k, v in trainer.policy.state_dict().items()}
    assert all(not torch.equal(before[k], after[k]) for k in before)
    metrics = read_metrics(out)
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and m["loss_tokens"] > 0 for m in train)
    # Packed rows: most positions are real tokens (4 rows x 256 per micro-batch).
    assert all(m["real_tokens"] > 0.8 * 4 * 256 for m in train)
    evals = [m for m in metrics if "eval/loss" in m]
    assert [m["step"] for m in evals] == [0, 2, 4]
    assert evals[-1]["eval/loss"] < evals[0]["eval/loss"]
    model = AutoModelForCausalLM.from_pretrained(os.path.join(out, "final"))
    assert model.config.architectures == ["LlamaForCausalLM"]


def test_pipeline_starts_dpo_from_the_sft_model(tmp_path):
    from torchxla_rlhf.__main__ import wire_stages

    root = str(tmp_path / "p")
    stages = wire_stages(os.path.join(REPO, "configs", "tiny"), root, [],
                         ("sft", "dpo", "reward", "ppo"))
    assert [s.kind for s in stages] == ["sft", "dpo", "reward", "ppo"]
    assert stages[1].wired == {"model": f"{root}/sft/final"}
    assert stages[3].wired == {"model": f"{root}/dpo/final", "reward_model": f"{root}/reward/final"}


@pytest.mark.slow
def test_tiny_pipeline_sft_then_dpo(tmp_path):
    from torchxla_rlhf.__main__ import run_pipeline

    results = run_pipeline(os.path.join(REPO, "configs", "tiny"), str(tmp_path), [
        "sft.total_steps=3", "sft.eval_dataset=null", "dpo.total_steps=2",
        "dpo.eval_dataset=null", "dpo.save_model_freq=0", "sft.logger.progress_bar=false",
        "dpo.logger.progress_bar=false"], stages=("sft", "dpo"))
    assert set(results) == {"sft", "dpo"}
    assert np.isfinite(results["dpo"]["loss"])
    assert f"{tmp_path}/sft/final" in (tmp_path / "dpo" / "config.yaml").read_text()
    assert (tmp_path / "sft" / "final" / "_COMPLETE").exists()
