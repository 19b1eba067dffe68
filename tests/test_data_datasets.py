"""DatasetConfig, sources (fsspec memory://, local files), PreferenceDataset and PromptDataset."""

import json
import uuid

import fsspec
import numpy as np
import pytest
import torch

from torchxla_rlhf.configs.data import DatasetConfig
from torchxla_rlhf.data import DataError, PreferenceDataset, PromptDataset, iter_records
from torchxla_rlhf.data.sources import SourceStats
from torchxla_rlhf.data.tokenizers import build_tiny_tokenizer


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def B(c):  # a byte's token id in the tiny tokenizer
    return ord(c) + 3


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def mem_file(lines) -> str:
    """Write lines (dicts are JSON-encoded, strings written raw) to a fresh memory:// file."""
    path = f"memory://data-{uuid.uuid4().hex}/set.jsonl"
    with fsspec.open(path, "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def pair(prompt="Hi", chosen="Yo", rejected="No", **extra):
    return {"chosen": [U(prompt), A(chosen)], "rejected": [U(prompt), A(rejected)], **extra}


# ---------------------------------------------------------------- config


def test_config_validate():
    DatasetConfig(path="x.jsonl").validate()
    DatasetConfig(hf_name="allenai/tulu-2.5-preference-data", hf_split="ultrafeedback_mean_aspects").validate()
    with pytest.raises(ValueError, match="exactly one of 'hf_name' and 'path'"):
        DatasetConfig().validate()
    with pytest.raises(ValueError, match="exactly one of 'hf_name' and 'path'"):
        DatasetConfig(path="a", hf_name="b").validate()
    with pytest.raises(ValueError, match="DatasetConfig.seq_length"):
        DatasetConfig(path="a", seq_length=0).validate()
    with pytest.raises(ValueError, match="DatasetConfig.batch_size"):
        DatasetConfig(path="a", batch_size=-2).validate()
    with pytest.raises(ValueError, match="DatasetConfig.max_samples"):
        DatasetConfig(path="a", max_samples=0).validate()
    with pytest.raises(ValueError, match="DatasetConfig.hf_split"):
        DatasetConfig(hf_name="a", hf_split="").validate()


# ---------------------------------------------------------------- sources


def test_iter_records_memory_origins_and_blank_lines():
    path = mem_file([{"a": 1}, "", "   ", {"a": 2}])
    got = list(iter_records(DatasetConfig(path=path)))
    assert got == [({"a": 1}, f"{path}:1"), ({"a": 2}, f"{path}:4")]


def test_iter_records_local_file_and_max_samples(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(5)))
    stats = SourceStats()
    got = list(iter_records(DatasetConfig(path=str(p), max_samples=3), stats))
    assert [r["i"] for r, _ in got] == [0, 1, 2]
    assert got[2][1] == f"{p}:3" and stats["read"] == 3


def test_iter_records_malformed_json_names_file_and_line():
    path = mem_file([{"a": 1}, "{not json", {"a": 3}])
    with pytest.raises(DataError, match=rf"{path}:2: malformed JSON line"):
        list(iter_records(DatasetConfig(path=path)))
    stats = SourceStats()
    got = list(iter_records(DatasetConfig(path=path, skip_malformed=True), stats))
    assert [r["a"] for r, _ in got] == [1, 3] and stats["skipped_malformed"] == 1


