"""LoRA configuration: a small frozen dataclass, validated on construction.

The on-disk form is PEFT's ``adapter_config.json`` (``peft_type: "LORA"``,
``r``, ``lora_alpha``, ``target_modules``, ...), so adapter folders written by
lorakit load in ``peft.PeftModel.from_pretrained`` and the other way round.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

__all__ = ["LoraConfig", "CONFIG_NAME"]

CONFIG_NAME = "adapter_config.json"

Bias = Literal["none", "all", "lora_only"]
Init = Literal["kaiming", "gaussian", "random"]

# PEFT field name -> lorakit field name, for the fields whose names differ.
_PEFT_NAMES = {"lora_alpha": "alpha", "lora_dropout": "dropout", "init_lora_weights": "init"}
_REQUIRED_PEFT_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules")
# PEFT options that change the maths, at the value meaning "off": lorakit refuses any other
# value rather than ignore it (and writes these values into its own files).
_UNSUPPORTED_PEFT_OPTIONS = {
    "layers_to_transform": None,
    "layer_replication": None,
    "lora_bias": False,
    "trainable_token_indices": None,
    "target_parameters": None,
    "exclude_modules": None,
    "megatron_config": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "ensure_weight_tying": False,
}
# PEFT keys with no effect on an adapter's outputs (bookkeeping, or settings that only
# matter together with an option above), read and dropped.
_PEFT_METADATA = ("peft_type", "auto_mapping", "peft_version", "revision", "inference_mode", "megatron_core",
                  "runtime_config", "qalora_group_size", "layers_pattern", "fan_in_fan_out")


_Cls = TypeVar("_Cls", bound=type)


def _peft_keywords(cls: _Cls) -> _Cls:
    """Let ``cls(...)`` take PEFT's option names as files do: at PEFT's "off" value an option
    is accepted (lorakit always behaves so) and dropped, any other value is refused by name
    (:func:`_refuse_unsupported`); a keyword nobody knows is a ``TypeError`` naming it."""
    fields_init = cls.__init__

    @functools.wraps(fields_init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _refuse_unsupported(kwargs, "LoraConfig(...)")
        # PEFT's inference_mode (in most PEFT snippets) says whether PEFT freezes the factors: no effect on outputs
        kwargs = {k: v for k, v in kwargs.items() if k not in _UNSUPPORTED_PEFT_OPTIONS and k != "inference_mode"}
        known = {f.name for f in dataclasses.fields(cls)} | set(_PEFT_NAMES)  # fields and PEFT's names (InitVars)
        unknown = sorted(kwargs.keys() - known)
        if unknown:
            raise TypeError(_unknown_keywords(unknown, known))
        fields_init(self, *args, **kwargs)

    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def _unknown_keywords(unknown: list[str], known: set[str]) -> str:
    """The message for keywords ``LoraConfig`` does not take, with the likely intended name."""
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, sorted(known | _UNSUPPORTED_PEFT_OPTIONS.keys()), n=1)
        if name in _PEFT_METADATA:
            hints.append(f"{name} is a PEFT setting LoraConfig does not take: leave it out")
        elif close:
            hints.append(f"did you mean {close[0]!r} for {name!r}?")
    return (f"LoraConfig got unexpected keyword argument(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
            + f"; it takes {', '.join(sorted(known))}, and PEFT's other options at their off values (docs/PEFT.md)")


def _refuse_unsupported(options: Mapping[str, Any], source: str) -> None:
    """Refuse each PEFT option of ``options`` (a file's dict or keywords) set to anything but its
    "off" value: lorakit would compute something else than the option asks."""
    for key, off in _UNSUPPORTED_PEFT_OPTIONS.items():
        if key == "target_parameters" and options.get(key) == []:  # PEFT 0.21 writes [] for MoE models: none
            continue
        if options.get(key) not in (None, off):
            raise ValueError(f"{source} sets {key}={options[key]!r}, which lorakit does not support "
                             f"(only PEFT's off value {off!r} is accepted)")


def _refuse_non_finite(d: Mapping[str, Any], source: str) -> None:
    """JSON files may hold ``Infinity`` / ``NaN`` (Python's json reads them); no LoRA setting is one."""
    for key, value in d.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{source} sets {key}={value!r}; every number of a LoRA config must be finite")


@_peft_keywords
@dataclass(frozen=True)
class LoraConfig:
    """Hyper-parameters of one LoRA adapter (paper section 4.1).

    A layer with frozen weight ``W0: (out, in)`` computes
    ``h = W0 x + scaling * B A dropout(x)`` with ``A: (r, in)``, ``B: (out, r)``,
    ``B = 0`` at initialisation and ``scaling = alpha / r``
    (``alpha / sqrt(r)`` with ``use_rslora``).
    """

    r: int = 8
    """Rank of the update ``B A``."""
    alpha: float = 8.0
    """Numerator of the scaling ``alpha / r`` (PEFT's ``lora_alpha``)."""
    target_modules: tuple[str, ...] | str | None = None
    """Module-name suffixes, one full-match regex, ``"all-linear"``, or None for
    the model's attention query/value projections."""
    dropout: float = 0.0
    """Dropout probability on the input of the LoRA branch."""
    bias: Bias = "none"
    """Which biases train: none, all biases of the model, or those of adapted layers."""
    init: Init = "kaiming"
    """Initialisation of ``A``: Kaiming-uniform (PEFT/loralib) or Gaussian (paper text), ``B = 0``; or
    ``random`` (PEFT's ``init_lora_weights=False``): ``B`` random too, as PEFT's layers' default
    init (Kaiming-uniform; embeddings: both factors standard normal), so a new adapter changes
    the outputs (tests, debugging)."""
    use_rslora: bool = False
    """Rank-stabilised scaling ``alpha / sqrt(r)``."""
    modules_to_save: tuple[str, ...] = ()
    """Module-name suffixes of whole modules trained and saved with the adapter."""
    enable_lora: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    """Fused projections adapted on some output slices only, e.g.
    ``{"c_attn": (True, False, True)}`` adapts GPT-2's q and v, not k
    (``loralib.MergedLinear``). lorakit-only: PEFT cannot load such adapters."""
    base_model_name_or_path: str | None = None
    """Recorded in the adapter file, as PEFT does."""
    task_type: str | None = None
    """PEFT's task type, recorded so PEFT picks the right model class."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA, Liu et al. 2024, section 4): the adapted weight is
    ``m * (W0 + scaling B A) / ||W0 + scaling B A||`` with the norm taken per output channel and a
    trained magnitude ``m`` initialised to that norm (see :mod:`lorakit.variants`)."""
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    """Ranks other than ``r`` for some layers (PEFT's ``rank_pattern``): a key is a regex that
    matches module name ``n`` when ``re.match(rf"(.*\\.)?({key})$", n)``, the first matching key
    wins, e.g. ``{"v_proj": 16}`` or ``{"^model.layers.0.self_attn.q_proj": 4}``."""
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    """Alphas other than ``alpha`` for some layers, matched as ``rank_pattern``."""
    # PEFT's names for alpha, dropout and init, accepted as keywords: LoraConfig(r=8, lora_alpha=16).
    lora_alpha: dataclasses.InitVar[float | None] = None
    lora_dropout: dataclasses.InitVar[float | None] = None
    init_lora_weights: dataclasses.InitVar[bool | str | None] = None

    def __post_init__(self, lora_alpha: float | None = None, lora_dropout: float | None = None,
                      init_lora_weights: bool | str | None = None) -> None:
        self._take_peft_names(lora_alpha, lora_dropout, init_lora_weights)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got r={self.r!r}")
        if (not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0
                or not math.isfinite(self.alpha)):  # inf would make every output inf or NaN
            raise ValueError(f"alpha must be a finite positive number, got alpha={self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got bias={self.bias!r}")
        if self.init not in ("kaiming", "gaussian", "random"):
            raise ValueError(f"init must be 'kaiming', 'gaussian' or 'random', got init={self.init!r}")
        _freeze(self, "target_modules", _names(self.target_modules, "target_modules", allow_str=True))
        _freeze(self, "modules_to_save", _names(self.modules_to_save, "modules_to_save") or ())
        masks = {}
        for name, mask in dict(self.enable_lora).items():
            mask = tuple(mask)
            if not mask or not all(isinstance(m, bool) for m in mask) or not any(mask):
                raise ValueError(
                    f"enable_lora[{name!r}] must be a non-empty sequence of booleans with at least "
                    f"one True, e.g. (True, False, True); got {mask!r}"
                )
            masks[name] = mask
        _freeze(self, "enable_lora", masks)
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"use_dora must be True or False, got use_dora={self.use_dora!r}")
        _freeze(self, "rank_pattern", _pattern(self.rank_pattern, "rank_pattern", "a positive integer (a rank)"))
        _freeze(self, "alpha_pattern", _pattern(self.alpha_pattern, "alpha_pattern", "a finite positive number"))

    def _take_peft_names(self, lora_alpha, lora_dropout, init_lora_weights) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if init_lora_weights is not None:
            init_lora_weights = _init_of(init_lora_weights, "init_lora_weights")
        for peft_name, value in (("lora_alpha", lora_alpha), ("lora_dropout", lora_dropout),
                                 ("init_lora_weights", init_lora_weights)):
            ours = _PEFT_NAMES[peft_name]
            if value is None:
                continue
            if getattr(self, ours) != defaults[ours] and getattr(self, ours) != value:
                raise ValueError(f"give {ours} or PEFT's {peft_name}, not both ({getattr(self, ours)!r} vs {value!r})")
            _freeze(self, ours, value)

    @property
    def scaling(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def rank_alpha(self, module: str | None) -> tuple[int, float]:
        """The rank and alpha of this adapter on the module named ``module`` (its path in the model):
        the value of the first key of ``rank_pattern`` / ``alpha_pattern`` that matches it (PEFT's
        ``get_pattern_key``), else ``r`` / ``alpha``. ``None``: no pattern applies."""
        if module is None:
            return self.r, self.alpha
        return _pattern_value(self.rank_pattern, module, self.r), _pattern_value(self.alpha_pattern, module, self.alpha)

    def scaling_of(self, r: int, alpha: float) -> float:
        """The scaling of a layer with rank ``r`` and alpha ``alpha`` (``rank_alpha``'s values)."""
        return alpha / (math.sqrt(r) if self.use_rslora else r)

    # ---- PEFT's adapter_config.json -------------------------------------------------

    def to_peft_dict(self) -> dict[str, Any]:
        """The fields of PEFT's ``LoraConfig`` that describe this adapter."""
        d: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": (
                self.target_modules if isinstance(self.target_modules, str) or self.target_modules is None
                else list(self.target_modules)
            ),
            "bias": self.bias,
            "init_lora_weights": {"kaiming": True, "gaussian": "gaussian", "random": False}[self.init],
            "use_rslora": self.use_rslora,
            "modules_to_save": list(self.modules_to_save) or None,
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_dora": self.use_dora,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            **_UNSUPPORTED_PEFT_OPTIONS,
        }
        if self.enable_lora:
            d["enable_lora"] = {k: list(v) for k, v in self.enable_lora.items()}
        return d

    @classmethod
    def from_peft_dict(cls, d: Mapping[str, Any], source: str = "adapter config") -> LoraConfig:
        """Build from a PEFT ``adapter_config.json`` dict; refuse what lorakit cannot honour."""
        missing = [k for k in _REQUIRED_PEFT_FIELDS if k not in d]
        if missing:
            raise ValueError(
                f"{source} is missing required field(s) {missing}; a PEFT LoRA config needs {list(_REQUIRED_PEFT_FIELDS)}"
            )
        if d["peft_type"] != "LORA":
            raise ValueError(f"{source} has peft_type={d['peft_type']!r}; lorakit reads only 'LORA' adapters")
        _refuse_non_finite(d, source)
        if isinstance(d.get("target_parameters"), list | tuple | set) and not d["target_parameters"]:
            d = {**d, "target_parameters": None}  # PEFT 0.21 writes [] for MoE models: no parameter targeted
        if d.get("target_parameters") is not None:
            raise ValueError(f"{source} sets target_parameters={d['target_parameters']!r} (LoRA on parameters such as "
                             "a mixture-of-experts model's router and fused experts), which lorakit does not support; "
                             "adapters on modules only (e.g. the attention) load")
        if d.get("ensure_weight_tying"):
            raise ValueError(f"{source} sets ensure_weight_tying={d['ensure_weight_tying']!r} (PEFT then also puts "
                             "a LoRA tied to the input embedding's on the tied output embedding), which lorakit does "
                             "not support; without it the tied head keeps the base weight, as in PEFT")
        _refuse_unsupported(d, source)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if _PEFT_NAMES.get(k, k) not in fields
                         and k not in _UNSUPPORTED_PEFT_OPTIONS and k not in _PEFT_METADATA)
        if unknown:
            raise ValueError(f"{source} has key(s) {unknown} that lorakit does not know; it refuses rather than "
                             "ignore what may change the adapter's outputs (a newer PEFT option?)")
        kwargs = {_PEFT_NAMES.get(k, k): v for k, v in d.items() if _PEFT_NAMES.get(k, k) in fields}
        kwargs["init"] = _init_of(d.get("init_lora_weights", True), f"{source} has init_lora_weights")
        if kwargs.get("modules_to_save") is None:
            kwargs["modules_to_save"] = ()
        for key, off in (("enable_lora", {}), ("use_dora", False), ("rank_pattern", {}), ("alpha_pattern", {})):
            if kwargs.get(key) is None:  # PEFT's null: the option is off
                kwargs[key] = off
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def coerce(cls, config: Any) -> LoraConfig:
        """``config`` itself, or a ``peft.LoraConfig`` / a dict of PEFT's keys as a lorakit config
        (PEFT's defaults for what the dict leaves out; unsupported options refused by name)."""
        if isinstance(config, cls):
            return config
        if hasattr(config, "to_dict") and type(config).__name__ == "LoraConfig":  # peft.LoraConfig
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a lorakit.LoraConfig, a peft.LoraConfig or a dict, got {type(config).__name__}")
        d = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": None, **config}
        d = {k: getattr(v, "value", v) for k, v in d.items()}  # PEFT's enums (PeftType.LORA) as their strings
        return cls.from_peft_dict(d, source="the PEFT config")

    def to_json(self) -> str:
        """PEFT's ``adapter_config.json`` text, keys sorted; the keys of ``rank_pattern`` and
        ``alpha_pattern`` keep their order (the first matching key wins)."""
        d = self.to_peft_dict()
        return json.dumps({k: d[k] for k in sorted(d)}, indent=2) + "\n"

    @classmethod
    def load(cls, directory: str | Path) -> LoraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"no {CONFIG_NAME} in {str(directory)!r}; expected a PEFT/lorakit adapter folder")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(d).__name__}")
        return cls.from_peft_dict(d, source=str(path))


