"""A lean forward pass of a transformers decoder for serving many sequences at once.

Each running sequence owns one row of a :class:`RowCache` (its keys and values, at its own
length) and may use its own adapter (:func:`lorakit.adapter_per_row`); one forward advances
all of them by a token, whatever their lengths. The model's own modules do the work (norms,
projections with their LoRA layers, MLPs, rotary embeddings); this module only replaces
transformers' cache and mask machinery, whose per-step overhead dominates decoding on a CPU.

Supported (by ``config.model_type``): Llama-style decoders (``llama`` — SmolLM too —,
``mistral``, ``qwen2``) and ``gpt2``. Sliding-window attention is not implemented (refused).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..allocator import trim_heap

__all__ = ["RowCache", "Decoder", "Positions", "at_positions"]

Positions = Tensor | tuple[Tensor, Tensor] | None  # see at_positions


def at_positions(x: Tensor, last: Positions) -> Tensor:
    """``x: (B, T, ...)`` at index ``last: (B,)`` of each row (None: ``T - 1``), ``(B, ...)``; or at the
    ``(row, index)`` pairs of two ``(N,)`` tensors, ``(N, ...)`` (a prompt's every position: its log-probabilities)."""
    if isinstance(last, tuple):
        return x[last[0], last[1]]
    if last is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), last]


