"""Start-up checks: will this config run on this pod? Answered before any weights load.

Everything a 13B run on a v3 pod could fail on after minutes of loading is arithmetic on the
model's shapes and the config: the mesh must use the pod's devices, every weight dim must
split over its mesh axes, every uploaded batch must split over ``dp*fsdp``, the sharded
training state must fit a device. :func:`check_run` does that arithmetic as a pure function
of (run config, model configs, device count, process count, devices per host) — no devices,
no torch_xla — so a test can check every shipped config against the pods its header names,
with the real Llama-2 13B and 70B shapes built on the ``meta`` device. Each failed check names
the config key and what would fit (including the meshes that pass everything).

:func:`check_before_loading` is the trainers' hook: it reads the topology from the runtime
and the model configs (config.json only), runs :func:`check_run`, logs, and raises.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from torchxla_rlhf import runtime, sharding
from torchxla_rlhf.configs import DPOConfig, GRPOConfig, PPOConfig, RewardConfig
from torchxla_rlhf.errors import UserError

logger = logging.getLogger(__name__)

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

TRAINED_STATE_FACTOR = 4
"""A trained parameter costs 4 copies of its size on the device: the parameter, its gradient
and AdamW's two moments (all in ``param_dtype``). A frozen one costs 1."""


class StartupError(UserError, ValueError):
    """A config that cannot run on this pod (every failed check in the message)."""


@dataclass(frozen=True)
class Check:
    """One start-up check: what it looked at (``key``), whether it passed, and why."""

    name: str
    key: str
    ok: bool
    detail: str
    warning: bool = False
    """Passed, but at a cost the log should state (e.g. heads resharded)."""


@dataclass
class StartupReport:
    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, key: str, ok: bool, detail: str, warning: bool = False) -> None:
        self.checks.append(Check(name, key, ok, detail, warning))

    @property
    def errors(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.ok and c.warning]

    @property
    def ok(self) -> bool:
        return not self.errors

    def failures_text(self) -> str:
        return "\n".join(f"- {c.name} ({c.key}): {c.detail}" for c in self.errors)


@dataclass(frozen=True)
class ModelShapes:
    """A model the run puts on the mesh: its HF config and parameter shapes (from ``meta``)."""

    role: str
    key: str
    """Config key it comes from (``model``, ``reward_model``, ``value_model``)."""
    config: Any
    params: tuple[tuple[str, tuple[int, ...]], ...]
    rules: tuple
    trained: bool
    param_dtype: str


