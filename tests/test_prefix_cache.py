"""Prefix caching in the generation server (issue #29, item 3): prompts that begin the same way on the same adapter
reuse the keys and values of their common blocks, and greedy outputs stay those of prefilling everything."""

import concurrent.futures
import random

import httpx
import pytest
import torch

import lorakit
from helpers import randomize
from lorakit.generate import Decoding, generate_ids
from lorakit.serving.config import ServeConfig
from lorakit.serving.generation import GenerationEngine
from lorakit.serving.prefix_cache import PrefixCache
from lorakit.serving.scheduler import Sampling, Scheduler, Sequence
from lorakit.serving.server import create_app
from lorakit.tasks.lm import load_causal_lm
from test_quant_serve import installed  # noqa: F401 (a fixture: a tiny Llama installed from a Q4_1 GGUF)
from test_serve import running
from test_serve_openai import _adapter_folders
from test_serve_process import cli_server

BLOCK = PrefixCache.BLOCK
ADAPTERS = [None, "small", "mid", "wide"]
TOKENS = 4096  # the prefix cache's bound where a test turns it on (a Scheduler's default is off)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2_lm"])
def lm(request, tmp_path_factory):
    """(model folder, adapter folders) for a tiny Llama and a tiny GPT-2."""
    model_dir = request.getfixturevalue(request.param)
    return model_dir, _adapter_folders(model_dir, tmp_path_factory.mktemp("prefix-adapters"))


def _model(model_dir: str, folders: dict[str, str]):
    tokenizer, model = load_causal_lm(model_dir)
    for name, folder in folders.items():
        lorakit.load_adapter(model, folder, name)
    return tokenizer, model.eval()


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 2000) for _ in range(n)]


def _alone(model, prompt: list[int], adapter: str | None, n: int) -> list[int]:
    return generate_ids(model, [prompt], pad_id=None, eos_id=[-1], adapters=[adapter], decoding=Decoding(max_new_tokens=n))[0]


def _run(scheduler: Scheduler, jobs: list[tuple[list[int], str | None]], n: int = 8) -> list[Sequence]:
    """``jobs`` (prompt, adapter) submitted together, run to their end; their sequences."""
    seqs = [Sequence(p, a, Sampling(max_tokens=n, temperature=0), lambda e: None) for p, a in jobs]
    for seq in seqs:
        scheduler.submit(seq)
    scheduler.run_until_done()
    return seqs


@pytest.mark.parametrize("engine", ["decoder", "model"])
def test_a_shared_prefix_is_read_from_the_cache_and_changes_no_greedy_token(lm, engine):
    """A system prompt of 2.5 blocks before each user turn, over the base model and three adapters: the first
    wave prefills it (chunks of 7: a later prompt finds what an earlier one's chunks stored), the second reads its
    two whole blocks; every completion is the one transformers generates alone."""
    tokenizer, model = _model(*lm)
    scheduler = Scheduler(model, tokenizer, eos=set(), max_rows=8, max_length=128, prefill_chunk=7, engine=engine,
                          prefix_cache_tokens=TOKENS)
    system = _ids(2 * BLOCK + 8, seed=1)
    first = _run(scheduler, [(system + _ids(5, seed=10 + i), a) for i, a in enumerate(ADAPTERS)])
    second = _run(scheduler, [(system + _ids(3 + i, seed=20 + i), a) for i, a in enumerate(ADAPTERS)])
    for seq in first + second:
        assert seq.tokens == _alone(model, seq.prompt, seq.adapter, 8), (seq.adapter, seq.cached)
    assert [s.cached for s in second] == [2 * BLOCK] * 4
    assert scheduler.prefix.hits >= 8 * BLOCK and scheduler.prefix.queries == sum(len(s.prompt) for s in first + second)
    assert len({tuple(s.tokens) for s in second}) == 4  # the adapters change the completions


