"""HF checkpoint export: round trips through from_pretrained, sharding, atomic replace, fsspec."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers

from torchxla_rlhf import runtime
from torchxla_rlhf.checkpoint import fsio, hf_export
from torchxla_rlhf.checkpoint import (
    CheckpointSchedule,
    is_complete_checkpoint,
    plan_shards,
    read_json,
    resolve_checkpoint,
    save_hf_checkpoint,
    write_json,
)
from torchxla_rlhf.configs.sections import TinyModelConfig
from torchxla_rlhf.models.llama import tiny_llama_config

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"


def tiny_config(tie: bool = False, pad_token_id: int | None = None, **kw) -> transformers.LlamaConfig:
    return tiny_llama_config(
        TinyModelConfig(max_position_embeddings=128), pad_token_id=pad_token_id,
        rope_theta=5000.0, tie_word_embeddings=tie, attn_implementation="eager", **kw,
    )


def causal_lm(tie: bool = False, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_config(tie)).eval()


def reward_model(seed: int = 0) -> transformers.LlamaForSequenceClassification:
    torch.manual_seed(seed)
    cfg = tiny_config(num_labels=1, pad_token_id=0)
    model = transformers.LlamaForSequenceClassification(cfg).eval()
    # score is initialised small; make it large enough that a wrong position shows.
    with torch.no_grad():
        model.score.weight.normal_()
    return model


def tiny_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": 4 + i for i in range(20)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def bf16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """The model with every weight rounded to bf16 and kept in fp32: what a bf16 file holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


INPUT_IDS = torch.tensor([[1, 5, 9, 300, 17, 2], [1, 44, 3, 2, 0, 0]])
ATTENTION = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS, attention_mask=ATTENTION).logits


def saved_keys(path: str) -> set[str]:
    keys: set[str] = set()
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                keys |= set(f.keys())
    return keys


# ----------------------------------------------------------------------------------------


def test_plan_shards_greedy_like_hf():
    f32 = torch.float32
    specs = [("a", torch.Size([25]), f32), ("b", torch.Size([5, 5]), f32),
             ("c", torch.Size([75]), f32), ("d", torch.Size([10]), torch.bfloat16)]
    # sizes 100, 100, 300, 20 bytes; limit 250: a+b fit, c alone (bigger than the limit), d.
    plan = plan_shards(specs, 250)
    assert plan.shards == [["a", "b"], ["c"], ["d"]]
    assert plan.filenames == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert plan.total_size == 520 and plan.total_parameters == 25 + 25 + 75 + 10
    assert plan.weight_map["c"] == "model-00002-of-00003.safetensors"
    assert plan_shards(specs, 10**6).filenames == ["model.safetensors"]
    with pytest.raises(ValueError, match="max_shard_size_bytes"):
        plan_shards(specs, 0)


@pytest.mark.parametrize("tie", [False, True])
def test_causal_lm_bf16_round_trip(tmp_path, tie):
    model = causal_lm(tie)
    tok = tiny_tokenizer()
    out = str(tmp_path / "ckpt")
    save_hf_checkpoint(model, tok, out, extra_files={"train_config.yaml": "lr: 1.0\n"})

    assert is_complete_checkpoint(out)
    files = set(os.listdir(out))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "_COMPLETE", "train_config.yaml"} <= files
    assert not any(f.endswith(".index.json") for f in files)
    assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []  # no tmp/old leftovers

    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["tie_word_embeddings"] is tie
    assert cfg["vocab_size"] == 320 and cfg["max_position_embeddings"] == 128
    assert cfg["rope_parameters"]["rope_theta"] == 5000.0
    assert model.config.dtype != torch.bfloat16  # the live config is not modified
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)

    keys = saved_keys(out)
    assert ("lm_head.weight" in keys) is (not tie)
    assert "model.embed_tokens.weight" in keys
    assert not any("inv_freq" in k for k in keys)  # non-persistent buffer
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16

    # Default load follows config.json's dtype.
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert loaded.dtype == torch.bfloat16
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded).float(), logits(model), atol=0.1, rtol=0.05)
    # In fp32 the loaded model is exactly the original with bf16-rounded weights.
    loaded32 = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    torch.testing.assert_close(logits(loaded32), logits(bf16_rounded(model)), atol=0, rtol=0)

    tok2 = transformers.AutoTokenizer.from_pretrained(out)
    assert tok2.chat_template == CHAT_TEMPLATE
    assert tok2.pad_token_id == 0 and tok2("w1 w2")["input_ids"] == [5, 6]


