"""Models a pipeline stage will produce, for planning before they exist.

The shipped 13B configs are one pipeline: ``reward_13b.yaml`` writes
``outputs/reward_13b/final``, which ``ppo_13b.yaml`` names as its reward model. Before the
reward stage has run that directory does not exist, so its shape cannot be read from it. The
trainers export the architecture of the model they started from (the same ``config.json``
sizes; a reward or value model keeps its base's backbone and swaps only the head, which the
memory plan takes from the role), so such a model has the shape of the producing stage's own
``model``. :func:`read_plan_shapes` reads every model of a run and, for a local path that does
not exist yet and that another config in the same folder exports, takes that stage's model's
shape and says so in a note. A missing path that no stage produces stays an error.
"""

from __future__ import annotations

import os
from typing import Any

from torchxla_rlhf.preflight.shapes import NoSuchModel, Shape, read_shape

AUTO_CLASS = {"causal": "AutoModelForCausalLM", "classifier": "AutoModelForSequenceClassification"}


def exports(cfg: Any) -> list[tuple[str, str]]:
    """The model directories a run of ``cfg`` exports under its ``output_dir`` at the end, as
    ``(name, what)``, from what its trainer declares it trains (:meth:`model_roles`): the
    model trained from ``model`` is ``final``; another trained model is ``final-ROLE`` (PPO's
    value model: ``final-value``)."""
    from torchxla_rlhf.trainers import registry

    kind = registry.spec_for(cfg).kind
    out = []
    for r in cfg.model_roles():
        if r.trained:
            name = "final" if r.key == "model" else f"final-{r.role.split()[0]}"
            out.append((name, f"the {kind} {r.role} ({AUTO_CLASS[r.head]})"))
    return out


def _norm(path: str) -> str:
    return os.path.normpath(path.rstrip("/"))


def producing_stage(config_path: str, model_path: str) -> tuple[str, Any] | None:
    """``(config file, loaded config)`` of the config beside ``config_path`` (same folder, a
    ``*.yaml`` declaring a trainer) whose run exports ``model_path``; None when none does."""
    from torchxla_rlhf.configs.loader import ConfigError
    from torchxla_rlhf.trainers import registry

    if "://" in config_path or not os.path.isfile(config_path):
        return None
    folder = os.path.dirname(os.path.abspath(config_path))
    want = _norm(model_path)
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".yaml") or os.path.samefile(path, config_path):
            continue
        try:
            other = registry.load(path)
        except ConfigError:
            continue  # not a trainer config (or a broken one): it produces nothing
        if any(_norm(f"{other.output_dir}/{sub}") == want for sub, _ in exports(other)):
            return path, other
    return None


def read_plan_shapes(cfg: Any, config_path: str | None,
                     _seen: frozenset[str] = frozenset()) -> tuple[dict[str, Shape], list[str]]:
    """Every model's shape by config key (as ``memory_plan.read_shapes``), and the notes on
    how any was read: a shipped copy of a hub config.json, or an earlier stage's output."""
    shapes: dict[str, Shape] = {}
    notes: list[str] = []
    for key in dict.fromkeys(r.key for r in cfg.model_roles()):
        model_cfg = getattr(cfg, key)
        try:
            shape = read_shape(model_cfg, key, cfg.remote_timeout_s, shipped_fallback=True)
        except NoSuchModel:
            stage = producing_stage(config_path, model_cfg.name_or_path) if config_path else None
            if stage is None or stage[0] in _seen:
                raise
            path, other = stage
            base = read_plan_shapes(other, path, _seen | {os.path.abspath(config_path)})
            shape, base_notes = base[0]["model"], base[1]
            notes += [n for n in base_notes if n not in notes]
            notes.append(f"{key}.name_or_path={model_cfg.name_or_path!r} does not exist yet: "
                         f"{os.path.basename(path)} exports it; planned with the shape of that "
                         f"stage's model {other.model.name_or_path!r} (a trained model keeps "
                         f"its base's architecture)")
        if shape.note and shape.note not in notes:
            notes.append(shape.note)
        shapes[key] = shape
    return shapes, notes