def test_a_sliding_window_family_reads_its_prefix_from_the_cache_too(tiny_gemma2_lm, tmp_path):
    """Gemma 2 (only the model engine serves it): a window of 4 on every other layer, soft-capping; the row keeps
    every position, so a cached prefix serves both kinds of layer."""
    folders = _adapter_folders(tiny_gemma2_lm, tmp_path)
    tokenizer, model = _model(tiny_gemma2_lm, folders)
    scheduler = Scheduler(model, tokenizer, eos=set(), max_length=128, prefill_chunk=9, prefix_cache_tokens=TOKENS)
    system = _ids(2 * BLOCK + 3, seed=2)
    seqs = [_run(scheduler, [(system + _ids(4, seed=40 + i), a)])[0] for i, a in enumerate(["wide", None, "wide", None])]
    assert [s.cached for s in seqs] == [0, 0, 2 * BLOCK, 2 * BLOCK] and scheduler.engine == "model"
    for seq in seqs:
        assert seq.tokens == _alone(model, seq.prompt, seq.adapter, 8), seq.adapter


def test_the_prefix_cache_off_prefills_everything(lm):
    """0 turns it off, and a Scheduler made in Python has it off unless asked (lorakit serve turns it on)."""
    tokenizer, model = _model(*lm)
    scheduler = Scheduler(model, tokenizer, eos=set(), max_length=128)
    assert ServeConfig().prefix_cache_tokens > 0 and not scheduler.prefix.enabled
    prompt = _ids(3 * BLOCK, seed=3)
    seqs = _run(scheduler, [(prompt, "small")]) + _run(scheduler, [(prompt, "small")])
    assert [s.cached for s in seqs] == [0, 0] and scheduler.prefix.hits == 0 and not scheduler.prefix.blocks
    assert seqs[0].tokens == seqs[1].tokens == _alone(model, prompt, "small", 8)


def test_two_adapters_with_one_prompt_share_no_block(lm):
    tokenizer, model = _model(*lm)
    scheduler = Scheduler(model, tokenizer, eos=set(), max_length=128, prefix_cache_tokens=TOKENS)
    prompt = _ids(3 * BLOCK, seed=4)
    seqs = [_run(scheduler, [(prompt, a)])[0] for a in ("small", "mid", None, "small", "mid", None)]
    assert [s.cached for s in seqs] == [0, 0, 0, 2 * BLOCK, 2 * BLOCK, 2 * BLOCK]
    for seq in seqs:
        assert seq.tokens == _alone(model, prompt, seq.adapter, 8), seq.adapter
    assert len({tuple(s.tokens) for s in seqs[:3]}) == 3


def test_the_least_recently_used_ends_of_chains_are_evicted_under_the_bound(lm):
    """Three blocks at most: P1 = a1 a2, P2 = a1 b2, P3 = c1 c2 evicts a2 then b2 (the oldest ends of chains), and
    keeps a1, which P2 touched last; what is evicted is prefilled again, with the same tokens."""
    tokenizer, model = _model(*lm)
    scheduler = Scheduler(model, tokenizer, eos=set(), max_length=128, prefix_cache_tokens=3 * BLOCK)
    a1, a2, b2, c1, c2 = (_ids(BLOCK, seed=30 + i) for i in range(5))
    tail = [7]  # (a block is read only when a token follows it)
    p1, p2, p3 = a1 + a2 + tail, a1 + b2 + tail, c1 + c2 + tail
    cached = []
    for prompt in (p1, p2, p3, p1, p2, p3):
        seq = _run(scheduler, [(prompt, "wide")])[0]
        assert seq.tokens == _alone(model, prompt, "wide", 8)
        assert scheduler.prefix.tokens <= 3 * BLOCK
        cached.append(seq.cached)
    # p1: nothing; p2: a1; p3: nothing (a2, b2 go); p1: a1 (a2 again, c2 goes); p2: a1 (b2 again: c1 goes, a2 stays)
    assert cached == [0, BLOCK, 0, BLOCK, BLOCK, 0]


def test_the_prefix_cache_takes_its_bound_in_tokens():
    with pytest.raises(ValueError, match="max_tokens must be 0 \\(off\\) or a positive number of tokens, got -1"):
        PrefixCache(-1)
    with pytest.raises(ValueError, match="prefix_cache_tokens must be 0 \\(off\\) or a positive integer, got -5"):
        ServeConfig(prefix_cache_tokens=-5)


