"""lorakit serve with a causal LM: continuous batching across adapters behind OpenAI's API,
through real HTTP clients (httpx, openai) against a server on loopback."""

import concurrent.futures
import json
import time

import httpx
import pytest

import lorakit
from helpers import randomize
from lorakit.generate import Decoding, generate_ids
from lorakit.serving.config import ServeConfig
from lorakit.serving.decoder import Decoder
from lorakit.serving.generation import GenerationEngine
from lorakit.serving.scheduler import Sampling, Scheduler, Sequence
from lorakit.serving.server import create_app
from lorakit.tasks.lm import load_causal_lm
from test_serve import running

# name -> rank; "wide" adapts every linear layer
ADAPTERS = {"small": 2, "mid": 4, "wide": 8}
PROMPTS = ["name : The Vaults | Type : pub", "hello", "a b c d e f g h i j k l m n o p",
           "the cat sat on the mat and then it went to sleep", "x", "area : city centre | food : Italian | near : the river"]


def _adapter_folders(model_dir: str, root) -> dict[str, str]:
    folders = {}
    for seed, (name, r) in enumerate(ADAPTERS.items()):
        _, model = load_causal_lm(model_dir)
        lorakit.add_lora(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules="all-linear" if r == 8 else None))
        randomize(model, seed + 5, std=0.3)
        lorakit.save_adapter(model, root / name)
        (root / name / "task.json").write_text(json.dumps({"task": "jsonl", "model": model_dir}))
        folders[name] = str(root / name)
    return folders


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2_lm"])
def lm(request, tmp_path_factory):
    """(model folder, adapter folders) for a tiny Llama and a tiny GPT-2."""
    model_dir = request.getfixturevalue(request.param)
    return model_dir, _adapter_folders(model_dir, tmp_path_factory.mktemp("gen-adapters"))


@pytest.fixture(scope="module")
def reference(lm):
    """Greedy completions of each prompt through each adapter, generated alone with transformers."""
    model_dir, folders = lm
    tokenizer, model = load_causal_lm(model_dir)
    for name, folder in folders.items():
        lorakit.load_adapter(model, folder, name)

    def complete(prompt: str, adapter: str | None, max_tokens: int) -> list[int]:
        ids = [tokenizer(prompt)["input_ids"]]
        return generate_ids(model, ids, pad_id=None, eos_id=tokenizer.eos_token_id, adapters=[adapter],
                            decoding=Decoding(max_new_tokens=max_tokens))[0]

    return tokenizer, complete


def _server(model_dir: str, folders: dict[str, str], **limits):
    config = ServeConfig(**{"max_length": 64, "max_new_tokens": 48, "prefill_chunk": 8, **limits})
    return running(create_app(GenerationEngine(model_dir, config, "fp32"), config, folders))


@pytest.fixture(scope="module")
def server(lm):
    with _server(*lm) as client:
        yield client


