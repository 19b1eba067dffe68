"""Static-shape sampling for PPO rollouts: one prefill graph, then every later token inside
ONE on-device XLA ``While`` loop, so that a rollout compiles to two graphs whatever the
continuation length, costs the host the same whatever the number of new tokens, and never
syncs the host unless asked to.

Layout. Prompts come LEFT-padded: ``input_ids [B, PL]``, ``attention_mask [B, PL]``. The
engine fills static buffers of length ``T = PL + CL``::

    sequences      [B, T] = [prompt | continuation], continuation = pad after a row's eos
    attention_mask [B, T] = [prompt mask | 1 up to and including eos, 0 after]

Position ids are ``clip(cumsum(mask) - 1, 0)`` (docs/data.md), so the first real prompt token
is position 0 and the continuation goes on from the prompt's length.

How it runs:

* KV cache: HF :class:`transformers.StaticCache` with ``max_cache_len = T``, written in place at
  its own device-tensor write position (``cumulative_length``), so the decode step is the same
  graph at every position.
* Attention: the engine hands the model an explicit additive 4-D mask ``[B, 1, q, T]``. HF's
  mask builders then return early, which removes their hidden host syncs (the ``sdpa`` builder
  does Python ``.all()`` checks). The model's attention is the one it was built with (by
  default ``models/attention.py``'s einsum form, which keeps heads split over ``mp``).
* Graphs: ``prefill`` (prompt forward + first token), traced under :func:`runtime.compile`
  (``full_graph=True``: a host sync inside raises), and ``decode`` (every later token): the
  one-token decode step runs inside ONE compiled XLA ``While`` (:class:`runtime.DeviceLoop`),
  as the JAX code's ``while_loop`` did. The step is traced once per ``(B, PL, CL)`` for the
  Generator's lifetime (the weights are loop inputs, so PPO's updated policy is not
  re-traced), so the host's cost of a rollout does not grow with the number of new tokens,
  and the KV cache is updated in place inside the loop. Both launches are asynchronous: the
  host never waits for the device, and ``generate()`` returns while the loop still runs.
  Observed on XLA:CPU: 2 compilations on the first call for a given ``(B, PL, CL)`` and
  sampling config, 0 after.
* Why not ``torch_xla``'s ``while_loop``/``fori_loop`` (``torch._higher_order_ops``): in 2.9
  they failed here on a body that closes over a weight (the lowering mis-orders the
  parameters: "condition and body ... must all have the same shape") and on an integer vector
  carry updated by ``argmax`` (``s64[]`` inferred for ``s64[2]``). ``DeviceLoop`` lowers the
  traced body itself and maps each body parameter (carry, weight or constant) to its loop
  slot by identity, which has neither problem. (Replaying a one-step executable per token
  instead would cost ~0.5 ms of host work per token, with no overlap.)
* Weights in the loop (``SamplingConfig.gather_weights``): FSDP-sharded weights are loop
  invariants, and XLA's loop-invariant code motion would hoist every all-gather out of the
  ``While``, so that a device holds the whole model (over ``mp``) for the whole rollout.
  ``per_layer`` (the default) makes each layer's weights (and the embedding's and LM head's)
  depend on that layer's input while the step and the prefill are traced (adding a ``-0.0``
  computed from it): the gathers then depend on the iteration and on the layers before, so
  they stay in the loop body, one layer at a time, at every token. ``hoisted`` leaves the
  compiler free to gather everything once before the loop. ``generation_layout`` copies the
  weights once per rollout (one compiled graph, ``generation_reshard``) into a tensor-parallel
  layout on a second ``(data, tp)`` mesh over the same devices; the prefill and the loop read
  that copy (loop invariants keyed by the layout, so a new copy traces nothing), rows and the
  KV cache are split over ``data`` and heads over ``tp``, and a token moves only activations.
  ``auto`` behaves as ``per_layer`` here (the trainers resolve it with the planner). The
  tokens are the same bit for bit whichever policy (checked on an 8-device proxy).
* Sampling: Gumbel-max over processed logits (temperature, top-k, top-p, the HF order). The
  noise comes from a counter-based hash of ``(seed, step, row, token)``: no global RNG state is
  read or advanced, the same seed gives the same tokens on CPU, on XLA and on any mesh.

The model is used as is (no weight copy): it is switched to ``eval()`` under ``no_grad`` for the
rollout and put back in its previous training mode afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from torchxla_rlhf.configs.sections import SamplingConfig
from torchxla_rlhf.algos.rl import position_ids_from_mask

logger = logging.getLogger(__name__)

_MASK32 = 0xFFFFFFFF
_SUPPORTED_ATTENTION = ("eager", "sdpa", "xla_einsum")  # xla_einsum: attention.NAME


# ----------------------------------------------------------------------------------------
# Configuration and output
# ----------------------------------------------------------------------------------------


@dataclass
class GenerationOutput:
    """A rollout batch. All tensors live on the input's device; ``T = PL + CL``."""

    sequences: torch.Tensor
    """``[B, T]`` long: ``[left-padded prompt | continuation]``; after a row's eos (which is
    kept) the continuation is ``pad``."""

    attention_mask: torch.Tensor
    """``[B, T]`` long: prompt mask, then 1 for each continuation token up to and including
    eos, 0 after."""

    continuation_mask: torch.Tensor
    """``[B, CL]`` long: the continuation part of ``attention_mask``."""

    prompt_length: int
    """``PL``: the continuation starts at column ``PL``."""

    decode_steps: torch.Tensor | None = None
    """Device ``int64`` scalar: decode steps run after the first token (``CL - 1`` unless the
    rollout stopped early). Reading it is a host sync. None on the eager CPU path."""

    @property
    def continuation(self) -> torch.Tensor:
        """``[B, CL]``: the generated tokens (a lazy slice of ``sequences``)."""
        return self.sequences[:, self.prompt_length :]


