"""Generation on tiny GPT-2 and Llama models built in memory: a padded batch equals each prompt alone
(greedy and beam), per-row adapters equal each adapter alone, merged equals unmerged, seeded sampling
repeats, and every Decoding error is pinned.

The models run in float64 because these tests compare token ids exactly: random tiny models have
near-flat logits, and in float32 a padded batch and a lone prompt sum in different orders, so a
near-tie between two tokens could flip the argmax. float64 keeps what is tested (padding, masks,
position ids, beam bookkeeping, adapter routing) and removes the rounding noise; a bug in any of
them changes logits by far more than float32 rounding.
"""

import dataclasses

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, NoRepeatNGramLogitsProcessor, PreTrainedTokenizerFast

import lorakit
from helpers import randomize
from lorakit import LoraConfig
from lorakit.generate import PAPER_DECODING, Decoding, _CompletionNoRepeatNGram, generate, generate_ids

PAD, EOS, VOCAB = 1, 2, 99
LENGTHS = (5, 9, 3, 12, 7, 4, 10, 6)
GREEDY = Decoding(max_new_tokens=20)
BEAM = Decoding(max_new_tokens=20, strategy="beam", num_beams=4, length_penalty=0.9, no_repeat_ngram_size=3)


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=EOS, eos_token_id=EOS)
    return _stopping(GPT2LMHeadModel(cfg), 3.0)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return _stopping(LlamaForCausalLM(cfg), 1.5)


def _stopping(model, boost: float):
    """float64, eval, and EOS's output row scaled up so that some completions end early (a random
    model almost never picks one given token otherwise, and EOS handling would go untested)."""
    model = model.double().eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] *= boost
    return model


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


class _NoRepeatInCompletion(LogitsProcessor):
    """Reference n-gram ban, written out: after the completion's last n-1 tokens, ban every token
    that followed those n-1 tokens earlier in the completion (the prompt does not count)."""

    def __init__(self, n: int, prompt_len: int):
        self.n, self.start = n, prompt_len

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        for row, seq in enumerate(input_ids[:, self.start :].tolist()):
            tail = seq[len(seq) - self.n + 1 :] if self.n > 1 else []
            for j in range(len(seq) - self.n + 1):
                if seq[j : j + self.n - 1] == tail:
                    scores[row, seq[j + self.n - 1]] = -float("inf")
        return scores


def _alone(model, prompt: list[int], d: Decoding) -> list[int]:
    """transformers' generate on one unpadded prompt, cut before EOS: the oracle."""
    beam = dict(length_penalty=d.length_penalty, early_stopping="never") if d.strategy == "beam" else {}
    ban = [_NoRepeatInCompletion(d.no_repeat_ngram_size, len(prompt))] if d.no_repeat_ngram_size else []
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=d.max_new_tokens, do_sample=False, num_beams=d.num_beams, pad_token_id=PAD,
                             eos_token_id=EOS, logits_processor=LogitsProcessorList(ban), **beam)
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(EOS)] if EOS in tokens else tokens


def _has_repeated_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[j : j + n]) for j in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


def _with_three_adapters(model):
    """Adapters a (r=2) and b (r=4) on the default q/v projections, c (r=8) on every linear layer,
    all with random B so that each changes the completions."""
    for name, r, targets in (("a", 2, None), ("b", 4, None), ("c", 8, "all-linear")):
        lorakit.add_lora(model, LoraConfig(r=r, alpha=2 * r, target_modules=targets), adapter=name)
    randomize(model, seed=3, std=0.3)
    return model


@pytest.mark.parametrize("decoding", [GREEDY, BEAM], ids=["greedy", "beam"])
@pytest.mark.parametrize("arch", MODELS)
def test_padded_batches_equal_each_prompt_alone(arch, decoding):
    model, prompts = MODELS[arch](), _prompts()
    # pad_id None pads with EOS, as for tokenizers without a pad token: transformers cannot then
    # tell padding from the ids, so the attention mask passed in is what keeps it out.
    got = generate_ids(model, prompts, pad_id=None, eos_id=EOS, decoding=decoding, batch_size=3)
    assert got == [_alone(model, p, decoding) for p in prompts]
    assert any(len(c) < decoding.max_new_tokens for c in got)  # EOS ended some completions
    assert len({len(p) for p in prompts}) == len(prompts)  # every batch holds prompts of different lengths
    if decoding.no_repeat_ngram_size:
        n = decoding.no_repeat_ngram_size
        assert not any(_has_repeated_ngram(c, n) for c in got)
        free = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=Decoding(max_new_tokens=20, strategy="beam",
                                                                                        num_beams=4, length_penalty=0.9))
        assert any(_has_repeated_ngram(c, n) for c in free)  # the ban was needed


