"""Configs: the YAML loader and the config trees, torch-free (``--help``, ``--check`` and
``plan`` load no model code).

- :mod:`.loader`: typed trees from YAML files (``base:``), ``key=value`` overrides, errors
  naming file:line and key.
- :mod:`.sections`: the sections every trainer's tree shares (models, optimizer, sampling,
  logging, :class:`~.sections.RunConfig`).
- :mod:`.data`: dataset sources and their sections.
- one module per trainer kind, holding its tree and its memory terms: :mod:`.sft`,
  :mod:`.dpo`, :mod:`.reward`, :mod:`.ppo`, :mod:`.grpo`.
"""
