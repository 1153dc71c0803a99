"""lorakit.serving.ModelDecoder: every served family, driven token by token with rows of
different prompt lengths and adapters (chunked prefill, then decoding), gives the greedy
tokens of transformers + PEFT ``generate`` on each row alone. Sliding windows are shorter
than the prompts; Gemma 2's soft-capping is set low enough to matter."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import transformers as T

import lorakit
import zoo
from helpers import MODEL_TOL, randomize
from lorakit.serving import ModelDecoder
from lorakit.serving.decoder import RowCache
from lorakit.serving.model_decoder import _Step, row_attention
from lorakit.serving.scheduler import Sampling, Scheduler, Sequence
from zoo import ARCHS

peft = pytest.importorskip("peft")

WINDOW = 4  # shorter than every prompt but the first
LENGTHS = (3, 9, 14)
ADAPTERS = ("a", None, "b")  # one per row
NEW = 8


def _arch(name: str, config: type, model: type, **kw) -> zoo.Arch:
    return dataclasses.replace(ARCHS[name], make=zoo._decoder(config, model, **kw))


FAMILIES = {
    "llama": ARCHS["llama"],
    "mistral": _arch("mistral", T.MistralConfig, T.MistralForCausalLM, sliding_window=WINDOW),
    "qwen2": _arch("qwen2", T.Qwen2Config, T.Qwen2ForCausalLM, use_sliding_window=True, sliding_window=WINDOW,
                   max_window_layers=1, tie_word_embeddings=True),  # layer 0 global, layer 1 windowed
    "qwen3": ARCHS["qwen3"],
    "qwen3_moe": ARCHS["qwen3_moe"],
    "mixtral": _arch("mixtral", T.MixtralConfig, T.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=WINDOW),
    "gemma": ARCHS["gemma"],
    "gemma2": _arch("gemma2", T.Gemma2Config, T.Gemma2ForCausalLM, head_dim=8, sliding_window=WINDOW,
                    attn_logit_softcapping=2.0, final_logit_softcapping=1.0),
    "gemma3": _arch("gemma3", T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=8, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"]),
    "phi3": ARCHS["phi3"],
    "gpt2": ARCHS["gpt2"],
}


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, zoo.VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _adapted(arch: zoo.Arch) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(base, a copy with adapters "a" (attention, r=4) and "b" (a projection and the head, r=2))."""
    base = zoo.base(arch)
    model = copy.deepcopy(base)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=list(arch.attention)), "a")
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=[arch.attention[0], arch.head]), "b")
    randomize(model, seed=5, std=0.3)
    return base, model


def _drive(engine, model, prompts: list[list[int]], adapters, chunk: int = 5) -> list[list[int]]:
    """Prefill all rows ``chunk`` tokens a step (right-padded, each from its own start), then
    decode them together, every row through its adapter."""
    B, cache, lengths = len(prompts), engine.cache(len(prompts), 64), [0] * len(prompts)
    out: list[list[int]] = [[] for _ in prompts]
    with lorakit.adapter_per_row(model, adapters):
        while any(n < len(p) for n, p in zip(lengths, prompts)):
            parts = [p[n : n + chunk] or p[-1:] for n, p in zip(lengths, prompts)]  # (a finished row re-feeds its last)
            ids = torch.zeros(B, max(map(len, parts)), dtype=torch.long)
            for i, part in enumerate(parts):
                ids[i, : len(part)] = torch.tensor(part)
            start = torch.tensor([min(n, len(p) - 1) for n, p in zip(lengths, prompts)])
            logits = engine.forward(ids, cache, slice(0, B), start, torch.tensor([len(q) - 1 for q in parts]))
            for i, (part, p) in enumerate(zip(parts, prompts)):
                if lengths[i] < len(p):
                    lengths[i] += len(part)
                    if lengths[i] == len(p):
                        out[i].append(int(logits[i].argmax()))
        for _ in range(NEW - 1):
            ids = torch.tensor([[o[-1]] for o in out])
            logits = engine.forward(ids, cache, slice(0, B), torch.tensor(lengths))
            lengths = [n + 1 for n in lengths]
            for o, t in zip(out, logits.argmax(-1).tolist()):
                o.append(t)
    return out