def _complete(client, model: str, prompt, **fields) -> dict:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def _stream(client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.read()
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_concurrent_requests_over_three_adapters_equal_each_alone(lm, server, reference):
    tokenizer, complete = reference
    model_dir = lm[0]
    jobs = [(p, a) for p in PROMPTS for a in [model_dir, *ADAPTERS]]
    alone = {job: _complete(server, job[1], job[0], max_tokens=20) for job in jobs[:8]}  # one at a time
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # all at once, arriving in a burst
        together = dict(zip(jobs, pool.map(lambda job: _complete(server, job[1], job[0], max_tokens=20), jobs)))
    for (prompt, adapter), out in together.items():
        want = complete(prompt, None if adapter == model_dir else adapter, 20)
        choice = out["choices"][0]
        assert choice["text"] == tokenizer.decode(want, skip_special_tokens=True), (prompt, adapter)
        assert choice["finish_reason"] == ("length" if len(want) == 20 else "stop")
        assert out["usage"]["prompt_tokens"] == len(tokenizer(prompt)["input_ids"])
        assert out["usage"]["completion_tokens"] == min(len(want) + 1, 20)
        if (prompt, adapter) in alone:
            assert alone[(prompt, adapter)]["choices"] == out["choices"]
    # the adapters changed the completions (else the comparison above proves little)
    texts = {a: together[(PROMPTS[0], a)]["choices"][0]["text"] for a in [model_dir, *ADAPTERS]}
    assert len(set(texts.values())) == 4


def test_several_prompts_in_one_request(server, reference):
    tokenizer, complete = reference
    out = _complete(server, "mid", PROMPTS[:3], max_tokens=12)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for prompt, choice in zip(PROMPTS, out["choices"]):
        assert choice["text"] == tokenizer.decode(complete(prompt, "mid", 12), skip_special_tokens=True)


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streaming_returns_the_same_text_as_non_streaming(server, path):
    chat = path.endswith("chat/completions")
    body = {"model": "wide", "temperature": 0, "max_tokens": 30, "stream_options": {"include_usage": True},
            **({"messages": [{"role": "user", "content": PROMPTS[3]}]} if chat else {"prompt": PROMPTS[3]})}
    r = server.post(path, json={k: v for k, v in body.items() if k != "stream_options"})
    whole = r.json()
    events = _stream(server, path, body)
    usage = events.pop()
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert {e["id"] for e in events} == {events[0]["id"]} and events[-1]["choices"][0]["finish_reason"] is not None
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        assert text == whole["choices"][0]["message"]["content"] and whole["object"] == "chat.completion"
        assert all(e["object"] == "chat.completion.chunk" for e in events)
    else:
        text = "".join(e["choices"][0]["text"] for e in events)
        assert text == whole["choices"][0]["text"]
    assert len([e for e in events if e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content")]) > 1
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_chat_applies_the_template(server, reference):
    tokenizer, complete = reference
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = server.post("/v1/chat/completions", json={"model": "small", "messages": messages, "temperature": 0, "max_tokens": 15})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = complete(prompt, "small", 15)  # the template's text, tokenized with the tokenizer's special tokens
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    if ids == tokenizer(prompt)["input_ids"]:
        assert r.json()["choices"][0]["message"]["content"] == tokenizer.decode(want, skip_special_tokens=True)


def test_stop_strings_and_seeded_sampling(server):
    full = _complete(server, "small", PROMPTS[2], max_tokens=30)["choices"][0]["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), full
    cut = _complete(server, "small", PROMPTS[2], max_tokens=30, stop=[stop, "never-there"])["choices"][0]
    assert cut == {**cut, "text": full[: full.index(stop)], "finish_reason": "stop"}
    events = _stream(server, "/v1/completions", {"model": "small", "prompt": PROMPTS[2], "temperature": 0,
                                                 "max_tokens": 30, "stop": stop})
    assert "".join(e["choices"][0]["text"] for e in events) == cut["text"]

    def draw(seed):
        return _complete(server, "mid", PROMPTS[0], max_tokens=20, temperature=1.5, top_p=0.9, seed=seed)["choices"][0]["text"]

    assert draw(1) == draw(1) and len({draw(1), draw(2), draw(3)}) > 1


def test_models_route_and_admin_load_unload_while_streams_run(lm, tmp_path):
    model_dir, folders = lm
    with _server(model_dir, {"small": folders["small"]}, max_new_tokens=200, max_length=40) as client:
        engine_eos = client.get("/v1/models").json()
        assert [m["id"] for m in engine_eos["data"]] == [model_dir, "small"]
        assert engine_eos["data"][1]["parent"] == model_dir
        body = {"model": "small", "prompt": "x", "temperature": 0, "max_tokens": 200}
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data"))
            assert client.post("/v1/adapters", json={"name": "wide", "path": folders["wide"]}).status_code == 201
            assert client.delete("/v1/adapters/wide").status_code == 200
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the stream ran to its end meanwhile
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [model_dir, "small"]


@pytest.fixture
def long_server(lm):
    """A slow server whose completions never stop early, running one sequence at a time."""
    model_dir, folders = lm
    config = ServeConfig(max_length=40, max_new_tokens=200, max_batch_rows=1, max_queue=1, max_wait_ms=0)
    engine = GenerationEngine(model_dir, config, "fp32")
    engine.scheduler.eos.clear()
    forward = engine.scheduler.decoder.forward  # 10 ms a step: 200 tokens take 2 s
    engine.scheduler.decoder.forward = lambda *args: time.sleep(0.01) or forward(*args)
    with running(create_app(engine, config, folders)) as client:
        yield client, engine


def test_disconnects_free_their_rows_at_once(long_server):
    client, engine = long_server
    body = {"model": "small", "prompt": "x", "temperature": 0, "max_tokens": 200}
    for stream in (True, False):
        before = engine.scheduler.tokens
        with httpx.Client(base_url=client.base_url, timeout=0.05) as short:
            if stream:  # leaving the block after the first event closes the connection
                with short.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    lines = r.iter_lines()
                    next(lines)
                    time.sleep(0.1)
                    assert client.get("/healthz").json()["running"] == 1
            else:
                with pytest.raises(httpx.ReadTimeout):
                    short.post("/v1/completions", json=body)
        deadline = time.time() + 5
        while client.get("/healthz").json()["running"] and time.time() < deadline:
            time.sleep(0.005)
        assert client.get("/healthz").json()["running"] == 0
        # ... well before its 200 tokens, and the row is free for the next request
        assert engine.scheduler.tokens - before < 200
        assert _complete(client, "small", "x", max_tokens=3)["choices"][0]["finish_reason"] == "length"


def test_unloading_an_adapter_ends_its_streams_with_an_error(long_server):
    client, _ = long_server
    with client.stream("POST", "/v1/completions", json={"model": "mid", "prompt": "x", "max_tokens": 200, "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data"))
        assert client.delete("/v1/adapters/mid").status_code == 200
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data") and line != "data: [DONE]"]
    assert "unloaded" in rest[-1]["error"]["message"]
    r = client.post("/v1/completions", json={"model": "mid", "prompt": "x"})
    assert r.status_code == 404 and "no model or adapter named 'mid'" in r.json()["error"]["message"]


def test_queue_limit(long_server):
    client, _ = long_server
    body = {"model": "small", "prompt": "x", "max_tokens": 200, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as first:  # running (max_batch_rows=1)
        lines = first.iter_lines()  # (a dropped iterator would close the connection)
        next(lines)
        with client.stream("POST", "/v1/completions", json=body) as second:  # queued (max_queue=1)
            assert second.status_code == 200
            third = client.post("/v1/completions", json={**body, "stream": False})
            assert third.status_code == 503 and "busy" in third.json()["error"]["message"]
            health = client.get("/healthz").json()
            assert (health["running"], health["queued"]) == (1, 1)


@pytest.mark.parametrize("body, status, message", [
    ({"model": "nope", "prompt": "x"}, 404, "no model or adapter named 'nope'"),
    ({"model": "small"}, 400, "prompt: Field required"),
    ({"model": "small", "prompt": "x", "max_tokens": 49}, 400, "max_tokens must be between 1 and 48"),
    ({"model": "small", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be between 1 and 48"),
    ({"model": "small", "prompt": "x", "suffix": "y"}, 400, "suffix='y' is not supported"),
    ({"model": "small", "prompt": "x", "logit_bias": {"5": 1}}, 400, "logit_bias={'5': 1.0} is not supported"),
    ({"model": "small", "prompt": "x", "temperature": -1}, 400, "temperature must be between 0 and 2"),
    ({"model": "small", "prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ({"model": "small", "prompt": "x", "stop": ["a", ""]}, 400, "stop takes up to 4 non-empty strings"),
    ({"model": "small", "prompt": "x", "tools": []}, 400, "tools: Extra inputs are not permitted"),
    ({"model": "small", "prompt": "word " * 70}, 400, "the limit is 64"),
    ({"model": "small", "prompt": ["x"] * 65}, 413, "prompt takes 1 to 64 strings"),
    ({"model": "small", "prompt": []}, 400, "prompt takes 1 to 64 strings"),
])
def test_completion_errors(server, body, status, message):
    r = server.post("/v1/completions", json=body)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_chat_errors_and_malformed_json(server):
    r = server.post("/v1/chat/completions", json={"model": "small", "messages": []})
    assert r.status_code == 400 and "messages is empty" in r.json()["error"]["message"]
    r = server.post("/v1/chat/completions", json={"model": "small", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]
    r = server.post("/v1/completions", content=b'{"model": "small", "prompt": ')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]["message"]


def test_the_openai_client_round_trip(server, reference, lm):
    openai = pytest.importorskip("openai")
    tokenizer, complete = reference
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [lm[0], *ADAPTERS]
    out = client.completions.create(model="mid", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert out.choices[0].text == tokenizer.decode(complete(PROMPTS[0], "mid", 10), skip_special_tokens=True)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="mid", prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True))
    assert streamed == out.choices[0].text
    chat = client.chat.completions.create(model="wide", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0)
    chunks = client.chat.completions.create(model="wide", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                            temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError, match="no model or adapter named 'gone'"):
        client.completions.create(model="gone", prompt="x")
    with pytest.raises(openai.BadRequestError, match="max_tokens must be between"):
        client.completions.create(model="mid", prompt="x", max_tokens=1000)


# ---- the scheduler and the decoder, without HTTP -----------------------------------------------------


def _scheduler_with_adapters(model_dir: str, folders: dict[str, str], **options):
    tokenizer, model = load_causal_lm(model_dir)
    for name, folder in folders.items():
        lorakit.load_adapter(model, folder, name)
    return tokenizer, model, Scheduler(model, tokenizer, eos=set(), **options)


def test_chunked_prefill_keeps_running_streams_going(lm):
    """A 40-token prompt prefilled 8 tokens a step: the running sequence gains a token at
    every one of those steps, and both complete as they would alone."""
    tokenizer, model, scheduler = _scheduler_with_adapters(*lm, max_rows=4, max_length=128, prefill_chunk=8)
    log: list[tuple[str, int]] = []  # (sequence, scheduler step) of each text event

    def emit(name):
        return lambda event: log.append((name, scheduler.steps))

    long_prompt = tokenizer(" ".join(["word"] * 40), add_special_tokens=False)["input_ids"][:40]
    first = Sequence(tokenizer("x")["input_ids"], "small", Sampling(max_tokens=30, temperature=0), emit("first"))
    second = Sequence(long_prompt, "wide", Sampling(max_tokens=5, temperature=0), emit("second"))
    scheduler.start()
    try:
        scheduler.submit(first)
        while not log:
            time.sleep(0.001)
        scheduler.submit(second)
        deadline = time.time() + 30
        while not (first.finished and second.finished) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    start = next(step for name, step in log if name == "first" and step > 0)  # first's first decode step
    first_of_second = min(step for name, step in log if name == "second")
    assert len(long_prompt) == 40 and first_of_second - start >= 40 // 8 - 1  # prefilled over 5 steps ...
    during = {step for name, step in log if name == "first" and start <= step <= first_of_second}
    assert during == set(range(start, first_of_second + 1))  # ... while the first gained a token at each
    for seq, name, n in ((first, "small", 30), (second, "wide", 5)):
        alone = generate_ids(model, [seq.prompt], pad_id=None, eos_id=[-1], adapters=[name], decoding=Decoding(max_new_tokens=n))
        assert seq.tokens == alone[0]


def test_rows_stay_compact_as_sequences_leave_in_any_order(lm):
    """Sequences of different lengths and adapters joining and leaving (finished or cancelled)
    keep producing what each produces alone."""
    tokenizer, model, scheduler = _scheduler_with_adapters(*lm, max_rows=3, max_length=96, prefill_chunk=5)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    names = [None, "small", "mid", "wide", "small", "mid"]
    limits = [3, 17, 9, 25, 6, 12]
    seqs = [Sequence(p, a, Sampling(max_tokens=n, temperature=0), lambda e: None) for p, a, n in zip(prompts, names, limits)]
    cancelled = Sequence(prompts[2], "wide", Sampling(max_tokens=90, temperature=0), lambda e: None)
    scheduler.start()
    try:
        for seq in seqs[:2] + [cancelled] + seqs[2:]:
            scheduler.submit(seq)
        time.sleep(0.05)
        scheduler.cancel(cancelled)
        deadline = time.time() + 30
        while not all(s.finished for s in seqs) and time.time() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    for seq, name, n in zip(seqs, names, limits):
        alone = generate_ids(model, [seq.prompt], pad_id=None, eos_id=[-1], adapters=[name], decoding=Decoding(max_new_tokens=n))
        assert seq.tokens == alone[0]
    assert scheduler.rows == [] and scheduler.running == 0 and scheduler.queued == 0


def test_decoder_refuses_other_architectures():
    from transformers import BertConfig, BertForMaskedLM

    with pytest.raises(ValueError, match=r"Llama-style decoders \(llama, mistral, qwen2\) and GPT-2, not BertForMaskedLM"):
        Decoder(BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)))


def test_serve_picks_the_engine_from_the_models_architecture(lm, tiny_model, monkeypatch):
    from lorakit.serving import server as serve_module

    engines = []
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    monkeypatch.setattr("uvicorn.Server.run", lambda self: None)  # generation: HTTP on a thread, then return
    real = serve_module.create_app
    monkeypatch.setattr(serve_module, "create_app", lambda engine, *a: engines.append(engine) or real(engine, *a))
    serve_module.serve(lm[0], {"small": lm[1]["small"]}, ServeConfig(), "127.0.0.1", 0, "fp32")
    serve_module.serve(tiny_model, {}, ServeConfig(), "127.0.0.1", 0, "fp32")
    assert [type(e).__name__ for e in engines] == ["GenerationEngine", "Engine"]


def test_compile_compiles_the_decode_step_before_serving_once(tiny_llama, monkeypatch, capsys):
    """--compile: prepare() (before the scheduler starts) warms the scheduler up once, so the first requests do
    not wait for the compilation; without it, no warm-up."""
    calls = []
    monkeypatch.setattr(Scheduler, "warm_up", lambda self: calls.append(self))
    engine = GenerationEngine(tiny_llama, ServeConfig(max_length=64, max_new_tokens=16, compile=True), "fp32")
    engine.prepare()
    engine.prepare()
    assert calls == [engine.scheduler] and engine.scheduler.decoder.compiled
    assert "compiling the decode step" in capsys.readouterr().out
    GenerationEngine(tiny_llama, ServeConfig(max_length=64, max_new_tokens=16), "fp32").prepare()
    assert len(calls) == 1


def test_a_failing_forward_ends_its_requests_with_500_and_the_server_goes_on(lm):
    model_dir, folders = lm
    config = ServeConfig(max_length=64, max_new_tokens=16, verify_adapters="off")  # (counts the requests' forwards)
    engine = GenerationEngine(model_dir, config, "fp32")
    forward, calls = engine.scheduler.decoder.forward, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory (simulated)")
        return forward(*args)

    engine.scheduler.decoder.forward = flaky
    with running(create_app(engine, config, folders)) as client:
        r = client.post("/v1/completions", json={"model": "small", "prompt": "x", "max_tokens": 8, "ignore_eos": True})
        assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
        events = _stream(client, "/v1/completions", {"model": "small", "prompt": "x", "max_tokens": 8, "ignore_eos": True})
        assert events[-1]["choices"][0]["finish_reason"] == "length" and client.get("/healthz").json()["running"] == 0
