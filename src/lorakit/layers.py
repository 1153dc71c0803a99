"""LoRA layers (paper section 4.1): wrappers that own a frozen layer's weight and add ``B A``.

Each wrapper takes over the wrapped module's ``weight`` and ``bias`` Parameters
(the same objects, under the same state-dict names) and keeps a stripped copy of
the module only to know its hyper-parameters and to rebuild it on unload.
Any number of adapters live side by side, keyed by name; ``active`` says which
ones the forward adds.

For an adapter with factors ``A: (r, in)``, ``B: (out, r)`` and ``scaling = alpha / r``::

    h = W0 x + b + scaling * B A dropout(x)
    delta_weight() = scaling * B A          # float32, in W0's layout

A DoRA adapter (``use_dora``) also has a magnitude ``m`` per output channel and adds
``(f - 1) * W0 x + f * scaling * B A x`` with ``f = m / ||W0 + scaling B A||`` instead
(:mod:`lorakit.variants`); its ``delta_weight()`` is ``f * (W0 + scaling B A) - W0``.

Merging adds ``delta_weight()`` to ``W0`` once and keeps a copy of ``W0`` so that
``unmerge`` restores it bit for bit in any dtype.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quant, variants
from .config import LoraConfig

__all__ = [
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "ModulesToSave",
    "RowPlan",
    "lora_class_for",
]


def _gpt2_conv1d() -> type | None:
    """transformers' ``Conv1D`` if transformers is loaded (no instance can exist otherwise)."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def _f32(t: Tensor) -> Tensor:
    """``t`` in float32 at least (float64 stays), where ``delta_weight`` is computed."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA wrapper class for ``module``, or None if lorakit cannot adapt it."""
    conv1d = _gpt2_conv1d()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv1d | nn.Conv2d) and module.groups == 1:
        return LoraConv
    return None


class RowPlan:
    """Which adapter each row of a batch uses (``None``: the base model); see
    :func:`lorakit.adapter_per_row`."""

    prepared = False  # True: each LoRA layer's stacks are up to date (LoraLinear._stacks) before the forward
    check_factors = True

    def __init__(self, names: Sequence[str | None], check_factors: bool = True) -> None:
        self.names = list(names)
        self.used = tuple(dict.fromkeys(n for n in self.names if n is not None))
        self.check_factors = check_factors  # see lorakit.adapter_per_row
        self._slots: dict[tuple, Tensor | int] = {}

    def for_layer(self, present: Sequence[str], x: Tensor, every: bool = False) -> tuple[tuple[str, ...], Tensor | int]:
        """The used adapters this layer has (``every``: all it has), and each row's slot
        among them (``len(names)`` for rows whose adapter is absent or None): a ``(B,)``
        tensor, or an int when every row has the same slot (a single row, for one), so that
        the layer runs that one adapter on the whole batch without gathering rows."""
        if x.shape[0] != len(self.names):
            raise ValueError(f"adapter_per_row was given {len(self.names)} adapter names for a batch of {x.shape[0]} rows")
        names = tuple(present) if every else tuple(n for n in self.used if n in present)
        key = (names, x.device)
        slot = self._slots.get(key)
        if slot is None:  # layers of one model mostly share their adapters
            where = {n: i for i, n in enumerate(names)}
            slots = [where.get(n, len(names)) for n in self.names]
            slot = slots[0] if len(set(slots)) == 1 else torch.tensor(slots, device=x.device)
            self._slots[key] = slot
        return names, slot