def _peft_generate(base, model, adapter: str | None, prompt: list[int], tmp_path) -> list[int]:
    """transformers + PEFT: the adapter saved by lorakit, loaded by PEFT, greedy ``generate``."""
    oracle = copy.deepcopy(base)
    if adapter is not None:
        lorakit.save_adapter(model, tmp_path / adapter, adapter)
        oracle = peft.PeftModel.from_pretrained(oracle, tmp_path / adapter).eval()
    with torch.no_grad():
        out = oracle.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_rows_with_their_own_adapters_give_transformers_and_peft_greedy_tokens(name, tmp_path):
    base, model = _adapted(FAMILIES[name])
    prompts = _prompts()
    want = [_peft_generate(base, model, a, p, tmp_path) for a, p in zip(ADAPTERS, prompts)]
    engine = ModelDecoder(model)
    assert _drive(engine, model, prompts, ADAPTERS) == want
    for prompt, adapter, tokens in zip(prompts, ADAPTERS, want):  # one stream: no mask until it outgrows a window
        assert _drive(engine, model, [prompt], [adapter]) == [tokens]
    ids = torch.tensor([prompts[2]])
    with torch.no_grad():
        for adapter in ("a", "b"):
            with lorakit.adapter_per_row(model, [adapter]):
                full = model(ids).logits[:, -1]
                assert not torch.allclose(full, base(ids).logits[:, -1], atol=1e-3)  # the adapter is not trivial
                # the logits themselves (greedy tokens cannot see a monotonic final soft-cap)
                got = engine.forward(ids, engine.cache(1, 64), slice(0, 1), torch.zeros(1, dtype=torch.long))
                torch.testing.assert_close(got, full, **MODEL_TOL)


@pytest.mark.parametrize("name", ["gpt_neox", "opt", "falcon"])
def test_an_architecture_not_served_is_refused_by_name(name):
    model = zoo.base(ARCHS[name])
    with pytest.raises(ValueError, match=rf"lorakit serve generates with llama, .*not {type(model).__name__} "
                                         rf"\(model_type '{model.config.model_type}'\); use lorakit generate"):
        ModelDecoder(model)


def test_bidirectional_gemma_is_refused():
    model = zoo._decoder(T.Gemma3TextConfig, T.Gemma3ForCausalLM, head_dim=8, use_bidirectional_attention=True)()
    with pytest.raises(ValueError, match=r"gemma3_text with use_bidirectional_attention is not a causal decoder"):
        ModelDecoder(model)


def test_attention_it_does_not_implement_is_refused_not_ignored():
    module = torch.nn.Module()
    q = torch.zeros(1, 2, 1, 4)
    with pytest.raises(ValueError, match=r"Module gives its attention \['s_aux'\], which lorakit serve does not"):
        row_attention(module, q, q, q, None, lorakit_step=object(), s_aux=torch.zeros(2))
    with pytest.raises(ValueError, match=r"Module gives its attention a mask of its own"):
        row_attention(module, q, q, q, torch.ones(1, 1, 1, 1), lorakit_step=object())


def test_longrope_is_served_up_to_its_original_length():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}
    model = zoo._decoder(T.Phi3Config, T.Phi3ForCausalLM, num_key_value_heads=1, rope_parameters=rope,
                         original_max_position_embeddings=32)()  # (Phi-4-mini: 4096 of 131072)
    engine = ModelDecoder(model)
    assert (engine.max_positions, model.config.max_position_embeddings) == (32, 64)
    assert engine.cache(2, 1000).max_length == 32


class _Tokens:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("name", ["mistral", "qwen2", "gemma2", "gemma3", "qwen3"])
def test_the_scheduler_serves_windowed_and_new_families_with_mixed_adapters(name, tmp_path):
    """The serving path (chunked prefill, rows joining and leaving) over prompts of 9 and 14 tokens, longer than
    the window of 4: Mistral's on every layer, Qwen2's on its second, Gemma 2/3's on interleaved layers."""
    base, model = _adapted(FAMILIES[name])
    with pytest.raises(ValueError, match="engine must be auto or one of"):
        Scheduler(model, _Tokens(), eos=set(), engine="vllm")
    with pytest.raises(ValueError, match="use engine 'model'"):
        Scheduler(model, _Tokens(), eos=set(), engine="decoder")
    scheduler = Scheduler(model, _Tokens(), eos=set(), max_rows=2, max_length=64, prefill_chunk=6)  # auto
    assert isinstance(scheduler.decoder, ModelDecoder) and scheduler.engine == "model"
    prompts = _prompts()
    seqs = [Sequence(p, a, Sampling(max_tokens=NEW, temperature=0), lambda e: None) for p, a in zip(prompts, ADAPTERS)]
    for seq in seqs:  # three sequences on two rows: one waits, and joins as another leaves
        scheduler.submit(seq)
    scheduler.run_until_done()
    assert [s.tokens for s in seqs] == [_peft_generate(base, model, a, p, tmp_path) for a, p in zip(ADAPTERS, prompts)]