# ----------------------------------------------------------------------------------------
# Pure functions: positions, masks, noise, sampling
# ----------------------------------------------------------------------------------------


def iota(n: int, device: torch.device | str) -> torch.Tensor:
    """``arange(n)`` (long) built from two ``~sqrt(n)``-long aranges: on XLA,
    ``torch.arange(n)`` is materialized on the host at every trace (about 0.4 us per element,
    14 ms for a 32k vocabulary, paid at every decode step); this costs ~0.3 ms."""
    b = math.isqrt(max(n - 1, 0)) + 1
    a = -(-n // b)
    grid = torch.arange(a, device=device)[:, None] * b + torch.arange(b, device=device)[None, :]
    return grid.reshape(-1)[:n]


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool ``[B, Q, T]`` (True = may attend) -> additive float mask ``[B, 1, Q, T]``: 0 where
    allowed, ``finfo(dtype).min`` elsewhere. A fully masked query row (a pad query) then gets
    uniform attention instead of NaN; its output is never used."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, neg)[:, None]


def prefill_mask(prompt_mask: torch.Tensor, total_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Mask for the prompt forward against a cache of ``total_len`` slots.

    ``prompt_mask [B, PL]`` -> ``[B, 1, PL, T]``: query ``i`` may attend key ``j`` iff
    ``j <= i`` and ``prompt_mask[b, j] == 1`` (slots ``j >= PL`` are empty, so masked).
    """
    _, pl = prompt_mask.shape
    dev = prompt_mask.device
    q = iota(pl, dev)[:, None]
    k = iota(total_len, dev)[None, :]
    causal = k <= q  # [PL, T]
    # `!= 0`, not `.bool()`: after its first use torch_xla tags an unsharded input as
    # {replicated}, and a dtype convert of it carries that tag into the HLO, so passing the
    # same mask tensor again would compile a second prefill graph.
    keys = torch.nn.functional.pad(prompt_mask != 0, (0, total_len - pl))  # [B, T]
    return additive_mask(causal[None] & keys[:, None, :], dtype)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding uint32 values (a bijection
    with full avalanche). Products wrap in int64 and are masked back to 32 bits, which gives
    the same bits on CPU and XLA."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def hash_uniform_at(seed: torch.Tensor, step: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform noise in ``(0, 1)``, float32, one value per entry of ``counter``.

    ``u = (mix(mix(counter xor key) + key) >> 8 + 0.5) / 2^24`` with
    ``key = mix(mix(seed) xor (step * 0x9E3779B9))``: a pure function of
    ``(seed, step, counter)`` (24 random bits), no RNG state. ``seed``/``step`` are int64
    scalars or ``[1]`` (device tensors, so new values do not recompile); ``counter`` holds
    int64 values below ``2^32``.
    """
    key = _mix32(_mix32(seed) ^ ((step * 0x9E3779B9) & _MASK32))
    h = _mix32(_mix32(counter ^ key) + key)
    return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))


