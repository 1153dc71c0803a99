"""The routes ``lorakit serve`` has beside its APIs (#29): vLLM's ``/health``, ``/tokenize``, ``/detokenize``
and adapter routes, and ``/metrics`` in Prometheus' text format; against real ``lorakit serve`` processes
(a tiny Llama, a tiny BERT classifier) started with an admin token."""

import math
import re

import httpx
import pytest
from transformers import AutoTokenizer

import lorakit
from lorakit.generate import Decoding, generate_ids
from lorakit.tasks.lm import load_causal_lm
from test_serve import PAIRS, SINGLES, _make_adapter
from test_serve_openai import PROMPTS, _adapter_folders
from test_serve_process import cli_server

TOKEN = {"authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def gen(tiny_llama, tmp_path_factory):
    """(url, model folder, adapter folders) of a generation server serving the adapter "small"."""
    root = tmp_path_factory.mktemp("routes-gen")
    folders = _adapter_folders(tiny_llama, root)
    with cli_server(tiny_llama, {"small": folders["small"]}, root / "log", "--token", "s3cret", "--max-length", "64",
                    "--max-new-tokens", "200") as (_, url):
        yield url, tiny_llama, folders


@pytest.fixture(scope="module")
def cls(tiny_model, tmp_path_factory):
    """(url, model folder, adapter folders) of a classification server serving the adapter "mrpc"."""
    root = tmp_path_factory.mktemp("routes-cls")
    for seed, task in enumerate(("mrpc", "cola")):
        _make_adapter(root / task, tiny_model, task, 4, seed)
    with cli_server(tiny_model, {"mrpc": str(root / "mrpc")}, root / "log", "--token", "s3cret") as (_, url):
        yield url, tiny_model, {task: str(root / task) for task in ("mrpc", "cola")}


def _post(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60, **kwargs)


SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})? (\S+)')


