"""Development tools used by ``tests/`` and ``bench/`` (not part of the installed package):
``memory_probe`` compiles small sharded proxies so that XLA dumps their per-device programs,
``xla_dump`` reads those dumps. Run from the repository root (``python -m tools.memory_probe``)."""
