"""transformers' ``Trainer`` with a lorakit-adapted model.

``model.save_pretrained`` on an adapted model writes the whole model with lorakit's own
parameter names; what PEFT users expect in each checkpoint is the adapter in PEFT's
format. :class:`SaveAdapterCallback` writes it there::

    lorakit.add_lora(model, cfg)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[lorakit.integrations.SaveAdapterCallback()])

Every ``checkpoint-<step>/`` then holds ``adapter_config.json``,
``adapter_model.safetensors`` (loadable by ``peft.PeftModel.from_pretrained`` and
:func:`lorakit.load_adapter`) and ``receipt.safetensors`` (:mod:`lorakit.receipt`), and
``output_dir`` gets the adapter at the end of training.
The checkpoint's own ``model.safetensors`` holds the trainable tensors only (lorakit's
names), not the frozen base: ``Trainer.train(resume_from_checkpoint=...)`` loads that file
non-strictly into the model, so resuming restores the factors, and a checkpoint weighs
what a PEFT model's does.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .io import save_adapter
from .model import frozen_parameter_names

__all__ = ["SaveAdapterCallback"]


class SaveAdapterCallback(TrainerCallback):
    """Save ``adapter`` (default: the active one) in PEFT's format with every Trainer checkpoint,
    and keep the frozen parameters out of the checkpoint's ``model.safetensors``.

    The Trainer writes checkpoints only in its log / evaluate / save phase, which follows
    ``on_step_end`` and ``on_epoch_end``; for that phase the model's
    ``_keys_to_ignore_on_save`` (what ``save_pretrained`` leaves out) also names every
    frozen parameter, and the next step, epoch or save puts the model's own list back.
    """

    def __init__(self, adapter: str | None = None) -> None:
        self.adapter = adapter
        self._changed: tuple[nn.Module, Any] | None = None  # (model, its own list) while it is replaced
        self._said_unverified = False

    def _leave_frozen_out(self, model: nn.Module | None) -> None:
        model = getattr(model, "module", model)  # (unwrapped from DDP)
        if self._changed is not None or not hasattr(model, "_keys_to_ignore_on_save"):
            return  # a plain nn.Module: the Trainer writes its state dict itself, whole
        own = model._keys_to_ignore_on_save
        self._changed = (model, own)
        model._keys_to_ignore_on_save = set(own or ()) | frozen_parameter_names(model)

    def _put_back(self) -> None:
        if self._changed is not None:
            model, own = self._changed
            model._keys_to_ignore_on_save = own
            self._changed = None

    def _save(self, model, folder: Path, args) -> None:
        # Process 0 alone saves here, and a receipt's probes and fingerprints would need every process under the
        # Trainer's FSDP or DeepSpeed (sharded weights): none there (lorakit train --fsdp makes it with all of them).
        sharded = bool(getattr(args, "fsdp", None)) or bool(getattr(args, "deepspeed", None))
        if sharded and not self._said_unverified:
            warnings.warn("under the Trainer's FSDP or DeepSpeed the adapters saved with its checkpoints carry no receipt "
                          "(receipt.safetensors): lorakit verify and lorakit serve will call them unverified; lorakit "
                          "train --fsdp writes one", stacklevel=2)
            self._said_unverified = True
        save_adapter(getattr(model, "module", model), folder, self.adapter, receipt=not sharded)  # (unwrapped from DDP)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._leave_frozen_out(model)
        return control

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self._leave_frozen_out(model)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._put_back()
        return control

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._put_back()
        return control

    def on_save(self, args, state, control, model=None, **kwargs):
        self._put_back()
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir) / f"checkpoint-{state.global_step}", args)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._put_back()
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir), args)
        return control