def test_a_step_masks_only_what_some_query_must_not_see():
    """Masks are additive (0 where query t of row b sees cache position j, -inf elsewhere), made
    once per forward and window; one new token per row, all at the same position, needs none."""
    cache = RowCache(1, 2, 1, 4, 64, torch.float32, torch.device("cpu"))
    one = _Step(cache, slice(0, 1), torch.tensor([[5]]))
    assert one.mask(None, torch.float32) is None and one.mask(6, torch.float32) is None  # end 6 <= window 6
    seen = one.mask(4, torch.float32)  # positions 2..5
    assert torch.equal(seen.isfinite(), torch.tensor([[[[False, False, True, True, True, True]]]]))
    assert seen.dtype == torch.float32 and one.mask(4, torch.float32) is seen and seen.max() == 0
    two = _Step(cache, slice(0, 2), torch.tensor([[2], [4]]))
    assert torch.equal(two.mask(None, torch.float32).isfinite().squeeze(), torch.arange(5) <= torch.tensor([[2], [4]]))
    chunk = _Step(cache, slice(0, 1), torch.tensor([[3, 4]]))  # a prefill chunk: causal within it
    assert torch.equal(chunk.mask(None, torch.float32).isfinite().squeeze(), torch.arange(5) <= torch.tensor([[3], [4]]))


def test_compiled_forward_gives_the_eager_greedy_tokens_over_quantized_weights():
    """ModelDecoder(compile=True): the same tokens as uncompiled over q4_1 weights (one C++ operator each, which
    inductor must trace, not break on), rows with mixed adapters and windows (eager), then single streams
    (compiled: one row decoding), past the sliding window."""
    pytest.importorskip("torch._inductor")
    from lorakit.quant import kernels
    from lorakit.quant.linear import QuantLinear, quantize_linears

    try:
        kernels.load()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    _, model = _adapted(FAMILIES["mistral"])
    assert quantize_linears(model, "q4_1", "q8_0") > 0
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    prompts, eager, compiled = _prompts(), ModelDecoder(model), ModelDecoder(model, compile=True)
    assert not eager.compiled and compiled.compiled
    want = _drive(eager, model, prompts, ADAPTERS)
    assert _drive(compiled, model, prompts, ADAPTERS) == want
    torch._dynamo.utils.counters.clear()
    for prompt, adapter in zip(prompts, ADAPTERS):
        assert _drive(compiled, model, [prompt], [adapter]) == _drive(eager, model, [prompt], [adapter])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps ran compiled


def test_a_compiled_single_stream_takes_any_adapter_without_recompiling():
    """The compiled decode step reads the stream's adapter as data: six adapters and the base model, one after
    another, give each one's eager logits from the same two graphs (by name: two more graphs per adapter, and
    from the fifth on dynamo's recompile limit sent the steps back to eager)."""
    pytest.importorskip("torch._inductor")
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    names = [f"a{i}" for i in range(6)]
    for name in names:
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name)
    randomize(model, seed=5, std=0.3)
    compiled, eager = ModelDecoder(model, compile=True), ModelDecoder(model, compile=False)
    caches = {d: d.cache(1, 64) for d in (compiled, eager)}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for adapter in [*names, None, "a2"]:
        with lorakit.adapter_per_row(model, [adapter]):
            for p in range(4):
                out = [d.forward(torch.tensor([[7 + p]]), c, slice(0, 1), torch.tensor([p])) for d, c in caches.items()]
                torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    # an adapter loaded later on layers no adapter had (a server's load_lora_adapter): new layers, a new plan
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["o_proj"]), "late")
    randomize(model, seed=6, std=0.3)
    with lorakit.adapter_per_row(model, ["late"]):
        out = [d.forward(torch.tensor([[9]]), c, slice(0, 1), torch.tensor([4])) for d, c in caches.items()]
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)


