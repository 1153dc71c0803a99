"""Packing (TRL's ``SFTConfig(packing=True)``): a causal LM's training rows concatenated into
sequences of up to ``max_length`` tokens, so that batches carry rows rather than padding.

Placement is first-fit decreasing: the longest rows first (rows of equal length in an order the
seed draws), each into the first sequence (in order of creation) with room for it, else into a
new one. Short rows fill the room long ones leave: on E2E's rows (59 tokens on average, SmolLM2's
tokenizer) sequences of 128 tokens are 98% filled, against 94% when rows come in a random order.
TRL's default (best-fit decreasing) fills alike. No row is cut: encoding already truncates a row
to ``max_length`` tokens (or drops it), as it does without packing, so a row of ``max_length``
tokens is a sequence of its own. The sequences are made once per run; each epoch shuffles them.

Rows in a sequence never see each other. Each row's position ids restart at 0, and a packed
batch carries ``position_ids`` instead of an attention mask: transformers' mask builder
(``masking_utils.find_packed_sequence_indices``) starts a new row wherever a position does not
follow the one before it by 1, and masks attention block-diagonally,

    token q sees token k  <=>  k <= q  and  row(k) == row(q),

a boolean 4-D mask for SDPA, an additive one for eager attention, the variable-length kernel for
flash attention. It reads the rows from the positions only in passes without a cache and without
a 2-D mask, as :class:`lorakit.tasks.lm.CausalLMLoss`'s are. That is transformers' own packed
format (TRL's ``padding_free``), exact on any device, and each attention implementation and
sliding window gets the mask it needs; a hand-built 4-D mask would have to match each
implementation's mask type and dtype. Families
whose modelling code does not follow position ids (OPT, Qwen2.5-VL's text model in transformers
5) are refused by :func:`check_model`, which compares two packed rows with each row alone.

The first label of each row is ignored, so no row's first token is predicted from the row
before it; prompt tokens keep their ignored labels. The loss terms of a packed sequence are then
exactly those of its rows unpacked, and the mean over an optimizer step's loss tokens
(:mod:`lorakit.training.loop`) is the unpacked loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..distributed import as_forward
from ..tasks import Split
from ..tasks.lm import IGNORE

__all__ = ["pack", "first_fit", "check_model"]


def pack(split: Split, max_length: int, seed: int) -> Split:
    """``split``'s rows (features ``input_ids``, ``labels``) packed first-fit decreasing into
    sequences of at most ``max_length`` tokens, with ``position_ids`` restarting at each row and each row's first label
    ``IGNORE``. The targets of the packed split are the indices of the rows in each sequence."""
    lengths = split.lengths
    if max(lengths) > max_length:
        raise ValueError(f"a row of {max(lengths)} tokens does not fit a packed sequence of --max-length {max_length}; "
                         "encode rows with the same max_length (it truncates them)")
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed)).tolist()
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths stay in the seeded order
    sequences = [[order[j] for j in part] for part in first_fit([lengths[i] for i in order], max_length)]
    return Split([_concatenate([split.features[i] for i in rows]) for rows in sequences], sequences)


def _concatenate(rows: list[dict[str, list[int]]]) -> dict[str, list[int]]:
    ids, labels, positions = [], [], []
    for row in rows:
        ids += row["input_ids"]
        labels += [IGNORE] + row["labels"][1:]
        positions += range(len(row["input_ids"]))
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths``, taken in order, in bins of ``capacity``: each index goes into the
    first bin with room for its length. A segment tree over the bins' free room finds that bin in
    ``O(log n)``: ``room[size + b]`` is bin ``b``'s, every inner node holds the larger of its two
    children's (unopened bins have the whole capacity)."""
    if any(n > capacity for n in lengths):
        raise ValueError(f"a length of {max(lengths)} exceeds the capacity {capacity}")
    size = 1 << max(0, len(lengths) - 1).bit_length()
    room = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i, n in enumerate(lengths):
        node = 1
        while node < size:  # down to the leftmost bin with room for n
            node = 2 * node if room[2 * node] >= n else 2 * node + 1
        if node - size == len(bins):
            bins.append([])
        bins[node - size].append(i)
        room[node] -= n
        while node > 1:
            node //= 2
            room[node] = max(room[2 * node], room[2 * node + 1])
    return bins


@torch.no_grad()
def check_model(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Refuse (``ValueError``) a causal LM whose attention or positions do not follow packed
    ``position_ids``: the last hidden states of rows of 5 and 3 tokens packed into one sequence
    must equal those of each row alone. The model runs once in eval mode (no dropout), on 8
    tokens; under FSDP every process runs it."""
    vocab = model.get_input_embeddings().num_embeddings
    ids = ((torch.arange(8) * 7 + 3) % vocab).to(device)[None]  # (1, 8)
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device)
    training = model.training
    model.eval()
    try:
        packed = _hidden(model, ids, positions)
        alone = torch.cat([_hidden(model, ids[:, :5], None), _hidden(model, ids[:, 5:], None)], dim=1)
    finally:
        model.train(training)
    if not torch.allclose(packed, alone, rtol=1e-3, atol=1e-3 * alone.abs().max().item()):
        raise ValueError(f"--packing: {type(model).__name__} lets packed rows see each other (its attention or positions "
                         "do not follow position ids restarting at each row, as transformers' masks for most causal "
                         "LMs do); train it without --packing")


def _hidden(model: nn.Module, ids: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    def run() -> torch.Tensor:
        return model.base_model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state

    return as_forward(model, run)
