"""``plan --compile``: the TPU compiler's verdict on a run, without a TPU (torchxla_rlhf/aot/).

Fast: the topology names, the traced mesh, the sharding remap, the missing-extra message, and
the planner against the TPU compiler's saved figures for the 13B runs (bench/tpu_compile.py).
Slow: a small trainer graph traced with placeholders and compiled by libtpu for a v3-8 (the
planner within 15 %, the gradients reduce-scattered, the XLA:CPU compile of torch_xla's own
module equal to torch_xla's buffer total), the remap against a native trace, and the CLI.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO
from torchxla_rlhf.aot import verdict as aot
from torchxla_rlhf.aot.compile import _tiles, collectives, oom_report, remap_sharding

HAVE_AOT = all(importlib.util.find_spec(p) is not None for p in aot.AOT_PACKAGES)
needs_aot = pytest.mark.skipif(not HAVE_AOT, reason="the aot extra (jax, jaxlib, libtpu) is not installed")
GIB = 1 << 30


def test_pods_map_to_libtpu_topologies():
    assert aot.topology("v3-8") == ("v3:2x2", {})
    assert aot.topology("v3-128") == ("v3:8x8", {})
    assert aot.topology("v3-256") == ("v3:8x16", {})
    name, kw = aot.topology("v4-64")
    assert name == "v4:2x4x4" and kw["chip_config_name"] == "megacore"
    assert aot.topology("v5p-32")[0] == "v5:2x2x4"


def test_trace_mesh_shrinks_fsdp_then_dp_and_keeps_mp():
    assert aot.trace_mesh((1, 16, 16)) == (1, 4, 16)
    assert aot.trace_mesh((1, 64, 4)) == (1, 16, 4)
    assert aot.trace_mesh((2, 64, 2)) == (2, 16, 2)
    assert aot.trace_mesh((8, 16, 8)) == (4, 2, 8)  # an axis over several devices keeps two
    assert aot.trace_mesh((1, 4, 2)) == (1, 4, 2)
    assert aot.trace_mesh((1, 4, 2), 4) == (1, 2, 2)
    with pytest.raises(aot.CompileFailed):
        aot.trace_mesh((1, 1, 128))


def _text(spec, mesh):
    dims, tiles, rep = _tiles(spec, mesh)
    return (f"devices=[{','.join(map(str, dims))}]{','.join(map(str, tiles.reshape(-1)))}"
            + (" last_tile_dim_replicate" if rep else ""))


@pytest.mark.parametrize("spec", [((1,), (2,)), ((2,), (1,)), ((1,), ()), ((), (2,)), ((1, 2), ()),
                                  ((0, 1), (2,))])
def test_remap_re_expresses_each_partition_spec_on_the_target_mesh(spec):
    """A sharding a 3-axis mesh (dp, fsdp, mp) produces becomes the one the same spec produces
    on the target mesh (each axis over one device on both, or over several on both)."""
    for src, dst in (((1, 4, 2), (1, 16, 2)), ((1, 4, 2), (1, 8, 16)), ((2, 4, 2), (4, 16, 2))):
        assert remap_sharding(_text(spec, src), src, dst) == _text(spec, dst)


def test_remap_reads_the_iota_form_and_keeps_tuples_and_replicated():
    # [4,2]<=[2,4]T(1,0): devices 0,4,1,5,2,6,3,7 = fsdp on dim 1, mp on dim 0 of mesh (1,4,2)?
    iota = "devices=[2,4]<=[4,2]T(1,0)"
    explicit = "devices=[2,4]" + ",".join(map(str, np.arange(8).reshape(4, 2).T.reshape(-1)))
    assert remap_sharding(iota, (1, 4, 2), (1, 8, 2)) == remap_sharding(explicit, (1, 4, 2), (1, 8, 2))
    assert remap_sharding("replicated", (1, 4, 2), (1, 8, 2)) == "replicated"
    pair = "{" + _text(((1,), ()), (1, 4, 2)) + "}, {replicated}"
    assert remap_sharding("{" + pair + "}", (1, 4, 2), (1, 8, 2)) == \
        "{{" + _text(((1,), ()), (1, 8, 2)) + "}, {replicated}}"
    with pytest.raises(ValueError):
        remap_sharding("devices=[2,4]0,1,2,3,4,5,6,7", (1, 4, 2), (1, 8, 2))


def test_collectives_and_oom_report_are_read_from_the_compiler_text():
    hlo = ("%a = f32[4]{0} all-reduce(f32[4]{0} %x), replica_groups={}\n"
           "%b = bf16[8]{0} all-gather-start(bf16[2]{0} %y), dimensions={0}\n"
           "%c = f32[2]{0} fusion(f32[8]{0} %z), kind=kCustom, calls=%all-reduce-scatter.1\n")
    assert collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1}
    o = oom_report("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                   "memory space hbm. Used 20.75G of 15.48G hbm. Exceeded hbm capacity by 5.27G.")
    assert o["used_bytes"] == int(20.75 * GIB) and o["hbm_bytes"] == int(15.48 * GIB)


def test_compile_without_the_aot_extra_is_one_line(monkeypatch, capsys):
    from torchxla_rlhf.__main__ import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    code = main(["plan", "--config", os.path.join(REPO, "configs", "tiny", "dpo.yaml"),
                 "--tpu", "v3-8", "--compile"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "libtpu not installed" in err[0] and 'pip install -e ".[aot]"' in err[0]


def test_compile_needs_a_tpu_type(capsys):
    from torchxla_rlhf.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--config", os.path.join(REPO, "configs", "tiny", "dpo.yaml"), "--compile"])
    assert e.value.code == 2 and "--compile needs --tpu" in capsys.readouterr().err


SAVED = os.path.join(REPO, "bench", "results", "tpu_compile_13b.json")


KNOWN_GAPS: set[tuple[str, str]] = set()
"""13B graphs where the planner is allowed more than 15 % from the TPU compiler's 40-layer
figure: none since the micro-steps were compiled at 40 layers (DPO's on the v3-256 at 16 and
24, its 40 needing more host memory than this machine has)."""


def _bench():
    spec = importlib.util.spec_from_file_location("bench_tpu", os.path.join(REPO, "bench", "tpu_compile.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_planner_follows_the_tpu_compiler_on_every_13b_graph():
    """The TPU compiler's figures for the 13B runs on v3-256 and v3-128 (saved by
    bench/tpu_compile.py: each graph compiled by libtpu at 2 and 4 layers and taken to 40 by
    its slope) against the planner's figure for the same graph: within 15 %, but for the
    known gaps (within 30 %); each run's peak (its largest graph with what stays resident
    beside it) within 20 %, and the same fits verdict on a v3 core."""
    bench = _bench()
    with open(SAVED) as f:
        rows = json.load(f)
    checked = bench.replan(rows)
    assert {r["pod"] for r in rows} >= {"v3-256", "v3-128"}
    assert {r["config"] for r in rows} >= {"dpo_13b.yaml", "reward_13b.yaml", "ppo_13b.yaml", "grpo_13b.yaml"}
    off = [(line, graph, f"{ratio:.2f}") for line, graph, tpu, planned, ratio, _ in checked
           if not (0.85 <= round(ratio, 2) <= 1.15 or ((line, graph) in KNOWN_GAPS and 0.7 <= ratio <= 1.3))]
    assert len(checked) >= 26 and off == []
    for row in rows:
        tpu, planned, hbm = bench.run_peaks(row, checked)
        assert planned == pytest.approx(tpu, rel=0.2), row["config"]
        assert (tpu <= hbm) == (planned <= hbm)


def test_update_graphs_compiled_at_40_layers_hold_the_planned_tiled_state():
    """The 13B AdamW updates compiled at their 40 layers (bench/tpu_compile.py --deeper): the
    compiler's argument bytes are the planner's tile-padded parameters, gradients and moments
    (within 0.5 %; mesh 1,16,16 pads its 320-wide shards to 384), and its transient is the
    planner's TPU_UPDATE_COPIES of the parameters: each update graph within 10 %."""
    bench = _bench()
    with open(SAVED) as f:
        rows = json.load(f)
    assert all(str(r["layers"]) in r["graphs"]["train_update"] for r in rows)
    for row in rows:
        *_, p, _ = bench.line_plan(row["pod"], row["config"], row["overrides"])
        memory = row["graphs"]["train_update"][str(row["layers"])]["memory"]
        # Gradients are persistent in the pair trainers' plans, a training phase's in PPO's and GRPO's.
        state = {id(t): t for t in p.persistent + [t for ts in p.phases.values() for t in ts]
                 if t.name.endswith((" parameters", " gradients", " AdamW moments"))}
        assert sum(t.bytes for t in state.values()) == pytest.approx(
            memory["argument"], rel=0.005), _line(row)
        assert aot.planned_graph_bytes(p, "train_update") == pytest.approx(
            memory["peak_memory"], rel=0.1), _line(row)