def test_a_warmed_up_compiled_scheduler_serves_adapters_without_compiling_again():
    """Scheduler.warm_up (lorakit serve --compile, before serving) compiles the single-stream step on the base
    model; requests through adapters then add no graph and give the eager scheduler's tokens."""
    pytest.importorskip("torch._inductor")
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    for name in ("a", "b", "c"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), name)
    randomize(model, seed=5, std=0.3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Scheduler(model, _Tokens(), eos=set(), max_length=200, engine="model", compile=True)
    compiled.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 1 and compiled.steps == compiled.tokens == 0 and not compiled.rows
    eager = Scheduler(model, _Tokens(), eos=set(), max_length=200, engine="model", compile=False)
    for adapter, prompt in [("a", [5, 6, 7]), ("c", [9, 3]), (None, [4, 4, 4, 4]), ("b", [8])]:
        runs = []
        for scheduler in (compiled, eager):
            seq = Sequence(prompt, adapter, Sampling(max_tokens=12, temperature=0), lambda e: None)
            scheduler.submit(seq)
            scheduler.run_until_done()
            runs.append(seq.tokens)
        assert runs[0] == runs[1]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_one_token_prefill_after_a_prefix_cache_hit_on_another_row_compiles_nothing():
    """A prompt whose every token but the last is in the prefix cache prefills one token, on whatever row it got:
    beside a running stream (row 0) that is row 1, which the compiled single-stream step (row 0) does not take."""
    pytest.importorskip("torch._inductor")
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), "a")
    randomize(model, seed=5, std=0.3)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Scheduler(model, _Tokens(), eos=set(), max_length=200, engine="model", compile=True,
                         prefix_cache_tokens=256)
    compiled.warm_up()
    prompt = list(range(3, 3 + 17))  # 16 tokens stored, the 17th prefilled
    runs = {}
    for name in ("first", "again"):
        seq = Sequence(prompt, "a", Sampling(max_tokens=6, temperature=0), lambda e: None)
        if name == "again":  # beside a running stream, which holds row 0
            other = Sequence([5, 6, 7], "a", Sampling(max_tokens=30, temperature=0), lambda e: None)
            compiled.submit(other)
            for _ in range(3):
                compiled._drain(block=False)
                compiled._step()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled.submit(seq)
        compiled.run_until_done()
        runs[name] = seq
    assert runs["again"].cached == 16 and runs["again"].tokens == runs["first"].tokens
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_lorakit_compile_in_the_environment_compiles_unless_told_otherwise(monkeypatch):
    _, model = _adapted(FAMILIES["llama"])
    monkeypatch.setenv("LORAKIT_COMPILE", "1")
    assert ModelDecoder(model).compiled and not ModelDecoder(model, compile=False).compiled
    monkeypatch.setenv("LORAKIT_COMPILE", "0")
    assert not ModelDecoder(model).compiled
    monkeypatch.setenv("LORAKIT_COMPILE", "yes")
    with pytest.raises(ValueError, match="LORAKIT_COMPILE must be 0 or 1, got 'yes'"):
        ModelDecoder(model)


@pytest.mark.parametrize("name", FAMILIES)
def test_auto_picks_the_lean_decoder_where_it_serves_the_family(name):
    from lorakit.serving.decoder import Decoder
    from lorakit.serving.scheduler import pick_engine

    model = zoo.base(FAMILIES[name])
    lean = name in ("llama", "gpt2")  # the others here are new families or have a sliding window
    assert pick_engine(model) == ("decoder" if lean else "model")
    assert (Decoder.refusal(model) is None) == lean
    assert pick_engine(model, compile=True) == "model"  # only the model engine compiles
    with pytest.raises(ValueError, match="needs the model engine"):
        pick_engine(model, "decoder", compile=True)


def test_a_compiled_single_stream_is_not_recompiled_for_each_size_of_a_growing_cache():
    """A serving process's row cache grows in rows and length with the load: the compiled decode step takes
    both as symbolic sizes (3 graphs over five cache sizes; one more, a recompilation, without it)."""
    pytest.importorskip("torch._inductor")
    cfg = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    compiled, eager = ModelDecoder(model, compile=True), ModelDecoder(model, compile=False)
    caches = {d: d.cache(32, 512) for d in (compiled, eager)}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for rows, length in [(1, 10), (1, 70), (5, 80), (9, 140), (17, 300)]:
        for decoder, cache in caches.items():
            cache.reserve(rows, length)
        for p in range(length - 3, length):
            out = [d.forward(torch.tensor([[5 + p % 7]]), c, slice(0, 1), torch.tensor([p])) for d, c in caches.items()]
            torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    assert caches[compiled].rows == 32 and caches[compiled].capacity == 512
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 3