def test_float32_save_is_exact_and_multi_shard(tmp_path):
    model = causal_lm(tie=False)
    out = str(tmp_path / "ckpt")
    # embed/lm_head are 320*64*4 = 81920 bytes each: several shards with a 100 kB limit.
    save_hf_checkpoint(model, None, out, save_dtype=torch.float32, max_shard_size_bytes=100_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    expected = {k: v for k, v in model.state_dict().items()}
    n = len(set(index["weight_map"].values()))
    assert n >= 3
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
    assert set(index["weight_map"].values()) == {
        f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)
    }
    for name, fn in index["weight_map"].items():
        with safe_open(os.path.join(out, fn), "pt") as f:
            assert name in f.keys()
    assert "model.safetensors" not in os.listdir(out)
    assert not os.path.exists(os.path.join(out, "tokenizer.json"))

    assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "float32"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(logits(loaded), logits(model), atol=0, rtol=0)


def test_sequence_classifier_round_trip(tmp_path):
    model = reward_model()
    out = str(tmp_path / "rm")
    save_hf_checkpoint(model, tiny_tokenizer(), out, save_dtype=torch.float32)
    keys = saved_keys(out)
    assert "score.weight" in keys and not any(k.startswith("lm_head") for k in keys)
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert list(f.get_slice("score.weight").get_shape()) == [1, 64]
    assert "score.bias" not in keys
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert cfg["pad_token_id"] == 0 and cfg["eos_token_id"] == 2
    assert len(cfg["id2label"]) == 1  # how HF serializes num_labels=1
    assert not os.path.exists(os.path.join(out, "generation_config.json"))  # as save_pretrained

    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(
        out, attn_implementation="eager"
    )
    assert type(loaded).__name__ == "LlamaForSequenceClassification"
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == 0
    expected = logits(model)
    assert expected.shape == (2, 1)
    torch.testing.assert_close(logits(loaded), expected, atol=0, rtol=0)


def test_sequence_classifier_pad_checks(tmp_path):
    model = reward_model()
    model.config.pad_token_id = 2  # == eos
    for main in (True, False):
        with pytest.raises(ValueError, match="pad_token_id=2 equals eos_token_id=2"):
            save_hf_checkpoint(model, None, str(tmp_path / "rm"), is_main_process=main)
    assert os.listdir(tmp_path) == []

    # A missing pad id is taken from the tokenizer (without touching the live config) ...
    model.config.pad_token_id = None
    save_hf_checkpoint(model, tiny_tokenizer(), str(tmp_path / "rm"))
    assert json.load(open(tmp_path / "rm" / "config.json"))["pad_token_id"] == 0
    assert model.config.pad_token_id is None
    # ... and with no tokenizer either it is an error.
    with pytest.raises(ValueError, match="pad_token_id is not set"):
        save_hf_checkpoint(model, None, str(tmp_path / "rm2"))


def test_failure_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "checkpoint-latest")
    old_model = causal_lm(seed=1)
    save_hf_checkpoint(old_model, None, out, save_dtype=torch.float32)

    calls = {"n": 0}
    real = hf_export._DirWriter.write_safetensors

    def failing(self, name, tensors):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        real(self, name, tensors)

    monkeypatch.setattr(hf_export._DirWriter, "write_safetensors", failing)
    with pytest.raises(OSError, match="simulated"):
        save_hf_checkpoint(causal_lm(seed=2), None, out, max_shard_size_bytes=50_000)
    assert calls["n"] == 2
    assert os.listdir(tmp_path) == ["checkpoint-latest"]  # temp dir removed
    assert is_complete_checkpoint(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded), logits(old_model), atol=0, rtol=0)


def test_crash_between_moves_recovers_previous_then_next_save_cleans(tmp_path, monkeypatch):
    out = str(tmp_path / "checkpoint-latest")
    old_model, new_model = causal_lm(seed=1), causal_lm(seed=2)
    save_hf_checkpoint(old_model, None, out, save_dtype=torch.float32)

    real_move = fsio.move_dir
    moves: list[tuple[str, str]] = []

    def crash_on_second_move(fs, src, dst):
        moves.append((src, dst))
        if len(moves) == 2:  # old was moved aside; the new one is not in place yet
            raise KeyboardInterrupt("killed (simulated)")
        real_move(fs, src, dst)

    monkeypatch.setattr(fsio, "move_dir", crash_on_second_move)
    # A hard kill runs no cleanup: switch the best-effort restore off.
    monkeypatch.setattr(fsio, "_restore_after_failed_publish", lambda *a: None)
    with pytest.raises(KeyboardInterrupt):
        save_hf_checkpoint(new_model, None, out, save_dtype=torch.float32)
    assert moves[0][0] == out and ".old-" in moves[0][1] and ".tmp-" in moves[1][0]
    assert not os.path.exists(out)
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and any(".tmp-" in x for x in left) and any(".old-" in x for x in left)

    previous = resolve_checkpoint(out)
    assert previous is not None and ".old-" in previous
    loaded = transformers.AutoModelForCausalLM.from_pretrained(previous, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded), logits(old_model), atol=0, rtol=0)

    monkeypatch.setattr(fsio, "move_dir", real_move)
    save_hf_checkpoint(new_model, None, out, save_dtype=torch.float32)
    assert os.listdir(tmp_path) == ["checkpoint-latest"]
    assert resolve_checkpoint(out) == out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded), logits(new_model), atol=0, rtol=0)


