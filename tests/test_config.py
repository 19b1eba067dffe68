"""Tests for torchxla_rlhf.configs.loader: typed config trees, YAML + base files, overrides, CLI."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import fsspec
import pytest
import yaml

from torchxla_rlhf.configs.loader import (
    ConfigError,
    cli_main,
    dump_yaml,
    field_docs,
    format_help,
    from_dict,
    load_config,
    parse_cli,
    save_config,
    to_dict,
)

# ---------------------------------------------------------------------------------------------
# Example trees (module level so `typing.get_type_hints` and `inspect.getsource` see them)

VALIDATE_CALLS: list[str] = []


@dataclass
class OptimizerConfig:
    """Optimizer settings."""

    lr: float = 5e-7
    """Peak learning rate."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer updates spent warming up
    linearly from 0."""
    undocumented: int = 3

    def validate(self) -> None:
        VALIDATE_CALLS.append("optimizer")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")


@dataclass
class BaseDoc:
    seed: int = 0
    """Random seed."""
    note: str = "x"
    """Base note."""


@dataclass
class ChildDoc(BaseDoc):
    note: str = "y"
    """Child note."""
    extra: bool = False
    """Extra flag."""


@dataclass
class EvalConfig:
    every: int = 100
    """Evaluate every N steps."""
    dataset: str | None = None
    """Eval dataset name, or null for none."""


@dataclass
class Inner:
    depth: int = 1
    """Must be positive."""

    def validate(self) -> None:
        VALIDATE_CALLS.append("inner")
        if self.depth <= 0:
            raise ValueError("depth must be positive")


@dataclass
class Middle:
    inner: Inner = field(default_factory=Inner)
    """Nested section."""


@dataclass
class PostInit:
    n: int = 1

    def __post_init__(self) -> None:
        if self.n > 10:
            raise ValueError("n too large")


@dataclass
class Root:
    """Toy trainer config."""

    model: str
    """HF model name or path."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """DPO loss variant."""
    use_ipo: bool = False
    """Use the IPO loss."""
    batch_size: int = 8
    """Global batch size."""
    beta: float = 0.1
    """KL coefficient."""
    run_name: str = "run"
    """Run name."""
    mesh_dim: str = "1,-1,1"
    """dp,fsdp,tp mesh."""
    max_steps: int | None = None
    """Stop after this many steps (null: one epoch)."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer section."""
    eval: EvalConfig | None = None
    """Optional eval section."""
    middle: Middle = field(default_factory=Middle)
    """Two levels deep."""
    post: PostInit = field(default_factory=PostInit)