def test_greedy_without_stop_runs_to_max_and_cuts_to_the_stopped_completion():
    model, prompts = tiny_gpt2(), _prompts()
    stopped = generate_ids(model, prompts, pad_id=PAD, eos_id=[EOS], decoding=GREEDY)
    full = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=Decoding(max_new_tokens=20, stop_at_eos=False))
    assert all(len(c) == 20 for c in full)
    assert any(EOS in c for c in full)
    assert [c[: c.index(EOS)] if EOS in c else c for c in full] == stopped


@pytest.mark.parametrize("decoding", [GREEDY, BEAM], ids=["greedy", "beam"])
@pytest.mark.parametrize("arch", MODELS)
def test_per_row_adapters_equal_each_adapter_alone(arch, decoding):
    model, prompts = _with_three_adapters(MODELS[arch]()), _prompts()
    names = ["a", "b", None, "c", "c", None, "b", "a"]
    got = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=decoding, adapters=names, batch_size=4)
    assert lorakit.active_adapters(model) == ("a",)  # per-row routing did not switch the model's adapter
    expected, base = [], []
    for prompt, name in zip(prompts, names):
        with lorakit.disable_adapters(model):
            base.append(_alone(model, prompt, decoding))
        if name is None:
            expected.append(base[-1])
        else:
            lorakit.set_adapter(model, name)
            expected.append(_alone(model, prompt, decoding))
    assert got == expected
    for name in ("a", "b", "c"):  # each adapter changes some of its prompts' completions
        assert any(g != b for g, b, n in zip(got, base, names) if n == name), name


