"""transformers' ``Trainer`` with a lorakit-adapted model.

``model.save_pretrained`` on an adapted model writes the whole model with lorakit's own
parameter names; what PEFT users expect in each checkpoint is the adapter in PEFT's
format. :class:`SaveAdapterCallback` writes it there::

    lorakit.add_lora(model, cfg)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[lorakit.integrations.SaveAdapterCallback()])

Every ``checkpoint-<step>/`` then holds ``adapter_config.json`` and
``adapter_model.safetensors`` (loadable by ``peft.PeftModel.from_pretrained`` and
:func:`lorakit.load_adapter`), and ``output_dir`` gets the adapter at the end of training.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from .io import save_adapter

__all__ = ["SaveAdapterCallback"]


class SaveAdapterCallback(TrainerCallback):
    """Save ``adapter`` (default: the active one) in PEFT's format with every Trainer checkpoint."""

    def __init__(self, adapter: str | None = None) -> None:
        self.adapter = adapter

    def _save(self, model, folder: Path) -> None:
        save_adapter(getattr(model, "module", model), folder, self.adapter)  # (unwrapped from DDP)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir))
        return control
