"""Building a causal LM on the meta device and filling it (lorakit.training.materialise): the same
weights, buffers and ties as from_pretrained, LoRA factors drawn as on a loaded base, random weights
for a folder with only a config, and one-line errors."""

import shutil
from pathlib import Path

import pytest
import torch
import transformers as T

from conftest import _tiny_lm_folder
from lorakit import LoraConfig, add_lora
from lorakit.tasks.lm import load_causal_lm
from lorakit.training.materialise import Checkpoint, has_meta, materialise


def _tied_llama(folder: Path) -> str:
    """tiny_llama's shape with tied input and output embeddings (SmolLM2's layout)."""
    path = _tiny_lm_folder(folder, "llama")
    config = T.AutoConfig.from_pretrained(path)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    T.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _config_only(source: str, folder: Path) -> str:
    """``source`` without its weights: the config and the tokenizer files."""
    folder.mkdir()
    for f in Path(source).iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copy(f, folder)
    return str(folder)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@pytest.mark.parametrize("arch", ["llama-tied", "gpt2", "gpt_neox"])  # tied; "h.0..." keys; "embed_out" renamed
def test_an_empty_model_filled_from_the_checkpoint_is_from_pretrained(arch, tmp_path):
    path = _tied_llama(tmp_path) if arch == "llama-tied" else _tiny_lm_folder(tmp_path, arch)
    _, loaded = load_causal_lm(path)
    _, model = load_causal_lm(path, empty=True)
    assert has_meta(model) and all(t.is_meta for t in _state(model).values())
    materialise(model, "cpu", Checkpoint.find(path))
    assert not has_meta(model)
    want, got = _state(loaded), _state(model)
    assert want.keys() == got.keys()
    for name in want:  # rotary inv_freq included: recomputed, never in a checkpoint
        assert torch.equal(got[name], want[name]), name
    tied = loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    assert tied == (arch != "gpt_neox")
    ids = torch.randint(0, 100, (2, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_lora_on_an_empty_base_draws_the_factors_of_a_loaded_one(tmp_path):
    path = _tied_llama(tmp_path)
    adapters = []
    for empty in (False, True):
        torch.manual_seed(3)
        _, model = load_causal_lm(path, empty=empty)
        add_lora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj", "up_proj")))
        factors = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert len(factors) == 12 and not any(p.is_meta for p in factors.values())
        if empty:
            materialise(model, "cpu", Checkpoint.find(path))
        adapters.append((factors, torch.randn(3), _state(model)))
    (a, next_a, state_a), (b, next_b, state_b) = adapters
    assert all(torch.equal(a[n], b[n]) for n in a) and torch.equal(next_a, next_b)  # and the random state after
    assert all(torch.equal(state_a[n], state_b[n]) for n in state_a)


def test_a_folder_with_only_a_config_gives_seeded_random_weights(tmp_path):
    source = _tied_llama(tmp_path / "source")
    path = _config_only(source, tmp_path / "config-only")
    assert Checkpoint.find(path) is None
    torch.manual_seed(0)
    _, one = load_causal_lm(path)
    torch.manual_seed(1)  # the run's seed does not change the model
    _, two = load_causal_lm(path)
    _, empty = load_causal_lm(path, empty=True)
    materialise(empty, "cpu", None)
    for name, value in _state(one).items():
        assert torch.equal(_state(two)[name], value) and torch.equal(_state(empty)[name], value), name
    embeddings = one.get_input_embeddings().weight
    assert one.get_output_embeddings().weight is embeddings
    assert 0.015 < embeddings.std().item() < 0.025  # transformers' init: normal, std initializer_range 0.02
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(32)) for layer in one.model.layers)
    _, loaded = load_causal_lm(source)
    torch.testing.assert_close(one.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq, rtol=0, atol=0)
    assert not torch.equal(embeddings, loaded.get_input_embeddings().weight)


def test_missing_tensors_are_named_in_one_error(tmp_path):
    path = _tiny_lm_folder(tmp_path, "llama")
    from safetensors.torch import load_file, save_file

    weights = load_file(Path(path) / "model.safetensors")
    del weights["lm_head.weight"], weights["model.norm.weight"]
    save_file(weights, Path(path) / "model.safetensors")
    _, model = load_causal_lm(path, empty=True)
    with pytest.raises(ValueError, match=r"the checkpoint has no tensor for 2 parameter\(s\) of the model: "
                                         r"model\.norm\.weight, lm_head\.weight$"):
        materialise(model, "cpu", Checkpoint.find(path))


def test_a_folder_of_other_weight_files_is_refused(tmp_path):
    path = _tiny_lm_folder(tmp_path, "llama")
    (Path(path) / "model.safetensors").rename(Path(path) / "pytorch_model.bin")
    with pytest.raises(ValueError, match="reads safetensors files, and this folder holds pytorch_model.bin; save the "
                                         "model with save_pretrained"):
        Checkpoint.find(path)


def test_fsdp_refuses_dora_for_causal_lms(tiny_llama, tmp_path):
    from lorakit import tasks, train

    cfg = train.TrainConfig(task="e2e", model=tiny_llama, out=str(tmp_path), fsdp=True, use_dora=True, precision="fp32")
    with pytest.raises(ValueError, match="--fsdp with --use-dora: DoRA's magnitude is computed from the whole base"):
        tasks.create(cfg).load_model(tiny_llama)
