"""The README's pod table: the shipped 13B configs on TPU pods, as ``plan`` sees them.

    PYTHONPATH=. python bench/pod_table.py [--model DIR_OR_HUB_NAME]

Each line is the pre-flight ``python -m torchxla_rlhf plan --config CONFIG --tpu POD
OVERRIDES`` runs (the start-up checks and the memory plan), with the models' shapes read as
``plan`` reads them: ``allenai/tulu-2-13b`` from the hub, or from its shipped config.json when
the hub cannot answer; PPO's reward model, which the reward stage exports, with that stage's
model's shape. ``--model`` gives every model of every line that shape instead. Prints a
Markdown table of the lines that fit, with the planner's per-device peak, then each line that
does not and why, then how the shapes were read.
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from torchxla_rlhf.configs.loader import find_config  # noqa: E402
from torchxla_rlhf.errors import UserError  # noqa: E402
from torchxla_rlhf.preflight import checks  # noqa: E402
from torchxla_rlhf.preflight.mesh import GIB, tpu_pod  # noqa: E402
from torchxla_rlhf.preflight.stages import read_plan_shapes  # noqa: E402
from torchxla_rlhf.trainers import registry  # noqa: E402

LINES = [
    # (pod, shipped config, overrides): the shipped mesh where it matches the pod, else the
    # header's; a second line with the same rows per update in smaller micro-batches (or the
    # rollout in pieces) where the first does not fit.
    ("v3-256", "dpo_13b.yaml", []),
    ("v3-256", "reward_13b.yaml", []),
    ("v3-256", "ppo_13b.yaml", []),
    ("v3-128", "dpo_13b.yaml", ["mesh_dim=-1,16,8"]),
    ("v3-128", "reward_13b.yaml", ["mesh_dim=1,64,2"]),
    ("v3-128", "reward_13b.yaml", ["mesh_dim=-1,32,4"]),
    ("v3-128", "ppo_13b.yaml", ["mesh_dim=1,32,4"]),
    ("v3-256", "grpo_13b.yaml", []),
    ("v3-128", "grpo_13b.yaml", ["mesh_dim=1,32,4"]),
    ("v4-64", "dpo_13b.yaml", ["mesh_dim=-1,4,8"]),
    ("v4-64", "reward_13b.yaml", ["mesh_dim=-1,4,8"]),
    ("v4-64", "ppo_13b.yaml", ["mesh_dim=1,8,4"]),
    ("v4-64", "ppo_13b.yaml", ["mesh_dim=1,8,4", "rollout_micro_batch_size=128",
                               "optimizer.accumulate_gradient_steps=4"]),
    ("v5p-32", "dpo_13b.yaml", ["mesh_dim=-1,2,8"]),
    ("v5p-32", "reward_13b.yaml", ["mesh_dim=-1,2,8"]),
    ("v5p-32", "ppo_13b.yaml", ["mesh_dim=1,4,4"]),
    ("v5p-32", "ppo_13b.yaml", ["mesh_dim=1,4,4", "rollout_micro_batch_size=128",
                                "optimizer.accumulate_gradient_steps=4"]),
]


def preflight(pod_name: str, config: str, overrides: list[str], model: str | None,
              notes: list[str]):
    """``(fits, plan or None, why)`` of one line, as ``plan`` computes it; how the shapes were
    read goes to ``notes``."""
    path = find_config(config)
    cfg = registry.load(path, overrides)
    if model is not None:
        keys = {r.key for r in cfg.model_roles()}
        cfg = registry.load(path, overrides + [f"{k}.name_or_path={model}" for k in sorted(keys)])
    pod = tpu_pod(pod_name)
    try:
        shapes, read_notes = read_plan_shapes(cfg, path)
        notes += [n for n in read_notes if n not in notes]
        report = checks.check_run(cfg, shapes, pod.devices, pod.hosts, pod.devices_per_host,
                                  hbm_bytes=pod.hbm_bytes)
    except UserError as e:
        return False, None, str(e)
    p = report.plan
    if report.ok and p is not None:
        return True, p, ""
    if p is not None and p.fits is False:
        meshes = checks.fitting_meshes(cfg, shapes, pod.devices, pod.hbm_bytes)
        return False, p, (f"{p.peak / GIB:.2f} of {p.hbm_bytes / GIB:g} GiB per device; meshes "
                          f"that fit these batches: {' '.join(f'`{m}`' for m in meshes) or 'none'}")
    return False, p, report.failures_line()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="the shape of every model (a directory "
                        "or hub name with a config.json; default: each model's own)")
    args = parser.parse_args()
    fit, misfit, notes = [], [], []
    for pod, config, overrides in LINES:
        ok, p, why = preflight(pod, config, overrides, args.model, notes)
        shown = " ".join(overrides) or "(as shipped)"
        if ok:
            d = p.dominant
            fit.append(f"| {pod} | `{config}` | `{shown}` | {p.peak / GIB:.2f} | "
                       f"{p.hbm_bytes / GIB:g} | {d.name} ({d.bytes / GIB:.2f}) |")
        else:
            misfit.append(f"- {pod} `{config}` `{shown}`: {why}")
    print("| pod | config | overrides | peak GiB per device | of GiB | dominant term (GiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(fit))
    if misfit:
        print("\nDoes not fit (the planner's peak):\n" + "\n".join(misfit))
    if notes:
        print("\nShapes:\n" + "\n".join(f"- {n}" for n in notes))


if __name__ == "__main__":
    main()
