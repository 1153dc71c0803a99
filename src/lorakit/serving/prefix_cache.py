"""Prefix caching: the keys and values of prompt prefixes already prefilled, reused by later prompts.

A prompt is cut into blocks of ``BLOCK`` tokens. Block ``i`` of a prompt on adapter ``a`` is stored under
the key ``(id of block i - 1, its BLOCK tokens)``, block 0 under ``(root of a, its tokens)``: a chain, so a
block's key names the whole prefix up to its end and the adapter that computed it (vLLM's automatic prefix
caching, Kwon et al. 2023, section 4.3; SGLang's RadixAttention). The adapter is part of the key because its
k/v projections change the cache; the base model (``None``) is a root of its own. Keys are compared exactly (ids
are never reused), so two prefixes never share a block by a hash collision.

An adapter's root changes when :meth:`PrefixCache.invalidate` is called (an adapter unloaded: one loaded later
under its name gets a new root), and its old blocks go. Blocks are kept in least-recently-used order, at most
``max_tokens`` tokens of them; a lookup or a store touches a chain from its end back to its root, so a block
is always more recent than the blocks after it: eviction takes the ends of chains, never leaves a block behind
that no lookup could reach.

Each block holds ``(2, layers, kv_heads, BLOCK, head_dim)``: keys then values of every layer, in the row cache's
dtype (SmolLM2-135M in fp32: 45 KB a token).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["PrefixCache"]


class PrefixCache:
    """Blocks of ``BLOCK`` prompt tokens' keys and values, per adapter, least recently used evicted past
    ``max_tokens`` (0: off). ``queries`` and ``hits`` count the prompt tokens looked up and found."""

    BLOCK = 16

    def __init__(self, max_tokens: int) -> None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
            raise ValueError(f"max_tokens must be 0 (off) or a positive number of tokens, got {max_tokens!r}")
        self.max_tokens = max_tokens
        self.blocks: OrderedDict[tuple[int, tuple[int, ...]], tuple[int, int, Tensor]] = OrderedDict()
        # key -> (block id, root id, kv); least recently used first
        self._ids = itertools.count(1)
        self.roots: dict[str | None, int] = {}
        self.queries = self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.max_tokens >= self.BLOCK

    @property
    def tokens(self) -> int:
        return len(self.blocks) * self.BLOCK

    def _root(self, adapter: str | None) -> int:
        if adapter not in self.roots:
            self.roots[adapter] = next(self._ids)
        return self.roots[adapter]

    def invalidate(self, adapter: str | None) -> None:
        """Forget ``adapter``'s blocks: its weights changed (unloaded; a later adapter may take its name)."""
        old = self.roots.pop(adapter, None)
        if old is not None:
            self.blocks = OrderedDict((k, b) for k, b in self.blocks.items() if b[1] != old)

    def lookup(self, adapter: str | None, prompt: Sequence[int]) -> Tensor | None:
        """The keys and values ``(2, layers, kv_heads, n, head_dim)`` of the longest cached prefix of ``prompt``
        on ``adapter``, in whole blocks, short of the prompt's last token (whose logits the prefill must give);
        None if there is none."""
        self.queries += len(prompt)
        if not self.enabled:
            return None
        parent, found = self._root(adapter), []
        for start in range(0, len(prompt) - self.BLOCK, self.BLOCK):  # (blocks ending before the last token)
            key = (parent, tuple(prompt[start : start + self.BLOCK]))
            block = self.blocks.get(key)
            if block is None:
                break
            found.append(key)
            parent = block[0]
        if not found:
            return None
        self._touch(found)
        self.hits += len(found) * self.BLOCK
        return torch.cat([self.blocks[key][2] for key in found], dim=3)

    def store(self, adapter: str | None, prompt: Sequence[int], length: int,
              read: Callable[[int, int], Tensor]) -> None:
        """Keep the whole blocks of ``prompt[:length]`` on ``adapter``; ``read(start, end)`` gives the keys and
        values of positions ``start:end`` ``(2, layers, kv_heads, end - start, head_dim)`` (a row of the cache)."""
        if not self.enabled:
            return
        root = parent = self._root(adapter)
        keys = []
        for start in range(0, length - self.BLOCK + 1, self.BLOCK):
            key = (parent, tuple(prompt[start : start + self.BLOCK]))
            block = self.blocks.get(key)
            if block is None:  # this block and the ones after it are new: read them from the row at once
                break
            keys.append(key)
            parent = block[0]
        start, end = len(keys) * self.BLOCK, length // self.BLOCK * self.BLOCK
        if start < end:
            kv = read(start, end)
            for i, at in enumerate(range(start, end, self.BLOCK)):
                block_id, part = next(self._ids), kv[:, :, :, i * self.BLOCK : (i + 1) * self.BLOCK]
                keys.append((parent, tuple(prompt[at : at + self.BLOCK])))
                self.blocks[keys[-1]] = (block_id, root, part.clone())  # (a block of its own memory)
                parent = block_id
        self._touch(keys)
        while self.tokens > self.max_tokens:
            self.blocks.popitem(last=False)

    def _touch(self, chain: list[tuple[int, tuple[int, ...]]]) -> None:
        """Make ``chain`` (keys from a root on) the most recently used blocks, its first block the most recent."""
        for key in reversed(chain):
            self.blocks.move_to_end(key)