@pytest.mark.parametrize("arch", MODELS)
def test_merged_equals_unmerged_text(arch):
    model, tokenizer = MODELS[arch](), _word_tokenizer()
    lorakit.add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model, seed=3, std=0.3)
    texts = [" ".join(f"w{t}" for t in p) for p in _prompts()]
    unmerged = generate(model, tokenizer, texts, decoding=GREEDY)
    with lorakit.disable_adapters(model):
        assert generate(model, tokenizer, texts, decoding=GREEDY) != unmerged
    lorakit.merge(model)
    assert generate(model, tokenizer, texts, decoding=GREEDY) == unmerged
    lorakit.unmerge(model)
    assert generate(model, tokenizer, texts, decoding=GREEDY, adapters=["default"] * len(texts)) == unmerged
    assert all(set(t.split()) <= {f"w{i}" for i in range(3, VOCAB)} | {"<s>"} for t in unmerged)  # no pad/EOS left


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """Words w3..w98 are ids 3..98; ``</s>`` (2) is EOS; no pad token (pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    assert tokenizer.pad_token_id is None
    return tokenizer


def test_seeded_sampling_repeats_and_leaves_the_global_generator_alone():
    model, prompts = tiny_llama(), _prompts()
    sample = Decoding(max_new_tokens=12, strategy="sample", temperature=1.5, top_k=40, top_p=0.95, seed=7)
    state = torch.get_rng_state()
    first = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=sample)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=sample) == first
    other = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=dataclasses.replace(sample, seed=8))
    assert other != first
    assert first != generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=Decoding(max_new_tokens=12))


def test_completion_only_ngram_ban_differs_from_transformers_own():
    scores = torch.zeros(1, 10)
    prompt_then_completion = torch.tensor([[5, 6, 5, 7, 5]])  # prompt (5, 6, 5), completion (7, 5)
    ours = _CompletionNoRepeatNGram(2, prompt_len=3)(prompt_then_completion, scores)
    assert torch.isinf(ours).nonzero().tolist() == []  # (5, 6) is in the prompt only; the completion may repeat it
    theirs = NoRepeatNGramLogitsProcessor(2)(prompt_then_completion, scores)  # transformers' own: the prompt counts
    assert torch.isinf(theirs).nonzero()[:, 1].tolist() == [6, 7]
    completion_repeat = _CompletionNoRepeatNGram(2, prompt_len=1)(torch.tensor([[9, 5, 7, 5]]), scores)
    assert torch.isinf(completion_repeat).nonzero()[:, 1].tolist() == [7]


def test_eval_mode_and_the_models_generation_config_are_restored_and_ignored():
    model, prompts = tiny_gpt2(), _prompts()
    expected = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=GREEDY)
    model.train()
    model.transformer.h[0].eval()
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1  # a checkpoint's defaults: not ours
    assert generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=GREEDY) == expected
    assert model.generation_config is config
    assert model.training and model.transformer.h[1].training and not model.transformer.h[0].training


def test_progress_bar(capsys):
    generate_ids(tiny_gpt2(), _prompts()[:3], pad_id=PAD, eos_id=EOS, decoding=Decoding(max_new_tokens=2), progress=True)
    err = capsys.readouterr().err
    assert "generate: 100%" in err and "3/3" in err


def test_paper_decoding():
    assert PAPER_DECODING == Decoding(max_new_tokens=64, strategy="beam", num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4)
    assert PAPER_DECODING.stop_at_eos


@pytest.mark.parametrize(("fields", "message"), [
    (dict(strategy="top"), r"Decoding.strategy='top': use one of \('greedy', 'sample', 'beam'\)"),
    (dict(max_new_tokens=0), r"Decoding.max_new_tokens=0: must be at least 1"),
    (dict(strategy="beam"), r"Decoding.num_beams=1: strategy='beam' needs num_beams >= 2"),
    (dict(num_beams=4), r"Decoding.num_beams=4: applies to strategy='beam' only; leave it at 1"),
    (dict(length_penalty=0.9), r"Decoding.length_penalty=0.9: applies to strategy='beam' only"),
    (dict(temperature=0.7), r"Decoding.temperature=0.7: applies to strategy='sample' only; leave it at 1.0"),
    (dict(strategy="beam", num_beams=2, seed=1), r"Decoding.seed=1: applies to strategy='sample' only; leave it at None"),
    (dict(strategy="sample", temperature=0.0), r"Decoding.temperature=0.0: must be > 0 \(use strategy='greedy'"),
    (dict(strategy="sample", top_p=1.5), r"Decoding.top_p=1.5: must be in \(0, 1\]"),
    (dict(strategy="sample", top_k=-1), r"Decoding.top_k=-1: must be >= 0"),
    (dict(strategy="sample", seed=-3), r"Decoding.seed=-3: must be None or a non-negative integer"),
    (dict(no_repeat_ngram_size=-1), r"Decoding.no_repeat_ngram_size=-1: must be >= 0"),
])
def test_decoding_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        Decoding(**fields)


def test_generate_errors():
    model, prompts = _with_three_adapters(tiny_gpt2()), _prompts()
    kw = dict(pad_id=PAD, eos_id=EOS)
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty; each prompt needs at least one token"):
        generate_ids(model, [[5], []], **kw)
    with pytest.raises(TypeError, match="prompts must be a list of prompts .*wrap a single one in a list"):
        generate_ids(model, [5, 6], **kw)
    with pytest.raises(ValueError, match="adapters has 1 names for 8 prompts; give one per prompt"):
        generate_ids(model, prompts, adapters=["a"], **kw)
    with pytest.raises(ValueError, match="eos_id must name at least one token id"):
        generate_ids(model, prompts, pad_id=PAD, eos_id=[])
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        generate_ids(model, prompts, batch_size=0, **kw)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        generate_ids(model, prompts[:1], adapters=["zz"], **kw)
    with pytest.raises(TypeError, match="model must be a transformers causal LM"):
        generate_ids(torch.nn.Linear(2, 2), prompts, **kw)
    with pytest.raises(TypeError, match="prompts must be a list of strings, got one string"):
        generate(model, _word_tokenizer(), "w3 w4")
    lorakit.merge(model)
    with pytest.raises(ValueError, match="cannot use per-row adapters while adapters are merged"):
        generate_ids(model, prompts[:1], adapters=["a"], **kw)


@pytest.mark.parametrize("arch", MODELS)
def test_a_temperature_too_small_to_sample_from_is_greedy(arch):
    # logits / 1e-40 overflows float32: transformers' own warper gives inf - inf = NaN and torch.multinomial fails
    model, prompts = MODELS[arch](), _prompts()
    tiny = Decoding(max_new_tokens=12, strategy="sample", temperature=1e-40, top_p=0.5, seed=0)
    greedy = generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=Decoding(max_new_tokens=12))
    assert generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=tiny) == greedy
    warm = Decoding(max_new_tokens=12, strategy="sample", temperature=1.5, seed=0)  # rows that do not overflow still sample
    assert generate_ids(model, prompts, pad_id=PAD, eos_id=EOS, decoding=warm) != greedy