def test_a_compiled_decode_step_with_cached_prefixes_gives_the_eager_tokens(tiny_llama):
    """--compile: a prompt one token past its cached blocks prefills that token through the compiled single-row
    step; the tokens are those of the eager scheduler with no prefix cache."""
    pytest.importorskip("torch._inductor")
    tokenizer, model = load_causal_lm(tiny_llama)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8), "a")
    randomize(model, seed=5, std=0.3)
    compiled = Scheduler(model, tokenizer, eos=set(), max_length=128, engine="model", compile=True,
                         prefix_cache_tokens=TOKENS)
    eager = Scheduler(model, tokenizer, eos=set(), max_length=128, engine="model", compile=False, prefix_cache_tokens=0)
    prompt = _ids(2 * BLOCK, seed=6)
    for tail, adapter in [([5], "a"), ([5], "a"), ([6, 7, 8], None), ([9], None)]:
        runs = [_run(s, [(prompt + tail, adapter)])[0] for s in (compiled, eager)]
        assert runs[0].tokens == runs[1].tokens
    assert compiled.prefix.hits == 2 * 2 * BLOCK


# ---- lorakit serve: a real process, and quantized layers ------------------------------------------------------------

SYSTEM = ("You are a helpful assistant for a restaurant guide. Answer in one sentence, name the venue, its food, its "
          "area and its price range, and never invent a venue that the user did not mention. ")
TURNS = ["name : The Vaults | Type : pub", "name : Aromi | food : Italian", "area : city centre | near : the river",
         "name : Loch Fyne | eatType : restaurant", "priceRange : cheap | food : French"]


def _metric(url: str, name: str) -> float:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))


def _complete(url: str, model: str, prompt: str) -> str:
    r = httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0},
                   timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _waves(url: str, models: list[str]) -> dict[tuple[str, str], str]:
    """Every turn on every model, all at once, then again one at a time."""
    jobs = [(m, SYSTEM + t) for t in TURNS for m in models]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = dict(zip(jobs, pool.map(lambda job: _complete(url, *job), jobs)))
    alone = {job: _complete(url, *job) for job in jobs}
    assert together == alone
    return alone


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """Greedy texts of a real ``lorakit serve`` with the prefix cache (default) and without (0), and the url of the
    first, still running."""
    root = tmp_path_factory.mktemp("prefix-process")
    folders = _adapter_folders(tiny_llama, root)
    models = [tiny_llama, "small", "wide"]
    flags = ("--max-length", "128", "--max-new-tokens", "16", "--prefill-chunk", "16")
    adapters = {"small": folders["small"], "wide": folders["wide"]}
    with cli_server(tiny_llama, adapters, root / "off.log", *flags, "--prefix-cache-tokens", "0") as (_, url):
        off = _waves(url, models)
        assert _metric(url, "lorakit:prefix_cache_hits_total") == 0
    with cli_server(tiny_llama, adapters, root / "on.log", *flags) as (_, url):
        assert _metric(url, "lorakit:prefix_cache_tokens") == 0
        on = _waves(url, models)
        yield off, on, url, folders, models


def test_a_served_prefix_cache_changes_no_greedy_text(served):
    off, on, url, _, models = served
    assert on == off
    assert len({off[(m, SYSTEM + TURNS[0])] for m in models}) == 3  # (the adapters change the text)
    hits, queries = _metric(url, "lorakit:prefix_cache_hits_total"), _metric(url, "lorakit:prefix_cache_queries_total")
    assert 0 < hits < queries and hits % BLOCK == 0 and _metric(url, "lorakit:prefix_cache_tokens") > 0


def test_an_adapter_reloaded_under_its_name_reuses_no_stale_keys(served):
    """"x" is the small adapter, then unloaded and loaded again from the wide one's folder: the same prompt gives
    the wide adapter's text (the small one's blocks are gone), and its own blocks are read on the next request."""
    off, _, url, folders, _ = served
    prompt = SYSTEM + TURNS[1]
    assert httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": folders["small"]}).status_code == 201
    assert _complete(url, "x", prompt) == off[("small", prompt)]
    before = _metric(url, "lorakit:prefix_cache_hits_total")
    assert _complete(url, "x", prompt) == off[("small", prompt)]
    assert _metric(url, "lorakit:prefix_cache_hits_total") > before  # (the cache serves "x")
    assert httpx.delete(f"{url}/v1/adapters/x").status_code == 200
    assert httpx.post(f"{url}/v1/adapters", json={"name": "x", "path": folders["wide"]}).status_code == 201
    before = _metric(url, "lorakit:prefix_cache_hits_total")
    assert _complete(url, "x", prompt) == off[("wide", prompt)] != off[("small", prompt)]
    assert _metric(url, "lorakit:prefix_cache_hits_total") == before
    assert _complete(url, "x", prompt) == off[("wide", prompt)]
    assert _metric(url, "lorakit:prefix_cache_hits_total") > before