class RowCache:
    """Keys and values of up to ``max_rows`` sequences: per layer ``(rows, kv_heads, capacity, head_dim)``.

    Rows and capacity grow (doubling, up to ``max_rows`` and ``max_length``: the bound on its
    memory) as sequences arrive and get longer, and :meth:`fit` gives memory back when the
    load falls: memory follows the load, not the limits.
    """

    MIN_ROWS, MIN_LENGTH = 4, 64  # the size it starts at and never shrinks below

    def __init__(self, layers: int, max_rows: int, kv_heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.max_rows, self.max_length = max_rows, max_length
        shape = (min(self.MIN_ROWS, max_rows), kv_heads, min(self.MIN_LENGTH, max_length), head_dim)
        with torch.inference_mode():  # as _resize makes them: a compiled step sees one kind of tensor (no recompile)
            self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
            self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]

    @property
    def rows(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def elements(self) -> int:
        """Numbers held, keys and values of every layer."""
        return sum(t.numel() for t in (*self.k, *self.v))

    def reserve(self, rows: int, length: int) -> None:
        """Make room for ``rows`` rows of ``length`` positions."""
        have_rows, have = self.rows, self.capacity
        if rows <= have_rows and length <= have:
            return
        if rows > self.max_rows or length > self.max_length:
            raise ValueError(f"{rows} rows of {length} positions exceed the cache's {self.max_rows} x {self.max_length}")
        rows = have_rows if rows <= have_rows else min(max(rows, 2 * have_rows), self.max_rows)
        length = have if length <= have else min(max(length, 2 * have), self.max_length)
        self._resize(rows, length)

    def fit(self, rows: int, length: int) -> None:
        """Shrink to the smallest power-of-two size (at least the starting one) that holds
        the first ``rows`` rows of ``length`` positions, keeping their contents."""
        rows = min(max(self.MIN_ROWS, 1 << max(rows - 1, 0).bit_length()), self.max_rows, self.rows)
        length = min(max(self.MIN_LENGTH, 1 << max(length - 1, 0).bit_length()), self.max_length, self.capacity)
        if (rows, length) != (self.rows, self.capacity):
            self._resize(rows, length)
            trim_heap()

    @torch.inference_mode()  # (the tensors are made in inference mode, within a forward)
    def _resize(self, rows: int, length: int) -> None:
        """New tensors of ``rows`` x ``length``, holding the old ones' overlap."""
        keep_rows, keep = min(rows, self.rows), min(length, self.capacity)
        for cache in (self.k, self.v):
            for i, old in enumerate(cache):
                new = old.new_zeros(rows, old.shape[1], length, old.shape[3])
                new[:keep_rows, :, :keep] = old[:keep_rows, :, :keep]
                cache[i] = new

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst``."""
        for cache in (self.k, self.v):
            for layer in cache:
                layer[dst, :, :length] = layer[src, :, :length]

    @torch.inference_mode()
    def read(self, row: int, start: int, end: int) -> Tensor:
        """Positions ``start:end`` of row ``row``: ``(2, layers, kv_heads, end - start, head_dim)``, keys then values."""
        return torch.stack([torch.stack([layer[row, :, start:end] for layer in cache]) for cache in (self.k, self.v)])

    @torch.inference_mode()
    def write(self, row: int, kv: Tensor) -> None:
        """``kv`` (as :meth:`read` gives it, ``n`` positions) into the first ``n`` positions of row ``row``."""
        n = kv.shape[3]
        self.reserve(row + 1, n)
        for cache, part in zip((self.k, self.v), kv):
            for layer, values in zip(cache, part):
                layer[row, :, :n] = values

    @torch.inference_mode()
    def clear(self, row: int) -> None:
        """Zero row ``row``: a masked position is read with weight 0, harmless only if finite."""
        if row < self.rows:
            for layer in (*self.k, *self.v):
                layer[row].zero_()


class Decoder:
    """``forward(ids, rows, start)``: the next-token logits of ``rows`` of the cache after
    feeding them ``ids`` at positions ``start, start + 1, ...``.

    ``ids`` is ``(B, T)`` (right-padded; a row's padding writes cache positions past its
    length, which no later step reads before overwriting), ``rows`` a slice of ``B`` cache
    rows, ``start`` a ``(B,)`` tensor of the positions of ``ids[:, 0]``, ``last`` the index
    in each row of the token whose logits are returned (or pairs of rows and indices: :func:`at_positions`).
    """

    @staticmethod
    def refusal(model: nn.Module) -> str | None:
        """Why this engine cannot serve ``model`` (None: it can)."""
        config = model.config
        kind = getattr(config, "model_type", None)
        if kind not in ("llama", "mistral", "qwen2", "gpt2"):
            return (f"the decoder engine serves Llama-style decoders (llama, mistral, qwen2) and GPT-2, "
                    f"not {type(model).__name__} (model_type {kind!r})")
        if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
            return f"{kind}: the decoder engine does not implement sliding-window attention"
        return None

    def __init__(self, model: nn.Module) -> None:
        if (reason := self.refusal(model)) is not None:
            raise ValueError(f"{reason}; use engine 'model' (lorakit serve --engine model)")
        config = model.config
        kind = config.model_type
        self.model = model
        self.config = config
        if kind == "gpt2":
            self.kind = "gpt2"
            self.layers = list(model.transformer.h)
            self.heads = self.kv_heads = config.n_head
            self.head_dim = config.n_embd // config.n_head
            self.max_positions = config.n_positions
        else:
            self.kind = "llama"
            self.layers = list(model.model.layers)
            self.heads = config.num_attention_heads
            self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
            self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
            self.max_positions = config.max_position_embeddings
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            self._rope = apply_rotary_pos_emb

    def cache(self, rows: int, max_length: int, dtype: torch.dtype | None = None) -> RowCache:
        dtype = dtype or next(self.model.parameters()).dtype
        return RowCache(len(self.layers), rows, self.kv_heads, self.head_dim, min(max_length, self.max_positions),
                        dtype, next(self.model.parameters()).device)

    @torch.inference_mode()
    def forward(self, ids: Tensor, cache: RowCache, rows: slice, start: Tensor, last: Positions = None) -> Tensor:
        B, T = ids.shape
        # (B, T); a padding token past the cache's end writes (garbage) into its last position instead
        positions = (start[:, None] + torch.arange(T, device=ids.device)).clamp(max=cache.max_length - 1)
        end = int(positions.max()) + 1
        cache.reserve(rows.stop, end)
        # mask[b, 0, t, j]: query t of row b sees cache position j (its own past and itself)
        mask = (torch.arange(end, device=ids.device) <= positions[:, :, None])[:, None]
        where = (torch.arange(B, device=ids.device)[:, None].expand(B, T), positions)
        if self.kind == "llama":
            x = self._llama(ids, cache, rows, positions, mask, where, end)
        else:
            x = self._gpt2(ids, cache, rows, positions, mask, where, end)
        x = at_positions(x, last)
        norm = self.model.model.norm if self.kind == "llama" else self.model.transformer.ln_f
        return self.model.lm_head(norm(x)).float()

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, i: int, cache: RowCache, rows: slice, mask: Tensor,
                where: tuple[Tensor, Tensor], end: int, scale: float) -> Tensor:
        """Write ``k, v`` (B, kv_heads, T, d) into the cache; attention of ``q`` over the cache."""
        kc, vc = cache.k[i][rows], cache.v[i][rows]
        kc[where[0], :, where[1]] = k.transpose(1, 2)
        vc[where[0], :, where[1]] = v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kc[:, :, :end], vc[:, :, :end], attn_mask=mask, scale=scale,
                                             enable_gqa=self.kv_heads != self.heads)
        B, _, T, _ = q.shape
        return out.transpose(1, 2).reshape(B, T, -1)

    def _llama(self, ids, cache, rows, positions, mask, where, end) -> Tensor:
        inner = self.model.model
        x = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(x, positions)
        B, T = ids.shape
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k = self._rope(q, k, cos, sin)
            x = x + attn.o_proj(self._attend(q, k, v, i, cache, rows, mask, where, end, attn.scaling))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return x

    def _gpt2(self, ids, cache, rows, positions, mask, where, end) -> Tensor:
        inner = self.model.transformer
        x = inner.wte(ids) + inner.wpe(positions)
        B, T = ids.shape
        width = self.config.n_embd
        for i, block in enumerate(self.layers):
            h = block.ln_1(x)
            q, k, v = (t.view(B, T, self.heads, self.head_dim).transpose(1, 2)
                       for t in block.attn.c_attn(h).split(width, dim=2))
            scale = self.head_dim ** -0.5 if self.config.scale_attn_weights else 1.0
            if self.config.scale_attn_by_inverse_layer_idx:
                scale /= i + 1
            x = x + block.attn.c_proj(self._attend(q, k, v, i, cache, rows, mask, where, end, scale))
            x = x + block.mlp(block.ln_2(x))
        return x
