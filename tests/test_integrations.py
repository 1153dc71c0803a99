"""transformers.Trainer on a lorakit-adapted model writes PEFT adapters with each checkpoint."""

import pytest
import torch

import lorakit
from helpers import MODEL_TOL, clone, ids, output, tiny_bert
from lorakit.integrations import SaveAdapterCallback

peft = pytest.importorskip("peft")


def test_trainer_checkpoints_hold_peft_adapters(tmp_path):
    from transformers import Trainer, TrainingArguments

    base = tiny_bert()
    model = lorakit.add_lora(clone(base), lorakit.LoraConfig(r=4, alpha=8, target_modules=["query", "value"],
                                                             modules_to_save=["classifier"], task_type="SEQ_CLS"))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 99, (10,), generator=g), "labels": torch.tensor(i % 2)} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_steps=1,
                             learning_rate=5e-2, report_to=[], use_cpu=True, logging_strategy="no")
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveAdapterCallback()]).train()
    model.eval()
    for folder in (tmp_path / "checkpoint-1", tmp_path / "checkpoint-2", tmp_path):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    x = ids()
    assert not torch.allclose(output(model, x), output(base, x))  # it trained
    theirs = peft.PeftModel.from_pretrained(clone(base), tmp_path / "checkpoint-2").eval()
    torch.testing.assert_close(output(theirs, x), output(model, x), **MODEL_TOL)
    ours = lorakit.load_adapter(clone(base), tmp_path).eval()
    torch.testing.assert_close(output(ours, x), output(model, x), **MODEL_TOL)
