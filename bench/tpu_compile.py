"""The TPU compiler's per-device peak of every 13B run on its pods, beside the planner's.

    PYTHONPATH=. python bench/tpu_compile.py [--pods v3-256,v3-128] [--save FILE]
    PYTHONPATH=. python bench/tpu_compile.py --deeper   # updates and micro-steps at 40 layers
    PYTHONPATH=. python bench/tpu_compile.py --replan [FILE]   # the planner against saved figures

For each line of the pod table (``bench/pod_table.py``) on the chosen pods this runs what
``python -m torchxla_rlhf plan --config CONFIG --tpu POD --compile`` runs: the trainer's graphs
traced with placeholder weights at the config's widths and batches at 2 and 4 layers on at most
64 virtual CPU devices, each compiled by libtpu's compile-only client for the pod (the ``aot``
extra), and the per-layer slope taken to 40 layers; ``--deeper`` compiles the AdamW updates
and the micro-steps at 40 layers (:data:`DEEPER`) and, saved beside, the micro-steps at 8
(:data:`PROBES`).
``--save`` writes the compiler's figures
(per graph and depth: peak, flops, ``optimal_seconds``, collectives) to a JSON file;
``--replan`` reads it and prints the planner's figure for each graph beside the compiler's
(no compile: seconds), which is what ``tests/test_tpu_compile.py`` checks (within +-15 %).
Default file: ``bench/results/tpu_compile_13b.json``. Several minutes per line on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # shapes from the shipped config.json

from bench.pod_table import LINES  # noqa: E402
from torchxla_rlhf.aot import verdict as aot  # noqa: E402
from torchxla_rlhf.configs.loader import find_config  # noqa: E402
from torchxla_rlhf.preflight.memory_plan import plan  # noqa: E402
from torchxla_rlhf.preflight.mesh import GIB, tpu_pod  # noqa: E402
from torchxla_rlhf.preflight.stages import read_plan_shapes  # noqa: E402
from torchxla_rlhf.trainers import registry  # noqa: E402

DEFAULT = os.path.join(REPO, "bench", "results", "tpu_compile_13b.json")


ROLLOUT_AS_COMPILED = ["sampling.gather_weights=per_layer"]
"""PPO's and GRPO's rollouts are compiled with ``per_layer`` weights here, the figures this
file's tables and tests were fitted on (the default ``auto`` picks the generation layout where
the planner says it fits: ``bench/tpu_compile_rollout.py`` compiles the rollout under each
policy, the layout included)."""


def line_plan(pod_name: str, config: str, overrides: list[str]):
    if config.startswith(("ppo", "grpo")):
        overrides = [*overrides, *ROLLOUT_AS_COMPILED]
    path = find_config(config)
    cfg = registry.load(path, overrides)
    shapes, _ = read_plan_shapes(cfg, path)
    pod = tpu_pod(pod_name)
    return path, cfg, shapes, plan(cfg, pod.devices, pod.hbm_bytes, shapes), pod


def measure(pods: list[str], save: str, lines: str | None = None) -> list[dict]:
    """Compile every line of ``pods`` (or the lines whose config names match ``lines``),
    writing the figures to ``save`` after each line (a run cut short keeps what it did;
    lines already in ``save`` are kept and not compiled again)."""
    rows = []
    if os.path.exists(save):
        with open(save) as f:
            rows = json.load(f)
    done = {(r["pod"], r["config"], tuple(r["overrides"])) for r in rows}
    for pod_name, config, overrides in LINES:
        if pod_name not in pods or (pod_name, config, tuple(overrides)) in done:
            continue
        if lines and not any(k in config for k in lines.split(",")):
            continue
        path, cfg, shapes, p, pod = line_plan(pod_name, config, overrides)
        mesh = [p.mesh.dp, p.mesh.fsdp, p.mesh.mp]
        t0 = time.time()
        print(f"{pod_name} {config} {' '.join(overrides)}", flush=True)
        traced = [*overrides, *ROLLOUT_AS_COMPILED] if config.startswith(("ppo", "grpo")) else overrides
        verdicts = aot.compile_run(path, traced, shapes, pod_name, mesh,
                                   say=lambda s: print(s, flush=True))
        rows.append({"pod": pod_name, "config": config, "overrides": overrides, "mesh": mesh,
                     "layers": shapes["model"].layers, "seconds": round(time.time() - t0),
                     "graphs": {n: {str(d): r for d, r in v.results.items()} for n, v in verdicts.items()}})
        os.makedirs(os.path.dirname(save), exist_ok=True)
        with open(save, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


DEEPER = {"train_update": None, "train_micro_step": None}
"""Graphs also compiled at the model's own depth (``--deeper``); ``GraphVerdict`` takes a
graph compiled at the model's depth as is, without extrapolating. The AdamW update is
elementwise, so its 40-layer compile takes seconds and little memory, and its transient does
not grow along the line through 2 and 4 layers (the reward model's update on the v3-256 holds
5.5, 22.6, 39.3 and 65.3 MiB of temporaries at 2, 4, 8 and 16 layers, 141 MiB at 40). A 13B
micro-step at 40 layers compiles in about two minutes with up to 20 GiB of host memory, and
its peak is not on the line through 2 and 4 layers either: which moment is the largest (the
backward's start with every checkpointed input, its end with the embedding gradient whole
over fsdp, the frozen models' forwards beside the backward) changes with depth. DPO's on the
v3-256 (``-1,16,16``) needs more than this machine's 24 GiB at 40 layers (:data:`TOO_DEEP`):
it is compiled at 16 and 24 layers beside its 2 and 4, and the line through the two deepest
taken to 40."""

TOO_DEEP = {("v3-256", "dpo_13b.yaml", "train_micro_step"): 24}
"""``(pod, config, graph)``: the deepest depth ``--deeper`` compiles it at (host memory)."""

PROBES = {"train_micro_step": 8}
"""Graphs ``--deeper`` also compiles at a third depth, saved beside the others (a line's
``probes``), to show how a micro-step's peak moves between 4 and 8 layers."""


def measure_deeper(save: str, deeper: dict[str, int | None] = DEEPER,
                   key: str = "graphs") -> list[dict]:
    """Compile the graphs of ``deeper`` of every line saved in ``save`` at their depth (None:
    the model's; traced as ``measure`` traces them, the other graphs left uncompiled), adding
    each result to the line's ``key`` (``graphs``: beside the 2- and 4-layer ones; ``probes``:
    :data:`PROBES`); saved after each line, a result already there is not compiled again."""
    import dataclasses
    import tempfile

    with open(save) as f:
        rows = json.load(f)
    for row in rows:
        by_depth: dict[int, list[str]] = {}
        for g, d in deeper.items():
            d = min(d or row["layers"], row["layers"],
                    TOO_DEEP.get((row["pod"], row["config"], g), row["layers"]))
            if g in row["graphs"] and str(d) not in row.get(key, {}).get(g, {}):
                by_depth.setdefault(d, []).append(g)
        path, cfg, shapes, p, _ = line_plan(row["pod"], row["config"], row["overrides"])
        traced = ([*row["overrides"], *ROLLOUT_AS_COMPILED] if row["config"].startswith(("ppo", "grpo"))
                  else row["overrides"])
        src = aot.trace_mesh(row["mesh"])
        for depth, todo in sorted(by_depth.items()):
            print(f"{_line(row)}: {', '.join(todo)} at {depth} layers", flush=True)
            with tempfile.TemporaryDirectory(prefix="tpu-compile-") as out:
                spec = {"config": path, "overrides": traced, "mesh": ",".join(map(str, src)),
                        "layers": depth, "out": out, "split": True,
                        "shapes": {k: dataclasses.asdict(v) for k, v in shapes.items()}}
                with open(os.path.join(out, "spec.json"), "w") as f:
                    json.dump(spec, f)
                aot._run(["-m", "torchxla_rlhf.aot.trace", os.path.join(out, "spec.json")],
                         aot._env(src[0] * src[1] * src[2]), "tracing")
                for fname in os.listdir(out):  # compile only the chosen graphs
                    if fname.endswith(".hlo.pb") and fname[:-len(".hlo.pb")] not in todo:
                        os.remove(os.path.join(out, fname))
                topo, kw = aot.topology(row["pod"])
                with open(os.path.join(out, "target.json"), "w") as f:
                    json.dump({"topology": topo, "topology_kwargs": kw, "mesh": row["mesh"],
                               "cpu": False, "suffix": "tpu"}, f)
                aot._run(["-m", "torchxla_rlhf.aot.compile", out, os.path.join(out, "target.json")],
                         aot._env(1), f"compiling at {depth} layers")
                for g in todo:
                    with open(os.path.join(out, f"{g}.tpu.result.json")) as f:
                        row.setdefault(key, {}).setdefault(g, {})[str(depth)] = json.load(f)
            with open(save, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


def replan(rows: list[dict]) -> list[tuple]:
    """Per saved graph: ``(line, graph, compiler GiB, planner GiB, ratio)``."""
    out = []
    for row in rows:
        _, cfg, shapes, p, _ = line_plan(row["pod"], row["config"], row["overrides"])
        for name, by_depth in row["graphs"].items():
            v = aot.GraphVerdict(name, {int(d): r for d, r in by_depth.items()}, row["layers"])
            if v.peak is None:
                continue
            planned = aot.planned_graph_bytes(p, name, cfg, shapes)
            out.append((f"{row['pod']} {row['config']} {' '.join(row['overrides'])}".strip(), name,
                        v.peak / GIB, planned / GIB, planned / v.peak, v))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", default="v3-256,v3-128")
    parser.add_argument("--lines", default=None, help="only the configs whose names contain one "
                        "of these (comma-separated), e.g. ppo,grpo")
    parser.add_argument("--save", default=DEFAULT)
    parser.add_argument("--replan", nargs="?", const=DEFAULT, default=None)
    parser.add_argument("--deeper", action="store_true", help="also compile the saved lines' "
                        "AdamW updates and micro-steps at the model's depth (DEEPER) and the "
                        "micro-steps at 8 layers (PROBES, saved beside)")
    args = parser.parse_args()
    if args.replan:
        with open(args.replan) as f:
            rows = json.load(f)
    else:
        rows = measure(args.pods.split(","), args.save, args.lines)
        if args.deeper:
            measure_deeper(args.save)
            rows = measure_deeper(args.save, PROBES, "probes")
    checked = replan(rows)
    print("Per graph: the TPU compiler's per-device peak at 2 and 4 layers (compiled), at 40 "
          "(compiled there, or extrapolated by the slope through the two deepest compiles), and the "
          "planner's for the same graph.\n")
    print("| line | graph | compiled at 2 / 4 (/ 40) layers (GiB) | per layer | 40 layers (GiB) | planner | planner / compiler |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for line, graph, tpu, planned, ratio, v in checked:
        at = " / ".join(f"{v.peak_at(d) / GIB:.2f}" for d in sorted(v.results))
        print(f"| {line} | {graph} | {at} | {v.slope / GIB:.3f} | {tpu:.2f} | {planned:.2f} | {ratio:.2f} |")
    print("\nPer run: the largest graph's peak plus what stays resident beside it (the planner's "
          "persistent terms the graph does not take), against a v3 core's 16 GiB.\n")
    print("| line | TPU compiler: peak (graph) | planner's peak | fits |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        peak, planned, hbm, graph, phase = run_peaks(row, checked, names=True)
        print(f"| {_line(row)} | {peak / GIB:.2f} ({graph}) | {planned / GIB:.2f} ({phase}) | "
              f"{'yes' if peak <= hbm else 'NO'} |")
    probed = probes(rows)
    if probed:
        print("\nProbes: graphs compiled at a third depth (not in the figures above), beside the "
              "line through 2 and 4 layers and the planner at that depth.\n")
        print("| line | graph | layers | compiled (GiB) | line (GiB) | planner (GiB) | planner / compiled |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for line, graph, d, tpu, along, planned in probed:
            print(f"| {line} | {graph} | {d} | {tpu / GIB:.2f} | {along / GIB:.2f} | "
                  f"{planned / GIB:.2f} | {planned / tpu:.2f} |")


def probes(rows: list[dict]) -> list[tuple]:
    """Per graph compiled at a probe depth (:data:`PROBES`): ``(line, graph, depth, compiler
    bytes there, the line through 2 and 4 layers there, planner bytes for that depth)``."""
    import dataclasses

    out = []
    for row in rows:
        path, cfg, shapes, _, pod = line_plan(row["pod"], row["config"], row["overrides"])
        for name, by_depth in row.get("probes", {}).items():
            v = aot.GraphVerdict(name, {int(d): r for d, r in row["graphs"][name].items()}, 0)
            for d, r in sorted(by_depth.items(), key=lambda x: int(x[0])):
                at = {k: dataclasses.replace(s, layers=int(d)) for k, s in shapes.items()}
                planned = aot.planned_graph_bytes(plan(cfg, pod.devices, pod.hbm_bytes, at), name)
                line = v.peak_at(4) + (int(d) - 4) * v.slope
                out.append((_line(row), name, int(d), r["memory"]["peak_memory"], line, planned))
    return out


def _line(row: dict) -> str:
    return f"{row['pod']} {row['config']} {' '.join(row['overrides'])}".strip()


def run_peaks(row: dict, checked: list, names: bool = False):
    """A line's peak per device: the TPU compiler's (its largest graph at 40 layers plus what
    stays resident beside it) and the planner's, and the device memory."""
    *_, p, pod = line_plan(row["pod"], row["config"], row["overrides"])
    graphs = [c for c in checked if c[0] == _line(row)]
    resident = aot.resident_outside(p, [c[1] for c in graphs])
    peak, graph = max(((c[5].peak + resident[c[1]]), c[1]) for c in graphs)
    out = (peak, p.peak, pod.hbm_bytes)
    return (*out, graph, p.peak_phase) if names else out


if __name__ == "__main__":
    main()
