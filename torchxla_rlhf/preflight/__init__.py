"""Pre-flight: will this config run on this pod? Answered from the config, the models'
``config.json`` and the pod's size, before any device or weight is touched.

- :mod:`~torchxla_rlhf.preflight.mesh`: the one parse of ``mesh_dim`` into a :class:`Mesh`;
  TPU pod types as PJRT sees them (devices, memory per device, hosts).
- :mod:`~torchxla_rlhf.preflight.shapes`: the one reader of a model's shape (local directory,
  hub name, ``gs://``), and the parameter names and shapes a Llama of that shape has.
- :mod:`~torchxla_rlhf.preflight.checks`: weight dims over the mesh axes, batch rows over
  ``dp*fsdp``, heads over ``mp``, per-host feeding; with the memory plan
  (:mod:`torchxla_rlhf.preflight.memory_plan`) the whole pre-flight of a run and of ``plan``.

Nothing here imports torch or torch_xla: ``plan`` and config validation stay fast.
"""