def test_iter_records_non_object_line():
    path = mem_file(["[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:1: expected a JSON object per line, got list"):
        list(iter_records(DatasetConfig(path=path)))


def test_iter_records_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset file not found: .*nope.jsonl"):
        list(iter_records(DatasetConfig(path=str(tmp_path / "nope.jsonl"))))


# ---------------------------------------------------------------- preference dataset


def test_preference_batch_hand_worked(tok):
    path = mem_file([pair("Hi", "Yo", "No", margin=0.5), pair("Hi", "Yes!", "")])
    ds = PreferenceDataset.build(DatasetConfig(path=path, seq_length=32), tok)
    assert len(ds) == 2 and ds.stats["kept"] == 2
    b = ds.get([1, 0])
    assert set(b) == {"input_ids", "attention_mask", "loss_mask", "margin", "index"}
    for k in ("input_ids", "attention_mask", "loss_mask"):  # rows: 2 chosen, then 2 rejected
        assert b[k].dtype == torch.int64 and b[k].shape == (4, 32)
    assert b["margin"].dtype == torch.float32 and b["margin"].tolist() == [0.0, 0.5]
    assert b["index"].tolist() == [1, 0]
    # row 1 = example 0: 27 prompt tokens, "Yo" + eos, then pad (0) up to 32
    prefix = [1] + [B(c) for c in "<|user|>\nHi\n<|assistant|>\n"]
    assert len(prefix) == 27
    assert b["input_ids"][1].tolist() == prefix + [B("Y"), B("o"), 2] + [0, 0]
    assert b["attention_mask"][1].tolist() == [1] * 30 + [0] * 2
    assert b["loss_mask"][1].tolist() == [0] * 27 + [1] * 3 + [0] * 2
    # example 1 (row 0; its rejected side is row 2): the rejected answer is empty -> only its
    # eos is scored
    assert b["input_ids"][2].tolist() == prefix + [2] + [0] * 4
    assert b["loss_mask"][2].tolist() == [0] * 27 + [1] + [0] * 4
    assert b["loss_mask"][0].tolist() == [0] * 27 + [1] * 5


def test_preference_truncation_and_no_loss_drops(tok):
    lines = [
        pair("Hi", "Yo", "No"),  # 30 tokens each side: fits 30
        pair("Hi", "Yo!!", "No"),  # chosen 32 tokens: truncated, still has loss tokens
        pair("Hello there, long prompt", "Yo", "No"),  # the prompt alone exceeds 30: no loss token
    ]
    path = mem_file(lines)
    ds = PreferenceDataset.build(DatasetConfig(path=path, seq_length=30, max_dropped_fraction=1.0), tok)
    assert ds.stats == dict(kept=2, dropped_truncated=0, dropped_no_loss_tokens=1, skipped_malformed=0, truncated_kept=1)
    b = ds.get([1])
    assert b["loss_mask"][0].tolist() == [0] * 27 + [1] * 3  # chosen "Yo!" kept, "!" + eos cut
    assert b["attention_mask"][0].sum() == 30
    ds2 = PreferenceDataset.build(DatasetConfig(path=path, seq_length=30, remove_truncated_samples=True, max_dropped_fraction=1.0), tok)
    assert len(ds2) == 1 and ds2.stats["dropped_truncated"] == 1 and ds2.origins == [f"{path}:1"]


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"chosen": [U("a"), A("b")]}, r":2: missing field 'rejected'"),
        ({"chosen": [U("a"), A("b")], "rejected": [U("a"), U("b")]}, r":2: field 'rejected' must end with an assistant turn"),
        ({"chosen": [], "rejected": [U("a"), A("b")]}, r":2: field 'chosen' is an empty conversation"),
        ({"chosen": [{"role": "gpt", "content": "x"}], "rejected": []}, r":2: field 'chosen\[0\]\.role' is 'gpt'"),
        ({"chosen": [U("a"), A(1)], "rejected": [U("a"), A("b")]}, r":2: field 'chosen\[1\]\.content' must be a string"),
        (pair(margin="big"), r":2: field 'margin' must be a finite number"),
        ("{oops", r":2: malformed JSON line"),
    ],
)
def test_preference_errors_name_file_line_field(tok, bad, match):
    path = mem_file([pair(), bad, pair()])
    with pytest.raises(DataError, match=path.replace(".", r"\.") + match):
        PreferenceDataset.build(DatasetConfig(path=path, seq_length=64), tok)
    ds = PreferenceDataset.build(DatasetConfig(path=path, seq_length=64, skip_malformed=True), tok)
    assert len(ds) == 2 and ds.stats["skipped_malformed"] == 1
    assert ds.origins == [f"{path}:1", f"{path}:3"]


def test_preference_index_out_of_range(tok):
    ds = PreferenceDataset.build(DatasetConfig(path=mem_file([pair()]), seq_length=32), tok)
    with pytest.raises(IndexError):
        ds.get([1])


def test_preference_chunks_match_single_batch(tok, monkeypatch):
    """Chunked tokenization gives the same arrays as one big batch."""
    import torchxla_rlhf.data.preference as pref

    rng = np.random.default_rng(0)
    lines = [pair("q" * int(rng.integers(1, 9)), "a" * int(rng.integers(0, 9)), "b" * int(rng.integers(0, 9)),
                  margin=float(i)) for i in range(23)]
    path = mem_file(lines)
    big = PreferenceDataset.build(DatasetConfig(path=path, seq_length=40), tok)
    monkeypatch.setattr(pref, "_CHUNK", 4)
    small = PreferenceDataset.build(DatasetConfig(path=path, seq_length=40), tok)
    idx = np.arange(len(big))
    for k, v in big.get(idx).items():
        assert torch.equal(v, small.get(idx)[k]), k


