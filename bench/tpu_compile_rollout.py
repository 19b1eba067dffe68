"""The TPU compiler's verdict on each rollout policy of the 13B PPO and GRPO runs.

    PYTHONPATH=. python bench/tpu_compile_rollout.py [--pods v3-256,v3-128] [--save FILE]
    PYTHONPATH=. python bench/tpu_compile_rollout.py --replan [FILE]   # the planner against saved figures

For the PPO and GRPO lines of the pod table (``bench/pod_table.py``) on the chosen pods, and
for each ``sampling.gather_weights`` policy (``per_layer``, ``hoisted``, and
``generation_layout`` at the ``generation_tp`` that ``auto`` resolves on the pod), this runs
what ``plan --compile`` runs for the rollout: the trainer's graphs traced with placeholder
weights at 2 and 4 layers (``--depths``) on at most 64 virtual CPU devices, and the rollout's graphs
(``generation_reshard`` for the layout, ``generation_prefill``, the decode ``While``
``generation_decode_loop``) compiled by libtpu's compile-only client for the pod. Saved per
graph and depth: the compile result (peak, flops, ``optimal_seconds``, collectives) and, for
the decode loop, the collectives inside the ``While`` body (one decode step) with their bytes
per device, read from the compiled TPU HLO (``tools/xla_dump.loop_collectives``). Printed:
per policy and graph, the peak at 40 layers (the per-layer slope), the planner's figure for
the same graph and the ratio, and the decode step's collective bytes per device at 40 layers
(the slope again) beside the planner's ``per_token_collective_bytes``.
Default file: ``bench/results/tpu_compile_13b_rollout_policies.json``. Minutes per policy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # shapes from the shipped config.json

from bench.pod_table import LINES  # noqa: E402
from tools.xla_dump import loop_collectives  # noqa: E402
from torchxla_rlhf.preflight import memory_plan  # noqa: E402
from torchxla_rlhf.aot import verdict as aot  # noqa: E402
from torchxla_rlhf.configs.loader import find_config  # noqa: E402
from torchxla_rlhf.preflight.mesh import GIB, tpu_pod  # noqa: E402
from torchxla_rlhf.preflight.stages import read_plan_shapes  # noqa: E402
from torchxla_rlhf.trainers import registry  # noqa: E402

DEFAULT = os.path.join(REPO, "bench", "results", "tpu_compile_13b_rollout_policies.json")
POLICIES = ("per_layer", "hoisted", "generation_layout")
ROLLOUT = ("generation_reshard", "generation_prefill", "generation_decode_loop")
MIB = 1 << 20


def policy_overrides(pod_name: str, config: str, overrides: list[str], policy: str) -> list[str]:
    """The overrides that give the rollout ``policy``; the generation layout at the tp
    ``auto`` resolves on the pod (``memory_plan.resolve_sampling``, as the trainers do)."""
    out = [*overrides, f"sampling.gather_weights={policy}"]
    if policy == "generation_layout":
        path = find_config(config)
        cfg = registry.load(path, [*overrides, "sampling.gather_weights=auto"])
        shapes, _ = read_plan_shapes(cfg, path)
        pod = tpu_pod(pod_name)
        s = memory_plan.resolve_sampling(cfg, pod.devices, pod.hbm_bytes, shapes)
        if s.gather_weights != "generation_layout":
            raise SystemExit(f"{pod_name} {config}: auto resolves to {s.gather_weights}, not the layout")
        out.append(f"sampling.generation_tp={s.generation_tp}")
    return out


def line_plan(pod_name: str, config: str, overrides: list[str]):
    """The config, shapes, plan and pod of one line under ``overrides``."""
    path = find_config(config)
    cfg = registry.load(path, overrides)
    shapes, _ = read_plan_shapes(cfg, path)
    pod = tpu_pod(pod_name)
    return path, cfg, shapes, memory_plan.plan(cfg, pod.devices, pod.hbm_bytes, shapes), pod


def loop_summary(hlo_path: str, n_devices: int) -> dict:
    """The collectives inside the compiled module's ``While`` body: one row per kind, shape
    and group size (count, bytes per device), and their total per iteration."""
    with open(hlo_path) as f:
        lc = loop_collectives(f.read(), n_devices)
    rows: dict[tuple, list[int]] = {}
    for t in lc.inside:
        shape = ",".join(f"{d}[{'x'.join(map(str, dims))}]" for d, dims in t.arrays)
        key = (t.kind, shape, len(t.groups[0]) if t.groups else 0)
        rows.setdefault(key, []).append(t.bytes)
    return {"bytes_per_iteration": lc.bytes_per_iteration, "count": len(lc.inside),
            "rows": [{"kind": k, "shape": s, "group": g, "count": len(b), "bytes": sum(b)}
                     for (k, s, g), b in sorted(rows.items(), key=lambda kv: -sum(kv[1]))],
            "outside_bytes": sum(t.bytes for t in lc.outside)}


def measure(pods: list[str], save: str, policies: list[str], configs: list[str] | None = None,
            depths: tuple[int, ...] = aot.DEPTHS) -> list[dict]:
    """Compile each PPO/GRPO line of ``pods`` (of ``configs``, if given) under each policy at
    ``depths``, writing ``save`` after each (rows already there are kept and not compiled
    again)."""
    rows = []
    if os.path.exists(save):
        with open(save) as f:
            rows = json.load(f)
    done = {(r["pod"], r["config"], tuple(r["overrides"]), r["policy"], tuple(r["depths"])) for r in rows}
    for pod_name, config, overrides in LINES:
        if pod_name not in pods or not config.startswith(("ppo", "grpo")) or configs and config not in configs:
            continue
        for policy in policies:
            if (pod_name, config, tuple(overrides), policy, tuple(depths)) in done:
                continue
            traced = policy_overrides(pod_name, config, overrides, policy)
            path, cfg, shapes, p, pod = line_plan(pod_name, config, traced)
            mesh = [p.mesh.dp, p.mesh.fsdp, p.mesh.mp]
            print(f"{pod_name} {config} {' '.join(traced)}", flush=True)
            t0 = time.time()
            with tempfile.TemporaryDirectory(prefix="rollout-compile-") as work:
                verdicts = aot.compile_run(path, traced, shapes, pod_name, mesh, depths, workdir=work,
                                           say=lambda s: print(s, flush=True), graphs=ROLLOUT,
                                           keep_hlo=True)
                loops = {}
                for d in verdicts["generation_decode_loop"].results:
                    hlo = os.path.join(work, f"layers{d}", "generation_decode_loop.tpu.hlo.txt")
                    if os.path.exists(hlo):
                        loops[str(d)] = loop_summary(hlo, pod.devices)
            rows.append({"pod": pod_name, "config": config, "overrides": overrides, "policy": policy,
                         "depths": list(depths),
                         "traced_overrides": traced, "mesh": mesh, "layers": shapes["model"].layers,
                         "seconds": round(time.time() - t0),
                         "graphs": {n: {str(d): r for d, r in v.results.items()} for n, v in verdicts.items()},
                         "decode_loop_collectives": loops})
            os.makedirs(os.path.dirname(save), exist_ok=True)
            with open(save, "w") as f:
                json.dump(rows, f, indent=1)
    return rows


def _extrapolate(by_depth: dict[int, float], layers: int) -> float | None:
    ds = sorted(by_depth)[-2:]
    if len(ds) < 2:
        return None
    (d1, b1), (d2, b2) = [(d, by_depth[d]) for d in ds]
    return b2 + (layers - d2) * (b2 - b1) / (d2 - d1)


def report(rows: list[dict]) -> list[dict]:
    """Per saved (line, policy, graph): the compiler's peak at the model's depth, the
    planner's, their ratio, ``optimal_seconds``; per (line, policy): the decode step's
    collective bytes at the model's depth beside the planner's."""
    out = []
    for row in rows:
        _, cfg, shapes, p, pod = line_plan(row["pod"], row["config"], row["traced_overrides"])
        shape = shapes["model"]
        for name, by_depth in sorted(row["graphs"].items()):
            v = aot.GraphVerdict(name, {int(d): r for d, r in by_depth.items()}, row["layers"])
            planned = aot.planned_graph_bytes(p, name, cfg, shapes)
            deepest = v.at(max(v.results))
            optimal = (deepest.get("cost") or {}).get("optimal_seconds")
            entry = {"line": _line(row),
                     "policy": row["policy"], "graph": name, "verdict": v, "planned": planned,
                     "peak": v.peak, "ratio": None if not v.peak else planned / v.peak,
                     "optimal_seconds": optimal if optimal is not None and optimal > 0 else None,
                     "error": next((r.get("error") or ("oom" if r.get("oom") else None)
                                    for r in v.results.values() if not r.get("ok")), None)}
            if name == "generation_decode_loop":
                loops = {int(d): s for d, s in row["decode_loop_collectives"].items()}
                entry["loop_bytes"] = _extrapolate({d: s["bytes_per_iteration"] for d, s in loops.items()},
                                                   row["layers"])
                entry["loops"] = loops
                tp = cfg.sampling.generation_tp
                rows_n = cfg.rollout_micro_batch_size or cfg.train_dataset.batch_size * cfg.rollouts_per_prompt
                b = memory_plan.per_token_collective_bytes(shape, p.mesh, row["policy"], rows_n,
                                                           cfg.model.param_dtype, cfg.model.compute_dtype, tp,
                                                           compiler="tpu")
                entry["planned_loop_bytes"] = b["weights"] + b["activations"]
            entry["resident"] = aot.resident_outside(p, [name])[name]
            entry["plan_peak"] = sum(t.bytes for t in p.persistent) + max(
                p.phase_total(k) for k in p.phases if k.startswith("rollout"))
            entry["hbm"] = pod.hbm_bytes
            out.append(entry)
    return out


def _line(row: dict) -> str:
    """A saved row's line: pod, config, overrides, and its depths where not the default."""
    line = f"{row['pod']} {row['config']} {' '.join(row['overrides'])}".strip()
    depths = tuple(row["depths"])
    return line if depths == aot.DEPTHS else f"{line} (at {' / '.join(map(str, depths))} layers)"