@pytest.mark.parametrize("quantize, engine", [("int8", "auto"), ("int4", "model")])
def test_quantized_layers_give_the_same_text_with_the_prefix_cache(installed, quantize, engine):  # noqa: F811
    """The same text with the cache on and off; and a prompt read from the cache on adapter "a" holds in its row the
    keys and values a whole prefill on the quantized layers writes (this tiny model's text hardly depends on them)."""
    folder, adapters = installed
    texts = []
    for tokens in (0, 4096):
        config = ServeConfig(max_length=128, max_new_tokens=12, prefill_chunk=16, engine=engine, prefix_cache_tokens=tokens)
        app = GenerationEngine(folder, config, "fp32", quantize=quantize)
        with running(create_app(app, config, adapters)) as client:
            texts.append({(m, t): _served_text(client, m, SYSTEM + t) for t in TURNS[:3] for m in (folder, "a", "b")})
            assert (app.scheduler.prefix.hits > 0) == (tokens > 0)
    assert texts[0] == texts[1] and len({texts[0][(m, TURNS[0])] for m in (folder, "a", "b")}) == 3
    prompt = app.tokenizer(SYSTEM + TURNS[0])["input_ids"]  # (served on "a" above: its blocks are cached)
    cached, fresh = (Scheduler(app.model, app.tokenizer, eos=set(), max_length=128, engine=engine, prefix_cache_tokens=n)
                     for n in (4096, 0))
    cached.prefix = app.scheduler.prefix  # (the server's scheduler has stopped)
    seq, row = _prefill(cached, prompt, "a")
    assert seq.cached == (len(prompt) - 1) // BLOCK * BLOCK > 0
    torch.testing.assert_close(row, _prefill(fresh, prompt, "a")[1], rtol=1e-5, atol=1e-5)


def _prefill(scheduler: Scheduler, prompt: list[int], adapter: str | None) -> tuple[Sequence, torch.Tensor]:
    """``prompt`` admitted and prefilled (in one chunk) on the calling thread; its sequence and its row's keys and
    values."""
    seq = Sequence(prompt, adapter, Sampling(max_tokens=2, temperature=0), lambda e: None)  # (not ended: keeps its row)
    scheduler.submit(seq)
    scheduler._drain(block=False)
    scheduler._admit()
    scheduler._prefill()
    assert seq.length == len(prompt)
    return seq, scheduler.cache.read(seq.row, 0, len(prompt))


def _served_text(client, model: str, prompt: str) -> str:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("engine", ["decoder", "model"])
def test_a_row_read_from_the_cache_holds_the_keys_and_values_of_a_whole_prefill(tiny_llama, engine):
    """A prompt that starts with another's three blocks (prefilled in chunks of 20) holds in its row, its prefix
    copied and the rest prefilled after it, what prefilling it whole writes (to float32 rounding)."""
    tokenizer, model = load_causal_lm(tiny_llama)
    scheduler = Scheduler(model, tokenizer, eos=set(), max_length=128, prefill_chunk=20, engine=engine,
                          prefix_cache_tokens=TOKENS)
    prompt = _ids(3 * BLOCK + 5, seed=8)
    _run(scheduler, [(prompt[: 3 * BLOCK] + [3, 4], None)], n=1)
    scheduler.prefill_chunk = 256
    seq, row = _prefill(scheduler, prompt, None)
    assert seq.cached == 3 * BLOCK
    fresh = Scheduler(model, tokenizer, eos=set(), max_length=128, engine=engine, prefix_cache_tokens=0)
    torch.testing.assert_close(row, _prefill(fresh, prompt, None)[1], rtol=1e-5, atol=1e-5)
