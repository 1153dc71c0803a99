"""lorakit: LoRA (Hu et al., 2021, arXiv:2106.09685) for any PyTorch / Hugging Face model.

    import lorakit
    cfg = lorakit.LoraConfig(r=8, alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = lorakit.add_lora(model, cfg)
    lorakit.save_adapter(model, "out/adapter")
"""

from .config import LoraConfig
from .io import adapter_state_dict, load_adapter, save_adapter
from .layers import LoraConv, LoraEmbedding, LoraLayer, LoraLinear, ModulesToSave, RowPlan
from .model import (
    active_adapters,
    adapter_config,
    adapter_names,
    adapter_per_row,
    add_lora,
    add_weighted_adapter,
    default_target_modules,
    delete_adapter,
    disable_adapters,
    lora_layers,
    lora_parameters,
    mark_trainable,
    merge,
    merge_and_unload,
    set_adapter,
    trainable_parameters,
    unmerge,
)
from .variants import loraplus_param_groups

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lorakit.integrations`` on first use: it imports transformers, which ``import lorakit`` does not."""
    if name == "integrations":
        import importlib

        return importlib.import_module(f"{__name__}.integrations")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "LoraConfig",
    "add_lora",
    "add_weighted_adapter",
    "trainable_parameters",
    "save_adapter",
    "load_adapter",
    "adapter_state_dict",
    "merge",
    "unmerge",
    "merge_and_unload",
    "set_adapter",
    "adapter_per_row",
    "mark_trainable",
    "delete_adapter",
    "disable_adapters",
    "adapter_names",
    "active_adapters",
    "adapter_config",
    "default_target_modules",
    "lora_layers",
    "lora_parameters",
    "LoraLayer",
    "LoraLinear",
    "LoraEmbedding",
    "LoraConv",
    "ModulesToSave",
    "RowPlan",
    "loraplus_param_groups",
]
