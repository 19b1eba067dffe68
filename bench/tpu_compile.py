"""The TPU compiler's per-device peak of every 13B run on its pods, beside the planner's.

    PYTHONPATH=. python bench/tpu_compile.py [--pods v3-256,v3-128] [--save FILE]
    PYTHONPATH=. python bench/tpu_compile.py --replan [FILE]   # the planner against saved figures

For each line of the pod table (``bench/pod_table.py``) on the chosen pods this runs what
``python -m torchxla_rlhf plan --config CONFIG --tpu POD --compile`` runs: the trainer's graphs
traced with placeholder weights at the config's widths and batches at 2 and 4 layers on at most
64 virtual CPU devices, each compiled by libtpu's compile-only client for the pod (the ``aot``
extra), and the per-layer slope taken to 40 layers. ``--save`` writes the compiler's figures
(per graph and depth: peak, flops, ``optimal_seconds``, collectives) to a JSON file;
``--replan`` reads it and prints the planner's figure for each graph beside the compiler's
(no compile: seconds), which is what ``tests/test_tpu_plan.py`` checks (within +-15 %).
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
from torchxla_rlhf.config import find_config  # noqa: E402
from torchxla_rlhf.memory_plan import plan  # noqa: E402
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
    args = parser.parse_args()
    if args.replan:
        with open(args.replan) as f:
            rows = json.load(f)
    else:
        rows = measure(args.pods.split(","), args.save, args.lines)
    checked = replan(rows)
    print("Per graph: the TPU compiler's per-device peak at 2 and 4 layers (compiled), at 40 "
          "(extrapolated by the per-layer slope), and the planner's for the same graph.\n")
    print("| line | graph | compiled, 2 / 4 layers (GiB) | per layer | 40 layers (GiB) | planner | planner / compiler |")
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
