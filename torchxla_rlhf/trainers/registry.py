"""The trainers, as they declare themselves: what the pre-flight, ``plan`` and the pipeline
know of a trainer comes from here, never from ``isinstance`` chains.

A trainer is two things:

- its config module (``configs/KIND.py``), torch-free: the config class, which names the trainer in its
  ``trainer`` key (``trainer: sft`` in a YAML file; the class's default), says what the run
  puts on the mesh (:meth:`model_roles`, :meth:`batches`: plain data of
  :mod:`torchxla_rlhf.roles`) and hands the memory plan its terms (:meth:`memory_terms`);
- its trainer class (a module in ``trainers/``), imported only when a run starts.

Adding a trainer is its config module, one module in ``trainers/``, and one
:func:`register` line below (``trainers/sft.py`` and ``configs/sft.py`` are the example). Importing this module imports neither torch nor torch_xla.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any, Sequence

from torchxla_rlhf.configs.loader import ConfigError, declared_value
from torchxla_rlhf.configs.dpo import DPOConfig
from torchxla_rlhf.configs.grpo import GRPOConfig
from torchxla_rlhf.configs.ppo import PPOConfig
from torchxla_rlhf.configs.reward import RewardConfig
from torchxla_rlhf.configs.sft import SFTConfig


@dataclass(frozen=True)
class TrainerSpec:
    config: type
    """The config class; its ``trainer`` default is the kind."""
    trainer: str
    """``module:Class`` of the trainer (imported only to run it)."""
    summary: str

    @property
    def kind(self) -> str:
        return declared_kind(self.config)

    def trainer_class(self) -> type:
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)


TRAINERS: dict[str, TrainerSpec] = {}
"""Kind -> spec, in registration order (the order ``--help`` lists them)."""


def declared_kind(config_cls: type) -> str:
    """The kind a config class declares: its ``trainer`` field's default."""
    return {f.name: f.default for f in dataclasses.fields(config_cls)}["trainer"]


def register(spec: TrainerSpec) -> TrainerSpec:
    if not spec.kind:
        raise ValueError(f"{spec.config.__name__} declares no trainer (its 'trainer' default)")
    if spec.kind in TRAINERS:
        raise ValueError(f"trainer {spec.kind!r} is registered twice")
    TRAINERS[spec.kind] = spec
    return spec


register(TrainerSpec(SFTConfig, "torchxla_rlhf.trainers.sft:SFTTrainer",
                     "supervised fine-tuning on chat conversations, packed (loss on assistant turns)"))
register(TrainerSpec(DPOConfig, "torchxla_rlhf.trainers.dpo:DPOTrainer",
                     "DPO / IPO / cDPO / length-normalized DPO / SimPO on preference pairs"))
register(TrainerSpec(RewardConfig, "torchxla_rlhf.trainers.reward:RewardTrainer",
                     "a reward model (LlamaForSequenceClassification) on preference pairs"))
register(TrainerSpec(PPOConfig, "torchxla_rlhf.trainers.ppo:PPOTrainer",
                     "PPO with policy, reference, reward and value models"))
register(TrainerSpec(GRPOConfig, "torchxla_rlhf.trainers.grpo:GRPOTrainer",
                     "GRPO / RLOO with verifiable rewards (no value model)"))


# ----------------------------------------------------------------------------------------
# Lookups
# ----------------------------------------------------------------------------------------


def get(kind: str, where: str = "trainer") -> TrainerSpec:
    """The spec of ``kind``; a :class:`ConfigError` naming the known kinds otherwise."""
    if kind not in TRAINERS:
        raise ConfigError(f"trainer: unknown trainer {kind!r}; known: {', '.join(TRAINERS)}",
                          key="trainer", where=where)
    return TRAINERS[kind]


def spec_for(cfg: Any) -> TrainerSpec:
    """The spec of a loaded config (by the kind its class declares)."""
    return get(declared_kind(type(cfg)))


def kind_of_file(path: str, overrides: Sequence[str] = ()) -> str:
    """The trainer a YAML config declares (top-level ``trainer:``, through its ``base:``
    chain; a ``trainer=KIND`` override wins). Never guessed from the other keys."""
    kind = next((o.partition("=")[2].strip() for o in reversed(overrides)
                 if o.partition("=")[0].strip().removeprefix("--") == "trainer"), None)
    if kind is None:
        kind, where = declared_value(path, "trainer")
        if kind is None:
            raise ConfigError(
                f"declares no trainer: add a top-level 'trainer: KIND' (KIND one of "
                f"{', '.join(TRAINERS)}) or pass trainer=KIND", key="trainer", where=where)
    else:
        where = f"override 'trainer={kind}'"
    get(str(kind), where)
    return str(kind)


def load(path: str, overrides: Sequence[str] = ()) -> Any:
    """Load a config file as the config class of the trainer it declares."""
    from torchxla_rlhf.configs.loader import load_config

    return load_config(get(kind_of_file(path, overrides)).config, path, overrides)