class LoraLayer(nn.Module):
    """Base class: owns the wrapped layer's parameters and the adapters' factors.

    Subclasses define the base computation, the LoRA branch and ``delta_weight``.
    """

    # Names of the factors in PEFT's files, after ``<module path>.``.
    file_keys: tuple[str, str] = ("lora_A.weight", "lora_B.weight")
    # Without autograd, add_rows gets every adapter of the layer (not only the batch's): see LoraLinear._stacks.
    rows_over_every_adapter = False
    # Whether the adapters' dropout applies to the input (not to an embedding's token ids).
    input_dropout = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self._param_names = tuple(base._parameters)
        for name in self._param_names:
            self.register_parameter(name, base._parameters[name])
        # Buffers too (Gemma's embed_scale): so that .to(device) and .to(dtype) move them with the model.
        self._buffer_names = tuple(base._buffers)
        for name in self._buffer_names:
            self.register_buffer(name, base._buffers[name], persistent=name not in base._non_persistent_buffers_set)
        template = copy.copy(base)
        template._parameters, template._buffers = {}, {}
        # A plain attribute, not a submodule: it holds hyper-parameters only.
        object.__setattr__(self, "base_template", template)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters' m (PEFT's name)
        self.configs: dict[str, LoraConfig] = {}
        self._adapters: tuple[str, ...] = ()  # the configs' names (a tuple: see ``adapters``)
        self.ranks: dict[str, int] = {}  # each adapter's rank and scaling here (rank_pattern, alpha_pattern)
        self.scalings: dict[str, float] = {}
        self.active: tuple[str, ...] = ()
        self.disabled = False
        self.merged = False
        self.rows: RowPlan | None = None  # set by lorakit.adapter_per_row
        # LoraLinear.add_rows' stacked factors while they stay valid, and what they were stacked from (see _stacks)
        self._stacked: tuple[tuple[Tensor, Tensor, Tensor], ...] | None = None
        self._stacked_from: tuple | None = None
        self.register_buffer("unmerged_weight", None, persistent=False)
        self.__dict__["tied_weight"] = None  # while merged: the weight shared with another module (see merge)
        self.train(base.training)  # a model in eval mode stays in eval mode (no dropout at inference)

    # ---- adapters --------------------------------------------------------------------

    def add_adapter(self, name: str, config: LoraConfig, enable: tuple[bool, ...] | None = None,
                    slices: Sequence[Tensor] | None = None, path: str | None = None) -> None:
        """Create the factors of adapter ``name``: ``B = 0`` so the output is unchanged (unless
        ``config.init`` is ``random``, PEFT's ``init_lora_weights=False``). ``path``, the layer's
        name in the model, picks its rank and alpha from ``rank_pattern`` / ``alpha_pattern``."""
        if enable is not None:
            raise ValueError(f"enable_lora applies to linear layers only, not {type(self.base_template).__name__}")
        r, alpha = config.rank_alpha(path)
        a_shape, b_shape = self.factor_shapes(r)
        self._add_factors(name, config, a_shape, b_shape, r, alpha)

    def _add_factors(self, name: str, config: LoraConfig, a_shape: tuple[int, ...], b_shape: tuple[int, ...],
                     r: int, alpha: float) -> None:
        dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        # A base on the meta device (built for FSDP, filled later) still gets real factors, drawn now
        # from the random state, as on a loaded base (lorakit.training.materialise).
        device = torch.device("cpu") if self.weight.is_meta else self.weight.device
        A = torch.empty(a_shape, dtype=dtype, device=device)
        B = torch.zeros(b_shape, dtype=dtype, device=device)
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(B)
        self.init_factors(name, config, r)
        self.lora_dropout[name] = (nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()).train(self.training)
        self.configs[name] = config
        self._adapters = tuple(self.configs)
        self.ranks[name], self.scalings[name] = r, config.scaling_of(r, alpha)
        if config.use_dora:  # after the factors: m = ||W0 + scaling B A||, B random with init "random"
            shape = self.magnitude_shape()
            self.lora_magnitude_vector[name] = nn.Parameter(variants.initial_magnitude(self, name, shape))
        self._stacked = self._stacked_from = None

    @torch.no_grad()
    def init_factors(self, name: str, config: LoraConfig, r: int) -> None:
        """PEFT's initialisation: ``A`` Kaiming-uniform (Gaussian, std ``1/r``), ``B = 0``
        (``init="random"``: Kaiming-uniform, as nn.Linear / nn.Conv's default init)."""
        A, B = self.lora_A[name], self.lora_B[name]
        if config.init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        if config.init == "random":
            nn.init.kaiming_uniform_(B, a=math.sqrt(5))

    def remove_adapter(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.lora_dropout[name], self.configs[name]
        self._adapters = tuple(self.configs)
        del self.ranks[name], self.scalings[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        self._stacked = self._stacked_from = None
        self.active = tuple(a for a in self.active if a != name)

    @property
    def adapters(self) -> tuple[str, ...]:
        # (kept as a tuple, not read from ``configs`` at each forward: torch.compile then guards on one tuple
        # of names instead of on every adapter's config, 2 x 32 per layer of a server's decode step)
        return self._adapters

    def scaling(self, name: str) -> float:
        return self.scalings[name]

    # ---- maths -----------------------------------------------------------------------

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def lora_forward(self, x: Tensor, name: str) -> Tensor:
        """``scaling * B A dropout(x)`` for adapter ``name``."""
        return self.lora_branch(self.lora_dropout[name](x.to(self.lora_A[name].dtype)), name)

    def lora_branch(self, x: Tensor, name: str) -> Tensor:
        """``scaling * B A x``: the LoRA branch on an input already through the dropout."""
        raise NotImplementedError

    def lora_delta(self, name: str) -> Tensor:
        """``scaling * B A`` in float32 (float64 for float64 layers), shaped like ``weight``."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> Tensor:
        """What adapter ``name`` adds to the weight, in float32 (float64 for float64 layers), shaped
        like ``weight``: ``scaling * B A``, or for DoRA ``m / ||W0 + scaling B A|| * (W0 + scaling B A) - W0``."""
        if name in self.lora_magnitude_vector:
            return variants.dora_delta(self, name)
        return self.lora_delta(name)

    def update(self, x: Tensor, name: str, base: Tensor) -> Tensor:
        """What adapter ``name`` adds to ``base``, the base output of ``x``."""
        if name in self.lora_magnitude_vector:
            return variants.dora_update(self, x, name, base)
        return self.lora_forward(x, name)

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            return self.base_forward(x, self.original_weight)
        out = self.base_forward(x, self.weight)
        if self.rows is not None:
            if self.merged:
                raise RuntimeError("per-row adapters need an unmerged model; call lorakit.unmerge(model) first")
            every = self.rows_over_every_adapter and not torch.is_grad_enabled()
            return self.add_rows(out, x, *self.rows.for_layer(self.adapters, x, every))
        if not self.merged:
            if len(self.active) == 1 and self.active[0] in self.lora_magnitude_vector:  # DoRA training: fewer ops
                return variants.dora_output(self, x, self.active[0], out)
            base = out  # each adapter's update is relative to the base output (DoRA's reads it)
            for name in self.active:
                out = out + self.update(x, name, base).to(out.dtype)
        return out

    # ---- DoRA's view of the weight (lorakit.variants) ------------------------------------

    def base_weight(self) -> Tensor:
        """The frozen base weight ``W0`` in the layer's layout, as the base output uses it: the one
        place DoRA's norms and delta read it (a quantized base would dequantize here)."""
        return self.original_weight

    def weight_rows(self, weight: Tensor) -> Tensor:
        """``weight`` as ``(c, n)``, a row per output channel (a view where possible)."""
        return weight.flatten(1)

    def rows_to_weight(self, rows: Tensor) -> Tensor:
        """The inverse of :meth:`weight_rows`."""
        return rows.reshape(self.weight.shape)

    def dora_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """``A: (r, n)`` and ``B: (c, r)`` with ``weight_rows(lora_delta) = scaling * B A``."""
        return self.lora_A[name].flatten(1), self.lora_B[name].flatten(1)

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of DoRA's ``m`` (PEFT's): one entry per output channel, broadcasting over the output."""
        return (self.weight_rows(self.weight).shape[0],)

    def add_rows(self, out: Tensor, x: Tensor, names: tuple[str, ...], slot: Tensor | int) -> Tensor:
        """``out`` plus, for each row ``i`` of the batch, the update of adapter
        ``names[slot[i]]`` (none where ``slot[i] == len(names)``); an int ``slot`` is every row's.

        The reference: one :meth:`lora_forward` per adapter on its rows.
        :class:`LoraLinear` overrides it with one batched multiply.
        """
        if isinstance(slot, int):
            return out if slot == len(names) else out + self.update(x, names[slot], out).to(out.dtype)
        for i, name in enumerate(names):
            rows = (slot == i).nonzero().squeeze(1)
            if len(rows):
                out = out.index_add(0, rows, self.update(x[rows], name, out[rows]).to(out.dtype))
        return out

    # ---- merging ---------------------------------------------------------------------

    @property
    def original_weight(self) -> Tensor:
        """The wrapped layer's weight without any adapter merged in."""
        if not self.merged:
            return self.weight
        return self.unmerged_weight if self.tied_weight is None else self.tied_weight

    quantized = False  # the wrapped weight is quantized (LoraLinear over bitsandbytes): see lorakit.quant

    @torch.no_grad()
    def merge(self, keep_original: bool = True, untie: bool = False, dtype: torch.dtype | None = None) -> None:
        """Add the active adapters' ``delta_weight`` to ``weight``; a no-op if merged already.

        The sum is formed in float32 and rounded to the weight's dtype once. With
        ``keep_original`` a copy of the weight is kept so that ``unmerge`` is exact.
        With ``untie`` (the weight is shared with another module: tied word embeddings)
        the merged weight becomes this layer's own new Parameter and the shared one is
        left untouched, so the other module does not change; ``unmerge`` ties them again.
        Over a quantized weight the merged one is a new float Parameter too, ``dequant(W) + ΔW``
        rounded once to ``dtype`` (default: the layer's compute dtype, float32 if unset): the
        function the adapter was trained against; the quantized one is kept aside as for ``untie``.
        """
        if self.merged or not self.active:
            return
        delta = sum(self.delta_weight(name) for name in self.active)
        if untie or self.quantized:
            original = self.weight
            start = self._dequantized(original) if self.quantized else original.detach()
            dtype = (dtype or getattr(self.base_template, "compute_dtype", None) or torch.float32) if self.quantized \
                else original.dtype
            self.weight = nn.Parameter((start.to(delta.dtype) + delta).to(dtype), requires_grad=original.requires_grad)
            if keep_original:
                self.__dict__["tied_weight"] = original  # a plain attribute: not a second state-dict entry
        else:
            if keep_original:
                self.unmerged_weight = self.weight.detach().clone()
            self.weight.copy_((self.weight.to(delta.dtype) + delta).to(self.weight.dtype))
        self.merged = True

    def _dequantized(self, weight: Tensor) -> Tensor:
        """A quantized ``weight`` in float32, ``(out, in)``: the wrapped module's ``dequantize()``."""
        return self._plain(weight).dequantize(torch.float32)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the weight saved by ``merge``, bit for bit; a no-op if not merged."""
        if not self.merged:
            return
        if self.tied_weight is not None:
            shared = self.tied_weight  # the shared (or quantized) Parameter, never written to
            if not self.quantized and (shared.device, shared.dtype) != (self.weight.device, self.weight.dtype):
                shared.data = shared.data.to(self.weight)  # held by no module while merged: .to() missed it
            self.weight = shared
            self.__dict__["tied_weight"] = None
        elif self.unmerged_weight is None:
            raise RuntimeError("this layer was merged without keeping its original weight; it cannot unmerge")
        else:
            self.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None
        self.merged = False

    def unwrap(self) -> nn.Module:
        """A plain module of the wrapped type holding this layer's current parameters and buffers."""
        plain = self._plain(self.weight)
        plain.train(self.training)
        return plain

    def _plain(self, weight: Tensor) -> nn.Module:
        """A shallow copy of the wrapped module holding ``weight`` and this layer's other
        parameters and buffers (the template itself is never changed: thread-safe)."""
        plain = copy.copy(self.base_template)
        plain._parameters = {name: self._parameters[name] for name in self._param_names}
        plain._parameters["weight"] = weight
        plain._buffers = {name: self._buffers[name] for name in self._buffer_names}
        return plain

    def extra_repr(self) -> str:
        ranks = dict(self.ranks)
        kind = type(self.base_template).__name__
        return f"{kind}{tuple(self.weight.shape)}, ranks={ranks}, active={list(self.active)}, merged={self.merged}"


class LoraLinear(LoraLayer):
    """LoRA on ``nn.Linear`` (weight ``(out, in)``) or transformers' GPT-2 ``Conv1D``
    (weight stored transposed, ``(in, out)``).

    An adapter may cover only some output slices of a fused projection
    (``enable=(True, False, True)`` on GPT-2's ``c_attn`` = q|k|v adapts q and v):
    then ``A: (k r, in)`` and ``B: (m, r)`` for the ``k`` enabled of ``n`` slices holding
    ``m`` output rows together, slice ``i`` being updated by ``B_i A_i``
    (``loralib.MergedLinear``). The slices are ``n`` equal contiguous blocks unless
    ``slices`` gives each one's output rows (grouped-query q|k|v of unequal sizes,
    q/k/v interleaved per head): see ``lorakit.architectures.fused_slices``.
    """

    rows_over_every_adapter = True
    # Set by lorakit.quant.linear for decoding (in the instance's __dict__, not a submodule: no new state-dict
    # keys): the weight block-quantized. Read as a plain attribute, as QuantLinear.fused.
    int8_base: nn.Module | None = None

    def __init__(self, base: nn.Module) -> None:
        base = quant.adopt(base)  # a bitsandbytes layer: lorakit's forward and dequantize() (lorakit.quant)
        super().__init__(base)
        self.quantized = hasattr(self.base_template, "dequantize")
        self.fan_in_fan_out = not isinstance(base, nn.Linear)
        rows, cols = (base.out_features, base.in_features) if self.quantized else self.weight.shape
        self.in_features, self.out_features = (rows, cols) if self.fan_in_fan_out else (cols, rows)
        self.enable: dict[str, tuple[bool, ...] | None] = {}
        self.enabled_rows: dict[str, tuple[Tensor, ...]] = {}  # output rows of each enabled slice

    def add_adapter(self, name: str, config: LoraConfig, enable: tuple[bool, ...] | None = None,
                    slices: Sequence[Tensor] | None = None, path: str | None = None) -> None:
        rows = self.out_features
        if enable is not None:
            slices = self._equal_slices(enable) if slices is None else tuple(slices)
            if len(slices) != len(enable):
                raise ValueError(f"enable_lora={enable!r} has {len(enable)} entries but this projection has "
                                 f"{len(slices)} output slices; give one boolean per slice")
            self.enabled_rows[name] = tuple(s.to(self.weight.device) for s, on in zip(slices, enable) if on)
            rows = sum(len(s) for s in self.enabled_rows[name])
        self.enable[name] = enable
        k = 1 if enable is None else sum(enable)
        r, alpha = config.rank_alpha(path)
        self._add_factors(name, config, (k * r, self.in_features), (rows, r), r, alpha)

    def _equal_slices(self, enable: tuple[bool, ...]) -> tuple[Tensor, ...]:
        if self.out_features % len(enable):
            raise ValueError(
                f"enable_lora={enable!r} splits {self.out_features} output features into "
                f"{len(enable)} slices, which does not divide evenly"
            )
        return torch.arange(self.out_features).chunk(len(enable))

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        del self.enable[name]
        self.enabled_rows.pop(name, None)

    def full_B(self, name: str) -> Tensor:
        """``B`` as an ``(out, k r)`` matrix: block-diagonal over the enabled slices, each
        block's rows placed at its slice's output rows."""
        B, enable = self.lora_B[name], self.enable[name]
        if enable is None:
            return B
        slices = self.enabled_rows[name]
        rows = torch.cat(slices).to(B.device)
        blocks = torch.block_diag(*B.split([len(s) for s in slices]))  # (m, k r)
        return blocks.new_zeros(self.out_features, blocks.shape[1]).index_copy(0, rows, blocks)

    def base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        quantized = self.int8_base
        if quantized is not None and weight is self.weight and not self.merged:
            return quantized(x)
        if self.quantized and weight is self.original_weight:  # the quantized weight: its module computes W x + b
            return type(self.base_template).forward(self._plain(weight), x)  # (on the class: see LoraEmbedding)
        if not self.fan_in_fan_out:
            return F.linear(x, weight, self.bias)
        out = x.reshape(-1, x.shape[-1]) @ weight  # Conv1D: (N, in) @ (in, out)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def lora_branch(self, x: Tensor, name: str) -> Tensor:
        h = F.linear(x, self.lora_A[name])  # (..., k r)
        return F.linear(h, self.full_B(name)) * self.scaling(name)

    def lora_delta(self, name: str) -> Tensor:
        delta = (_f32(self.full_B(name)) @ _f32(self.lora_A[name])) * self.scaling(name)  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def weight_rows(self, weight: Tensor) -> Tensor:
        return weight.T if self.fan_in_fan_out else weight  # (out, in)

    def rows_to_weight(self, rows: Tensor) -> Tensor:
        return rows.T if self.fan_in_fan_out else rows

    def dora_factors(self, name: str) -> tuple[Tensor, Tensor]:
        return self.lora_A[name], self.full_B(name)

    def unwrap(self) -> nn.Module:
        """As :meth:`LoraLayer.unwrap`; merged over a quantized weight: a plain ``nn.Linear`` of the merged dtype."""
        if not (self.quantized and self.merged):
            return super().unwrap()
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        plain.weight = self.weight
        if self.bias is not None:
            plain.bias = nn.Parameter(self.bias.detach().to(self.weight.dtype), requires_grad=self.bias.requires_grad)
        return plain.train(self.training)

    def add_rows(self, out: Tensor, x: Tensor, names: tuple[str, ...], slot: Tensor | int) -> Tensor:
        """Batched gather-and-multiply over stacked factors (S-LoRA / Punica style).

        The adapters' ``A`` and ``scaling * B`` are stacked by rank, one stack per rank
        (``(n, r, in)`` and ``(n, out, r)``), so memory follows the sum of the ranks, not
        adapters x largest rank. Each row gathers its own pair from its rank's stack and two
        ``bmm`` per rank compute the updates. With a single rank, rows without adapter meet a
        zero pair; with several, each rank's ``bmm`` takes only its own rows. Only the
        adapters in ``names`` enter the stacks, so only they receive gradients. A batch whose
        rows all use one adapter (an int ``slot``: a single stream) gathers nothing: two small
        products, as the reference.
        """
        if isinstance(slot, int):
            name = names[slot] if slot < len(names) else None
            if name is not None and self._plain_update(name, x, out):  # (decoding one stream: the fewest operators)
                return torch.add(out, F.linear(F.linear(x, self.lora_A[name]), self.lora_B[name]), alpha=self.scalings[name])
            return LoraLayer.add_rows(self, out, x, names, slot)
        if not names:
            return out
        dora = tuple(n for n in names if n in self.lora_magnitude_vector) if self.lora_magnitude_vector else ()
        if dora:  # DoRA rows through the reference (per adapter, on the base output); the others batched
            names, slot, out = self._dora_rows(out, x, names, slot, dora)
            if not names:
                return out
        # Inference in bf16/fp16 (a server): the factors in the activations' dtype too.
        low = not torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float16)
        prepared = self.rows is not None and self.rows.prepared  # (add_rows is also called without a plan)
        stacks = self._stacked if prepared else self._stacks(names, x.dtype if low else None, self._checked())
        rows = self._rows_dropout(x.to(stacks[0][1].dtype), names, slot).reshape(len(slot), -1, self.in_features)
        if len(stacks) == 1:
            where, As, Bs = stacks[0]
            pick = where[slot]  # (index_select: a third of the time of As[pick] for a small batch)
            h = torch.bmm(rows, As.index_select(0, pick).transpose(1, 2))  # (N, T, r)
            Bt = Bs.index_select(0, pick).transpose(1, 2)  # (N, r, out)
            if out.dtype == h.dtype and not torch.is_grad_enabled():  # the sum in the same operator
                return torch.baddbmm(out.reshape(len(slot), -1, self.out_features), h, Bt).view(out.shape)
            return out + torch.bmm(h, Bt).view(out.shape).to(out.dtype)
        total = out.reshape(len(slot), -1, self.out_features)
        for where, As, Bs in stacks:
            pick = where[slot]  # (N,): each row's place in this rank's stack, -1 for the others
            index = (pick >= 0).nonzero().squeeze(1)
            if len(index):
                mine = pick[index]
                h = torch.bmm(rows[index], As.index_select(0, mine).transpose(1, 2))  # (n, T, rank)
                delta = torch.bmm(h, Bs.index_select(0, mine).transpose(1, 2))  # (n, T, out)
                total = total.index_add(0, index, delta.to(out.dtype))
        return total.view(out.shape)

    def _plain_update(self, name: str, x: Tensor, out: Tensor) -> bool:
        """Whether adapter ``name``'s update is ``scaling * B A x`` with nothing else to apply: inference
        (no autograd, no dropout), no DoRA magnitude, no slices, factors of ``x``'s and ``out``'s dtype."""
        return (not torch.is_grad_enabled() and not self.training and self.enable[name] is None
                and name not in self.lora_magnitude_vector and x.dtype == out.dtype == self.lora_A[name].dtype)

    def _dora_rows(self, out: Tensor, x: Tensor, names: tuple[str, ...], slot: Tensor,
                   dora: tuple[str, ...]) -> tuple[tuple[str, ...], Tensor, Tensor]:
        """``out`` with the DoRA adapters' rows added (:meth:`LoraLayer.add_rows`), and the other
        adapters' names with each row's slot among them (``len``: none) for the batched path."""
        index = {n: i for i, n in enumerate(names)}
        out = LoraLayer.add_rows(self, out, x, names, torch.where(torch.isin(slot, torch.tensor(
            [index[n] for n in dora], device=slot.device)), slot, len(names)))
        plain = tuple(n for n in names if n not in dora)
        remap = torch.tensor([plain.index(n) if n in plain else len(plain) for n in names] + [len(plain)],
                             device=slot.device)
        return plain, remap[slot], out

    def _stacks(self, names: tuple[str, ...], dtype: torch.dtype | None = None,
                used: Sequence[str] | None = None) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
        """Per rank among ``names``: ``(where, As, Bs)``, the ``A`` and ``scaling * B`` of its
        adapters stacked (cast to ``dtype`` if given), and ``where[i]`` the place of
        ``names[i]`` in them, -1 if of another rank. ``where[-1]`` is for rows without
        adapter: -1, or with a single rank a zero pair stacked last.

        Without autograd the stacks are kept for the next call until the adapters change or
        the contents of a factor the caller reads do (``used``: the adapters of its rows,
        default all ``names``; a factor changed in place is restacked when a batch next uses
        it), and ``names`` are all the layer's adapters: a server's decode steps, whose batches
        mix different adapters from one step to the next, reuse one set of stacks and check
        only the versions of the factors they read (a single stream over 32 adapters: 2 per
        layer, not 64)."""
        A, B = self.lora_A._parameters, self.lora_B._parameters  # (plain dicts: fast to read at every step)
        if self._stacked is not None and self._stacked_from[0] == (names, dtype) and not torch.is_grad_enabled():
            versions = self._stacked_from[1]
            if all(versions[n] == (A[n]._version, B[n]._version) for n in (names if used is None else used)
                   if n in versions):
                return self._stacked
        ranks: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            ranks.setdefault(A[name].shape[0], []).append(i)
        stacks = []
        for rank, members in ranks.items():
            As = [self.lora_A[names[i]] for i in members]
            Bs = [self.full_B(names[i]) * self.scaling(names[i]) for i in members]
            where = torch.full((len(names) + 1,), -1, dtype=torch.long)
            where[members] = torch.arange(len(members))
            if len(ranks) == 1:  # the zero pair
                As.append(As[0].new_zeros(rank, self.in_features))
                Bs.append(Bs[0].new_zeros(self.out_features, rank))
                where[-1] = len(members)
            As, Bs = torch.stack(As), torch.stack(Bs)
            if dtype is not None:
                As, Bs = As.to(dtype), Bs.to(dtype)
            stacks.append((where.to(self.weight.device), As, Bs))
        # (tuples, the versions kept apart: a compiled step reads, and dynamo guards, only the tensors)
        stacks = tuple(stacks)
        versions = {n: (A[n]._version, B[n]._version) for n in names}
        if torch.is_grad_enabled():
            self._stacked = self._stacked_from = None
        else:
            self._stacked, self._stacked_from = stacks, ((names, dtype), versions)
        return stacks

    def _checked(self) -> Sequence[str] | None:
        """The adapters whose factors :meth:`_stacks` checks for in-place changes under the row plan (None: all)."""
        if self.rows is None:
            return None
        return self.rows.used if self.rows.check_factors else ()

    def _rows_dropout(self, x: Tensor, names: tuple[str, ...], slot: Tensor) -> Tensor:
        """Each row through its adapter's dropout (one call per distinct dropout rate)."""
        if not self.training:  # dropout is the identity
            return x
        by_rate: dict[float, list[int]] = {}
        for i, name in enumerate(names):
            by_rate.setdefault(self.configs[name].dropout, []).append(i)
        if len(by_rate) == 1:
            return self.lora_dropout[names[0]](x)
        out = torch.zeros_like(x)  # rows without adapter meet the zero slot: any value will do
        for slots in by_rate.values():
            rows = torch.isin(slot, torch.tensor(slots, device=slot.device)).nonzero().squeeze(1)
            out = out.index_copy(0, rows, self.lora_dropout[names[slots[0]]](x[rows]))
        return out