def test_exception_during_swap_restores_previous(tmp_path, monkeypatch):
    out = str(tmp_path / "ck")
    old_model = causal_lm(seed=1)
    save_hf_checkpoint(old_model, None, out, save_dtype=torch.float32)
    real_move = fsio.move_dir
    n = {"moves": 0}

    def fail_second(fs, src, dst):
        n["moves"] += 1
        if n["moves"] == 2:
            raise OSError("rename failed (simulated)")
        real_move(fs, src, dst)

    monkeypatch.setattr(fsio, "move_dir", fail_second)
    with pytest.raises(OSError):
        save_hf_checkpoint(causal_lm(seed=2), None, out, save_dtype=torch.float32)
    assert os.listdir(tmp_path) == ["ck"] and is_complete_checkpoint(out)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(logits(loaded), logits(old_model), atol=0, rtol=0)


def test_memory_fsspec_target_and_json_helpers(tmp_path):
    root = f"memory://ckpt-test-{uuid.uuid4().hex}"
    fs, root_path = fsspec.core.url_to_fs(root)
    try:
        out = f"{root}/run/checkpoint-latest"
        save_hf_checkpoint(causal_lm(seed=1), tiny_tokenizer(), out, max_shard_size_bytes=100_000)
        model = causal_lm(seed=2)
        save_hf_checkpoint(model, tiny_tokenizer(), out, max_shard_size_bytes=100_000)
        assert is_complete_checkpoint(out) and resolve_checkpoint(out) == out
        assert fs.ls(f"{root_path}/run", detail=False) == [f"{root_path}/run/checkpoint-latest"]
        names = {p.rpartition("/")[2] for p in fs.find(f"{root_path}/run/checkpoint-latest")}
        assert {"_COMPLETE", "config.json", "generation_config.json", "tokenizer.json",
                "model.safetensors.index.json"} <= names
        index = read_json(f"{out}/model.safetensors.index.json")
        assert set(index["weight_map"].values()) <= names

        local = str(tmp_path / "downloaded")
        fs.get(f"{root_path}/run/checkpoint-latest/", local, recursive=True)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            local, dtype=torch.float32, attn_implementation="eager"
        )
        torch.testing.assert_close(logits(loaded), logits(bf16_rounded(model)), atol=0, rtol=0)

        write_json(f"{root}/state/train.json", {"step": 3, "rng": [1, 2]})
        assert read_json(f"{root}/state/train.json") == {"step": 3, "rng": [1, 2]}
    finally:
        fs.rm(root_path, recursive=True)