def test_planner_follows_the_compiled_micro_steps_at_each_depth():
    """The micro-steps with no frozen model (reward model, GRPO), at each depth compiled (2, 4
    and the 8-layer probe, and 40): the planner within 15 %, at few layers through the backward's
    end (GRPO's on the v3-256 peaks there, its embedding gradient beside the first layer)."""
    import dataclasses

    from torchxla_rlhf.preflight.memory_plan import plan

    bench = _bench()
    with open(SAVED) as f:
        rows = [r for r in json.load(f) if r["config"] in ("reward_13b.yaml", "grpo_13b.yaml")]
    assert len(rows) == 5
    for row in rows:
        _, cfg, shapes, _, pod = bench.line_plan(row["pod"], row["config"], row["overrides"])
        compiled = {**row["graphs"]["train_micro_step"], **row["probes"]["train_micro_step"]}
        assert sorted(compiled, key=int) == ["2", "4", "8", "40"]
        for depth, r in compiled.items():
            at = {k: dataclasses.replace(v, layers=int(depth)) for k, v in shapes.items()}
            planned = aot.planned_graph_bytes(plan(cfg, pod.devices, pod.hbm_bytes, at), "train_micro_step")
            assert planned == pytest.approx(r["memory"]["peak_memory"], rel=0.15), (_line(row), depth)


