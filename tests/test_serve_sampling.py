"""What clients and evaluation harnesses send the OpenAI routes (#29): ``n`` (sharing the prompt's prefill),
``logprobs`` / ``top_logprobs``, ``echo`` (the prompt's log-probabilities, equal to transformers + PEFT),
``top_k``, ``min_p``, ``repetition_penalty``, presence and frequency penalties, and the 400s for values out of
range; against a real ``lorakit serve`` process on a tiny Llama, through the official ``openai`` client where
it has the field; then the scheduler's forks and prompt log-probabilities in-process."""

import collections
import json
import math

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.serving.sampling import Sampling, penalize, sample
from lorakit.serving.scheduler import Sequence
from test_serve_openai import PROMPTS, _adapter_folders, _scheduler_with_adapters
from test_serve_process import cli_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """(url, model folder, adapter folders) of a server with the adapters "small" and "wide"."""
    root = tmp_path_factory.mktemp("sampling")
    folders = _adapter_folders(tiny_llama, root)
    with cli_server(tiny_llama, {"small": folders["small"], "wide": folders["wide"]}, root / "log", "--max-length", "64",
                    "--max-new-tokens", "48", "--max-batch-rows", "16", "--prefill-chunk", "8") as (_, url):
        yield url, tiny_llama, folders


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused", max_retries=0, timeout=60)


def _post(url: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def _text(client, **fields) -> str:
    return client.completions.create(**{"model": "wide", "prompt": PROMPTS[0], "max_tokens": 8, **fields}).choices[0].text


def _repeats(tokens: list[str]) -> int:
    return len(tokens) - len(set(tokens))


# ---- n ---------------------------------------------------------------------------------------------


def test_n_greedy_choices_are_equal_and_seeded_ones_draw_with_seed_plus_j(client, served):
    tokenizer = AutoTokenizer.from_pretrained(served[1])
    prompts = [PROMPTS[0], PROMPTS[3]]
    out = client.completions.create(model="wide", prompt=prompts, max_tokens=8, temperature=0, n=3)
    alone = [_text(client, prompt=p, temperature=0) for p in prompts]
    assert [c.index for c in out.choices] == list(range(6))  # prompt i's j-th choice is i * 3 + j
    assert [c.text for c in out.choices] == [t for t in alone for _ in range(3)]
    assert out.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)  # once per prompt

    seeded = [c.text for c in client.completions.create(model="wide", prompt=PROMPTS[0], max_tokens=8, temperature=1,
                                                        n=3, seed=7).choices]
    assert len(set(seeded)) == 3 and seeded == [_text(client, temperature=1, seed=7 + j) for j in range(3)]
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="wide", messages=messages, max_tokens=6, temperature=1, n=2, seed=3)
    texts = [c.message.content for c in chat.choices]
    assert len(set(texts)) == 2 and texts == [
        client.chat.completions.create(model="wide", messages=messages, max_tokens=6, temperature=1, seed=3 + j)
        .choices[0].message.content for j in range(2)]