def test_json_helpers_local_errors(tmp_path):
    write_json(str(tmp_path / "a" / "s.json"), {"x": 1})
    assert read_json(str(tmp_path / "a" / "s.json")) == {"x": 1}
    assert os.listdir(tmp_path / "a") == ["s.json"]
    (tmp_path / "bad.json").write_text('{"x": 1,\n}')
    with pytest.raises(ValueError, match=r"bad.json: invalid JSON at line 2"):
        read_json(str(tmp_path / "bad.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        read_json(str(tmp_path / "missing.json"))


def test_non_main_process_writes_nothing_but_makes_the_same_copies(tmp_path, monkeypatch):
    model = causal_lm(tie=True)
    copies: list[tuple[int, ...]] = []
    real = runtime.to_cpu

    def recording(t):
        copies.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(runtime, "to_cpu", recording)
    save_hf_checkpoint(model, tiny_tokenizer(), str(tmp_path / "w"), is_main_process=False,
                       max_shard_size_bytes=30_000)
    assert os.listdir(tmp_path) == []
    worker_copies, copies[:] = list(copies), []
    save_hf_checkpoint(model, tiny_tokenizer(), str(tmp_path / "m"), max_shard_size_bytes=30_000)
    assert worker_copies == copies
    assert len(copies) == len(model.state_dict()) - 1  # lm_head tied: copied once


def test_extra_files_validation(tmp_path):
    with pytest.raises(ValueError, match=r"'\.\./x'"):
        save_hf_checkpoint(causal_lm(), None, str(tmp_path / "c"), extra_files={"../x": "a"})
    assert os.listdir(tmp_path) == []


def test_checkpoint_schedule():
    s = CheckpointSchedule(save_model_freq=2, save_milestone_freq=3)
    assert [s.actions(k, is_last=False) for k in range(0, 7)] == [
        [], [], ["checkpoint-latest"], ["checkpoint-3"], ["checkpoint-latest"], [],
        ["checkpoint-6", "checkpoint-latest"],
    ]
    assert s.actions(7, is_last=True) == ["final"]
    assert s.actions(6, is_last=True) == ["checkpoint-6", "final"]
    off = CheckpointSchedule(0, 0)
    assert [off.actions(k, False) for k in range(1, 5)] == [[]] * 4
    assert off.actions(4, True) == ["final"]
    renamed = CheckpointSchedule(1, 0, latest_name="latest", final_name="last")
    assert renamed.actions(1, False) == ["latest"] and renamed.actions(2, True) == ["last"]
    with pytest.raises(ValueError, match="save_model_freq=-1"):
        CheckpointSchedule(-1, 0)


def test_streaming_from_sharded_xla_params(tmp_path):
    dev = runtime.init()
    mesh = runtime.make_mesh(f"1,{runtime.device_count()},1")
    cpu_model = causal_lm(tie=False, seed=3)
    expected = {k: v.to(torch.bfloat16) for k, v in cpu_model.state_dict().items()}
    model = causal_lm(tie=False, seed=3).to(dev)
    for name, p in model.named_parameters():
        if p.ndim == 2:  # FSDP-style: dim 0 over fsdp (320, 64, 128, 32 all divide 1/2/4/8)
            runtime.mark_sharding(p, mesh, ("fsdp", None))
    out = str(tmp_path / "xla")
    compiles = runtime.compile_count()
    save_hf_checkpoint(model, None, out, max_shard_size_bytes=60_000)
    # At most torch_xla's small ReplicateShardedData computation per sharded tensor.
    assert runtime.compile_count() - compiles <= len(expected)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(expected)
    for name, fn in index["weight_map"].items():
        with safe_open(os.path.join(out, fn), "pt") as f:
            got = f.get_tensor(name)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, expected[name], atol=0, rtol=0)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    )
    torch.testing.assert_close(logits(loaded), logits(bf16_rounded(cpu_model)), atol=0, rtol=0)


def test_tied_xla_model_warns_when_tie_was_broken_by_to_device(tmp_path, caplog):
    dev = runtime.init()
    model = causal_lm(tie=True, seed=4).to(dev)
    broken = model.lm_head.weight is not model.model.embed_tokens.weight
    with caplog.at_level("WARNING", logger="torchxla_rlhf.checkpoint"):
        save_hf_checkpoint(model, None, str(tmp_path / "a"), save_dtype=torch.float32)
    assert ("declared tied" in caplog.text) is broken
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    caplog.clear()
    with caplog.at_level("WARNING", logger="torchxla_rlhf.checkpoint"):
        save_hf_checkpoint(model, None, str(tmp_path / "b"), save_dtype=torch.float32)
    assert "declared tied" not in caplog.text
    assert "lm_head.weight" not in saved_keys(str(tmp_path / "b"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "b"), attn_implementation="eager"
    )
    torch.testing.assert_close(logits(loaded), logits(causal_lm(tie=True, seed=4)), atol=0, rtol=0)


# ----------------------------------------------------------------------------------------
# The checkpoint manager: resolution of resume_from, the minutes schedule, purging
# ----------------------------------------------------------------------------------------


def _manager(out, clock=None, **kw):
    from torchxla_rlhf.checkpoint import CheckpointManager

    args = dict(schedule=CheckpointSchedule(kw.pop("save_model_freq", 0), kw.pop("milestones", 0)),
                save_every_minutes=kw.pop("minutes", 0.0), save_training_state=kw.pop("state", True),
                is_main=True, export=lambda path: None, trained=dict, trainer_state=dict)
    if clock is not None:
        args["clock"] = clock
    return CheckpointManager(str(out), **args)


def _fake_checkpoint(path, step=None, complete=True):
    """A checkpoint directory: with a training state at ``step`` (None: weights only)."""
    os.makedirs(path, exist_ok=True)
    if step is not None:
        write_json(os.path.join(path, "training_state", "trainer_state.json"), {"step": step})
    if complete:
        open(os.path.join(path, fsio.COMPLETE_MARKER), "w").close()


