"""The command line a new user meets first: fast answers (no torch for --help or a typo),
``--config F --help`` with F's values, ``--print-config`` and ``--check`` on every shipped
config, data paths from a config file found from any directory, the pipeline's stage
headers and summary, and the top-level help."""

from __future__ import annotations

import ast
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from torchxla_rlhf.configs.loader import cli_main, from_dict, load_config
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig

from torchxla_rlhf.trainers import registry

KINDS = {kind: spec.config for kind, spec in registry.TRAINERS.items()}
SHIPPED = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
HEAVY = ("torch", "torch_xla", "transformers")
PACKAGE = Path(REPO) / "torchxla_rlhf"
LLAMA2_13B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000,
                  hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)


def kind_of(path: str) -> str:
    return registry.kind_of_file(path)


def run_cli(kind: str, argv: list[str]) -> int:
    from torchxla_rlhf.preflight.startup import run_checks

    with pytest.raises(SystemExit) as e:
        cli_main(KINDS[kind], lambda cfg: pytest.fail("must not run"), argv=argv, prog=kind,
                 check=run_checks)
    return e.value.code


def imported_top_level(args: list[str], cwd: str = REPO) -> tuple[subprocess.CompletedProcess, set]:
    """Run ``python -X importtime ARGS``; the top-level packages it imported."""
    env = dict(os.environ, PYTHONPATH=REPO)
    p = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True,
                       text=True, timeout=120, env=env, cwd=cwd)
    names = {line.rsplit("|", 1)[1].strip().split(".")[0]
             for line in p.stderr.splitlines() if line.startswith("import time:")}
    return p, names


def _module_file(name: str) -> Path | None:
    p = PACKAGE.joinpath(*name.split(".")[1:])
    if p.is_dir():
        return p / "__init__.py"
    return p.with_suffix(".py") if p.with_suffix(".py").is_file() else None


