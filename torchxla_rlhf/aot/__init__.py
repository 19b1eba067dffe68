"""The TPU compiler's verdict on a run, on a machine without a TPU (``plan --compile``).

- :mod:`~torchxla_rlhf.aot.trace` (torch): the trainer's graphs traced at the config's widths
  with placeholder weights, at reduced depth, on at most 64 virtual CPU devices;
- :mod:`~torchxla_rlhf.aot.compile` (jax + libtpu, the ``aot`` extra): each graph compiled by
  XLA:TPU for the target topology (compile-only client), its shardings remapped to the pod's
  mesh;
- :mod:`~torchxla_rlhf.aot.verdict`: the driver (subprocesses, depths, the per-layer slope to
  the full depth) and the report beside the planner's figures.
"""