def hash_uniform(seed: torch.Tensor, step: torch.Tensor, batch: int, vocab: int) -> torch.Tensor:
    """``u[b, v] = hash_uniform_at(seed, step, b * V + v)``, shape ``[B, V]``. Needs
    ``B * V < 2^32``."""
    dev = seed.device
    return hash_uniform_at(
        seed, step, iota(batch, dev)[:, None] * vocab + iota(vocab, dev)[None, :]
    )


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, batch: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise ``g[b, v] = -log(-log(u[b, v]))``, ``[B, V]`` float32 (see
    :func:`hash_uniform`)."""
    return -torch.log(-torch.log(hash_uniform(seed, step, batch, vocab)))


def _top_p_remove_ascending(z_sorted: torch.Tensor, top_p: float) -> torch.Tensor:
    """HF's top-p rule on logits sorted ascending along the last dim: remove where
    ``cumsum(softmax(z_sorted)) <= 1 - p``, never the last (largest) entry. Bool, same shape."""
    cum = torch.softmax(z_sorted, dim=-1).cumsum(dim=-1)
    n = z_sorted.shape[-1]
    keep_last = iota(n, z_sorted.device) == n - 1
    return (cum <= (1.0 - top_p)) & ~keep_last


def process_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order of HF's logits warpers), ``[B, V]`` float
    -> ``[B, V]`` with removed tokens at ``-inf``. Static shapes only (topk/sort/scatter).

    * temperature: ``z = logits / T``;
    * top-k: remove ``z < topk(z, k)[-1]`` (ties with the k-th value are kept);
    * top-p: sort ascending, ``c = cumsum(softmax(z_sorted))``, remove ``c <= 1 - p`` except
      the largest token.

    This is the reference, full-vocabulary form; :func:`sample_next_token` samples from the
    same distribution working on the top-k candidates only.
    """
    z = logits.float()
    if config.temperature != 1.0:
        z = z / config.temperature
    neg_inf = torch.full((), float("-inf"), dtype=z.dtype, device=z.device)
    if 0 < config.top_k < z.shape[-1]:
        # min() of the top-k values, not values[..., -1:]: with the slice XLA:CPU keeps a full
        # sort of the vocabulary (measured 64 ms vs 7 ms for [8, 32000]).
        kth = torch.topk(z, config.top_k, dim=-1).values.min(dim=-1, keepdim=True).values
        z = torch.where(z < kth, neg_inf, z)
    if config.top_p < 1.0:
        z_sorted, order = torch.sort(z, dim=-1, descending=False)
        remove_sorted = _top_p_remove_ascending(z_sorted, config.top_p)
        remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
        z = torch.where(remove, neg_inf, z)
    return z


def sample_next_token(
    logits: torch.Tensor, config: SamplingConfig, seed: torch.Tensor, step: torch.Tensor
) -> torch.Tensor:
    """Next tokens ``[B]`` long from logits ``[B, V]``.

    Greedy: ``argmax(logits)``. Otherwise Gumbel-max, ``argmax_v(process_logits(logits) + g)``
    with ``g = gumbel_noise(seed, step)``: an exact draw from ``softmax(process_logits(logits))``
    without ``multinomial`` or data-dependent shapes.

    With top-k on, only the k candidates ``topk(logits, k)`` ``[B, k]`` are processed
    (temperature and top-p on k values, noise hashed at the candidates' token ids, so each
    token gets the very noise value the full form would give it): same tokens as the full
    form, except that a tie with the k-th logit keeps exactly k candidates. For a 32k
    vocabulary this drops the per-step noise and masking work from ``B*V`` to ``B*k``.
    """
    if config.greedy:
        return torch.argmax(logits, dim=-1)
    b, v = logits.shape
    if not 0 < config.top_k < v:
        z = process_logits(logits, config)
        return torch.argmax(z + gumbel_noise(seed, step, b, v), dim=-1)
    vals, idx = torch.topk(logits.float(), config.top_k, dim=-1)  # [B, k], descending
    z = vals / config.temperature if config.temperature != 1.0 else vals
    if config.top_p < 1.0:
        remove = _top_p_remove_ascending(z.flip(-1), config.top_p).flip(-1)
        z = torch.where(remove, torch.full((), float("-inf"), device=z.device), z)
    counter = iota(b, logits.device)[:, None] * v + idx
    g = -torch.log(-torch.log(hash_uniform_at(seed, step, counter)))
    pick = torch.argmax(z + g, dim=-1, keepdim=True)  # [B, 1] index into the candidates
    return idx.gather(-1, pick)[:, 0]


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------


