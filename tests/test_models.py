"""Model loading (local, fsspec, hub path), forward helpers and gradient checkpointing."""

import os

import pytest
import torch

from torchxla_rlhf import checkpoint, runtime
from torchxla_rlhf.models import llama
from torchxla_rlhf.configs.sections import ModelConfig
from torchxla_rlhf.algos.rl import position_ids_from_mask
from torchxla_rlhf.data.tokenizers import build_tiny_tokenizer


@pytest.fixture(scope="module")
def mesh():
    return runtime.make_mesh("1,1,1")


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory, mesh):
    lm = llama.load_causal_lm(ModelConfig(compute_dtype="float32"), mesh)
    path = str(tmp_path_factory.mktemp("lm") / "model")
    checkpoint.save_hf_checkpoint(lm, build_tiny_tokenizer(), path, save_dtype=torch.float32)
    return lm, path


def _logits(model, ids, mask):
    dev = runtime.device()
    return runtime.to_cpu(llama.causal_lm_logits(model, ids.to(dev), mask.to(dev)))


def test_tiny_model_is_seeded_and_loads_back_from_a_local_dir(mesh, saved_lm):
    lm, path = saved_lm
    again = llama.load_causal_lm(ModelConfig(compute_dtype="float32"), mesh)
    loaded = llama.load_causal_lm(ModelConfig(name_or_path=path, compute_dtype="float32"), mesh)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ref = _logits(lm, ids, mask)
    torch.testing.assert_close(_logits(again, ids, mask), ref)
    torch.testing.assert_close(_logits(loaded, ids, mask), ref)
    assert loaded.config._attn_implementation == "xla_einsum"  # the default on XLA (attention.py)


def test_fsspec_directory_is_copied_to_a_local_cache(mesh, saved_lm, tmp_path, monkeypatch):
    import fsspec

    _, path = saved_lm
    fs = fsspec.filesystem("memory")
    for name in os.listdir(path):
        fs.pipe(f"/models/tiny/{name}", open(os.path.join(path, name), "rb").read())
    monkeypatch.setenv("TORCHXLA_RLHF_CACHE", str(tmp_path / "cache"))
    model = llama.load_causal_lm(
        ModelConfig(name_or_path="memory://models/tiny", compute_dtype="float32"), mesh)
    assert model.config.num_hidden_layers == 2
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama.resolve_model_dir("memory://models/nothing-here")


def test_hub_names_go_to_the_hub_with_the_token(monkeypatch, saved_lm):
    _, path = saved_lm
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, token=None, allow_patterns=None):
        calls.update(repo_id=repo_id, revision=revision, token=token)
        return path

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert llama.resolve_model_dir("allenai/tulu-2-13b", "main") == path
    assert calls == {"repo_id": "allenai/tulu-2-13b", "revision": "main", "token": "hf_secret"}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llama.resolve_model_dir("./outputs/missing/final")


def test_position_ids_and_last_token_scores_with_left_and_right_padding(mesh):
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
    rm = llama.load_sequence_classifier(ModelConfig(compute_dtype="float32"), mesh)
    dev = runtime.device()
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    scores = runtime.to_cpu(llama.sequence_classifier_scores(rm, ids.to(dev), mask.to(dev)))
    every = runtime.to_cpu(llama.sequence_classifier_scores(rm, ids.to(dev), mask.to(dev), every_position=True))
    # The score is the head at the last real token: column 4 (left-padded), column 2 (right).
    torch.testing.assert_close(scores, torch.stack([every[0, 4], every[1, 2]]))
    # Same tokens, same positions: the two rows score the same.
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(mesh):
    dev = runtime.device()
    ids = torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(1)).to(dev)
    mask = torch.ones_like(ids)
    grads = []
    for ckpt in (False, True):
        model = llama.load_causal_lm(
            ModelConfig(compute_dtype="float32", gradient_checkpointing=ckpt), mesh)
        loss = llama.causal_lm_logits(model, ids, mask).float().logsumexp(-1).mean()
        loss.backward()
        runtime.sync()  # one graph for all gradients (else each .cpu() traces its own)
        grads.append({n: runtime.to_cpu(p.grad) for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert grads[1]["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0


def test_bf16_compute_over_fp32_params(mesh):
    model = llama.load_causal_lm(ModelConfig(compute_dtype="bfloat16"), mesh)
    assert model.lm_head.weight.dtype == torch.float32
    ids = torch.randint(3, 250, (2, 8)).to(runtime.device())
    with runtime.autocast("bfloat16", "float32"):
        logits = llama.causal_lm_logits(model, ids, torch.ones_like(ids))
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(runtime.to_cpu(logits).float()).all()


def test_pad_equal_to_eos_is_refused_for_reward_models(mesh):
    with pytest.raises(ValueError, match="different from eos"):
        llama.load_sequence_classifier(ModelConfig(), mesh, pad_token_id=2)


def test_remote_model_cache_is_keyed_by_the_files_version(tmp_path, monkeypatch):
    """A model rewritten at the same URL is copied again (never served stale from the cache);
    gcsfs's generation (or checksum) is the version when the store gives one."""
    import fsspec

    fs = fsspec.filesystem("memory")
    url = f"memory://models/rewritten-{os.getpid()}"
    fs.pipe(f"{url}/config.json", b"{}")
    fs.pipe(f"{url}/model.safetensors", b"old weights")
    monkeypatch.setenv("TORCHXLA_RLHF_CACHE", str(tmp_path / "cache"))
    first = llama.resolve_model_dir(url)
    assert llama.resolve_model_dir(url) == first  # unchanged: the cache is reused
    fs.pipe(f"{url}/model.safetensors", b"new weights")
    second = llama.resolve_model_dir(url)
    assert second != first
    assert open(os.path.join(second, "model.safetensors"), "rb").read() == b"new weights"
    assert llama._object_version({"generation": "17", "size": 3}) == "generation=17"
    assert llama._object_version({"size": 3, "mtime": 5.0}) == "size=3 time=5.0"
