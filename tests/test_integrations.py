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


def _llama_trainer(tmp_path, seed: int, max_steps: int = 2):
    """A Trainer on a tiny tied-embedding Llama with a LoRA adapter (A drawn from ``seed``)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    torch.manual_seed(seed)
    model = lorakit.add_lora(base, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": x, "labels": x} for x in torch.randint(0, 99, (8, 10), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=max_steps, save_steps=1,
                             learning_rate=5e-2, report_to=[], use_cpu=True, logging_strategy="no", seed=0)
    return model, Trainer(model=model, args=args, train_dataset=rows, callbacks=[SaveAdapterCallback()])


def test_trainer_checkpoints_hold_the_trainable_tensors_only_and_resume_from_them(tmp_path):
    from safetensors.torch import load_file

    model, trainer = _llama_trainer(tmp_path / "whole", seed=1)
    trainer.train()
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    for step in (1, 2):
        folder = tmp_path / "whole" / f"checkpoint-{step}"
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        assert load_file(folder / "model.safetensors").keys() == trained.keys()  # no frozen base, no tied lm_head
        assert (folder / "model.safetensors").stat().st_size < 2 * (folder / "adapter_model.safetensors").stat().st_size
    assert model._keys_to_ignore_on_save == set()  # the model's own list is back: a later save is whole
    # resuming from checkpoint-1 (a fresh adapter, other random A) ends where the whole run ended
    fresh, trainer = _llama_trainer(tmp_path / "resumed", seed=7)
    assert not torch.equal(dict(fresh.named_parameters())[next(iter(trained))], next(iter(trained.values())))
    trainer.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-1"))
    for name, p in fresh.named_parameters():
        if name in trained:
            torch.testing.assert_close(p.detach(), trained[name], rtol=0, atol=0, msg=name)


def test_integrations_is_reached_from_import_lorakit_without_importing_transformers():
    import subprocess
    import sys

    code = ("import lorakit, sys; assert 'transformers' not in sys.modules; "
            "assert lorakit.integrations.SaveAdapterCallback.__name__ == 'SaveAdapterCallback'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_under_the_trainers_fsdp_the_checkpoints_adapters_are_saved_unverified_and_it_says_so(tmp_path):
    from types import SimpleNamespace

    from lorakit.receipt import RECEIPT_NAME

    model, _ = _llama_trainer(tmp_path, seed=1)
    callback = SaveAdapterCallback()
    with pytest.warns(UserWarning, match="carry no receipt"):
        callback._save(model, tmp_path / "a", SimpleNamespace(fsdp="full_shard", deepspeed=None))
    callback._save(model, tmp_path / "b", SimpleNamespace(fsdp="full_shard", deepspeed=None))  # (said once)
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file() and not (tmp_path / "b" / RECEIPT_NAME).exists()
    callback._save(model, tmp_path / "c", SimpleNamespace(fsdp="", deepspeed=None))
    assert (tmp_path / "c" / RECEIPT_NAME).is_file()