def _scrape(url: str) -> dict[str, float]:
    """``/metrics`` (no token needed) as ``{'name{labels}': value}``, checking the text format on the way: each
    sample after its family's ``# TYPE``, histogram buckets cumulative up to ``+Inf``, which equals ``_count``."""
    r = httpx.get(f"{url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.text
    samples, kinds = {}, {}
    for line in r.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            kinds[name] = kind
        elif not line.startswith("# HELP "):
            m = SAMPLE.fullmatch(line)
            assert m, line
            family = re.sub(r"_(bucket|sum|count)$", "", m[1]) if m[1] not in kinds else m[1]
            assert family in kinds, f"{line!r} before its # TYPE line"
            samples[m[1] + (m[2] or "")] = float(m[3])
    for name in [n for n, kind in kinds.items() if kind == "histogram"]:
        buckets = [(float(k.split('le="')[1][:-2]), v) for k, v in samples.items() if k.startswith(f"{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1][0] == math.inf and buckets[-1][1] == samples[f"{name}_count"]
    return samples


def _greedy(model_dir: str, folder: str, prompt: str, max_tokens: int) -> str:
    """The adapter's greedy completion, generated alone with transformers."""
    tokenizer, model = load_causal_lm(model_dir)
    lorakit.load_adapter(model, folder, "a")
    ids = generate_ids(model, [tokenizer(prompt)["input_ids"]], pad_id=None, eos_id=tokenizer.eos_token_id,
                       adapters=["a"], decoding=Decoding(max_new_tokens=max_tokens))[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("server", ["gen", "cls"])
def test_health_is_an_empty_200(server, request):
    url = request.getfixturevalue(server)[0]
    r = httpx.get(f"{url}/health", timeout=30)
    assert r.status_code == 200 and r.content == b""


def test_metrics_count_requests_and_tokens_per_adapter_and_time_them(gen):
    url, model_dir, _ = gen
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = _scrape(url)
    fields = {"temperature": 0, "ignore_eos": True}
    assert _post(url, "/v1/completions", {"model": "small", "prompt": PROMPTS[:2], "max_tokens": 5, **fields}).status_code == 200
    assert _post(url, "/v1/completions", {"model": model_dir, "prompt": PROMPTS[2], "max_tokens": 3, **fields}).status_code == 200
    after = _scrape(url)

    def grew(name: str, **labels: str) -> float:
        key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        return after.get(key, 0) - before.get(key, 0)

    prompt = [len(tokenizer(p)["input_ids"]) for p in PROMPTS[:3]]
    for model, requests, prompt_tokens, tokens, completions in (("small", 1, prompt[0] + prompt[1], 10, 2),
                                                               (model_dir, 1, prompt[2], 3, 1)):
        assert grew("lorakit:requests_total", model_name=model) == requests
        assert grew("lorakit:prompt_tokens_total", model_name=model) == prompt_tokens
        assert grew("lorakit:generation_tokens_total", model_name=model) == tokens
        assert grew("lorakit:request_success_total", model_name=model, finished_reason="length") == completions
    assert grew("lorakit:time_to_first_token_seconds_count") == 3 and grew("lorakit:time_to_first_token_seconds_sum") > 0
    # one interval per token after each completion's first, fewer where tokens came out together (held-back text)
    assert 0 < grew("lorakit:inter_token_latency_seconds_count") <= 13 - 3
    assert grew("lorakit:inter_token_latency_seconds_sum") > 0
    assert after["lorakit:num_requests_running"] == after["lorakit:num_requests_waiting"] == 0


def test_metrics_show_the_rows_running(gen):
    url, _, _ = gen
    body = {"model": "small", "prompt": ["x"] * 8, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line)
        running = _scrape(url)["lorakit:num_requests_running"]
        list(lines)
    assert running == 8 and _scrape(url)["lorakit:num_requests_running"] == 0


def test_tokenize_and_detokenize_take_vllms_shapes(gen):
    url, model_dir, _ = gen
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(PROMPTS[0])["input_ids"]
    r = _post(url, "/tokenize", {"model": "small", "prompt": PROMPTS[0]})
    # max_model_len: prompt and completion, here the tiny model's 256 positions (under --max-length + --max-new-tokens)
    assert r.json() == {"count": len(ids), "max_model_len": 256, "tokens": ids, "token_strs": None}
    bare = _post(url, "/tokenize", {"prompt": PROMPTS[0], "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == ids[1:-1] and bare["token_strs"] == tokenizer.convert_ids_to_tokens(ids[1:-1])
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = _post(url, "/tokenize", {"model": model_dir, "messages": messages}).json()
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    completion = _post(url, "/v1/chat/completions", {"model": "small", "messages": messages, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == chat["count"]  # what the completion was given
    assert _post(url, "/detokenize", {"model": "small", "tokens": ids}).json() == {"prompt": tokenizer.decode(ids)}


@pytest.mark.parametrize("path, body, status, message", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "no model or adapter named 'nope'"),
    ("/tokenize", {"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400, "either 'prompt' or 'messages'"),
    ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
     "cannot both be true"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens[1] is -1, not a token id"),
    ("/detokenize", {"tokens": [1], "extra": 1}, 400, "extra: Extra inputs are not permitted"),
])
def test_tokenizer_route_errors_take_openais_shape(gen, path, body, status, message):
    r = _post(gen[0], path, body)
    error = r.json()["error"]
    assert r.status_code == status and message in error["message"] and error["code"] == status, r.text


def test_vllms_adapter_routes_load_and_unload_behind_the_token(gen):
    url, model_dir, folders = gen
    body = {"lora_name": "mid", "lora_path": folders["mid"]}
    assert _post(url, "/v1/load_lora_adapter", body).status_code == 401
    assert _post(url, "/v1/load_lora_adapter", body, headers={"authorization": "Bearer wrong"}).status_code == 401
    r = _post(url, "/v1/load_lora_adapter", body, headers=TOKEN)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mid' added successfully."
    assert "mid" in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"]]
    served = _post(url, "/v1/completions", {"model": "mid", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    assert served.json()["choices"][0]["text"] == _greedy(model_dir, folders["mid"], PROMPTS[0], 8)
    again = _post(url, "/v1/load_lora_adapter", body, headers=TOKEN)
    assert again.status_code == 409 and "is taken" in again.json()["error"]["message"]
    inplace = _post(url, "/v1/load_lora_adapter", {**body, "load_inplace": True}, headers=TOKEN)
    assert inplace.status_code == 400 and "load_inplace is not supported" in inplace.json()["error"]["message"]
    assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "mid"}).status_code == 401
    r = _post(url, "/v1/unload_lora_adapter", {"lora_name": "mid", "lora_int_id": 1}, headers=TOKEN)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'mid' removed successfully."
    assert _post(url, "/v1/completions", {"model": "mid", "prompt": "x"}).status_code == 404
    gone = _post(url, "/v1/unload_lora_adapter", {"lora_name": "mid"}, headers=TOKEN)
    assert gone.status_code == 404 and "no adapter named 'mid'" in gone.json()["error"]["message"]


def test_a_classifier_server_has_the_same_routes(cls):
    url, model_dir, folders = cls
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    before = _scrape(url)
    assert _post(url, "/v1/classify", {"adapter": "mrpc", "inputs": PAIRS}).status_code == 200
    after = _scrape(url)
    tokens = sum(len(tokenizer(a, b)["input_ids"]) for a, b in PAIRS)
    assert after['lorakit:requests_total{model_name="mrpc"}'] - before.get('lorakit:requests_total{model_name="mrpc"}', 0) == 1
    assert after['lorakit:prompt_tokens_total{model_name="mrpc"}'] - before.get(
        'lorakit:prompt_tokens_total{model_name="mrpc"}', 0) == tokens
    assert after["lorakit:forward_passes_total"] > before["lorakit:forward_passes_total"]
    assert after["lorakit:num_requests_waiting"] == 0 and after["lorakit:num_adapters"] == 1
    body = {"lora_name": "cola", "lora_path": folders["cola"]}
    assert _post(url, "/v1/load_lora_adapter", body).status_code == 401
    r = _post(url, "/v1/load_lora_adapter", body, headers=TOKEN)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'cola' added successfully."
    reply = _post(url, "/v1/classify", {"adapter": "cola", "inputs": SINGLES}).json()
    assert reply["task"] == "cola" and len(reply["labels"]) == len(SINGLES)
    assert _scrape(url)["lorakit:num_adapters"] == 2
    r = _post(url, "/v1/unload_lora_adapter", {"lora_name": "cola"}, headers=TOKEN)
    assert r.status_code == 200 and _post(url, "/v1/classify", {"adapter": "cola", "inputs": SINGLES}).status_code == 404