@dataclass
class _State:
    """Decode-loop state, every tensor a device tensor of fixed shape."""

    sequences: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, T] long
    continuation_mask: torch.Tensor  # [B, CL] long
    last_token: torch.Tensor  # [B] long, the token written at the previous step
    done: torch.Tensor  # [B] bool, row has emitted eos
    all_done: torch.Tensor  # [] bool
    step: torch.Tensor  # [] long, continuation column the next step writes
    seed: torch.Tensor  # [1] long
    cache: Any = field(repr=False)  # transformers.StaticCache


_STATE_FIELDS = ("sequences", "mask", "continuation_mask", "last_token", "done", "all_done", "step", "seed")
"""The tensor fields of :class:`_State`, in the order the decode loop carries them."""


def _cache_slots(cache: Any) -> list[tuple[Any, str]]:
    """``(layer, attribute)`` of every tensor a ``StaticCache`` updates in place (per layer:
    keys, values and the write position ``cumulative_length``), in a fixed order."""
    return [
        (layer, name)
        for layer in cache.layers
        for name in sorted(vars(layer))
        if isinstance(getattr(layer, name), torch.Tensor)
    ]


class Generator:
    """Samples continuations from a (possibly sharded, possibly training) HF causal LM.

    One instance per policy: it keeps the compiled graph wrappers, so call
    :meth:`generate` on it every PPO step. Prompts of the same ``(B, PL)`` and the same
    ``max_new_tokens`` reuse the compiled graphs.

    Args:
        model: a ``transformers`` causal LM (``LlamaForCausalLM``) whose attention is the
            project's ``xla_einsum`` (the default, ``models/attention.py``), ``eager`` or ``sdpa``,
            on the XLA device or on CPU.
        sampling: the :class:`SamplingConfig`.
        eos_token_id: ends a row (kept in the output, mask 1).
        pad_token_id: written after a row's eos.
        mesh: a :class:`runtime.MeshInfo` when the model is sharded: the buffers' batch dim
            and the KV cache (batch over ``(dp, fsdp)``, kv-heads over ``mp``) are then
            annotated explicitly instead of relying on sharding propagation.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        sampling: SamplingConfig | None = None,
        *,
        eos_token_id: int,
        pad_token_id: int,
        mesh: Any = None,
    ) -> None:
        attn = getattr(model.config, "_attn_implementation", None)
        if attn not in _SUPPORTED_ATTENTION:
            raise ValueError(
                f"Generator: model.config._attn_implementation={attn!r}; expected one of "
                f"{_SUPPORTED_ATTENTION} (load the model with attn_implementation='eager'): the "
                "engine passes an explicit 4-D additive attention mask"
            )
        self.model = model
        self.sampling = sampling if sampling is not None else SamplingConfig()
        self.eos_token_id = int(eos_token_id)
        self.pad_token_id = int(pad_token_id)
        self.mesh = mesh
        self._compiled: dict[str, Any] = {}
        self._loop: Any = None  # runtime.DeviceLoop of the decode step, made on first use
        self._loop_cache: Any = None  # the rollout's StaticCache while the loop is called
        self._layout_mesh: Any = None  # runtime.LayoutMesh of the generation layout
        self._layout_slots: list[tuple[torch.nn.Module, str, tuple, bool]] | None = None
        self._reshard: Any = None  # the compiled reshard graph
        self._batch_mesh: Any = mesh  # the mesh the rollout's rows and cache are laid out on

    # -- public ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        seed: int = 0,
    ) -> GenerationOutput:
        """Sample up to ``max_new_tokens`` (= CL) tokens after each LEFT-padded prompt.

        Args:
            input_ids: ``[B, PL]`` long, left-padded.
            attention_mask: ``[B, PL]``, 1 for real tokens (left padding is not checked: that
                would need a host sync; right-padded prompts give wrong first tokens).
            max_new_tokens: CL, the static continuation length.
            seed: selects the noise; the same seed, prompts and weights give the same tokens.

        Returns: :class:`GenerationOutput` with ``sequences``/``attention_mask`` ``[B, PL+CL]``
        and ``continuation_mask [B, CL]``.
        """
        self._check_inputs(input_ids, attention_mask, max_new_tokens)
        was_training = self.model.training
        on_xla = input_ids.device.type == "xla"
        self.model.eval()
        # The generation layout's copy of the weights: made here (one compiled graph, launched
        # asynchronously), read by the prefill and the decode loop, and dropped when this call
        # returns (its buffers are freed once the loop that reads them has run).
        copy = self._layout_copy() if on_xla and self._layout_on() else None
        self._batch_mesh = self._layout_mesh if copy is not None else self.mesh
        try:
            with self._weights_in_layout(copy), self._weights_gathered_per_layer(on_xla):
                state = self._run(
                    "prefill", self._prefill, input_ids, attention_mask, max_new_tokens, seed
                )
            if on_xla:
                # Every later token in ONE compiled device loop; nothing here waits for it.
                decode_steps = self._decode_loop(state, max_new_tokens - 1, copy)
            else:
                decode_steps = None
                every = self.sampling.stop_check_every
                for t in range(1, max_new_tokens):
                    if every and t % every == 0 and bool(state.all_done.item()):  # host sync
                        break
                    state = self._decode_step(state)
        finally:
            self.model.train(was_training)
            del copy
        return GenerationOutput(
            sequences=state.sequences,
            attention_mask=state.mask,
            continuation_mask=state.continuation_mask,
            prompt_length=input_ids.shape[1],
            decode_steps=decode_steps,
        )

    # -- graphs ----------------------------------------------------------------------------

    def _run(self, name: str, fn: Any, *args: Any) -> _State:
        """Eager on CPU. On XLA, trace ``fn`` under :func:`runtime.compile`
        (``full_graph=True``: a host sync inside raises) and launch it as one graph."""
        device = args[0].device
        if device.type != "xla":
            return fn(*args)
        from . import runtime

        if name not in self._compiled:
            self._compiled[name] = runtime.compile(fn, name=f"generation_{name}", full_graph=True)
        return self._compiled[name](*args)

    def _decode_loop(self, state: _State, steps: int, copy: list | None = None) -> torch.Tensor:
        """Run ``steps`` decode steps on ``state`` (updated in place) inside one device loop
        (:class:`runtime.DeviceLoop`, an XLA ``While``): the host traces the decode step once
        per ``(B, PL, CL)`` for the Generator's lifetime, not once per token, and the cost of a
        rollout to the host does not grow with the number of new tokens. The model's weights
        and buffers enter the loop as inputs at every call, so PPO's updated policy needs no
        re-trace. With ``stop_check_every > 0`` the loop also ends as soon as every row has
        emitted eos (checked on the device at every step, with no host sync; the output is the
        same, since the remaining steps would only write pad)."""
        from . import runtime

        slots = _cache_slots(state.cache)
        if self._loop is None:
            stop = _STATE_FIELDS.index("all_done") if self.sampling.stop_check_every else None
            self._loop = runtime.DeviceLoop(
                self._decode_flat, name="generation_decode_loop", stop_slot=stop
            )
        self._loop_cache = state.cache  # what _decode_flat swaps the carried tensors into
        carry = [getattr(state, f) for f in _STATE_FIELDS] + [getattr(o, a) for o, a in slots]
        try:
            if copy is None:
                return self._loop(carry, steps,
                                  invariants=[*self.model.parameters(), *self.model.buffers()])
            # The generation layout: the loop reads this rollout's copy (new tensors at every
            # rollout, same shapes and shardings: the loop is cached by the key, not by them).
            with self._weights_in_layout(copy):
                return self._loop(carry, steps, invariants=[*copy, *self.model.buffers()],
                                  invariants_key=("generation_layout", self._layout_mesh.tp))
        finally:
            self._loop_cache = None

    def _decode_flat(self, flat: list) -> list:
        """One decode step on the flat carry ``[state fields..., cache tensors...]`` (the
        traced body of the device loop). The cache object's tensors are swapped for the
        carried ones while the step is traced, then put back."""
        n = len(_STATE_FIELDS)
        cache = self._loop_cache
        slots = _cache_slots(cache)
        originals = [getattr(o, a) for o, a in slots]
        for (o, a), t in zip(slots, flat[n:]):
            setattr(o, a, t)
        try:
            with self._weights_gathered_per_layer():
                new = self._decode_step(_State(**dict(zip(_STATE_FIELDS, flat[:n])), cache=cache))
            return [getattr(new, f) for f in _STATE_FIELDS] + [getattr(o, a) for o, a in slots]
        finally:
            for (o, a), t in zip(slots, originals):
                setattr(o, a, t)

    # -- the generation layout --------------------------------------------------------------

    def _layout_on(self) -> bool:
        """``gather_weights: generation_layout`` on a mesh (on one device there is nothing to
        lay out: the policy's own weights are read, as with ``hoisted``)."""
        return self.sampling.gather_weights == "generation_layout" and self.mesh is not None

    def _layout_copy(self) -> list[torch.Tensor]:
        """This rollout's copy of the policy's weights in the generation layout (one per
        ``(module, parameter)`` slot, tied weights included: the embedding and the LM head
        get their own copies, in their own specs and dtypes). One compiled graph, the same
        at every rollout; launched, not waited for."""
        from . import runtime
        from torchxla_rlhf.models.sharding import GENERATION_COMPUTE_DTYPE, GENERATION_RULES, match_specs

        if self._layout_slots is None:
            tp = self.sampling.generation_tp or self.mesh.mp * self.mesh.fsdp
            self._layout_mesh = runtime.generation_mesh(self.mesh, tp)
            named = [(f"{mn}.{pn}" if mn else pn, m, pn, p)
                     for mn, m in self.model.named_modules()
                     for pn, p in m._parameters.items() if p is not None]
            specs = match_specs(((n, tuple(p.shape)) for n, _, _, p in named),
                                GENERATION_RULES, axis_sizes=self._layout_mesh.sizes,
                                large_weight_numel=1 << 62)
            self._layout_slots = [(m, pn, specs[n], bool(GENERATION_COMPUTE_DTYPE.search(n)))
                                  for n, m, pn, _ in named]
            self._reshard = runtime.compile(self._reshard_fn, name="generation_reshard",
                                            full_graph=True)
        # The matmul weights in the dtype the rollout's matmuls use: autocast's, if on.
        cast = torch.get_autocast_dtype("xla") if torch.is_autocast_enabled("xla") else None
        sources = [m._parameters[pn].detach() for m, pn, _, _ in self._layout_slots]
        return self._reshard(sources, cast)

    def _reshard_fn(self, sources: list[torch.Tensor], cast: torch.dtype | None) -> list:
        """The reshard graph: every weight, cast (matmul weights, under autocast) and
        annotated with its generation-layout spec, so the graph's outputs are laid out so."""
        from . import runtime

        out = []
        for (_, _, spec, matmul), w in zip(self._layout_slots, sources):
            # `* 1.0` makes a new value to annotate even when no cast is needed (annotating
            # the input itself would re-shard the training weights in place).
            c = w.to(cast) if matmul and cast is not None and cast != w.dtype else w * 1.0
            out.append(runtime.mark_sharding(c, self._layout_mesh, spec))
        return out

    @contextlib.contextmanager
    def _weights_in_layout(self, copy: list[torch.Tensor] | None):
        """While the prefill or the decode step is traced: the model's parameter slots hold
        the rollout's copy (not Parameters: a forward under no_grad only reads them); the
        policy's own parameters are put back afterwards, untouched."""
        if copy is None:
            yield
            return
        from . import runtime

        mesh = self._layout_mesh

        def replicated_over_tp(block: torch.nn.Module, args: tuple, output: Any) -> None:
            # The residual stream: rows over data, whole over tp. Left to propagation it
            # follows the embedding's hidden split over tp, and every column-parallel matmul
            # all-gathers it again (5 all-gathers of [rows, hidden] per layer, seen here).
            h = output if isinstance(output, torch.Tensor) else output[0]
            rows = "data" if h.shape[0] % mesh.data == 0 else None
            runtime.mark_sharding(h, mesh, (rows,) + (None,) * (h.ndim - 1))

        saved = [(m, pn, m._parameters[pn]) for m, pn, _, _ in self._layout_slots]
        handles = []
        try:
            for (m, pn, _, _), c in zip(self._layout_slots, copy):
                m._parameters[pn] = c
            for block in self._weight_blocks()[:-1]:  # the embedding and every layer
                handles.append(block.register_forward_hook(replicated_over_tp))
            yield
        finally:
            for h in handles:
                h.remove()
            for m, pn, p in saved:
                m._parameters[pn] = p

    def _weight_blocks(self) -> list[torch.nn.Module]:
        """The modules whose weights ``per_layer`` gathers one at a time: the input
        embedding, every decoder layer, the LM head."""
        layers = getattr(getattr(self.model, "model", None), "layers", None)
        if layers is None:
            raise ValueError(
                f"Generator: {type(self.model).__name__} has no .model.layers; "
                "sampling.gather_weights=per_layer needs a decoder-layer stack (a Llama)"
            )
        blocks = [self.model.get_input_embeddings(), *layers, self.model.get_output_embeddings()]
        return [b for b in blocks if b is not None]

    @contextlib.contextmanager
    def _weights_gathered_per_layer(self, on: bool = True):
        """While the prefill or the decode step is traced (``gather_weights=per_layer``; the
        prefill too: XLA:CPU otherwise gathers every layer at the top of that graph, so its
        per-device peak held the whole model over ``mp``): each weight block runs on
        ``weight + z`` with ``z = -(|s| * 0) = -0.0`` computed from ``s``, the largest
        entry of the block's first input (token ids or hidden states; ``s`` is
        taken as 0 where it is not finite). ``w + (-0.0) == w`` bit for bit, and XLA does not
        fold ``x * 0`` for floats (NaN), so each weight, and its FSDP all-gather, depends on
        the iteration and on the layers before: the gathers can be neither hoisted out of
        the ``While`` nor scheduled ahead of their layer. (An optimization barrier would not
        do: XLA:CPU removes barriers before it schedules, and then gathers every layer at the
        top of the body.) Costs per layer and token: one scalar max over the devices and one
        elementwise add over the weight shards. The model's own parameters are put back
        afterwards, untouched."""
        if not on or self.sampling.gather_weights not in ("per_layer", "auto"):
            yield
            return
        swapped: dict[torch.nn.Module, list[tuple[torch.nn.Module, str, Any]]] = {}

        def before(block: torch.nn.Module, args: tuple) -> None:
            s = args[0].detach().max().float()
            zero = -(torch.where(torch.isfinite(s), s, torch.zeros_like(s)).abs() * 0.0)
            slots = [(m, name, p) for m in block.modules()
                     for name, p in m._parameters.items() if p is not None]
            for m, name, p in slots:
                m._parameters[name] = p + zero.to(p.dtype)
            swapped[block] = slots

        def after(block: torch.nn.Module, args: tuple, output: Any) -> None:
            for m, name, p in swapped.pop(block, []):
                m._parameters[name] = p

        handles = []
        try:
            for block in self._weight_blocks():
                handles.append(block.register_forward_pre_hook(before))
                handles.append(block.register_forward_hook(after, always_call=True))
            yield
        finally:
            for h in handles:
                h.remove()
            for block in list(swapped):
                after(block, (), None)

    def _forward_last_logits(
        self, ids: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """Model forward writing ``ids [B, q]`` into the cache; logits of the last query
        position ``[B, V]`` float32."""
        out = self.model(
            input_ids=ids,
            attention_mask=bias,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, seed: int
    ) -> _State:
        """Prompt forward into a fresh cache, then the first continuation token (column PL)."""
        from torchxla_rlhf.models.attention import static_cache

        b, pl = input_ids.shape
        total = pl + max_new_tokens
        dev = input_ids.device
        prompt_mask = attention_mask.long()
        cache = static_cache(self.model.config, total)  # compute-dtype KV cache
        bias = prefill_mask(prompt_mask, total, self._mask_dtype())
        logits = self._forward_last_logits(
            input_ids.long(), bias, position_ids_from_mask(prompt_mask), cache
        )
        self._shard_cache(cache, b)

        pad = torch.full((b, max_new_tokens), self.pad_token_id, dtype=torch.long, device=dev)
        state = _State(
            sequences=torch.cat([input_ids.long(), pad], dim=1),
            mask=torch.cat([prompt_mask, torch.zeros_like(pad)], dim=1),
            continuation_mask=torch.zeros_like(pad),
            last_token=torch.zeros(b, dtype=torch.long, device=dev),
            done=torch.zeros(b, dtype=torch.bool, device=dev),
            all_done=torch.zeros((), dtype=torch.bool, device=dev),
            step=torch.zeros((), dtype=torch.long, device=dev),
            # Shape [1], not []: torch_xla turns a 0-dim 0 or 1 (even one copied from the host)
            # into a graph constant, so seeds 0 and 1 would each compile their own prefill.
            seed=torch.tensor([int(seed) & _MASK32], dtype=torch.long).to(dev),
            cache=cache,
        )
        for name in ("sequences", "mask", "continuation_mask"):
            self._shard_batch(getattr(state, name))
        return self._append(state, logits, pl)

    def _decode_step(self, state: _State) -> _State:
        """Feed the previous token (its cache slot is the StaticCache's write position),
        sample the next one. Same graph at every step: the column is ``state.step``."""
        pl = state.sequences.shape[1] - state.continuation_mask.shape[1]
        # The previous token's mask column is already written and later columns are 0, so the
        # spec's clip(cumsum(mask) - 1, 0) at that column is the row sum minus one.
        pos = (state.mask.sum(dim=-1, keepdim=True) - 1).clamp(min=0)  # [B, 1]
        bias = additive_mask(state.mask.bool()[:, None, :], self._mask_dtype())  # [B, 1, 1, T]
        logits = self._forward_last_logits(state.last_token[:, None], bias, pos, state.cache)
        return self._append(state, logits, pl)

    def _append(self, state: _State, logits: torch.Tensor, pl: int) -> _State:
        """Sample from ``logits [B, V]`` and write the token at continuation column
        ``state.step``; rows already done write ``pad`` with mask 0."""
        tok = sample_next_token(logits, self.sampling, state.seed, state.step)
        tok = torch.where(state.done, self.pad_token_id, tok)
        live = (~state.done).long()[:, None]  # [B, 1]: 1 for a real token (eos included)
        cl = state.continuation_mask.shape[1]
        dev = tok.device
        at_cont = (iota(cl, dev) == state.step)[None, :]  # [1, CL]
        at_full = (iota(pl + cl, dev) == state.step + pl)[None, :]  # [1, T]
        done = state.done | (tok == self.eos_token_id)
        return _State(
            sequences=torch.where(at_full, tok[:, None], state.sequences),
            mask=torch.where(at_full, live, state.mask),
            continuation_mask=torch.where(at_cont, live, state.continuation_mask),
            last_token=tok,
            done=done,
            all_done=done.all(),
            step=state.step + 1,
            seed=state.seed,
            cache=state.cache,
        )

    # -- helpers ---------------------------------------------------------------------------

    def _mask_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _batch_layout(self) -> tuple[Any, Any, str, int, int]:
        """``(mesh, batch axes, heads axis, batch ways, heads ways)`` of the rollout's rows
        and KV cache: ``(dp, fsdp)`` and ``mp`` on the training mesh, ``data`` and ``tp`` in
        the generation layout."""
        from . import runtime

        m = self._batch_mesh
        if isinstance(m, runtime.LayoutMesh):
            return m, "data", "tp", m.data, m.tp
        return m, runtime.BATCH_AXES, "mp", m.batch, m.mp

    def _shard_batch(self, t: torch.Tensor) -> None:
        if self._batch_mesh is None:
            return
        mesh, axes, _, ways, _ = self._batch_layout()
        if t.shape[0] % ways:
            return
        from . import runtime

        runtime.mark_sharding(t, mesh, (axes,) + (None,) * (t.ndim - 1))

    def _shard_cache(self, cache: Any, batch: int) -> None:
        """KV cache ``[B, kv_heads, T, head_dim]``: batch over (dp, fsdp), kv-heads over mp;
        in the generation layout batch over data, kv-heads over tp (replicated over tp where
        tp does not divide them)."""
        if self._batch_mesh is None:
            return
        from . import runtime

        mesh, axes, heads_axis, ways, heads_ways = self._batch_layout()
        batch_axes = axes if batch % ways == 0 else None
        for layer in cache.layers:
            for t in (layer.keys, layer.values):
                heads = heads_axis if t.shape[1] % heads_ways == 0 else None
                runtime.mark_sharding(t, mesh, (batch_axes, heads, None, None))

    def _check_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int
    ) -> None:
        if input_ids.ndim != 2:
            raise ValueError(
                f"Generator.generate: input_ids must be [B, PL], got shape {tuple(input_ids.shape)}"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"Generator.generate: attention_mask shape {tuple(attention_mask.shape)} != "
                f"input_ids shape {tuple(input_ids.shape)}"
            )
        if input_ids.device != attention_mask.device:
            raise ValueError(
                f"Generator.generate: input_ids on {input_ids.device}, attention_mask on "
                f"{attention_mask.device}; expected the same device"
            )
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(
                f"Generator.generate: max_new_tokens={max_new_tokens!r}, expected an int >= 1"
            )
        total = input_ids.shape[1] + max_new_tokens
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and total > limit:
            raise ValueError(
                f"Generator.generate: prompt length {input_ids.shape[1]} + max_new_tokens "
                f"{max_new_tokens} = {total} exceeds model.config.max_position_embeddings={limit}"
            )
        vocab = getattr(self.model.config, "vocab_size", 0)
        if input_ids.shape[0] * vocab >= 2**32:
            raise ValueError(
                f"Generator.generate: batch {input_ids.shape[0]} x vocab {vocab} >= 2^32 "
                "overflows the noise counter; split the batch"
            )