def test_micro_steps_with_frozen_models_compiled_at_40_layers_hold_no_frozen_layers():
    """DPO's and PPO's micro-steps compiled at their 40 layers (bench/tpu_compile.py --deeper)
    hold what the planner's terms say without any per-layer term for the frozen models'
    forwards (within 10 %), and far less than the line through 2 and 4 layers, which carries
    what the frozen forwards hold at few layers."""
    bench = _bench()
    with open(SAVED) as f:
        rows = [r for r in json.load(f) if r["config"] in ("dpo_13b.yaml", "ppo_13b.yaml")
                and "40" in r["graphs"]["train_micro_step"]]
    assert len(rows) == 3
    for row in rows:
        *_, p, _ = bench.line_plan(row["pod"], row["config"], row["overrides"])
        by_depth = row["graphs"]["train_micro_step"]
        compiled = by_depth["40"]["memory"]["peak_memory"]
        two, four = (by_depth[d]["memory"]["peak_memory"] for d in ("2", "4"))
        assert compiled < 0.8 * (four + (four - two) / 2 * 36), _line(row)
        assert not any(t.name.startswith("frozen") for t in p.phases["train micro-step"])
        assert aot.planned_graph_bytes(p, "train_micro_step") == pytest.approx(
            compiled, rel=0.1), _line(row)


def _line(row: dict) -> str:
    return f"{row['pod']} {row['config']} {' '.join(row['overrides'])}".strip()


ROLLOUT_SAVED = os.path.join(REPO, "bench", "results", "tpu_compile_13b_rollout_policies.json")


