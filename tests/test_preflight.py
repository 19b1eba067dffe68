"""The pre-flight's inputs: the one mesh parse, TPU pods as PJRT sees them, the one model-shape
reader (local, hub, gs://; never a guess from the name) and the parameter list it derives."""

from __future__ import annotations

import json
import os

import fsspec
import pytest

from torchxla_rlhf.configs.sections import ModelConfig
from torchxla_rlhf.errors import RemoteError, UserError
from torchxla_rlhf.preflight.mesh import (GIB, Mesh, MeshError, TpuError, fixed_devices,
                                          parse_mesh_dim, tpu_pod)
from torchxla_rlhf.preflight.shapes import (NoSuchModel, ShapeError, frozen_dtype, read_shape,
                                            shape_from_config)

from helpers import REPO

LLAMA2_13B_DIR = os.path.join(REPO, "bench", "shapes", "llama-2-13b")


def test_mesh_value_unpacks_and_compares_as_a_tuple():
    m = parse_mesh_dim("-1,16,16", 512)
    assert m == (2, 16, 16) and isinstance(m, Mesh)
    dp, fsdp, mp = m
    assert (dp, fsdp, mp, m.devices, m.batch, str(m)) == (2, 16, 16, 512, 32, "2,16,16")
    assert parse_mesh_dim(m, 512) == m  # the runtime's make_mesh takes the parsed value
    assert fixed_devices("1,32,4") == 128 and fixed_devices("1,-1,4") is None


@pytest.mark.parametrize("mesh_dim,match", [
    ("1,2", "expected 3 axes"), ("a,b,c", "three comma-separated"), ("-1,-1,2", "at most one"),
    ("0,2,2", "positive"), ("1,2,2", "uses 4 device"), ("-1,3,1", "does not fit 8 device"),
])
def test_bad_meshes_are_one_line_user_errors(mesh_dim, match):
    with pytest.raises(MeshError, match=match) as e:
        parse_mesh_dim(mesh_dim, 8)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,devices,hosts,gib", [
    ("v3-128", 128, 16, 16), ("v3-256", 256, 32, 16), ("v3-8", 8, 1, 16),
    ("v4-64", 32, 8, 32), ("v5p-32", 16, 4, 95),
])
def test_tpu_pods_as_pjrt_sees_them(name, devices, hosts, gib):
    """v3: every TensorCore is a device of 16 GiB, 8 per host; v4 and v5p are megacore: one
    device per chip (2 cores), 4 chips per host."""
    pod = tpu_pod(name)
    assert (pod.devices, pod.hosts, pod.hbm_bytes) == (devices, hosts, gib * GIB)


@pytest.mark.parametrize("name", ["v9-8", "v3-100", "v3", "tpu"])
def test_unknown_tpu_types(name):
    with pytest.raises(TpuError, match="v3-128, v3-256, v4-64, v5p-32"):
        tpu_pod(name)


# ----------------------------------------------------------------------------- shapes


def _model(name, **kw):
    return ModelConfig(name_or_path=name, **kw)


def test_local_directory_shape():
    s = read_shape(_model(LLAMA2_13B_DIR))
    assert (s.vocab, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim) == (
        32000, 5120, 13824, 40, 40, 40, 128)
    assert not s.tie and s.max_positions == 4096 and s.dtype == "float16"


def test_a_size_in_the_name_is_never_read(monkeypatch, tmp_path):
    """A directory named like a 13B model is whatever its config.json says; a hub name that
    cannot be read is an error naming the key, not Llama-2 13B's shape."""
    d = tmp_path / "tulu-2-13b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)))
    assert read_shape(_model(str(d))).hidden == 64
    _offline(monkeypatch, tmp_path)
    with pytest.raises(RemoteError, match="meta-llama/Llama-2-13b-hf.*HF_HUB_OFFLINE"):
        read_shape(_model("meta-llama/Llama-2-13b-hf"), "reward_model")


def _offline(monkeypatch, tmp_path):
    from torchxla_rlhf.preflight import shapes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(shapes, "_hub_answers", {})