def test_n_streams_carry_each_choices_index(client):
    fields = dict(model="wide", prompt=[PROMPTS[1], PROMPTS[4]], max_tokens=6, temperature=1, seed=5, n=2)
    streamed = collections.defaultdict(str)
    for chunk in client.completions.create(**fields, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    whole = client.completions.create(**fields)
    assert dict(streamed) == {c.index: c.text for c in whole.choices} and len(streamed) == 4

    messages = [{"role": "user", "content": "hi"}]
    deltas = collections.defaultdict(str)
    for chunk in client.chat.completions.create(model="small", messages=messages, max_tokens=5, temperature=1, seed=2,
                                                n=3, stream=True):
        for choice in chunk.choices:
            deltas[choice.index] += choice.delta.content or ""
    chat = client.chat.completions.create(model="small", messages=messages, max_tokens=5, temperature=1, seed=2, n=3)
    assert dict(deltas) == {c.index: c.message.content for c in chat.choices} and len(deltas) == 3


# ---- logprobs and echo ----------------------------------------------------------------------------


def test_completion_logprobs_take_openais_shape_and_equal_the_prompt_path(served):
    url, model_dir, _ = served
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    body = {"model": "small", "prompt": PROMPTS[1], "max_tokens": 6, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    choice = _post(url, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 6
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert value < 0 and top[token] == value and len(top) == 3  # greedy: the token is the most likely ...
        assert value == max(top.values())  # ... and top holds the 3 most likely, it among them (vLLM's shape)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    # the same numbers through the prompt path: the prompt and those tokens echoed back as token ids
    ids = tokenizer(PROMPTS[1])["input_ids"] + tokenizer.convert_tokens_to_ids(lp["tokens"])
    echoed = _post(url, "/v1/completions", {"model": "small", "prompt": ids, "max_tokens": 0, "echo": True,
                                            "logprobs": 3}).json()["choices"][0]["logprobs"]
    assert echoed["tokens"][-6:] == lp["tokens"]
    assert echoed["token_logprobs"][-6:] == pytest.approx(lp["token_logprobs"], abs=1e-4)
    # streamed: the same log-probabilities, chunk by chunk
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert sum((p["tokens"] for p in parts), []) == lp["tokens"]
    assert sum((p["text_offset"] for p in parts), []) == lp["text_offset"]
    assert sum((p["token_logprobs"] for p in parts), []) == pytest.approx(lp["token_logprobs"], abs=1e-5)
    assert _post(url, "/v1/completions", {**body, "logprobs": None}).json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_take_openais_shape(client):
    fields = dict(model="small", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                  extra_body={"ignore_eos": True})
    out = client.chat.completions.create(**fields, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob < 0
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (entry.token, entry.logprob)  # greedy
    streamed = [e for chunk in client.chat.completions.create(**fields, logprobs=True, top_logprobs=2, stream=True)
                for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    bare = client.chat.completions.create(**fields, logprobs=True)  # top_logprobs left out: none
    assert [e.top_logprobs for e in bare.choices[0].logprobs.content] == [[]] * 5
    assert client.chat.completions.create(**fields).choices[0].logprobs is None


def test_echo_gives_the_prompts_logprobs_of_transformers_and_peft(client, served):
    """What lm-evaluation-harness's completions backend asks: the prompt's log-probabilities (``echo``,
    ``logprobs``, ``max_tokens`` 0 or 1), equal to a forward pass of transformers with the adapter loaded
    by PEFT, for prompts longer than the server's prefill chunk (8 tokens), text or token ids."""
    peft = pytest.importorskip("peft")
    url, model_dir, folders = served
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    oracle = peft.PeftModel.from_pretrained(base, folders["wide"]).eval()
    prompts = [PROMPTS[5], PROMPTS[2]]
    out = client.completions.create(model="wide", prompt=prompts, max_tokens=0, echo=True, logprobs=2)
    assert out.usage.completion_tokens == 0
    for prompt, choice in zip(prompts, out.choices):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            want = oracle(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, vocab)
        lp = choice.logprobs
        assert len(ids) > 8 and choice.text == prompt and choice.finish_reason == "length"
        assert lp.tokens == [tokenizer.decode([t]) for t in ids] and len(lp.text_offset) == len(ids)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
        expected = torch.tensor([want[j - 1, ids[j]].item() for j in range(1, len(ids))])
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected, atol=1e-3, rtol=0)
        for j in range(1, len(ids)):  # the two most likely tokens at each position, as PEFT's
            top = sorted(lp.top_logprobs[j].values(), reverse=True)[:2]
            torch.testing.assert_close(torch.tensor(top), want[j - 1].topk(2).values, atol=1e-3, rtol=0)
    first = out.choices[0].logprobs.token_logprobs[1:]
    base_model = client.completions.create(model=model_dir, prompt=prompts[0], max_tokens=0, echo=True, logprobs=2)
    moved = [abs(a - b) for a, b in zip(base_model.choices[0].logprobs.token_logprobs[1:], first)]
    assert max(moved) > 0.01  # the adapter changed them: the comparison above could fail

    ids = tokenizer(prompts[0])["input_ids"]  # token ids, as lm-evaluation-harness sends them; one more token
    one = _post(url, "/v1/completions", {"model": "wide", "prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                         "temperature": 0}).json()["choices"][0]
    assert one["text"].startswith(tokenizer.decode(ids)) and len(one["logprobs"]["tokens"]) == len(ids) + 1
    assert one["logprobs"]["token_logprobs"][1 : len(ids)] == pytest.approx(first, abs=1e-5)
    streamed = collections.defaultdict(str)
    for chunk in client.completions.create(model="wide", prompt=prompts, max_tokens=2, echo=True, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert [streamed[i][: len(p)] for i, p in enumerate(prompts)] == prompts


# ---- top_k, min_p, penalties ----------------------------------------------------------------------


def test_top_k_and_min_p_cut_the_draw(client, served):
    greedy = _text(client, temperature=0)
    assert any(_text(client, temperature=1.5, seed=s) != greedy for s in range(3))  # sampling differs ...
    for seed in range(3):  # ... a cut to the most likely token is greedy
        assert _text(client, temperature=1.5, seed=seed, extra_body={"top_k": 1}) == greedy
        assert _text(client, temperature=1.5, seed=seed, extra_body={"min_p": 1.0}) == greedy
    body = {"model": "wide", "prompt": PROMPTS[3], "max_tokens": 16, "temperature": 1, "seed": 4, "ignore_eos": True}
    ranks = collections.Counter()
    for cut in ({}, {"top_k": 3}, {"min_p": 0.5}):
        lp = _post(served[0], "/v1/completions", {**body, **cut, "logprobs": 3}).json()["choices"][0]["logprobs"]
        for value, top in zip(lp["token_logprobs"], lp["top_logprobs"]):
            best = max(top.values())
            ranks[str(cut), "in top 3"] += len(top) == 3  # (the token is among the three most likely)
            ranks[str(cut), "over half the best"] += value >= best + math.log(0.5) - 1e-6
    assert ranks["{}", "in top 3"] < 16 and ranks["{}", "over half the best"] < 16  # without a cut, some are not
    assert ranks["{'top_k': 3}", "in top 3"] == 16 and ranks["{'min_p': 0.5}", "over half the best"] == 16


def test_penalties_push_greedy_away_from_repeating(served):
    url = served[0]
    body = {"model": "small", "prompt": PROMPTS[0], "max_tokens": 24, "temperature": 0, "logprobs": 0, "ignore_eos": True}

    def tokens(**penalty) -> list[str]:
        return _post(url, "/v1/completions", {**body, **penalty}).json()["choices"][0]["logprobs"]["tokens"]

    plain = tokens()
    assert _repeats(plain) > 10  # this adapter loops: the penalties have work to do
    for penalty in ({"presence_penalty": 2}, {"frequency_penalty": 2}, {"repetition_penalty": 1e6}):
        once = tokens(**penalty)
        assert _repeats(once) == 0 and once == tokens(**penalty), penalty  # never repeats; greedy stays greedy
    assert _repeats(tokens(frequency_penalty=0.05)) < _repeats(plain) <= _repeats(tokens(presence_penalty=-2))


# ---- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, fields, message", [
    ("completions", {"n": 0}, "n must be between 1 and 16 (the rows this server decodes at once), got 0"),
    ("chat/completions", {"n": 17}, "n must be between 1 and 16 (the rows this server decodes at once), got 17"),
    ("completions", {"prompt": ["x"] * 9, "n": 8}, "9 prompts x n=8 are 72 completions, over the limit of 64 per request"),
    ("completions", {"n": 2, "best_of": 1}, "best_of must be at least n (2), got 1"),
    ("completions", {"logprobs": 21}, "logprobs must be between 0 and 20, got 21"),
    ("completions", {"logprobs": -1}, "logprobs must be between 0 and 20, got -1"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20, got 21"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
    ("completions", {"top_k": -2}, "top_k must be -1 or 0 (every token) or a positive integer, got -2"),
    ("completions", {"min_p": 1.5}, "min_p must be between 0 and 1, got 1.5"),
    ("completions", {"repetition_penalty": 0}, "repetition_penalty must be positive (1: none), got 0.0"),
    ("completions", {"presence_penalty": 2.5}, "presence_penalty must be between -2 and 2, got 2.5"),
    ("chat/completions", {"frequency_penalty": -3}, "frequency_penalty must be between -2 and 2, got -3.0"),
    ("completions", {"max_tokens": 0}, "max_tokens must be between 1 and 48, got 0 (0, the prompt's logprobs only, needs echo)"),
    ("completions", {"prompt": [5, 10**6]}, "prompt 0 has a token id outside the vocabulary (0 to"),
])
def test_values_out_of_range_are_one_line_400s_naming_the_field(served, path, fields, message):
    body = {"model": "small", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    body.pop("messages" if path == "completions" else "prompt")
    r = _post(served[0], f"/v1/{path}", {**body, **fields})
    error = r.json()["error"]["message"]
    assert r.status_code == (413 if "per request" in message else 400) and message in error and "\n" not in error, r.text


def test_what_stays_unsupported_is_refused_by_name(client):
    messages = [{"role": "user", "content": "x"}]
    refused = [
        (lambda: client.chat.completions.create(model="small", messages=messages, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {}}}]), "tools: Extra inputs are not permitted"),
        (lambda: client.chat.completions.create(model="small", messages=messages, response_format={"type": "json_object"}),
         "response_format: Extra inputs are not permitted"),
        (lambda: client.completions.create(model="small", prompt="x", suffix="y"), "suffix='y' is not supported"),
        (lambda: client.completions.create(model="small", prompt="x", logit_bias={"5": 1}), "logit_bias="),
        (lambda: client.completions.create(model="small", prompt="x", n=2, best_of=3),
         r"best_of=3 \(more than n\) is not supported"),
    ]
    for call, message in refused:
        with pytest.raises(openai.BadRequestError, match=message):
            call()
    assert len(client.completions.create(model="small", prompt="x", n=2, best_of=2, max_tokens=2).choices) == 2


# ---- the math, by hand ----------------------------------------------------------------------------


def test_penalties_and_cuts_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    # repetition 2 over the prompt [0] and the output [1, 1, 2]: 2 -> 1, -1 -> -2, 0.5 -> 0.25, 3 unseen;
    # then counts [0, 2, 1, 0]: frequency 0.25 and presence 0.5 take 1 from token 1, 0.75 from token 2
    got = penalize(logits, Sampling(repetition_penalty=2, presence_penalty=0.5, frequency_penalty=0.25), [0], [1, 1, 2])
    torch.testing.assert_close(got, torch.tensor([1.0, -3.0, -0.5, 3.0]))
    assert penalize(logits, Sampling(), [0], [1]) is logits  # none: the logits themselves
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def drawn(**cut) -> set[int]:
        return {sample(probs, Sampling(**cut), torch.Generator().manual_seed(s)) for s in range(200)}

    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == drawn(min_p=0.5) == {0, 1}  # 0.3 >= 0.5 x 0.5 > 0.15
    assert drawn(min_p=0.2, top_k=3) == {0, 1, 2} and drawn(top_k=1) == {0}


# ---- the scheduler, without HTTP ------------------------------------------------------------------


def _step(scheduler) -> None:
    """One step of the scheduler's loop, on this thread (its inbox first)."""
    scheduler._drain(block=False)
    scheduler._step()
    scheduler._release()


@pytest.fixture(scope="module")
def lm(tiny_llama, tmp_path_factory):
    return tiny_llama, _adapter_folders(tiny_llama, tmp_path_factory.mktemp("fork-adapters"))


def test_forks_share_the_prefill_and_draw_as_sequences_of_their_own(lm):
    """Two prompts of three completions each, queued together behind a running sequence, prefilled in
    chunks of 4: only the first of each three is prefilled, and each draws what it draws alone."""
    tokenizer, _, scheduler = _scheduler_with_adapters(*lm, max_rows=8, prefill_chunk=4)
    prefilled: list[Sequence] = []
    forward = scheduler._forward

    def recording(seqs, ids, start, last=None):
        if last is not None:  # a prefill
            prefilled.extend(seqs)
        return forward(seqs, ids, start, last)

    scheduler._forward = recording
    events = collections.defaultdict(list)
    jobs = [(tokenizer(p)["input_ids"], a, Sampling(max_tokens=8, temperature=1, seed=11 + j))
            for p, a in ((PROMPTS[5], "wide"), (PROMPTS[3], "small")) for j in range(3)]
    seqs = [Sequence(*job, events[i].append) for i, job in enumerate(jobs) if i % 3]
    seqs[0:0] = [Sequence(*jobs[0], events[0].append, seqs[0:2])]
    seqs[3:3] = [Sequence(*jobs[3], events[3].append, seqs[3:5])]
    other = Sequence(tokenizer("x")["input_ids"], "small", Sampling(max_tokens=20, temperature=0), lambda e: None)
    for seq in (other, seqs[0], seqs[3]):
        scheduler.submit(seq)
    while not all(s.finished for s in (other, *seqs)):
        _step(scheduler)
    assert set(prefilled) == {other, seqs[0], seqs[3]}  # the forks were never prefilled
    assert scheduler.rows == [] and scheduler.running == 0
    alone = []
    for job in jobs:  # each alone: the same tokens
        seq = Sequence(*job, lambda e: None)
        scheduler.submit(seq)
        scheduler.run_until_done()
        alone.append(seq.tokens)
    assert [s.tokens for s in seqs] == alone and len({tuple(t) for t in alone[:3]}) == 3  # ("wide" draws apart)
    assert all([e for e in events[i] if e[0] != "text"] == [("done", "length")] for i in range(6))


def test_forks_end_with_their_sequence_before_its_prompt_is_read(lm):
    tokenizer, _, scheduler = _scheduler_with_adapters(*lm, max_rows=8, prefill_chunk=4)
    prompt = tokenizer(PROMPTS[5])["input_ids"]
    events = collections.defaultdict(list)

    def group(name: str) -> list[Sequence]:
        forks = [Sequence(prompt, "wide", Sampling(max_tokens=4), events[name, j].append) for j in (1, 2)]
        return [Sequence(prompt, "wide", Sampling(max_tokens=4), events[name, 0].append, forks), *forks]

    dropped, retired, kept = group("dropped"), group("retired"), group("kept")
    for g in (dropped, retired, kept):
        scheduler.submit(g[0])
    scheduler.cancel(kept[1])  # one fork of "kept", before it has a row
    _step(scheduler)  # the first chunk of "dropped"'s prompt
    assert 0 < dropped[0].length < len(prompt) and dropped[1].row >= 0
    scheduler.cancel(dropped[0])  # "dropped" before its prompt is read: its forks go with it
    _step(scheduler)  # the first chunk of "retired"'s
    assert 0 < retired[0].length < len(prompt)
    scheduler.retire(lambda s: s in retired, 404, "gone")  # one error each
    while scheduler.rows or scheduler.waiting:
        _step(scheduler)
    ends = {key: [e for e in log if e[0] != "text"] for key, log in events.items()}
    assert ends["kept", 0] == ends["kept", 2] == [("done", "length")] and events["kept", 1] == []
    assert all(events["dropped", j] == [] for j in range(3))
    assert all(ends["retired", j] == [("error", (404, "gone"))] for j in range(3))
    assert all(s.finished for s in (*kept, *dropped, *retired)) and scheduler.rows == [] and scheduler.queued == 0


@pytest.mark.parametrize("engine", ["decoder", "model"])
def test_prompt_logprobs_over_chunks_and_beside_other_rows_equal_transformers(lm, engine):
    """Echoed rows (every position's logits) and plain ones (the last) in the same prefill calls."""
    tokenizer, model, scheduler = _scheduler_with_adapters(*lm, max_rows=4, prefill_chunk=5, engine=engine)
    prompts = [tokenizer(p)["input_ids"] for p in (PROMPTS[5], PROMPTS[1], PROMPTS[3])]
    seqs = [Sequence(ids, a, Sampling(max_tokens=n, temperature=0, prompt_logprobs=k), lambda e: None)
            for ids, a, n, k in zip(prompts, ("wide", "small", "mid"), (0, 3, 2), (2, None, 0))]
    for seq in seqs:
        scheduler.submit(seq)
    scheduler.run_until_done()
    assert seqs[1].prompt_logprobs == [] and len(seqs[1].tokens) == 3 and seqs[0].tokens == []
    for seq, k in ((seqs[0], 2), (seqs[2], 0)):
        with torch.no_grad(), lorakit.adapter_per_row(model, [seq.adapter]):
            want = model(torch.tensor([seq.prompt])).logits[0].float().log_softmax(-1)
        got = seq.prompt_logprobs
        assert [e.token for e in got] == seq.prompt and got[0].logprob is None
        torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]),
                                   want[torch.arange(len(got) - 1), torch.tensor(seq.prompt[1:])], atol=1e-4, rtol=0)
        assert all(len(e.top) == k for e in got[1:])


def test_prompt_logprobs_are_whole_when_the_prompt_is_in_the_prefix_cache(lm):
    """An echoed prompt whose prefix another request stored is prefilled whole (every position's logits),
    while a plain one reuses the stored keys and values."""
    tokenizer, model, scheduler = _scheduler_with_adapters(*lm, max_rows=4, prefill_chunk=64,
                                                           prefix_cache_tokens=1024)
    prompt = tokenizer(" ".join([PROMPTS[5]] * 3 + [PROMPTS[1]]))["input_ids"]
    assert len(prompt) > 2 * 16  # (whole blocks of 16 tokens are stored)
    first, plain, echoed = (Sequence(prompt, "wide", Sampling(max_tokens=1, temperature=0, prompt_logprobs=k),
                                     lambda e: None) for k in (None, None, 1))
    for seq in (first, plain, echoed):
        scheduler.submit(seq)
        scheduler.run_until_done()
    assert plain.cached > 0 and echoed.cached == 0
    with torch.no_grad(), lorakit.adapter_per_row(model, ["wide"]):
        want = model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    assert [e.token for e in echoed.prompt_logprobs] == prompt
    torch.testing.assert_close(torch.tensor([e.logprob for e in echoed.prompt_logprobs[1:]]),
                               want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)