def _top_level_imports(path: Path) -> list[str]:
    """Modules a file imports when it is imported: its top-level statements (and those in
    top-level ``if``/``try`` blocks, but not the ``__main__`` block); ``from m import x``
    also names ``m.x``, a submodule when there is one."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            continue
        for n in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(n, ast.Import):
                names += [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module:
                names += [n.module] + [f"{n.module}.{a.name}" for a in n.names]
    return names


def test_entry_points_import_no_torch_at_module_level():
    """What ``python -m torchxla_rlhf.dpo --help`` (or a typo, or --print-config) imports
    before it parses the arguments: the entry points' top-level imports, followed through the
    package (parents included), name no heavy package. The subprocess test below checks the
    real command."""
    todo = ["torchxla_rlhf.dpo", "torchxla_rlhf.reward", "torchxla_rlhf.ppo", "torchxla_rlhf.grpo",
            "torchxla_rlhf.__main__", "torchxla_rlhf.launch"]
    seen, third_party = set(), {}
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
        if (path := _module_file(name)) is None:
            continue  # a name imported from a module, not a module
        for imported in _top_level_imports(path):
            if imported.split(".")[0] == "torchxla_rlhf":
                todo.append(imported)
            else:
                third_party.setdefault(imported.split(".")[0], name)
    assert "torchxla_rlhf.configs" in seen and "yaml" in third_party  # the walk does follow
    assert {k: v for k, v in third_party.items() if k in HEAVY} == {}


@pytest.mark.multiprocess
@pytest.mark.parametrize("args,code", [
    (["-m", "torchxla_rlhf.dpo", "--help"], 0),
    (["-m", "torchxla_rlhf.ppo", "--config", "tiny/ppo", "--help"], 0),
    (["-m", "torchxla_rlhf.reward", "--config", "tiny/reward", "optimizer.lrr=1"], 2),
    (["-m", "torchxla_rlhf.dpo", "--config", "dpo_13b.yaml", "--print-config"], 0),
    (["-m", "torchxla_rlhf", "--help"], 0),
])
def test_help_typos_and_print_config_import_no_torch(args, code):
    p, names = imported_top_level(args)
    assert p.returncode == code, p.stderr[-2000:]
    assert "torchxla_rlhf" in names and "yaml" in names  # importtime does list them
    assert not names & set(HEAVY), sorted(names & set(HEAVY))
    if code == 2:
        assert "did you mean 'optimizer.lr'?" in p.stderr


def test_config_help_shows_the_files_values(capsys):
    assert run_cli("dpo", ["--config", "tiny/dpo", "beta=0.25", "--help"]) == 0
    out = capsys.readouterr().out
    assert "values resolved from tiny/dpo and 1 override(s)" in out
    assert "  beta: float = 0.25   (default: 0.1)" in out
    assert "  output_dir: str = 'outputs/tiny/dpo'   (default: 'outputs/dpo')" in out
    assert "  use_ipo: bool = false\n" in out  # the file leaves it at its default
    assert "    lr: float = 0.001   (default: 5e-07)" not in out  # keys are dotted
    assert "  optimizer.lr: float = 0.001   (default: 5e-07)" in out
    assert "[eval_dataset] DataSource | None\n" in out  # set in the file: not null
    # A bad file under --help is the usual one-line error, not a help page.
    assert run_cli("dpo", ["--config", "tiny/dpo", "bta=1", "--help"]) == 2
    assert "did you mean 'beta'?" in capsys.readouterr().err


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, REPO))
def test_print_config_on_every_shipped_config(path, capsys):
    kind = kind_of(path)
    assert run_cli(kind, ["--config", path, "--print-config"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"# resolved {KINDS[kind].__name__}\n")
    assert from_dict(KINDS[kind], yaml.safe_load(text)) == load_config(KINDS[kind], path)


def test_action_flag_errors(capsys):
    assert run_cli("dpo", ["--config", "tiny/dpo", "--print-config", "--check"]) == 2
    assert "cannot be combined" in capsys.readouterr().err
    assert run_cli("dpo", ["--config", "tiny/dpo", "--devices", "4"]) == 2
    assert "--devices is only used with --check" in capsys.readouterr().err
    assert run_cli("dpo", ["--config", "tiny/dpo", "--check", "--devices", "0"]) == 2
    assert "expected a device count >= 1" in capsys.readouterr().err


@pytest.fixture
def llama13b_dir(tmp_path):
    d = tmp_path / "llama2-13b"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA2_13B))
    return str(d)


def _check(kind, path, tmp_path, capsys, *extra):
    code = run_cli(kind, ["--config", path, f"output_dir={tmp_path}/out", "--check", *extra])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("path", [p for p in SHIPPED if "/tiny" in p],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_check_on_the_tiny_configs(path, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data paths resolve beside the config, from any directory
    kind = kind_of(path)
    tok = "tiny"
    if "tiny_llama2" in path:
        from helpers import LLAMA2_MISSING, LLAMA2_TOKENIZER_DIR, has_llama2_tokenizer

        if not has_llama2_tokenizer():
            pytest.skip(LLAMA2_MISSING)
        tok = LLAMA2_TOKENIZER_DIR
    extra = [f"tokenizer={tok}"]
    if kind == "ppo":
        # PPO starts from the DPO and reward runs' outputs: without them, named failures.
        code, out = _check(kind, path, tmp_path, capsys)
        assert code == 2, out
        assert "model config: FAIL: model.name_or_path='outputs/" in out
        assert "; skipped: mesh, memory plan (no device was touched)" in out
        extra += ["model.name_or_path=tiny", "reward_model.name_or_path=tiny"]
        if "tiny_llama2" in path:
            extra += ["model.tiny.vocab_size=32000", "reward_model.tiny.vocab_size=32000"]
    code, out = _check(kind, path, tmp_path, capsys, *extra)
    assert code == 0, out
    for name in ("config", "remote paths", "output_dir", "resume_from", "logging", "model config", "data",
                 "mesh", "memory plan"):
        assert f"\n{name}: ok: " in "\n" + out, (name, out)
    assert "train_dataset: read " in out  # the data report
    assert "memory plan: " in out and out.rstrip().endswith("check: passed (no device was touched)")


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.endswith("_13b.yaml")],
                         ids=lambda p: os.path.relpath(p, REPO))
def test_check_on_the_13b_configs_with_local_stand_ins(path, tmp_path, capsys, llama13b_dir):
    """The 13B configs' own mesh, batch and memory arithmetic on a v3-256, with a local
    config.json of Llama-2 13B's shape and the tiny data in place of the hub's."""
    kind = kind_of(path)
    data = os.path.join(REPO, "data", "tiny", "preference_train.jsonl")
    if kind == "grpo":
        data = os.path.join(REPO, "data", "tiny", "rlvr_train.jsonl")
    if kind == "ppo":
        data = str(tmp_path / "prompts.jsonl")  # 512 prompts per batch: more than the tiny 500
        with open(os.path.join(REPO, "data", "tiny", "prompts.jsonl")) as f:
            lines = f.readlines()
        with open(data, "w") as f:
            f.writelines(lines * 2)
    extra = ["--devices", "256", f"model.name_or_path={llama13b_dir}", "tokenizer=tiny",
             "train_dataset.hf_name=null", f"train_dataset.path={data}"]
    if kind == "ppo":
        extra.append(f"reward_model.name_or_path={llama13b_dir}")
    if kind == "sft":
        extra.append("messages_key=chosen")  # the tiny data's conversations
    code, out = _check(kind, path, tmp_path, capsys, *extra)
    assert code == 0, out
    assert "40 layers, hidden 5120" in out and "on 256 device(s) (--devices)" in out
    # The same config on one device: the mesh check names mesh_dim and fails.
    code, out = _check(kind, path, tmp_path, capsys, *extra[2:], "--devices", "1")
    assert code == 2 and "mesh: FAIL: " in out and "mesh_dim" in out, out


@pytest.mark.multiprocess
def test_check_names_the_hub_model_when_offline(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "torchxla_rlhf.dpo", "--config", "dpo_13b.yaml",
                        f"output_dir={tmp_path}/o", "--check", "--devices", "256"],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 2, p.stdout + p.stderr
    failed = [line for line in p.stdout.splitlines() if line.startswith("model config: FAIL: ")]
    assert len(failed) == 1 and "allenai/tulu-2-13b" in failed[0], p.stdout
    assert "mesh: skip: needs the model configs" in p.stdout


def test_relative_data_paths_resolve_beside_the_config(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "d.jsonl").write_text("{}\n")
    (tmp_path / "cfg" / "run.yaml").write_text(
        "train_dataset: {path: d.jsonl}\neval_dataset: {path: missing.jsonl}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(DPOConfig, str(tmp_path / "cfg" / "run.yaml"))
    assert cfg.train_dataset.path == str(tmp_path / "cfg" / "d.jsonl")
    assert cfg.eval_dataset.path == "missing.jsonl"  # found nowhere: left for the reader's error
    # The working directory wins when the file exists there too.
    (elsewhere / "d.jsonl").write_text("{}\n")
    assert load_config(DPOConfig, str(tmp_path / "cfg" / "run.yaml")).train_dataset.path == "d.jsonl"
    # Command-line values are the working directory's.
    cfg = load_config(DPOConfig, str(tmp_path / "cfg" / "run.yaml"), ["eval_dataset.path=x.jsonl"])
    assert cfg.eval_dataset.path == "x.jsonl"

    from torchxla_rlhf.data.sources import iter_records

    with pytest.raises(FileNotFoundError, match=f"missing.jsonl \\(relative to the working "
                                                f"directory {elsewhere};"):
        list(iter_records(load_config(DPOConfig, str(tmp_path / "cfg" / "run.yaml")).eval_dataset))


def test_shipped_tiny_config_reads_its_data_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DPOConfig, "tiny/dpo")
    assert os.path.isfile(cfg.train_dataset.path) and os.path.isfile(cfg.eval_dataset.path)
    assert load_config(PPOConfig, "tiny_llama2/ppo").train_dataset.path == os.path.join(
        REPO, "data", "tiny", "prompts.jsonl")


def test_pipeline_prints_stage_headers_and_a_summary(tmp_path, monkeypatch, capsys):
    import torchxla_rlhf.trainers.base as base
    from torchxla_rlhf.__main__ import run_pipeline

    labels = []
    monkeypatch.setattr(base, "run", lambda cls, cfg, setup_logging, label: labels.append(label) or {})
    run_pipeline(os.path.join(REPO, "configs", "tiny"), str(tmp_path / "p"), [])
    out = capsys.readouterr().out
    root = tmp_path / "p"
    assert f"stage 1/3: dpo -> {root}/dpo\n" in out and f"stage 3/3: ppo -> {root}/ppo\n" in out
    assert out.index("stage 2/3: reward") < out.index("stage 3/3: ppo") < out.index("pipeline done")
    assert labels == ["dpo (stage 1/3)", "reward (stage 2/3)", "ppo (stage 3/3)"]
    summary = out[out.index("pipeline done"):]
    for path in ("dpo/final", "reward/final", "ppo/final", "ppo/final-value"):
        assert f"{root}/{path} " in summary, summary
    assert f"{root}/ppo/metrics.jsonl" in summary


def test_pipeline_with_a_grpo_stage_prints_its_header_and_summary(tmp_path, monkeypatch, capsys):
    import torchxla_rlhf.trainers.base as base
    from torchxla_rlhf.__main__ import main

    runs = []
    monkeypatch.setattr(base, "run", lambda cls, cfg, setup_logging, label: runs.append((label, cfg)) or {})
    root = tmp_path / "p"
    assert main(["pipeline", "--configs", os.path.join(REPO, "configs", "tiny"), "--output-root",
                 str(root), "--stages", "dpo,reward,grpo", "grpo.total_steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"stage 3/3: grpo -> {root}/grpo\n" in out
    assert [label for label, _ in runs] == ["dpo (stage 1/3)", "reward (stage 2/3)", "grpo (stage 3/3)"]
    grpo = runs[-1][1]
    assert grpo.model.name_or_path == f"{root}/dpo/final" and grpo.total_steps == 3
    summary = out[out.index("pipeline done"):]
    assert f"{root}/grpo/final " in summary and f"{root}/grpo/metrics.jsonl" in summary
    assert "ppo" not in summary


@pytest.mark.parametrize("stages,overrides,wired", [
    (("dpo", "reward", "ppo"), [], {"ppo": {"model": "dpo", "reward_model": "reward"}}),
    # The tiny GRPO config scores with a verifier only: no reward model to wire...
    (("dpo", "reward", "grpo"), [], {"grpo": {"model": "dpo"}}),
    # ...unless its config has one; then it is the reward stage's, as PPO's.
    (("dpo", "reward", "grpo"), ["grpo.reward_model.param_dtype=float32"],
     {"grpo": {"model": "dpo", "reward_model": "reward"}}),
    # A command-line path wins over the wiring (and is not reported as wired).
    (("dpo", "reward", "grpo"), ["grpo.reward_model.name_or_path=tiny"], {"grpo": {"model": "dpo"}}),
    (("grpo",), [], {}),
    (("reward", "dpo", "ppo"), [], {"ppo": {"model": "dpo", "reward_model": "reward"}}),
])
def test_pipeline_stages_are_wired_from_what_each_trainer_declares(stages, overrides, wired, tmp_path):
    """No data read, nothing trained: which earlier output feeds which key follows from each
    trainer's model roles (a trained causal ``model`` = a policy, a trained classifier = a
    reward model), for any registered kinds in any order."""
    from torchxla_rlhf.__main__ import wire_stages

    root = str(tmp_path)
    got = wire_stages(os.path.join(REPO, "configs", "tiny"), root, overrides, stages)
    assert [st.kind for st in got] == list(stages)
    assert all(st.out == f"{root}/{st.kind}" and st.cfg.output_dir == st.out for st in got)
    assert {st.kind: st.wired for st in got if st.wired} == {
        kind: {key: f"{root}/{src}/final" for key, src in keys.items()} for kind, keys in wired.items()}
    for st in got:
        for key, path in st.wired.items():
            assert getattr(st.cfg, key).name_or_path == path


@pytest.mark.parametrize("stages,match", [
    ("dpo,kto", "unknown trainer 'kto'; known: sft, dpo, reward, ppo, grpo"),
    ("dpo,dpo", "name each stage once"),
])
def test_pipeline_stage_errors_are_one_line(stages, match, tmp_path, capsys):
    from torchxla_rlhf.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--configs", os.path.join(REPO, "configs", "tiny"), "--output-root",
              str(tmp_path), "--stages", stages])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert match in err[0] and all("--debug" in line for line in err[1:]), err


def test_top_level_help_lists_every_entry_point(capsys):
    from torchxla_rlhf.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for entry in ("torchxla_rlhf.dpo", "torchxla_rlhf.reward", "torchxla_rlhf.ppo",
                  "torchxla_rlhf pipeline", "torchxla_rlhf plan", "torchxla_rlhf.launch"):
        assert f"python -m {entry}" in out, entry


@pytest.mark.parametrize("path", [p for p in SHIPPED if "/tiny" in p], ids=lambda p: os.path.relpath(p, REPO))
def test_tiny_configs_leave_wandb_to_the_environment(path):
    """``WANDB_MODE=offline python -m torchxla_rlhf.dpo --config tiny/dpo`` must be offline."""
    from torchxla_rlhf.tracking import wandb_settings

    logger_cfg = load_config(KINDS[kind_of(path)], path).logger
    assert logger_cfg.wandb_mode is None and logger_cfg.project is None
    assert wandb_settings(logger_cfg, {"WANDB_MODE": "offline"}).mode == "offline"
    assert wandb_settings(logger_cfg, {}).mode == "disabled"


def test_check_fails_on_a_bad_wandb_mode_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlin")
    code, out = _check("dpo", "tiny/dpo", tmp_path, capsys)
    assert code == 2 and "logging: FAIL: WANDB_MODE='offlin': expected online, offline" in out
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out = _check("dpo", "tiny/dpo", tmp_path, capsys, "logger.wandb_mode=disabled")
    assert code == 0 and "W&B disabled (logger.wandb_mode; WANDB_MODE=offline ignored)" in out


def test_help_names_every_trainer_with_an_entry_point_and_no_jargon(capsys):
    """The top-level --help lists every registered trainer by a command that exists; neither it
    nor any trainer's --help says "the seed" (development jargon)."""
    import importlib.util

    from torchxla_rlhf.__main__ import main

    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert top.splitlines()[0].startswith("torchxla_rlhf: SFT, DPO, reward models, PPO and GRPO")
    for kind in KINDS:
        assert f"python -m torchxla_rlhf.{kind} " in top
        assert importlib.util.find_spec(f"torchxla_rlhf.{kind}") is not None, kind
    texts = [top]
    for kind in KINDS:
        assert run_cli(kind, ["--help"]) == 0
        texts.append(capsys.readouterr().out)
    assert all(len(t) > 200 and "the seed" not in t.lower() and "seed's" not in t for t in texts)