def build_meta(model_cls, config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Parameter names and shapes of ``model_cls(config)`` built on the ``meta`` device (no
    memory: 13B takes a fraction of a second)."""
    with torch.device("meta"):
        model = model_cls(config)
    return tuple((n, tuple(p.shape)) for n, p in model.named_parameters())


def run_models(cfg, model_configs: Mapping[str, Any]) -> list[ModelShapes]:
    """The models a trainer of ``cfg``'s kind puts on the mesh, with their shapes."""
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    def causal(role: str, key: str, trained: bool) -> ModelShapes:
        config = model_configs[key]
        return ModelShapes(role, key, config, build_meta(LlamaForCausalLM, config),
                           sharding.CAUSAL_LM_RULES, trained, getattr(cfg, key).param_dtype)

    def classifier(role: str, key: str, model_cfg, trained: bool) -> ModelShapes:
        config = copy.deepcopy(model_configs[key])
        config.num_labels = 1
        return ModelShapes(role, key, config, build_meta(LlamaForSequenceClassification, config),
                           sharding.SEQUENCE_CLASSIFIER_RULES, trained, model_cfg.param_dtype)

    if isinstance(cfg, PPOConfig):
        value_key = "value_model" if cfg.value_model is not None else "reward_model"
        return [
            causal("policy", "model", True),
            causal("reference", "model", False),
            classifier("reward model", "reward_model", cfg.reward_model, False),
            classifier("value model", value_key, cfg.value_model or cfg.reward_model, True),
        ]
    if isinstance(cfg, RewardConfig):
        return [classifier("reward model", "model", cfg.model, True)]
    if isinstance(cfg, GRPOConfig):
        roles = [causal("policy", "model", True)]
        if cfg.needs_reference:
            roles.append(causal("reference", "model", False))
        if cfg.rewards.reward_model is not None:
            roles.append(classifier("reward model", "reward_model", cfg.rewards.reward_model, False))
        return roles
    if isinstance(cfg, DPOConfig):
        policy = [causal("policy", "model", True)]
        return policy + ([causal("reference", "model", False)] if cfg.needs_reference else [])
    raise TypeError(f"no start-up checks for config type {type(cfg).__name__}")


def uploaded_batches(cfg) -> list[tuple[str, int]]:
    """``(what, rows)`` of each batch the trainer uploads with dim 0 over ``dp*fsdp``."""
    if isinstance(cfg, (PPOConfig, GRPOConfig)):
        return [("train_dataset.batch_size x rollouts_per_prompt (rollout rows)",
                 cfg.train_dataset.batch_size * cfg.rollouts_per_prompt)]
    # Held-out pairs are fed in train_dataset.batch_size batches too (PairData.eval_batches).
    return [("train_dataset.batch_size x 2 (chosen + rejected rows)",
             2 * cfg.train_dataset.batch_size)]


def _sequence_lengths(cfg) -> tuple[str, int]:
    if isinstance(cfg, (PPOConfig, GRPOConfig)):
        return ("train_dataset.seq_length + max_continuation_len",
                cfg.train_dataset.seq_length + cfg.max_continuation_len)
    lengths = [cfg.train_dataset.seq_length]
    if cfg.eval_dataset is not None:
        lengths.append(cfg.eval_dataset.seq_length)
    return ("train_dataset.seq_length", max(lengths))


def check_mesh_fit(
    cfg, models: list[ModelShapes], mesh: tuple[int, int, int],
    device_memory_bytes: int | None, report: StartupReport,
) -> None:
    """The checks that depend on the mesh: weight dims, batch rows, heads, state memory."""
    dp, fsdp, mp = mesh
    sizes = {"dp": dp, "fsdp": fsdp, "mp": mp}
    state_bytes = 0.0
    for m in models:
        try:
            specs = sharding.match_specs(m.params, m.rules, axis_sizes=sizes)
        except sharding.ShardingError as e:
            report.add("weights split over the mesh", f"mesh_dim / {m.key}", False,
                       f"{m.role}: {e}")
            continue
        shapes = dict(m.params)
        per_device = sum(
            math.prod(shapes[n]) / sharding._axes_size_all(spec, sizes) for n, spec in specs.items()
        )
        state_bytes += per_device * BYTES[m.param_dtype] * (TRAINED_STATE_FACTOR if m.trained else 1)
        cost = sharding.heads_split_cost(m.config, mp)
        report.add("attention heads over mp", "mesh_dim", True,
                   f"{m.role}: {cost or f'{m.config.num_attention_heads} heads split {mp} ways'}",
                   warning=cost is not None)
    for what, rows in uploaded_batches(cfg):
        ok = rows % (dp * fsdp) == 0
        report.add("batch rows over dp*fsdp", "train_dataset.batch_size", ok,
                   f"{what} = {rows} over dp*fsdp = {dp}*{fsdp} = {dp * fsdp}: "
                   + (f"{rows // (dp * fsdp)} row(s) per device" if ok else
                      f"does not divide; a batch_size giving a multiple of {dp * fsdp} rows fits"))
    if isinstance(cfg, PPOConfig):
        chunk = cfg.mini_batch_size // cfg.optimizer.accumulate_gradient_steps
        even = chunk % (dp * fsdp) == 0
        report.add("PPO chunk rows over dp*fsdp", "mini_batch_size", True,
                   f"mini_batch_size / accumulate_gradient_steps = {chunk} rows per chunk over "
                   f"dp*fsdp = {dp * fsdp}" + ("" if even else ": uneven, GSPMD pads the shards"),
                   warning=not even)
    gib = state_bytes / 2**30
    if device_memory_bytes is None:
        report.add("training state per device", "mesh_dim", True,
                   f"{gib:.2f} GiB of parameters, gradients and AdamW state per device "
                   "(activations come on top)")
    else:
        ok = state_bytes < device_memory_bytes
        report.add("training state per device", "mesh_dim", ok,
                   f"{gib:.2f} GiB of parameters, gradients and AdamW state per device of "
                   f"{device_memory_bytes / 2**30:.1f} GiB (activations come on top)"
                   + ("" if ok else ": shard more ways (larger fsdp*mp) or use more devices"))


def fitting_meshes(
    cfg, models: list[ModelShapes], devices: int, device_memory_bytes: int | None = None,
    limit: int = 4,
) -> list[str]:
    """Meshes ``'dp,fsdp,mp'`` on ``devices`` that pass every check, best first: heads split
    evenly, then fewer data-parallel replicas (less memory), then smaller mp."""
    found = []
    for mp in range(1, devices + 1):
        if devices % mp:
            continue
        for fsdp in range(1, devices // mp + 1):
            if (devices // mp) % fsdp:
                continue
            dp = devices // (mp * fsdp)
            report = StartupReport()
            check_mesh_fit(cfg, models, (dp, fsdp, mp), device_memory_bytes, report)
            if report.ok:
                found.append((bool(report.warnings), dp, mp, f"{dp},{fsdp},{mp}"))
    return [text for *_, text in sorted(found)][:limit]


def check_run(
    cfg, model_configs: Mapping[str, Any], devices: int, processes: int, devices_per_host: int,
    *, device_memory_bytes: int | None = None,
) -> StartupReport:
    """Every start-up check of ``cfg`` on a pod of ``devices`` devices over ``processes``
    hosts of ``devices_per_host`` devices each. ``model_configs`` maps config keys (``model``,
    ``reward_model``, ``value_model``) to HF Llama configs. Pure: no device is touched."""
    report = StartupReport()
    report.add("pod topology", "(runtime)", processes * devices_per_host == devices,
               f"{processes} host(s) x {devices_per_host} device(s) for {devices} devices")
    models = run_models(cfg, model_configs)
    try:
        mesh = runtime.parse_mesh_dim(cfg.mesh_dim, devices)
    except runtime.MeshError as e:
        fits = fitting_meshes(cfg, models, devices, device_memory_bytes)
        report.add("mesh uses the pod's devices", "mesh_dim", False,
                   f"{e} Meshes that pass every check here: {fits or 'none'}")
        return report
    report.add("mesh uses the pod's devices", "mesh_dim", True,
               f"{cfg.mesh_dim!r} -> dp={mesh[0]} fsdp={mesh[1]} mp={mesh[2]} on {devices} devices")
    check_mesh_fit(cfg, models, mesh, device_memory_bytes, report)
    if not report.ok:
        fits = fitting_meshes(cfg, models, devices, device_memory_bytes)
        report.add("a mesh that fits", "mesh_dim", False,
                   f"meshes on {devices} devices that pass every check: {fits or 'none'}")
    what, length = _sequence_lengths(cfg)
    for m in models:
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit is not None and length > limit:
            report.add("sequence length", what, True,
                       f"{length} tokens exceed {m.role}'s max_position_embeddings={limit} "
                       "(rotary positions beyond it were never trained)", warning=True)
    for what, rows in uploaded_batches(cfg):
        report.add("per-host feeding", "train_dataset.batch_size", True,
                   f"every host builds the {rows}-row global batch ({what}) from the same "
                   f"seeded order and uploads only the shards of its {devices_per_host} devices")
    return report


def check_before_loading(cfg) -> StartupReport:
    """The trainers' hook (after ``runtime.init``, before any model loads): run
    :func:`check_run` on this pod, log warnings, raise :class:`StartupError` on failures."""
    from torchxla_rlhf import models

    devices, processes, per_host = runtime.topology()
    keys = ["model"] + (["reward_model"] if isinstance(cfg, PPOConfig) else [])
    if isinstance(cfg, PPOConfig) and cfg.value_model is not None:
        keys.append("value_model")
    configs = {k: models.model_config_only(getattr(cfg, k), cfg.tokenizer_pad_token_id)
               for k in keys}
    if isinstance(cfg, GRPOConfig) and cfg.rewards.reward_model is not None:
        configs["reward_model"] = models.model_config_only(cfg.rewards.reward_model,
                                                           cfg.tokenizer_pad_token_id)
    report = check_run(cfg, configs, devices, processes, per_host)
    for c in report.warnings:
        logger.warning("start-up check %s (%s): %s", c.name, c.key, c.detail)
    if not report.ok:
        raise StartupError(
            f"this config cannot run on {devices} device(s) over {processes} host(s):\n"
            + report.failures_text()
        )
    logger.info("start-up checks passed on %d device(s), %d host(s)", devices, processes)
    return report
