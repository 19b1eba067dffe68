"""Weights from sharded PyTorch ``.bin`` checkpoints (how allenai/tulu-2-13b is published):
read tensor by tensor with ``torch.load(weights_only=True, mmap=True)``, and the bad cases."""

import json
import os
import re

import pytest
import torch
from transformers import LlamaForCausalLM

from torchxla_rlhf import runtime
from torchxla_rlhf.models import llama


@pytest.fixture(scope="module")
def mesh():
    return runtime.make_mesh("1,1,1")


@pytest.fixture(scope="module")
def reference():
    """A tiny causal LM on the host (the weights to save)."""
    torch.manual_seed(3)
    return LlamaForCausalLM(llama.tiny_llama_config(llama.TinyModelConfig())).eval()


def save_two_bin_shards(model, path):
    """``pytorch_model-0000{1,2}-of-00002.bin`` + ``pytorch_model.bin.index.json``, as HF
    writes a sharded checkpoint."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        file = f"pytorch_model-{i:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, os.path.join(path, file))
        weight_map.update({k: file for k in part})
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def cfg(path):
    return llama.ModelConfig(name_or_path=str(path), compute_dtype="float32")


def test_two_bin_shards_load_tensor_by_tensor(tmp_path, mesh, reference, monkeypatch):
    path = save_two_bin_shards(reference, tmp_path / "m")
    calls = []
    real_load = torch.load

    def spy(f, *args, **kwargs):
        calls.append((os.path.basename(str(f)), kwargs.get("weights_only"), kwargs.get("mmap")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    loaded = llama.load_causal_lm(cfg(path), mesh)
    # Never a full unpickle, never the whole shard read into memory; each shard opened once.
    assert calls and all(w is True and m is True for _, w, m in calls)
    assert sorted(c[0] for c in calls) == ["pytorch_model-00001-of-00002.bin",
                                            "pytorch_model-00002-of-00002.bin"]
    for name, p in reference.named_parameters():
        torch.testing.assert_close(runtime.to_cpu(dict(loaded.named_parameters())[name]), p.detach())
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    dev = runtime.device()
    ours = runtime.to_cpu(llama.causal_lm_logits(loaded, ids.to(dev), mask.to(dev)))
    with torch.no_grad():
        theirs = reference(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_single_bin_and_reward_model_from_bin(tmp_path, mesh, reference):
    path = tmp_path / "single"
    os.makedirs(path)
    reference.config.save_pretrained(path)
    torch.save(reference.state_dict(), path / "pytorch_model.bin")
    assert set(llama.weight_index(str(path))) == set(reference.state_dict())
    rm = llama.load_sequence_classifier(cfg(path), mesh)  # backbone from .bin, fresh head
    torch.testing.assert_close(runtime.to_cpu(rm.model.norm.weight), reference.model.norm.weight.detach())


def test_safetensors_win_over_bin_files(tmp_path, reference):
    from safetensors.torch import save_file

    path = save_two_bin_shards(reference, tmp_path / "both")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, os.path.join(path, "model.safetensors"))
    assert set(llama.weight_index(path).values()) == {os.path.join(path, "model.safetensors")}
    assert llama.weight_pattern(["a.json", "model-1.safetensors", "pytorch_model-1.bin"]) == "*.safetensors"
    assert llama.weight_pattern(["a.json", "pytorch_model-00001-of-00003.bin"]) == "*.bin"


def test_hub_repo_without_safetensors_fetches_the_bin_shards(tmp_path, monkeypatch, reference):
    """allenai/tulu-2-13b publishes only .bin shards: the safetensors fetch brings config and
    tokenizer files only, then the .bin shards are fetched."""
    bins = save_two_bin_shards(reference, tmp_path / "bins")
    no_weights = tmp_path / "meta"
    reference.config.save_pretrained(no_weights)
    patterns = []

    def fake_snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        patterns.append([p for p in allow_patterns if p in ("*.safetensors", "*.bin")])
        return bins if "*.bin" in allow_patterns else str(no_weights)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert llama.resolve_model_dir("allenai/tulu-2-13b") == bins
    assert patterns == [["*.safetensors"], ["*.bin"]]


def test_bad_index_missing_and_corrupt_shards(tmp_path, mesh, reference):
    path = save_two_bin_shards(reference, tmp_path / "bad")
    index = os.path.join(path, "pytorch_model.bin.index.json")
    good = open(index).read()

    with open(index, "w") as f:
        f.write('{"weight_map": ')
    with pytest.raises(ValueError, match=r"pytorch_model.bin.index.json: not a checkpoint index.*JSONDecodeError"):
        llama.load_causal_lm(cfg(path), mesh)
    with open(index, "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(ValueError, match=r"not a checkpoint index.*'weight_map'"):
        llama.load_causal_lm(cfg(path), mesh)
    with open(index, "w") as f:
        f.write(good)

    second = os.path.join(path, "pytorch_model-00002-of-00002.bin")
    os.rename(second, second + ".moved")
    with pytest.raises(FileNotFoundError, match=r"index.json names shard\(s\) that are not in .*'pytorch_model-00002-of-00002.bin'"):
        llama.load_causal_lm(cfg(path), mesh)
    os.rename(second + ".moved", second)

    with open(second, "r+b") as f:  # truncate the zip archive: its central directory is gone
        f.truncate(os.path.getsize(second) // 2)
    with pytest.raises(ValueError, match=r"pytorch_model-00002-of-00002.bin: cannot read as a PyTorch checkpoint shard"):
        llama.load_causal_lm(cfg(path), mesh)


def edit_first_shard(path, edit):
    """Rewrite shard 1 of a saved checkpoint after ``edit(state)``; returns what edit returned."""
    first = os.path.join(path, "pytorch_model-00001-of-00002.bin")
    state = torch.load(first, weights_only=True)
    result = edit(state)
    torch.save(state, first)
    return result


def test_a_shard_holding_arbitrary_objects_is_refused(tmp_path, mesh, reference):
    """weights_only: a pickled object other than tensors and containers is never executed."""
    path = save_two_bin_shards(reference, tmp_path / "evil")
    edit_first_shard(path, lambda state: state.update(extra=torch.nn.Linear(2, 2)))  # a module
    with pytest.raises(ValueError, match=r"00001-of-00002.bin: cannot read .*UnpicklingError: Weights only load failed"):
        llama.load_causal_lm(cfg(path), mesh)


def test_index_lists_a_tensor_its_shard_lacks(tmp_path, mesh, reference):
    path = save_two_bin_shards(reference, tmp_path / "lying")

    def drop_first(state):
        name = sorted(state)[0]
        del state[name]
        return name

    dropped = edit_first_shard(path, drop_first)
    with pytest.raises(KeyError, match=rf"index lists tensor '{re.escape(dropped)}' here, the shard lacks it"):
        llama.load_causal_lm(cfg(path), mesh)


def test_directory_without_weights(tmp_path, mesh, reference):
    reference.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no weights: expected model.safetensors"):
        llama.load_causal_lm(cfg(tmp_path), mesh)