def _init_of(init_lora_weights: Any, what: str) -> str:
    """lorakit's ``init`` for PEFT's ``init_lora_weights``: true, "gaussian" or false (random B);
    PiSSA, OLoRA, LoftQ and other data-driven inits change the base weights: refused."""
    inits = {True: "kaiming", "gaussian": "gaussian", False: "random"}
    if not isinstance(init_lora_weights, bool | str) or init_lora_weights not in inits:
        raise ValueError(f"{what}={init_lora_weights!r}; lorakit supports true, false (random B, as PEFT) or 'gaussian'")
    return inits[init_lora_weights]


def _names(value: Any, arg: str, allow_str: bool = False) -> tuple[str, ...] | str | None:
    if value is None or (allow_str and isinstance(value, str)):
        if isinstance(value, str) and not value:
            raise ValueError(f"{arg} must not be an empty string")
        return value
    if isinstance(value, str) or not isinstance(value, Sequence | set | frozenset):
        raise TypeError(f"{arg} must be a list of module names, got {value!r}")
    names = tuple(sorted(value)) if isinstance(value, set | frozenset) else tuple(value)
    if not all(isinstance(n, str) and n for n in names):
        raise TypeError(f"{arg} must hold non-empty strings, got {value!r}")
    if allow_str and not names:
        raise ValueError(f"{arg} must not be empty; pass None for the model's query/value projections")
    return names


def _pattern(value: Any, arg: str, expected: str) -> dict[str, int | float]:
    """``rank_pattern`` / ``alpha_pattern`` checked: module-name regexes to ranks (alphas)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{arg} must be a mapping of module-name regexes to values, e.g. {{'v_proj': 16}}, got {value!r}")
    rank = arg == "rank_pattern"
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"{arg} keys must be non-empty strings (module-name regexes), got {key!r}")
        try:
            re.compile(rf"(.*\.)?({key})$")
        except re.error as e:
            raise ValueError(f"{arg} key {key!r} is not a valid regular expression ({e}); escape special "
                             "characters (re.escape) to name a module literally") from None
        number = isinstance(v, int | float) and not isinstance(v, bool)
        if not number or not v > 0 or not math.isfinite(v) or (rank and not isinstance(v, int)):
            raise ValueError(f"{arg}[{key!r}] must be {expected}, got {v!r}")
    return dict(value)


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` then ``pattern.get(key, default)``: the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", module)``; without one, ``module`` itself is looked up."""
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), module)
    return pattern.get(key, default)


def _freeze(cfg: LoraConfig, name: str, value: Any) -> None:
    object.__setattr__(cfg, name, value)