class LoraEmbedding(LoraLayer):
    """LoRA on ``nn.Embedding`` (weight ``(num, dim)``): ``A: (r, num)``, ``B: (dim, r)``.

    As in loralib and PEFT, ``A`` starts at zero and ``B`` Gaussian, and no dropout
    is applied to token ids. ``delta_weight = scaling * (B A)^T``.

    The base output comes from the wrapped module's own forward, so what a subclass
    adds is kept: Gemma's scaled embedding multiplies by ``embed_scale`` (sqrt(hidden)),
    and the LoRA branch is multiplied by it too (as PEFT does), so that merged =
    unmerged. A subclass that changes the output in any other way is refused.
    """

    file_keys = ("lora_embedding_A", "lora_embedding_B")
    input_dropout = False  # token ids: no dropout (as PEFT)

    def __init__(self, base: nn.Module) -> None:
        overridden = type(base).forward is not nn.Embedding.forward
        if overridden and _scalar(getattr(base, "embed_scale", None)) is None:
            raise ValueError(
                f"lorakit cannot put LoRA on {type(base).__name__}: it overrides nn.Embedding.forward "
                "(positions, normalisation, ...) in a way the LoRA update cannot follow; only plain "
                "embeddings and scaled ones (a scalar embed_scale, as Gemma's) are supported"
            )
        super().__init__(base)

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        num, dim = self.weight.shape
        return (r, num), (dim, r)

    @torch.no_grad()
    def init_factors(self, name: str, config: LoraConfig, r: int) -> None:
        """PEFT's embedding factors: ``A = 0`` and ``B`` normal; init "random": both normal."""
        nn.init.normal_(self.lora_B[name])
        if config.init == "random":
            nn.init.normal_(self.lora_A[name])
        else:
            nn.init.zeros_(self.lora_A[name])

    def _embed(self, ids: Tensor, table: Tensor) -> Tensor:
        t = self.base_template
        return F.embedding(ids, table, t.padding_idx, t.max_norm, t.norm_type, t.scale_grad_by_freq, t.sparse)

    def base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        # The wrapped class's forward (scaling and all), called on the class: not a forward patched onto
        # the original instance (accelerate's hooks) that would read the original's weight instead of ``weight``.
        return type(self.base_template).forward(self._plain(weight), x)

    def lora_forward(self, x: Tensor, name: str) -> Tensor:
        h = self._embed(x, self.lora_A[name].T)  # (..., r)
        out = h @ self.lora_B[name].T * self.scaling(name)
        scale = _scalar(self._buffers.get("embed_scale", getattr(self.base_template, "embed_scale", None)),
                        self.weight.dtype)
        return out if scale is None else out * scale.to(device=out.device, dtype=out.dtype)

    def lora_delta(self, name: str) -> Tensor:
        return (_f32(self.lora_B[name]) @ _f32(self.lora_A[name])).T * self.scaling(name)

    def weight_rows(self, weight: Tensor) -> Tensor:
        return weight.T  # (dim, num): DoRA's channels are the embedding's dimensions (PEFT's)

    def rows_to_weight(self, rows: Tensor) -> Tensor:
        return rows.T