def test_resume_auto_takes_the_newest_complete_checkpoint_of_any_kind(tmp_path):
    m = _manager(tmp_path)
    _fake_checkpoint(tmp_path / "checkpoint-latest", step=20)
    _fake_checkpoint(tmp_path / "checkpoint-30", step=30)
    _fake_checkpoint(tmp_path / "training-state-latest", step=45)
    _fake_checkpoint(tmp_path / "training-state-latest.tmp-staged", step=50, complete=False)
    _fake_checkpoint(tmp_path / "checkpoint-latest-value")  # PPO's value export: not a candidate
    assert m.resolve("auto") == str(tmp_path / "training-state-latest")
    # Killed while publishing step 60's state: the previous one, left aside, is the newest.
    os.rename(tmp_path / "training-state-latest", tmp_path / "training-state-latest.old-1-ab")
    _fake_checkpoint(tmp_path / "checkpoint-latest", step=40)
    assert m.resolve("auto") == str(tmp_path / "training-state-latest.old-1-ab")


def test_resume_auto_never_starts_fresh_over_unusable_checkpoints(tmp_path, caplog):
    from torchxla_rlhf.errors import ResumeError

    m = _manager(tmp_path / "run")
    with caplog.at_level("WARNING"):
        assert m.resolve("auto") is None  # nothing there (not even the directory)
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    os.makedirs(tmp_path / "run")
    _fake_checkpoint(tmp_path / "run" / "checkpoint-latest")  # weights only
    _fake_checkpoint(tmp_path / "run" / "training-state-latest", step=3, complete=False)
    with pytest.raises(ResumeError) as e:
        m.resolve("auto")
    msg = str(e.value)
    assert "\n" not in msg and "none can be resumed" in msg
    assert "checkpoint-latest: weights only" in msg and "training-state-latest: incomplete" in msg
    with pytest.raises(ResumeError, match="holds weights but no training state"):
        m.resolve(str(tmp_path / "run" / "checkpoint-latest"))
    with pytest.raises(ResumeError, match="not a complete checkpoint"):
        m.resolve(str(tmp_path / "run" / "training-state-latest"))


def test_minutes_schedule_becomes_steps_and_preemption_saves_state_only(tmp_path):
    """save_every_minutes=1 at 10 s per step: a state save every 6 steps after the timed ones;
    HF exports with state reset the count; a preemption writes the state alone."""
    now = {"t": 0.0}
    m = _manager(tmp_path, clock=lambda: now["t"], minutes=1.0, save_model_freq=10, state=True)
    writes = []
    m._save_dir = lambda path, step, hf, with_state: writes.append((step, path.rpartition("/")[2], hf))
    for step in range(1, 26):
        m.save(step, last=step == 25)
        now["t"] += 10.0
    assert m.state_every_steps == 6
    assert writes == [(9, "training-state-latest", False), (10, "checkpoint-latest", True),
                      (16, "training-state-latest", False), (20, "checkpoint-latest", True),
                      (25, "final", True)]
    writes.clear()
    m.save(26, preempted=True)
    assert writes == [(26, "training-state-latest", False)]


def test_purge_drops_a_superseded_state_only_checkpoint(tmp_path):
    m = _manager(tmp_path, save_model_freq=5)
    _fake_checkpoint(tmp_path / "training-state-latest", step=3)
    _fake_checkpoint(tmp_path / "training-state-latest.old-1-ab", step=2)
    m._save_dir = lambda path, step, hf, with_state: _fake_checkpoint(path, step)
    m.save(4)
    assert (tmp_path / "training-state-latest").exists()
    m.save(5)  # checkpoint-latest with a newer state
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-latest"]


@pytest.mark.parametrize("name,cls", [("dpo_13b", "dpo.DPOConfig"), ("reward_13b", "reward.RewardConfig"),
                                      ("ppo_13b", "ppo.PPOConfig")])
def test_13b_configs_bound_the_lost_work(name, cls):
    """Every 13B config saves its training state at most 30 minutes apart (a crash loses at
    most that plus one step), and its header says what a preemption writes per host."""
    import importlib

    from torchxla_rlhf.configs.loader import load_config

    module, _, cls = cls.partition(".")
    path = os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.yaml")
    cfg = load_config(getattr(importlib.import_module(f"torchxla_rlhf.configs.{module}"), cls), path)
    assert 0 < cfg.save_every_minutes <= 30 and cfg.save_training_state  # every export resumes
    header = open(path).read().split("\n\n")[0]
    assert "loses at most 30 minutes plus one step" in header and "GB per host" in header