def _err(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return str(p)


# ---------------------------------------------------------------------------------------------
# field_docs


def test_field_docs_reads_docstrings_under_fields():
    docs = field_docs(OptimizerConfig)
    assert docs["lr"] == "Peak learning rate."
    assert docs["warmup_ratio"] == (
        "Fraction of optimizer updates spent warming up\nlinearly from 0.")
    assert "undocumented" not in docs


def test_field_docs_walks_base_classes_child_wins():
    docs = field_docs(ChildDoc)
    assert docs == {"seed": "Random seed.", "note": "Child note.", "extra": "Extra flag."}


def test_field_docs_of_local_class():
    @dataclass
    class Local:
        a: int = 1
        """Doc of a."""

    assert field_docs(Local) == {"a": "Doc of a."}


# ---------------------------------------------------------------------------------------------
# from_dict: types


def test_from_dict_defaults_and_nested():
    cfg = from_dict(Root, {"model": "m", "optimizer": {"lr": 1e-6}, "eval": {"every": 5}})
    assert cfg.model == "m"
    assert cfg.optimizer == OptimizerConfig(lr=1e-6)
    assert cfg.eval == EvalConfig(every=5)
    assert cfg.middle.inner.depth == 1


def test_int_coercion():
    assert from_dict(Root, {"model": "m", "batch_size": 16}).batch_size == 16
    cfg = from_dict(Root, {"model": "m", "batch_size": 16.0})
    assert cfg.batch_size == 16 and type(cfg.batch_size) is int
    assert from_dict(Root, {"model": "m", "batch_size": "1e3"}).batch_size == 1000
    msg = _err(from_dict, Root, {"model": "m", "batch_size": 2.5})
    assert "'batch_size'" in msg and "expected int" in msg and "fractional" in msg
    msg = _err(from_dict, Root, {"model": "m", "batch_size": True})
    assert "'batch_size': expected int, got bool true" in msg
    assert "expected int" in _err(from_dict, Root, {"model": "m", "batch_size": "eight"})


def test_float_coercion_accepts_int_and_yaml_float_strings():
    assert from_dict(Root, {"model": "m", "beta": 1}).beta == 1.0
    assert type(from_dict(Root, {"model": "m", "beta": 1}).beta) is float
    # YAML 1.1 (PyYAML) reads `5e-7` as a string.
    data = yaml.safe_load("model: m\noptimizer:\n  lr: 5e-7\n")
    assert data["optimizer"]["lr"] == "5e-7"
    assert from_dict(Root, data).optimizer.lr == 5e-7
    msg = _err(from_dict, Root, {"model": "m", "optimizer": {"lr": "fast"}})
    assert "'optimizer.lr': expected float, got str 'fast'" in msg
    assert "expected float" in _err(from_dict, Root, {"model": "m", "beta": False})


def test_bool_only_real_booleans():
    assert from_dict(Root, {"model": "m", "use_ipo": True}).use_ipo is True
    for bad in ("true", 1, 0, None):
        msg = _err(from_dict, Root, {"model": "m", "use_ipo": bad})
        assert "'use_ipo': expected bool" in msg


def test_str_rejects_non_strings_in_files():
    msg = _err(from_dict, Root, {"model": 2024})
    assert "'model': expected str, got int 2024" in msg and "quote" in msg


def test_optional_and_literal():
    assert from_dict(Root, {"model": "m", "max_steps": None}).max_steps is None
    assert from_dict(Root, {"model": "m", "max_steps": 7}).max_steps == 7
    assert "'max_steps': expected int" in _err(from_dict, Root, {"model": "m", "max_steps": "x"})
    assert from_dict(Root, {"model": "m", "loss": "ipo"}).loss == "ipo"
    msg = _err(from_dict, Root, {"model": "m", "loss": "sigmod"})
    assert "'loss': expected one of 'sigmoid', 'ipo'" in msg
    assert "did you mean 'sigmoid'?" in msg


def test_sections_must_be_mappings():
    msg = _err(from_dict, Root, {"model": "m", "optimizer": 3})
    assert "'optimizer': expected a mapping of OptimizerConfig keys, got int 3" in msg
    msg = _err(from_dict, Root, {"model": "m", "eval": "yes please"})
    assert "'eval': expected a mapping of EvalConfig keys, got str 'yes please'" in msg


def test_missing_required_and_unknown_keys():
    msg = _err(from_dict, Root, {}, source="cfg.yaml")
    assert msg == "cfg.yaml: missing required key 'model' (str)"
    msg = _err(from_dict, Root, {"model": "m", "optimizer": {"lrr": 1}}, source="x.yaml")
    assert msg == "x.yaml: unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"
    # Right name in the wrong section.
    msg = _err(from_dict, Root, {"model": "m", "warmup_ratio": 0.2})
    assert "unknown key 'warmup_ratio'; did you mean 'optimizer.warmup_ratio'?" in msg
    # Nothing close: list what is valid there.
    msg = _err(from_dict, Root, {"model": "m", "eval": {"zzzzzz": 1}})
    assert "unknown key 'eval.zzzzzz'" in msg and "valid keys at 'eval': every, dataset" in msg


def test_validate_called_recursively_with_key_prefix():
    VALIDATE_CALLS.clear()
    from_dict(Root, {"model": "m"})
    # Default-built sections are validated too, children before their parents.
    assert sorted(VALIDATE_CALLS) == ["inner", "optimizer"]
    msg = _err(from_dict, Root, {"model": "m", "optimizer": {"warmup_ratio": 1.5}})
    assert "invalid 'optimizer': warmup_ratio must be in [0, 1], got 1.5" in msg
    msg = _err(from_dict, Root, {"model": "m", "middle": {"inner": {"depth": 0}}}, source="f.yaml")
    assert msg == "f.yaml: invalid 'middle.inner': depth must be positive"
    msg = _err(from_dict, Root, {"model": "m", "post": {"n": 11}})
    assert "invalid 'post': n too large" in msg


def test_round_trip_to_dict_from_dict_and_yaml():
    cfg = from_dict(Root, {
        "model": "m", "loss": "ipo", "max_steps": 3, "eval": {"every": 9, "dataset": "d"},
        "optimizer": {"lr": 5e-7},
    })
    d = to_dict(cfg)
    assert d["eval"] == {"every": 9, "dataset": "d"} and d["max_steps"] == 3
    assert d["optimizer"] == {"lr": 5e-7, "warmup_ratio": 0.1, "undocumented": 3}
    assert from_dict(Root, d) == cfg
    text = dump_yaml(cfg)
    assert "lr: 5.0e-07" in text  # written so that YAML 1.1 reads a float back
    assert yaml.safe_load(text)["optimizer"]["lr"] == 5e-7
    assert from_dict(Root, yaml.safe_load(text)) == cfg
    with pytest.raises(TypeError):
        to_dict({"a": 1})


# ---------------------------------------------------------------------------------------------
# load_config: files, base chains, line numbers


def test_load_yaml_with_line_numbers(tmp_path):
    path = _write(tmp_path, "x.yaml", """\
        model: m
        optimizer:
          lr: 5e-7
          lrr: 1
        """)
    msg = _err(load_config, Root, path)
    assert msg == f"{path}:4: unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?"
    path = _write(tmp_path, "v.yaml", "model: m\noptimizer:\n  warmup_ratio: 2\n")
    msg = _err(load_config, Root, path)
    # A section's validate() error is located at the field its message names.
    assert msg == f"{path}:3: invalid 'optimizer': warmup_ratio must be in [0, 1], got 2.0"
    path = _write(tmp_path, "y.yaml", "model: m\nbatch_size: 2.5\n")
    assert _err(load_config, Root, path).startswith(f"{path}:2: 'batch_size': expected int")
    path = _write(tmp_path, "z.yaml", "beta: 2\n")
    assert _err(load_config, Root, path) == f"{path}: missing required key 'model' (str)"


def test_yaml_float_strings(tmp_path):
    path = _write(tmp_path, "x.yaml", "model: m\nbeta: 1e-1\noptimizer: {lr: 5e-7}\n")
    cfg = load_config(Root, path)
    assert cfg.optimizer.lr == 5e-7 and cfg.beta == 0.1


def test_bad_files(tmp_path):
    msg = _err(load_config, Root, str(tmp_path / "nope.yaml"))
    assert "config file not found" in msg and "nope.yaml" in msg
    path = _write(tmp_path, "bad.yaml", "model: m\noptimizer: [1,\n")
    assert _err(load_config, Root, path).startswith(f"{path}:")
    assert "invalid YAML" in _err(load_config, Root, path)
    path = _write(tmp_path, "list.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping" in _err(load_config, Root, path)
    path = _write(tmp_path, "dup.yaml", "model: m\nbeta: 1.0\nbeta: 2.0\n")
    assert _err(load_config, Root, path) == f"{path}:3: duplicate key 'beta' (first set at line 2)"
    path = _write(tmp_path, "empty.yaml", "")
    assert "missing required key 'model'" in _err(load_config, Root, path)
    assert load_config(Root, path, ["model=m"]).model == "m"


def test_base_chain_deep_merge(tmp_path):
    _write(tmp_path, "common/root.yaml", """\
        model: root-model
        batch_size: 4
        optimizer: {lr: 1.0e-5, warmup_ratio: 0.2}
        eval: {every: 10}
        """)
    _write(tmp_path, "common/mid.yaml", """\
        base: root.yaml
        batch_size: 16
        optimizer:
          lr: 2e-6
        """)
    top = _write(tmp_path, "exp/top.yaml", """\
        base: ../common/mid.yaml
        run_name: top
        eval: null
        """)
    cfg = load_config(Root, top)
    assert cfg.model == "root-model"
    assert cfg.batch_size == 16
    assert cfg.optimizer.lr == 2e-6 and cfg.optimizer.warmup_ratio == 0.2  # merged, not replaced
    assert cfg.eval is None  # an explicit null replaces the base's section
    assert cfg.run_name == "top"
    # Errors in a base file point at that file and line.
    _write(tmp_path, "common/root.yaml", "model: m\noptimizer:\n  warmup_ratio: fast\n")
    msg = _err(load_config, Root, top)
    assert "common/root.yaml:3: 'optimizer.warmup_ratio': expected float, got str 'fast'" in msg


def test_base_list_and_missing_base(tmp_path):
    _write(tmp_path, "a.yaml", "model: a\nbatch_size: 1\n")
    _write(tmp_path, "b.yaml", "batch_size: 2\nbeta: 0.5\n")
    top = _write(tmp_path, "top.yaml", "base: [a.yaml, b.yaml]\nbeta: 0.25\n")
    cfg = load_config(Root, top)
    assert (cfg.model, cfg.batch_size, cfg.beta) == ("a", 2, 0.25)
    top = _write(tmp_path, "top2.yaml", "model: m\nbase: missing.yaml\n")
    msg = _err(load_config, Root, top)
    assert msg.startswith(f"{top}:2: base config file not found") and "missing.yaml" in msg
    top = _write(tmp_path, "top3.yaml", "base: 3\n")
    assert "'base' must be a file path" in _err(load_config, Root, top)


def test_base_cycle(tmp_path):
    _write(tmp_path, "a.yaml", "base: b.yaml\nmodel: m\n")
    _write(tmp_path, "b.yaml", "base: c.yaml\n")
    _write(tmp_path, "c.yaml", "base: a.yaml\n")
    msg = _err(load_config, Root, str(tmp_path / "a.yaml"))
    assert "'base' cycle:" in msg
    assert "a.yaml -> " in msg and "b.yaml -> " in msg and msg.endswith("a.yaml")
    _write(tmp_path, "self.yaml", "base: self.yaml\n")
    assert "'base' cycle" in _err(load_config, Root, str(tmp_path / "self.yaml"))


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrides_of_every_kind(tmp_path):
    path = _write(tmp_path, "x.yaml", "model: m\nbeta: 0.5\neval: {every: 3, dataset: d}\n")
    cfg = load_config(Root, path, [
        "optimizer.lr=1e-6",          # YAML string '1e-6' -> float
        "mesh_dim='1,2,2'",           # quoted
        "use_ipo=true",
        "eval.dataset=null",
        "run_name=2024",              # str field gets the raw text, not int 2024
        "model=no",                   # ... and not False
        "batch_size=32",
        "beta=1",                     # int -> float
        "max_steps=1e3",
        "loss=ipo",
        "loss=ipo",
    ])
    assert cfg.optimizer.lr == 1e-6
    assert cfg.mesh_dim == "1,2,2"
    assert cfg.use_ipo is True
    assert cfg.eval == EvalConfig(every=3, dataset=None)
    assert cfg.run_name == "2024" and cfg.model == "no"
    assert (cfg.batch_size, cfg.beta, cfg.max_steps) == (32, 1.0, 1000)
    assert cfg.loss == "ipo"
    # Later overrides win; a section can be nulled and recreated.
    cfg = load_config(Root, path, ["eval=null"])
    assert cfg.eval is None
    cfg = load_config(Root, path, ["eval=null", "eval.every=7"])
    assert cfg.eval == EvalConfig(every=7)
    # A mapping value merges into the section.
    cfg = load_config(Root, path, ["optimizer={lr: 0.5}", "optimizer.warmup_ratio=0"])
    assert cfg.optimizer == OptimizerConfig(lr=0.5, warmup_ratio=0.0)


def test_override_into_none_subconfig_creates_defaults():
    cfg = load_config(Root, None, ["model=m", "eval.dataset=tulu"])
    assert cfg.eval == EvalConfig(every=100, dataset="tulu")
    cfg = load_config(Root, None, ["model=m"])
    assert cfg.eval is None


def test_override_errors(tmp_path):
    msg = _err(load_config, Root, None, ["model=m", "optimizer.lrr=1"])
    assert msg == ("override 'optimizer.lrr=1': unknown key 'optimizer.lrr'; "
                   "did you mean 'optimizer.lr'?")
    msg = _err(load_config, Root, None, ["model=m", "batch_size.x=1"])
    assert "cannot set 'batch_size.x': 'batch_size' is a int field, not a section" in msg
    msg = _err(load_config, Root, None, ["model=m", "optimizer.lr=fast"])
    assert msg == "override 'optimizer.lr=fast': 'optimizer.lr': expected float, got str 'fast'"
    msg = _err(load_config, Root, None, ["model=m", "use_ipo=maybe"])
    assert "'use_ipo': expected bool" in msg
    assert "expected key=value" in _err(load_config, Root, None, ["model"])
    assert "malformed key" in _err(load_config, Root, None, ["optimizer..lr=1"])
    assert "cannot parse value" in _err(load_config, Root, None, ["model=[a"])
    msg = _err(load_config, Root, None, ["model=m", "optimizer.warmup_ratio=3"])
    assert msg == ("override 'optimizer.warmup_ratio=3': invalid 'optimizer': "
                   "warmup_ratio must be in [0, 1], got 3.0")
    # The file set a section to a scalar: setting a key inside it is an error.
    path = _write(tmp_path, "x.yaml", "model: m\noptimizer: 3\n")
    msg = _err(load_config, Root, path, ["optimizer.lr=1"])
    assert "cannot set 'optimizer.lr': 'optimizer' is int 3" in msg and "x.yaml:2" in msg


# ---------------------------------------------------------------------------------------------
# Command line


def test_parse_cli_forms(tmp_path):
    path = _write(tmp_path, "x.yaml", "model: m\nbatch_size: 4\n")
    cfg = parse_cli(Root, ["--config", path, "beta=0.2", "--optimizer.lr=1e-6",
                           "--batch_size", "64", "--use_ipo", "true", "--optimizer.warmup_ratio",
                           "0.3"])
    assert (cfg.model, cfg.beta, cfg.optimizer.lr, cfg.batch_size) == ("m", 0.2, 1e-6, 64)
    assert cfg.use_ipo is True and cfg.optimizer.warmup_ratio == 0.3
    cfg = parse_cli(Root, [f"--config={path}", "--use_ipo", "false", "--max_steps", "-1"])
    assert cfg.use_ipo is False and cfg.max_steps == -1
    # EasyLM's flags always take a value.
    assert "'use_ipo' needs a value" in _err(parse_cli, Root, ["model=m", "--use_ipo"])


def test_parse_cli_errors(tmp_path):
    msg = _err(parse_cli, Root, ["model=m", "--batch_size"])
    assert "'batch_size' needs a value" in msg
    assert "unknown key 'optimizer.lrr'" in _err(parse_cli, Root, ["--optimizer.lrr", "1"])
    assert "expected key=value" in _err(parse_cli, Root, ["stray"])
    assert "'config' needs a value" in _err(parse_cli, Root, ["--config"])
    p = _write(tmp_path, "x.yaml", "model: m\n")
    assert "more than once" in _err(parse_cli, Root, ["--config", p, "--config", p])


def test_help_lists_keys_types_defaults_docs(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(Root, ["model=m", "--help"], prog="train_dpo")
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out == format_help(Root, prog="train_dpo")
    assert out.startswith("usage: train_dpo ")
    assert "Toy trainer config." in out
    assert "  model: str (required)\n      HF model name or path." in out
    assert "  loss: 'sigmoid' | 'ipo' = 'sigmoid'\n      DPO loss variant." in out
    assert "[optimizer] OptimizerConfig" in out and "Optimizer settings." in out
    assert "  optimizer.lr: float = 5e-07\n      Peak learning rate." in out
    assert "linearly from 0." in out
    assert "[eval] EvalConfig | None = null" in out
    assert "  eval.dataset: str | None = null\n      Eval dataset name, or null for none." in out
    assert "[middle.inner] Inner" in out and "  middle.inner.depth: int = 1" in out
    assert "  max_steps: int | None = null" in out
    # Sections come after the top-level keys.
    assert out.index("  max_steps:") < out.index("[optimizer]") < out.index("[eval]")


def test_cli_main(capsys):
    got = []
    assert cli_main(Root, lambda c: got.append(c) or "ok", ["model=m", "beta=0.5"]) == "ok"
    assert got[0].beta == 0.5
    with pytest.raises(SystemExit) as info:
        cli_main(Root, got.append, ["model=m", "optimizer.lrr=1"], prog="train")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "train: error: override 'optimizer.lrr=1': unknown key 'optimizer.lrr'; " \
           "did you mean 'optimizer.lr'?" in err
    assert len(got) == 1

    def main_fn(cfg):
        raise ConfigError("model 'm' has no tokenizer", key="model")

    with pytest.raises(SystemExit) as info:
        cli_main(Root, main_fn, ["model=m"], prog="train")
    assert info.value.code == 2
    assert "train: error: model 'm' has no tokenizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# save_config / fsspec URLs


def test_save_config_local_round_trip(tmp_path):
    cfg = load_config(Root, None, ["model=m", "eval.every=3", "optimizer.lr=5e-7",
                                   "loss=ipo"])
    path = str(tmp_path / "deep" / "dir" / "config.yaml")
    save_config(cfg, path)
    assert load_config(Root, path) == cfg


def test_save_and_load_via_fsspec_url():
    fs = fsspec.filesystem("memory")
    cfg = load_config(Root, None, ["model=m", "beta=0.125"])
    save_config(cfg, "memory://cfgtest/run/config.yaml")
    with fs.open("/cfgtest/run/exp.yaml", "w") as f:
        f.write("base: config.yaml\nbatch_size: 3\n")
    loaded = load_config(Root, "memory://cfgtest/run/exp.yaml")
    assert loaded.beta == 0.125 and loaded.batch_size == 3 and loaded.model == "m"
    fs.rm("/cfgtest", recursive=True)


def test_nan_inf_floats_are_refused_naming_key_and_place(tmp_path):
    # A non-finite hyperparameter would train to the end and publish a NaN model.
    assert "'beta'" in _err(from_dict, Root, {"model": "m", "beta": float("inf")})
    for text in ("beta=.inf", "beta=inf", "beta=1e400", "beta=-.inf", "beta=nan"):
        msg = _err(load_config, Root, None, ["model=m", text])
        assert f"override '{text}'" in msg and "'beta'" in msg and "finite" in msg, msg
    path = _write(tmp_path, "x.yaml", "model: m\noptimizer: {lr: .nan}\n")
    msg = _err(load_config, Root, path)
    assert f"{path}:2" in msg and "'optimizer.lr'" in msg and "finite" in msg, msg
    # A NaN int is not an int.
    assert "expected int" in _err(from_dict, Root, {"model": "m", "batch_size": float("nan")})


# ---------------------------------------------------------------------------------------------
# The trainers' trees: shipped configs by name, override locations, --help cost


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    from torchxla_rlhf.configs.loader import SHIPPED_CONFIGS
    from torchxla_rlhf.configs.dpo import DPOConfig
    from torchxla_rlhf.configs.ppo import PPOConfig

    monkeypatch.chdir(tmp_path)  # not the repository: names resolve against its configs/
    assert load_config(PPOConfig, "ppo_13b.yaml").mode == "interleaved"
    assert load_config(DPOConfig, "tiny/dpo.yaml").model.name_or_path == "tiny"
    assert load_config(DPOConfig, "tiny/dpo").output_dir == "outputs/tiny/dpo"
    assert load_config(DPOConfig, "configs/tiny/dpo.yaml").beta == 0.1
    msg = _err(load_config, DPOConfig, "dpo_7b.yaml")
    assert msg.startswith("config file not found: dpo_7b.yaml")
    assert str(SHIPPED_CONFIGS) in msg and "dpo_13b.yaml" in msg and "tiny/ppo.yaml" in msg
    # A local file of the same name wins over the shipped one.
    _write(tmp_path, "ppo_13b.yaml", "mode: standard\nmini_batch_size: 8\ntrain_dataset: {path: p.jsonl}\n")
    assert load_config(PPOConfig, "ppo_13b.yaml").mode == "standard"


def test_override_errors_name_the_override_not_the_file_section(tmp_path):
    from torchxla_rlhf.configs.dpo import DPOConfig

    path = _write(tmp_path, "d.yaml", "optimizer:\n  lr: 1.0e-6\nlabel_smoothing: 0.1\n"
                                      "train_dataset: {path: p.jsonl}\n")
    msg = _err(load_config, DPOConfig, path, ["optimizer.warmup_ratio=3"])
    assert msg.startswith("override 'optimizer.warmup_ratio=3': invalid 'optimizer': warmup_ratio")
    msg = _err(load_config, DPOConfig, path, ["use_ipo=true"])
    assert msg.startswith(f"{path}:3: invalid config: label_smoothing: not used by IPO")
    # A section-wide error caused by an override names the override.
    msg = _err(load_config, DPOConfig, path, ["train_dataset.hf_name=x/y"])
    assert msg.startswith("override 'train_dataset.hf_name=x/y': invalid 'train_dataset': ")
    # The loss's bound and the config's agree: 0.5 is refused by both.
    assert "label_smoothing: must be in [0, 0.5)" in _err(
        load_config, DPOConfig, path, ["label_smoothing=0.5"])


def test_eval_dataset_takes_the_training_batch_size(tmp_path):
    """Held-out pairs are evaluated in train_dataset.batch_size batches: eval_dataset has no
    batch size (or shuffling) of its own, and setting one points at the key that is used."""
    from torchxla_rlhf.configs.dpo import DPOConfig

    path = _write(tmp_path, "d.yaml", "train_dataset: {path: p.jsonl, batch_size: 4}\n"
                                      "eval_dataset: {path: e.jsonl, seq_length: 64}\n")
    assert load_config(DPOConfig, path).eval_dataset.seq_length == 64
    msg = _err(load_config, DPOConfig, path, ["eval_dataset.batch_size=2"])
    assert "unknown key 'eval_dataset.batch_size'" in msg
    assert "did you mean 'train_dataset.batch_size'" in msg
    assert "eval_dataset.batch_size" not in format_help(DPOConfig)
    assert "eval_dataset.seq_length" in format_help(DPOConfig)

def test_help_does_not_load_torch_xla_or_transformers():
    import subprocess
    import sys

    code = ("import sys\nfrom torchxla_rlhf.ppo import main\nfrom torchxla_rlhf.configs.loader import "
            "format_help\nfrom torchxla_rlhf.configs.ppo import PPOConfig\n"
            "assert 'max_continuation_len' in format_help(PPOConfig)\n"
            "print(sorted(m for m in ('torch_xla', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "[]"