def _scalar(value: object, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """``embed_scale`` as a tensor if it is one number (PEFT's ``_get_embed_scale``: a Python
    number in the weight's ``dtype``), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return torch.tensor(value, dtype=dtype)
    if isinstance(value, Tensor) and value.numel() == 1:
        return value
    return None


class LoraConv(LoraLayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (``groups=1``), weight ``(out, in, *k)``.

    ``A: (r, in, *k)`` is a convolution with the base layer's kernel, stride,
    padding and dilation; ``B: (out, r, 1...)`` a 1x1 convolution (PEFT's layout).
    ``delta_weight = scaling * (B.flatten(1) @ A.flatten(1)).view(W.shape)``.
    """

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        out, inp, *kernel = self.weight.shape
        return (r, inp, *kernel), (out, r, *[1] * len(kernel))

    def base_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self.base_template._conv_forward(x, weight, self.bias)

    def lora_branch(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        h = self.base_template._conv_forward(x, A, None)
        conv = F.conv1d if B.dim() == 3 else F.conv2d
        return conv(h, B) * self.scaling(name)

    def lora_delta(self, name: str) -> Tensor:
        A, B = _f32(self.lora_A[name]), _f32(self.lora_B[name])
        return (B.flatten(1) @ A.flatten(1)).view(self.weight.shape) * self.scaling(name)

    def magnitude_shape(self) -> tuple[int, ...]:
        return (1, self.weight.shape[0], *[1] * (self.weight.dim() - 2))  # PEFT's (1, out, 1, ...)


class ModulesToSave(nn.Module):
    """A whole module trained with an adapter (e.g. a classifier head): each adapter
    gets its own trainable copy; the original stays frozen and runs when no adapter
    with a copy is active, or under ``disable_adapters``."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.rows: RowPlan | None = None  # set by lorakit.adapter_per_row
        self.train(original.training)

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original)  # in the original's mode

    def remove_adapter(self, name: str) -> None:
        del self.copies[name]
        if self.active == name:
            self.active = None

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active is None:
            return self.original
        return self.copies[self.active]

    def forward(self, *args, **kwargs):
        if self.rows is None or self.disabled:
            return self.current(*args, **kwargs)
        return self._rows_forward(*args, **kwargs)

    def _rows_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        """Each adapter's copy on its rows, the original on the others. Outputs of
        different widths (heads with different label counts) are zero-padded on the
        last dimension to the widest."""
        names, slot = self.rows.for_layer(tuple(self.copies), x)
        if isinstance(slot, int):  # every row through one module
            return (self.copies[names[slot]] if slot < len(names) else self.original)(x, *args, **kwargs)
        parts, order = [], []
        for i, module in enumerate([self.copies[n] for n in names] + [self.original]):
            rows = (slot == i).nonzero().squeeze(1)
            if len(rows):
                parts.append(module(x[rows], *args, **kwargs))
                order.append(rows)
        width = max(p.shape[-1] for p in parts)
        out = torch.cat([F.pad(p, (0, width - p.shape[-1])) for p in parts])
        return out[torch.cat(order).argsort()]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code may read attributes of the module it expects here.
            return getattr(self.current, name)