ROLLOUT_GAPS = {
    ("v3-128 grpo_13b.yaml mesh_dim=1,32,4", "generation_layout", "generation_prefill"),
    ("v3-128 grpo_13b.yaml mesh_dim=1,32,4", "generation_layout", "generation_reshard"),
    ("v3-128 ppo_13b.yaml mesh_dim=1,32,4", "hoisted", "generation_decode_loop"),
    ("v3-128 grpo_13b.yaml mesh_dim=1,32,4", "hoisted", "generation_decode_loop"),
    ("v3-128 grpo_13b.yaml mesh_dim=1,32,4 (at 6 / 8 layers)", "hoisted", "generation_decode_loop"),
}
"""13B rollout graphs where the planner is more than 15 % from the TPU compiler
(docs/tpu-compiler.md, "Rollout policies at 13B"): the layout's prefill graph is charged the
decode loop's cache copies where those are the larger moment; the reshard on 1,32,4 holds more
per layer than its copy; ``hoisted``'s decode loop on 1,32,4 holds about one layer's
column-parallel matrices (gathered, bf16) more per layer than ``per_layer``'s (linear from 4 to 8
layers), which the planner does not count."""


def test_planner_follows_the_tpu_compiler_on_every_13b_rollout_policy():
    """The TPU compiler's figures for the 13B PPO and GRPO rollouts under each
    ``gather_weights`` policy (saved by bench/tpu_compile_rollout.py: the generation layout at
    the tp ``auto`` picks, its reshard, prefill and decode loop compiled at 2 and 4 layers and
    taken to 40) against the planner's: every graph within 15 %, the same fits verdict, and
    the layout's decode step moving what the planner says (activations only, within 15 %).
    ``hoisted`` is not hoisted by XLA:TPU: its decode step gathers as much as ``per_layer``'s."""
    spec = importlib.util.spec_from_file_location("bench_rollout", os.path.join(REPO, "bench", "tpu_compile_rollout.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with open(ROLLOUT_SAVED) as f:
        rows = json.load(f)
    entries = bench.report(rows)
    for pod in ("v3-256", "v3-128"):
        assert {(r["config"], r["policy"]) for r in rows if r["pod"] == pod} == {
            (c, pol) for c in ("ppo_13b.yaml", "grpo_13b.yaml") for pol in bench.POLICIES}
    assert all(e["error"] is None for e in entries)
    off = [(e["line"], e["policy"], e["graph"], f"{e['ratio']:.2f}") for e in entries
           if not 0.85 <= round(e["ratio"], 2) <= 1.15
           and not ((e["line"], e["policy"], e["graph"]) in ROLLOUT_GAPS and 0.5 <= e["ratio"] <= 1.3)]
    assert off == []
    for e in entries:
        if (e["line"], e["policy"], "generation_decode_loop") not in ROLLOUT_GAPS:
            assert (e["peak"] + e["resident"] <= e["hbm"]) == (e["plan_peak"] <= e["hbm"]), e["line"]
    loops = {(e["line"], e["policy"]): e for e in entries if e["graph"] == "generation_decode_loop"}
    for (line, policy), e in loops.items():
        if policy == "generation_layout":
            assert e["planned_loop_bytes"] == pytest.approx(e["loop_bytes"], rel=0.15), line
        if policy == "hoisted" and (line, "per_layer") in loops:  # not the deeper extra line
            assert e["loop_bytes"] == pytest.approx(loops[(line, "per_layer")]["loop_bytes"], rel=0.05)
            assert e["loop_bytes"] > 100 * loops[(line, "generation_layout")]["loop_bytes"]


# ----------------------------------------------------------------------------------------
# Slow: libtpu compiles
# ----------------------------------------------------------------------------------------


def _bench_memory():
    spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(REPO, "bench", "memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _proxy(layers: int, mesh: str = "1,4,2"):
    """The DPO trainer proxy of bench/memory.py (13B ratios at hidden 256)."""
    from torchxla_rlhf.preflight.stages import read_plan_shapes
    from torchxla_rlhf.trainers import registry

    path = os.path.join(REPO, "configs", "tiny", "dpo.yaml")
    overrides = _bench_memory().proxy_overrides("dpo", mesh, layers)
    cfg = registry.load(path, overrides)
    shapes, _ = read_plan_shapes(cfg, path)
    return path, overrides, cfg, shapes


@needs_aot
@pytest.mark.slow
@pytest.mark.multiprocess
def test_small_trainer_graph_compiled_for_v3_8_is_planned_and_reduce_scatters(tmp_path):
    from torchxla_rlhf.preflight.memory_plan import plan

    path, overrides, cfg, shapes = _proxy(4)
    verdicts = aot.compile_run(path, overrides, shapes, "v3-8", (1, 4, 2), depths=(4,),
                               workdir=str(tmp_path), say=lambda s: None)
    p = plan(cfg, 8, None, shapes)  # the run's peak graph: the micro-step
    v = verdicts["train_micro_step"]
    assert aot.planned_graph_bytes(p, "train_micro_step") == pytest.approx(v.peak_at(4), rel=0.15)
    # The micro-step reduces every fsdp-sharded weight's gradient with a reduce-scatter
    # (XLA:TPU's all-reduce-scatter fusion), not an all-reduce of the whole gradient.
    weights = 2 + 7 * 4  # embedding, LM head, 7 matrices a layer
    assert verdicts["train_micro_step"].at(4)["collectives"].get("reduce-scatter", 0) >= weights


@needs_aot
@pytest.mark.slow
@pytest.mark.multiprocess
def test_xla_cpu_through_the_route_agrees_with_torch_xla(tmp_path):
    """torch_xla's own XLA:CPU buffer total for the proxy's step (a real run, dumped) against
    (a) the same dumped module and (b) the placeholder-traced module, both compiled by
    jaxlib's XLA:CPU through the route plan --compile takes."""
    from tools import xla_dump

    path, overrides, _, shapes = _proxy(2)
    dump = tmp_path / "dump"
    env = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="8", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_proto --xla_dump_hlo_as_text "
               "--xla_dump_hlo_module_re=proxy_train")
    subprocess.run([sys.executable, "-m", "tools.memory_probe", "dpo", path, *overrides], env=env,
                   cwd=REPO, check=True, capture_output=True, timeout=900)
    total = next(v for k, v in xla_dump.peak_bytes_by_module(str(dump)).items() if k.endswith("proxy_train"))
    # (a) torch_xla's module: its buffer donors are in the proto (the route re-applies them).
    own = tmp_path / "own"
    own.mkdir()
    module = sorted(glob.glob(str(dump / "*proxy_train*before_optimizations.hlo.pb")))[0]
    from torchxla_rlhf.aot.compile import module_proto

    (own / "proxy_train.hlo.pb").write_bytes(module_proto(open(module, "rb").read()))
    (own / "proxy_train.json").write_text(json.dumps({"name": "proxy_train", "mesh": [1, 4, 2], "from_proto": True}))
    # (b) the placeholder trace
    traced = aot.compile_run(path, overrides, shapes, "v3-8", (1, 4, 2), depths=(2,),
                             workdir=str(tmp_path / "traced"), say=lambda s: None, cpu=True,
                             split=False)
    subprocess.run([sys.executable, "-m", "torchxla_rlhf.aot.compile", str(own),
                    _target(tmp_path, {"cpu": True, "mesh": [1, 4, 2], "suffix": "cpu"})],
                   env=aot._env(1), check=True, capture_output=True, timeout=600)
    with open(own / "proxy_train.cpu.result.json") as f:
        route = json.load(f)["memory"]["peak_memory"]
    placeholder = traced["proxy_train"].peak_at(2)
    assert route == pytest.approx(total, rel=0.05)
    assert placeholder == pytest.approx(route, rel=0.01)


def _target(tmp_path, target: dict) -> str:
    path = tmp_path / "target.json"
    path.write_text(json.dumps(target))
    return str(path)


@needs_aot
@pytest.mark.slow
@pytest.mark.multiprocess
def test_remapped_trace_compiles_as_a_native_trace(tmp_path):
    """The DPO proxy traced on 4 devices (mesh 1,2,2) and remapped to 1,4,2 compiles for a
    v3-8 to the same per-device bytes as the same graph traced natively on 8 devices."""
    path, overrides, _, shapes = _proxy(2)
    native = aot.compile_run(path, overrides, shapes, "v3-8", (1, 4, 2), depths=(2,),
                             workdir=str(tmp_path / "native"), say=lambda s: None)
    remapped = aot.compile_run(path, overrides, shapes, "v3-8", (1, 4, 2), depths=(2,),
                               workdir=str(tmp_path / "remapped"), say=lambda s: None, trace_devices=4)
    for graph in ("train_micro_step", "train_update"):
        a, b = native[graph].at(2)["memory"], remapped[graph].at(2)["memory"]
        a.pop("generated_code"), b.pop("generated_code")  # the program text, not its buffers
        assert a == b, graph


@needs_aot
@pytest.mark.slow
@pytest.mark.multiprocess
def test_plan_compile_answers_one_line_per_graph_and_a_verdict():
    env = dict(os.environ, PYTHONPATH=REPO, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torchxla_rlhf", "plan", "--config",
         os.path.join(REPO, "configs", "tiny", "grpo.yaml"), "--tpu", "v3-8", "--compile",
         "mesh_dim=1,4,2"], env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    # GRPO on a v3-8's 16 GiB: auto picks the generation layout, so its reshard is a graph too.
    for graph in ("train_micro_step", "train_update", "generation_reshard", "generation_prefill",
                  "generation_decode_loop"):
        assert f"  {graph}: " in out
    assert "TPU compiler verdict: FITS" in out


@needs_aot
@pytest.mark.slow
@pytest.mark.multiprocess
def test_remapped_generation_layout_compiles_as_a_native_trace(tmp_path):
    """GRPO's rollout in the generation layout with tp = mp * 2 (a (data, tp) mesh splitting
    fsdp) traced on 8 devices (mesh 1,4,2) and remapped to 1,8,2 compiles for a v3-16 to the
    same per-device bytes as the same graphs traced natively on 16 devices."""
    from torchxla_rlhf.preflight.stages import read_plan_shapes
    from torchxla_rlhf.trainers import registry

    path = os.path.join(REPO, "configs", "tiny", "grpo.yaml")
    overrides = ["sampling.gather_weights=generation_layout", "sampling.generation_tp=4",
                 "model.tiny.num_key_value_heads=4", "mini_batch_size=16"]
    shapes, _ = read_plan_shapes(registry.load(path, overrides), path)
    runs = {}
    for name, devices in (("native", 16), ("remapped", 8)):
        runs[name] = aot.compile_run(path, overrides, shapes, "v3-16", (1, 8, 2), depths=(2,),
                                     workdir=str(tmp_path / name), say=lambda s: None,
                                     trace_devices=devices)
    with open(tmp_path / "remapped" / "layers2" / "generation_decode_loop.json") as f:
        assert json.load(f)["mesh"] == [1, 4, 2]  # traced on 8, the layout's fsdp split kept
    for graph in ("generation_reshard", "generation_prefill", "generation_decode_loop"):
        a, b = runs["native"][graph].at(2), runs["remapped"][graph].at(2)
        assert a.get("ok") and b.get("ok"), (a.get("error"), b.get("error"))
        a, b = a["memory"], b["memory"]
        a.pop("generated_code"), b.pop("generated_code")
        assert a == b, graph


def test_trace_mesh_keeps_the_generation_layouts_split_of_fsdp():
    from torchxla_rlhf.aot.compile import split_fsdp

    assert aot.trace_mesh((1, 8, 2), 8, f=2) == (1, 4, 2)
    assert aot.trace_mesh((1, 64, 4), f=1) == (1, 16, 4)
    assert aot.trace_mesh((1, 64, 4), f=4) == (1, 16, 4)
    with pytest.raises(aot.CompileFailed):
        aot.trace_mesh((1, 64, 4), f=16)  # fsdp / 16 over two devices: 128 to trace
    assert split_fsdp((1, 4, 2), (1, 8, 2), 2) == ((1, 2, 2, 2), (1, 4, 2, 2))
    with pytest.raises(ValueError):
        split_fsdp((1, 2, 2), (1, 8, 2), 2)
    assert aot.layout_tp(["sampling.gather_weights=generation_layout", "sampling.generation_tp=4"],
                         (1, 64, 4)) == 4
    assert aot.layout_tp(["sampling.gather_weights=generation_layout", "sampling.generation_tp=0"],
                         (1, 64, 4)) == 256
    assert aot.layout_tp(["sampling.gather_weights=per_layer"], (1, 64, 4)) == 0


def test_remap_re_expresses_a_generation_layout_sharding():
    """A (data, tp) sharding with tp = mp * 2 (devices arange(n) as [n / tp, tp]) traced on
    (1, 4, 2) is, on the target (1, 8, 2), the same spec on its (data, tp) mesh."""
    from torchxla_rlhf.aot.compile import split_fsdp

    def layout(n, tp, spec):  # spec per dim: "data", "tp" or None
        ids = np.arange(n).reshape(n // tp, tp)
        axes = {"data": 0, "tp": 1}
        used = [axes[a] for a in spec if a]
        unused = [a for a in (0, 1) if a not in used]
        dims = [ids.shape[axes[a]] if a else 1 for a in spec]
        rep = int(np.prod([ids.shape[a] for a in unused])) if unused else 1
        tiles = ids.transpose(used + unused).reshape(dims + ([rep] if rep > 1 else []))
        return (f"devices=[{','.join(map(str, tiles.shape))}]{','.join(map(str, tiles.reshape(-1)))}"
                + (" last_tile_dim_replicate" if rep > 1 else ""))

    src, dst = split_fsdp((1, 4, 2), (1, 8, 2), 2)
    for spec in (("tp", None), (None, "tp"), ("data", None), ("data", "tp"), ("tp", "data")):
        assert remap_sharding(layout(8, 4, spec), src, dst) == layout(16, 4, spec), spec


@pytest.mark.parametrize("pod,config,overrides,tp,traced", [
    ("v3-256", "grpo_13b.yaml", [], 4, (1, 16, 4)),
    ("v3-128", "ppo_13b.yaml", ["mesh_dim=1,32,4"], 8, (1, 16, 4)),
])
def test_plan_compile_traces_the_rollout_policy_the_run_resolves(pod, config, overrides, tp, traced):
    """``plan --compile`` traces the rollout as the trainers resolve ``gather_weights: auto``
    on the pod (``trainers.base.rollout_sampling``: the planner on the run's mesh), on a
    traced mesh that keeps the layout's split of fsdp; the reshard graph is planned with the
    copy it writes, not the KV cache the prefill makes after it."""
    from torchxla_rlhf.configs.loader import find_config
    from torchxla_rlhf.preflight.memory_plan import plan, resolve_sampling
    from torchxla_rlhf.preflight.mesh import tpu_pod
    from torchxla_rlhf.preflight.stages import read_plan_shapes
    from torchxla_rlhf.trainers import registry

    path = find_config(config)
    cfg = registry.load(path, overrides)
    shapes, _ = read_plan_shapes(cfg, path)
    p = plan(cfg, tpu_pod(pod).devices, tpu_pod(pod).hbm_bytes, shapes)
    run = resolve_sampling(cfg, tpu_pod(pod).devices, tpu_pod(pod).hbm_bytes, shapes, mesh=p.mesh)
    traced_overrides = aot.sampling_overrides(cfg, tpu_pod(pod).devices, tpu_pod(pod).hbm_bytes, shapes, p.mesh)
    assert (run.gather_weights, run.generation_tp) == ("generation_layout", tp)
    assert traced_overrides == ["sampling.gather_weights=generation_layout", f"sampling.generation_tp={tp}"]
    mesh = (p.mesh.dp, p.mesh.fsdp, p.mesh.mp)
    assert aot.trace_mesh(mesh, f=aot.layout_tp(traced_overrides, mesh) // p.mesh.mp) == traced
    reshard, prefill = (aot.planned_graph_bytes(p, g, cfg, shapes) for g in ("generation_reshard", "generation_prefill"))
    copy = next(t.bytes for t in p.phases["rollout prefill"] if t.name == aot.COPY_TERM)
    kv = next(t.bytes for t in p.phases["rollout prefill"] if t.name == "KV cache")
    assert copy < reshard < prefill - kv