def _fmt(b: float | None, unit: float = GIB, digits: int = 2) -> str:
    return "?" if b is None else f"{b / unit:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", default="v3-256")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--configs", default=None, help="only these configs (comma-separated)")
    parser.add_argument("--depths", default=",".join(map(str, aot.DEPTHS)),
                        help="decoder layers traced (the slope between the two deepest)")
    parser.add_argument("--save", default=DEFAULT)
    parser.add_argument("--replan", nargs="?", const=DEFAULT, default=None)
    args = parser.parse_args()
    if args.replan:
        with open(args.replan) as f:
            rows = json.load(f)
    else:
        rows = measure(args.pods.split(","), args.save, args.policies.split(","),
                       args.configs.split(",") if args.configs else None,
                       tuple(int(d) for d in args.depths.split(",")))
    entries = report(rows)
    print("Per policy and graph: the TPU compiler's per-device peak at the traced depths (compiled), "
          "at 40 (extrapolated by the per-layer slope), and the planner's for the same graph.\n")
    print("| line | policy | graph | compiled, by depth (GiB) | 40 layers (GiB) | planner | "
          "planner / compiler | optimal_seconds (deepest) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for e in entries:
        v = e["verdict"]
        if e["error"]:
            print(f"| {e['line']} | {e['policy']} | {e['graph']} | not compiled: {e['error'][:80]} | | | | |")
            continue
        at = " / ".join(_fmt(v.peak_at(d)) for d in sorted(v.results))
        opt = "n/a" if e["optimal_seconds"] is None else f"{e['optimal_seconds']:.3g}"
        print(f"| {e['line']} | {e['policy']} | {e['graph']} | {at} | {_fmt(e['peak'])} | "
              f"{_fmt(e['planned'])} | {e['ratio']:.2f} | {opt} |")
    print("\nPer run and policy: the rollout's largest graph plus what stays resident beside it "
          "(the planner's persistent terms the graph does not take), against the planner's "
          "persistent terms and rollout phase, and a v3 core's 16 GiB.\n")
    print("| line | policy | TPU compiler: rollout peak (graph) | planner: rollout peak | fits |")
    print("| --- | --- | --- | --- | --- |")
    runs: dict[tuple, list] = {}
    for e in entries:
        if not e["error"] and e["peak"] is not None:
            runs.setdefault((e["line"], e["policy"]), []).append(e)
    for (line, policy), es in runs.items():
        peak, graph = max((e["peak"] + e["resident"], e["graph"]) for e in es)
        print(f"| {line} | {policy} | {_fmt(peak)} ({graph}) | {_fmt(es[0]['plan_peak'])} | "
              f"{'yes' if peak <= es[0]['hbm'] else 'NO'} |")
    print("\nPer policy: the collectives inside the decode While body (one token), bytes per device "
          "from the compiled TPU HLO at the traced depths and extrapolated to 40, beside the planner's "
          "per_token_collective_bytes.\n")
    print("| line | policy | collectives per iteration (deepest) | MiB by depth | "
          "MiB at 40 | planner MiB | planner / compiler |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for e in entries:
        if e["graph"] != "generation_decode_loop" or e["error"] or not e["loops"]:
            continue
        deep = e["loops"][max(e["loops"])]
        kinds: dict[str, int] = {}
        for r in deep["rows"]:
            kinds[r["kind"]] = kinds.get(r["kind"], 0) + r["count"]
        what = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none"
        at = " / ".join(_fmt(e["loops"][d]["bytes_per_iteration"], MIB) for d in sorted(e["loops"]))
        ratio = "" if not e["loop_bytes"] else f"{e['planned_loop_bytes'] / e['loop_bytes']:.2f}"
        print(f"| {e['line']} | {e['policy']} | {what} | {at} | {_fmt(e['loop_bytes'], MIB)} | "
              f"{_fmt(e['planned_loop_bytes'], MIB)} | {ratio} |")


if __name__ == "__main__":
    main()
