"""The model side: transformers' own Llama classes, built and loaded sharded on the mesh.

- :mod:`~torchxla_rlhf.models.llama`: load a causal LM or a sequence classifier (local,
  hub, ``gs://``; ``.safetensors`` or ``.bin``), freeze a model, the forward passes the
  trainers call.
- :mod:`~torchxla_rlhf.models.sharding`: the partition rules for Llama parameter names, as
  data, and the one function that applies them.
- :mod:`~torchxla_rlhf.models.attention`: attention that keeps heads split over ``mp``.

The rollout engine that runs these models token by token is :mod:`torchxla_rlhf.generation`.
"""
