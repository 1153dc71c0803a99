"""Serving a transformers decoder through its own modules, with lorakit's row cache for attention.

:class:`ModelDecoder` has :class:`lorakit.serving.decoder.Decoder`'s interface (``cache``, ``forward``,
``max_positions``) but writes no model's forward again: it calls the model's own base model
(``model.base_model``: embedding and its scale, rotary embeddings — per layer type for Gemma 3 —,
norms, fused projections, MLPs and mixture-of-experts blocks, final norm) and then its LM head on
each row's last position, soft-capped when ``config.final_logit_softcapping`` says so (Gemma 2/3).

Only attention is lorakit's: :func:`row_attention`, registered with transformers' attention
interface under ``ATTENTION`` and made the model's attention implementation for the length of
one forward. transformers makes no mask for an implementation its mask interface does not know,
and each attention module hands the function its ``layer_idx``, ``scaling``, ``sliding_window``
and ``softcap``. For query ``t`` of row ``b`` at position ``p = p[b, t]``, over the row's cache
``K, V: (kv_heads, end, d)`` after writing the new keys and values at their positions::

    s_j = scaling q . K_j,   s_j <- c tanh(s_j / c)   (soft-capping, when the layer gives c)
    out = softmax_j(s_j over j <= p and, with a window w, j > p - w) V

(``j > p - w`` is transformers' ``sliding_window_overlay``.) Grouped-query heads are shared by
SDPA's ``enable_gqa``. Masks are made once per forward and window, none where every query sees
the whole cache (one stream decoding).

Compiled (``compile=True``, or ``LORAKIT_COMPILE=1`` in the environment when the argument is left out): a single
stream's decode step (one row, one new token) runs the model's forward under ``torch.compile`` (inductor), fusing
the norms, rotary embeddings and activations around the matrix products into a few generated kernels and dropping
the Python of ~400 module calls per token; the quantized products stay one C++ operator each (its fake
implementation gives inductor their shapes). Its guards check each module's dict tags first (dynamo's
``use_recursive_dict_tags_for_guards``): a module whose attributes did not change skips the checks of its ~20
tensors (SmolLM2 int4: 13.6 -> 12.0 ms per token in process, 2 threads, Zen 4). Two graphs per model (the cache's
length becomes dynamic at the second step), compiled at the first step (about a minute on one core of a Zen 4 EPYC,
less from inductor's cache), whatever adapter the stream uses: the compiled step reads its adapter as data
(:class:`_OneRow`: a slot tensor into stacks of every adapter, prepared eagerly before the step), where reading it
by name gave two graphs per adapter and, from the fifth adapter on, dynamo's recompile limit sent every step back
to eager. Prefills and batches of rows stay eager: their per-row adapters (``LoraLinear.add_rows``' cached stacks)
break the graph at every layer, and 30 layers' resumed frames exceed dynamo's recompile limit, so compiled batches
ran 1.2-1.7x slower. Off by default for that minute.

Served (``config.model_type``): see ``SERVED``; every other architecture is refused by name, as
are bidirectional attention and a layer whose attention passes anything this function does not
implement (ALiBi, attention sinks, a mask of its own).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import LoraLinear, RowPlan
from .decoder import Positions, RowCache, at_positions

__all__ = ["ATTENTION", "SERVED", "ModelDecoder", "compile_wanted", "row_attention"]

ATTENTION = "lorakit_rows"
# Families whose greedy tokens are tested equal to transformers + PEFT (tests/test_model_decoder.py)
SERVED = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral", "gemma", "gemma2", "gemma3_text", "phi3",
          "gpt2")
_PASSED_THROUGH = {"position_ids", "use_cache", "dropout"}  # what a model's forward hands its attention, unused here
_BATCH_DEPENDENT_ROPE = ("longrope", "dynamic")  # frequencies follow the batch's longest position past this length


class _Step:
    """One forward's rows, positions and masks, handed to every layer's attention."""

    def __init__(self, cache: RowCache, rows: slice, positions: Tensor) -> None:
        self.cache, self.rows, self.positions = cache, rows, positions  # positions: (B, T)
        self.end = int(positions.max()) + 1
        B, T = positions.shape
        # One new token per row, all at the last position: each query sees the whole cache up to end (one stream)
        self.sees_all = T == 1 and int(positions.min()) == self.end - 1
        self.where = (torch.arange(B, device=positions.device)[:, None].expand(B, T), positions)
        self.masks: dict[int | None, Tensor | None] = {}
        self.layers: set[int] = set()

    def mask(self, window: int | None, dtype: torch.dtype) -> Tensor | None:
        """``(B, 1, T, end)``, added to the scores: 0 where query ``t`` of row ``b`` sees cache
        position ``j``, ``-inf`` elsewhere; None where every query sees every position. Made once
        per forward (SDPA would turn a boolean mask into this one in every layer)."""
        if window not in self.masks:
            if self.sees_all and (window is None or self.end <= window):
                self.masks[window] = None
            else:
                j, p = torch.arange(self.end, device=self.positions.device), self.positions[:, :, None]
                seen = j <= p if window is None else (j <= p) & (j > p - window)
                mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))
                self.masks[window] = mask[:, None]
        return self.masks[window]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scaling: float, window: int | None,
               softcap: float | None) -> Tensor:
        """Write ``k, v`` ``(B, kv_heads, T, d)`` into layer ``layer``'s rows; ``(B, T, heads, d)``."""
        kc, vc = self.cache.k[layer][self.rows], self.cache.v[layer][self.rows]
        if (k.shape[1], k.shape[3]) != (kc.shape[1], kc.shape[3]):
            raise ValueError(f"layer {layer} has {k.shape[1]} key heads of {k.shape[3]}, the cache "
                             f"{kc.shape[1]} of {kc.shape[3]}: layers of different shapes are not served")
        self.layers.add(layer)
        if self.sees_all:  # every row writes position end - 1: a slice, no index tensors
            kc[:, :, self.end - 1 : self.end].copy_(k)
            vc[:, :, self.end - 1 : self.end].copy_(v)
        else:
            b, p = self.where
            kc[b, :, p] = k.transpose(1, 2)
            vc[b, :, p] = v.transpose(1, 2)
        kc, vc, mask = kc[:, :, : self.end], vc[:, :, : self.end], self.mask(window, q.dtype)
        gqa = q.shape[1] != kc.shape[1]
        if softcap is None:
            out = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        else:  # (SDPA has no soft-capping; this is transformers' eager attention)
            if gqa:
                kc, vc = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (kc, vc))
            scores = torch.tanh(q @ kc.transpose(2, 3) * scaling / softcap) * softcap  # (B, heads, T, end)
            if mask is not None:
                scores = scores + mask
            out = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ vc
        return out.transpose(1, 2)