# ---------------------------------------------------------------- prompt dataset


def test_prompt_left_padding_hand_worked(tok):
    recs = [
        {"messages": [U("Hi")], "source": "x"},
        {"instruction": "Go"},
        {"chosen": [U("Q"), A("a")], "rejected": [U("Q"), A("b")]},
        {"messages": [U("A"), A("B")]},
    ]
    path = mem_file(recs)
    ds = PromptDataset.build(DatasetConfig(path=path, seq_length=30), tok, add_bos=True)
    assert len(ds) == 4
    assert ds.texts[0] == "<s><|user|>\nHi\n<|assistant|>\n"
    assert ds.texts[3] == "<s><|user|>\nA\n<|assistant|>\n"
    b = ds.get([0, 2])
    ids = [1] + [B(c) for c in "<|user|>\nHi\n<|assistant|>\n"]  # 27 tokens
    assert b["input_ids"].shape == (2, 30) and b["input_ids"].dtype == torch.int64
    assert b["input_ids"][0].tolist() == [0, 0, 0] + ids
    assert b["attention_mask"][0].tolist() == [0, 0, 0] + [1] * 27
    assert b["input_ids"][1].tolist()[-15:] == [B(c) for c in "\n<|assistant|>\n"]
    assert b["attention_mask"][1].sum() == 26 and b["index"].tolist() == [0, 2]
    no_bos = PromptDataset.build(DatasetConfig(path=path, seq_length=30), tok, add_bos=False)
    assert no_bos.get([0])["input_ids"][0].tolist() == [0] * 4 + ids[1:]


def test_prompt_truncation(tok):
    path = mem_file([{"instruction": "Hi"}, {"instruction": "A much longer prompt"}])
    ds = PromptDataset.build(DatasetConfig(path=path, seq_length=27), tok, add_bos=True)
    assert ds.stats["truncated_kept"] == 1 and len(ds) == 2
    row = ds.get([1])["input_ids"][0].tolist()
    # the last 27 tokens are kept: the generation header survives, the BOS does not
    assert row[-14:] == [B(c) for c in "<|assistant|>\n"] and 1 not in row
    assert ds.get([1])["attention_mask"].sum() == 27
    ds2 = PromptDataset.build(DatasetConfig(path=path, seq_length=27, remove_truncated_samples=True), tok, add_bos=True)
    assert len(ds2) == 1 and ds2.stats["dropped_truncated"] == 1


def test_prompt_errors(tok):
    path = mem_file([{"instruction": "Hi"}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(DataError, match=path.replace(".", r"\.") + r":2: field 'messages\[0\]\.role' is 'bot'"):
        PromptDataset.build(DatasetConfig(path=path, seq_length=64), tok, add_bos=True)
    ds = PromptDataset.build(DatasetConfig(path=path, seq_length=64, skip_malformed=True), tok, add_bos=True)
    assert len(ds) == 1 and ds.stats["skipped_malformed"] == 1


def test_hf_source_origins_and_token(monkeypatch, tok):
    """hf_name/hf_split go through datasets.load_dataset with $HF_TOKEN (faked: offline)."""
    import datasets

    calls = []

    def fake_load_dataset(name, split, token):
        calls.append((name, split, token))
        return datasets.Dataset.from_list([pair(margin=1.0), {"chosen": [U("a")], "rejected": [U("a"), A("b")]}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    cfg = DatasetConfig(hf_name="allenai/tulu-2.5-preference-data", hf_split="uf", seq_length=32)
    origins = [o for _, o in iter_records(cfg)]
    assert origins == ["allenai/tulu-2.5-preference-data[uf]:0", "allenai/tulu-2.5-preference-data[uf]:1"]
    assert calls[0] == ("allenai/tulu-2.5-preference-data", "uf", "hf_secret")
    with pytest.raises(DataError, match=r"tulu-2\.5-preference-data\[uf\]:1: field 'chosen' must end with an assistant turn") as e:
        PreferenceDataset.build(cfg, tok)
    assert "hf_secret" not in str(e.value)