def test_offline_hub_fails_fast_and_falls_back_to_the_shipped_config_json(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE: the cache is the only answer (no network wait); for plan
    (shipped_fallback) a hub model a shipped config names then comes from its shipped
    config.json, with a note; others, another revision than the shipped one, and a run's own
    start-up read stay errors."""
    from torchxla_rlhf.preflight import shapes

    _offline(monkeypatch, tmp_path)
    monkeypatch.setattr(shapes, "_remote", lambda *a: pytest.fail("waited for the network"))
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE"):  # a run needs the hub anyway
        read_shape(_model("allenai/tulu-2-13b"), "model")
    s = read_shape(_model("allenai/tulu-2-13b"), "model", shipped_fallback=True)
    assert (s.vocab, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads) == (
        32000, 5120, 13824, 40, 40, 40)
    assert s.note == ("allenai/tulu-2-13b: shape from the shipped copy of its config.json; "
                      "the hub was not reached (HF_HUB_OFFLINE is set)")
    with pytest.raises(RemoteError, match="HF_HUB_OFFLINE"):
        read_shape(_model("allenai/tulu-2-13b", revision="v1"), "model", shipped_fallback=True)


def test_every_hub_model_a_shipped_config_names_has_its_config_json_shipped():
    """Every hub name in configs/ (the model keys' name_or_path) has a shipped config.json, and
    every shipped config.json is named by a config (setup.cfg installs them)."""
    import glob
    import re

    from torchxla_rlhf.preflight.shapes import SHIPPED_MODEL_CONFIGS, shipped_model_config

    named = set()
    for path in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True):
        for name in re.findall(r"name_or_path:\s*([^\s#]+)", open(path).read()):
            if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(os.path.join(os.path.dirname(path), name)) \
                    and not name.startswith(("outputs/", "data/")):
                named.add(name)
    assert named, "no hub model in the shipped configs?"
    assert {n for n in named if shipped_model_config(n) is None} == set()
    shipped = {f.removesuffix(".json").replace("--", "/") for f in os.listdir(SHIPPED_MODEL_CONFIGS)}
    assert shipped == named
    with open(os.path.join(REPO, "setup.cfg")) as f:
        assert "preflight/model_configs/*.json" in f.read()


def test_a_hub_that_answers_wins_over_the_shipped_copy(monkeypatch, tmp_path):
    from torchxla_rlhf.preflight import shapes

    monkeypatch.setattr(shapes, "_hub_answers", {})
    d = tmp_path / "hub"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(
        model_type="llama", vocab_size=320, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4)))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: str(d / "config.json"))
    s = read_shape(_model("allenai/tulu-2-13b"), shipped_fallback=True)
    assert s.hidden == 64 and s.note == ""


def test_hub_name_reads_config_json_with_revision_and_token(monkeypatch, tmp_path):
    calls = []

    def fake_download(repo, filename, revision=None, local_files_only=False, token=None):
        calls.append((repo, filename, revision, local_files_only, token))
        return os.path.join(LLAMA2_13B_DIR, "config.json")

    import huggingface_hub

    from torchxla_rlhf.preflight import shapes

    monkeypatch.setattr(shapes, "_hub_answers", {})
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert read_shape(_model("org/model", revision="v2")).layers == 40
    assert calls == [("org/model", "config.json", "v2", True, "hf_secret")]


def test_gs_directory_through_fsspec():
    fs = fsspec.filesystem("memory")
    with open(os.path.join(LLAMA2_13B_DIR, "config.json")) as f:
        fs.pipe("/bucket/rm/config.json", f.read().encode())
    assert read_shape(_model("memory://bucket/rm/"), "reward_model").hidden == 5120
    with pytest.raises(ShapeError, match=r"reward_model.name_or_path='memory://bucket/none'.*does not exist"):
        read_shape(_model("memory://bucket/none"), "reward_model")


@pytest.mark.parametrize("name", ["outputs/rm_13b/final", "./nowhere"])
def test_missing_local_model_names_the_key(name):
    with pytest.raises(NoSuchModel, match=f"reward_model.name_or_path='{name}': no such model directory") as e:
        read_shape(_model(name), "reward_model")
    assert isinstance(e.value, FileNotFoundError) and e.value.key == "reward_model"


def test_not_a_llama_or_missing_sizes():
    with pytest.raises(ShapeError, match="'mistral' model"):
        shape_from_config({"model_type": "mistral"}, "x")
    with pytest.raises(ShapeError, match="no integer hidden_size"):
        shape_from_config({"vocab_size": 10, "intermediate_size": 8, "num_hidden_layers": 1,
                           "num_attention_heads": 1}, "x")


@pytest.mark.parametrize("extra", [{}, {"tie_word_embeddings": True}, {"num_key_value_heads": 2},
                                   {"head_dim": 32}])
@pytest.mark.parametrize("head", ["causal", "classifier"])
def test_params_are_what_transformers_builds(extra, head):
    """The torch-free parameter list equals ``named_parameters()`` of transformers' Llama of
    that shape (built on the meta device)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    c = {**dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=80,
                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4), **extra}
    config = LlamaConfig(**{k: v for k, v in c.items() if k != "model_type"}, num_labels=1)
    cls = LlamaForCausalLM if head == "causal" else LlamaForSequenceClassification
    with torch.device("meta"):
        model = cls(config)
    expected = tuple((n, tuple(p.shape)) for n, p in model.named_parameters())
    assert shape_from_config(c, "x").params(head) == expected


def test_frozen_dtype_is_one_rule():
    from torchxla_rlhf.models import llama

    assert llama.frozen_dtype is frozen_dtype
    assert frozen_dtype(_model("tiny", param_dtype="float32", compute_dtype="bfloat16")) == "bfloat16"
    assert frozen_dtype(_model("tiny", param_dtype="float32", compute_dtype="float32")) == "float32"
    assert frozen_dtype(_model("tiny", compute_dtype="bfloat16", frozen_dtype="param")) == "float32"