def row_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                  lorakit_step: _Step | None = None, **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature (``query: (B, heads, T, d)``, ``key, value:
    (B, kv_heads, T, d)``; returns ``(B, T, heads, d)`` and no weights), over the rows of
    ``lorakit_step``'s cache."""
    if lorakit_step is None:
        raise RuntimeError(f"the {ATTENTION!r} attention runs only within ModelDecoder.forward")
    if attention_mask is not None or not kwargs.keys() <= _PASSED_THROUGH or not getattr(module, "is_causal", True):
        _refuse(module, attention_mask, kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return lorakit_step.attend(module.layer_idx, query, key, value, scaling, sliding_window, softcap), None


def _refuse(module: nn.Module, attention_mask: Tensor | None, kwargs: dict) -> None:
    """Raise for what :func:`row_attention` does not implement (arguments passed as None are not used)."""
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _PASSED_THROUGH)
    if attention_mask is not None or unknown or not getattr(module, "is_causal", True):
        what = "a mask of its own" if attention_mask is not None else unknown or "bidirectional attention"
        raise ValueError(f"{type(module).__name__} gives its attention {what}, which lorakit serve does not implement")


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, row_attention)


def compile_wanted() -> bool:
    """``LORAKIT_COMPILE``: ``1`` compiles ModelDecoder's forward, ``0`` or unset does not."""
    value = os.environ.get("LORAKIT_COMPILE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"LORAKIT_COMPILE must be 0 or 1, got {value!r}")
    return value == "1"


def _max_positions(config) -> int:
    """The longest sequence served: the model's, and no further than the length past which
    rotary frequencies change with the batch's longest position (``longrope``, ``dynamic``)."""
    limit = getattr(config, "max_position_embeddings", None) or config.n_positions
    rope = getattr(config, "rope_parameters", None) or {}
    groups = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in groups:
        if params.get("rope_type") in _BATCH_DEPENDENT_ROPE:
            limit = min(limit, params.get("original_max_position_embeddings") or limit)
    return limit


def _dynamic_sizes(cache: RowCache) -> None:
    """A row cache's rows and capacity follow the load: symbolic in the compiled graph from the start, rather than
    a recompilation (about a minute) at each new size of a serving process's cache."""
    if getattr(cache, "_marked", None) is not cache.k[0]:  # (new tensors after each resize)
        for t in (*cache.k, *cache.v):
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        cache._marked = cache.k[0]


class _OneRow(RowPlan):
    """A compiled single stream's adapter as data: ``slot``, a ``(1,)`` tensor set before each step, indexes
    ``names`` (every adapter of the model, then the base model); each LoRA layer maps it to its place among its
    own adapters (``tables``) and multiplies by its stacks of every adapter, prepared before the step (:meth:`prepare`).
    The compiled graph then holds no adapter name."""

    prepared = True

    def __init__(self, layers: tuple[LoraLinear, ...]) -> None:
        self.layers = layers  # (lorakit.model._adapter_modules' tuple: a new one when layers are added or replaced)
        self.key = tuple(tuple(layer.adapters) for layer in layers)
        self.names = list(dict.fromkeys(n for adapters in self.key for n in adapters))
        self.slot = torch.zeros(1, dtype=torch.long, device=layers[0].weight.device)
        self.tables: dict[tuple[str, ...], Tensor] = {}
        for adapters in self.key:
            where = {n: i for i, n in enumerate(adapters)}
            self.tables[adapters] = torch.tensor([where.get(n, len(adapters)) for n in self.names] + [len(adapters)],
                                                 device=self.slot.device)

    @staticmethod
    def serves(layers: tuple[nn.Module, ...]) -> bool:
        """Whether every layer can take its adapter as data: LoRA linear layers, one rank per layer, no DoRA."""
        return all(isinstance(m, LoraLinear) and not m.lora_magnitude_vector
                   and len({m.lora_A[n].shape[0] for n in m.adapters}) <= 1 for m in layers)

    def prepare(self, adapter: str | None, dtype: torch.dtype | None, check_factors: bool = True) -> None:
        """Point ``slot`` at ``adapter`` and bring each layer's stacks up to date (eager: cached until a factor
        changes; ``check_factors``: see :func:`lorakit.adapter_per_row`)."""
        self.slot.fill_(len(self.names) if adapter is None else self.names.index(adapter))
        used = (adapter,) if adapter is not None and check_factors else ()
        for layer in self.layers:
            layer._stacks(layer.adapters, dtype, used)

    def for_layer(self, present, x: Tensor, every: bool = False) -> tuple[tuple[str, ...], Tensor]:
        names = tuple(present)
        return names, self.tables[names][self.slot]


@contextmanager
def _rows(model: nn.Module, plan: RowPlan | None) -> Iterator[None]:
    """``plan`` as every adapter module's row plan for the block (nothing when None)."""
    if plan is None:
        yield
        return
    from ..model import _set_on_adapter_modules

    with _set_on_adapter_modules(model, "rows", plan):
        yield


class ModelDecoder:
    """``forward(ids, cache, rows, start, last)``: the next-token logits ``(B, vocab)`` of
    ``rows`` of the cache after feeding them ``ids`` ``(B, T)`` (right-padded) at positions
    ``start, start + 1, ...`` (``start: (B,)``), taken at index ``last`` (default ``T - 1``) of
    each row (or pairs of rows and indices: :func:`~lorakit.serving.decoder.at_positions`) — as
    :class:`lorakit.serving.decoder.Decoder`, through the model's own modules."""

    @staticmethod
    def refusal(model: nn.Module) -> str | None:
        """Why no engine serves ``model`` (None: this one does)."""
        config = model.config
        kind = getattr(config, "model_type", None)
        if kind not in SERVED:
            return (f"lorakit serve generates with {', '.join(SERVED)}, not {type(model).__name__} "
                    f"(model_type {kind!r}); use lorakit generate for it")
        if getattr(config, "use_bidirectional_attention", False):
            return f"{kind} with use_bidirectional_attention is not a causal decoder: not served"
        return None

    def __init__(self, model: nn.Module, compile: bool | None = None) -> None:
        if (reason := self.refusal(model)) is not None:
            raise ValueError(reason)
        config = model.config
        _register()
        self.model, self.config = model, config
        self.body, self.head = model.base_model, model.get_output_embeddings()
        self.layers = config.num_hidden_layers
        heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.max_positions = _max_positions(config)
        self.compiled = compile_wanted() if compile is None else compile
        self._body = torch.compile(self.body) if self.compiled else self.body
        self._one_row: _OneRow | None = None

    def cache(self, rows: int, max_length: int, dtype: torch.dtype | None = None) -> RowCache:
        weight = next(self.model.parameters())
        return RowCache(self.layers, rows, self.kv_heads, self.head_dim, min(max_length, self.max_positions),
                        dtype or weight.dtype, weight.device)

    def _adapter_as_data(self) -> _OneRow | None:
        """The stream's adapter (``lorakit.adapter_per_row``) as a :class:`_OneRow` plan, or None where there is
        no per-row plan or a layer cannot take it (the layers then read it by name, as eager steps do)."""
        from ..model import _adapter_modules

        modules = _adapter_modules(self.model)
        plan = modules[0].rows if modules else None
        if plan is None or isinstance(plan, _OneRow) or len(plan.names) != 1:
            return None
        one = self._one_row
        if one is None or one.layers is not modules or one.key != tuple(tuple(m.adapters) for m in modules):
            self._one_row = _OneRow(modules) if _OneRow.serves(modules) else None
        if self._one_row is not None:
            dtype = next(self.model.parameters()).dtype
            self._one_row.prepare(plan.names[0], dtype if dtype in (torch.bfloat16, torch.float16) else None,
                                  plan.check_factors)
        return self._one_row

    @contextmanager
    def _row_attention(self) -> Iterator[None]:
        before = self.config._attn_implementation
        self.config._attn_implementation = ATTENTION
        try:
            yield
        finally:
            self.config._attn_implementation = before

    @torch.inference_mode()
    def forward(self, ids: Tensor, cache: RowCache, rows: slice, start: Tensor, last: Positions = None) -> Tensor:
        B, T = ids.shape
        # (B, T); a padding token past the cache's end writes (garbage) into its last position instead
        positions = (start[:, None] + torch.arange(T, device=ids.device)).clamp(max=cache.max_length - 1)
        step = _Step(cache, rows, positions)
        cache.reserve(rows.stop, step.end)
        # (compiled: a single stream's decode step only, not a one-token prompt's prefill: a graph of its own)
        # (and at the cache's first row: a one-token prefill after a prefix-cache hit lands on any row, and a graph
        # per row index recompiled for a minute each; the single stream decodes in row 0)
        body = self._body if B == T == 1 and step.end > 1 and rows.start == 0 else self.body
        plan, guards = None, nullcontext()
        if body is not self.body:
            _dynamic_sizes(cache)
            plan = self._adapter_as_data()
            guards = torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)
        with self._row_attention(), _rows(self.model, plan), guards:
            hidden = body(input_ids=ids, position_ids=positions, use_cache=False, lorakit_step=step)[0]
        if len(step.layers) != self.layers:  # a layer that attends some other way would be served wrong
            raise ValueError(f"{type(self.model).__name__}: {self.layers - len(step.layers)} of {self.layers} layers "
                             f"did not use the attention interface; not served")
        logits = self.head(at_positions(hidden, last))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
