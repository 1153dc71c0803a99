"""``lorakit serve`` with a causal LM as a real process: one bad request among good ones,
slow request heads on kept-alive connections, request limits, Ctrl-C; and its scheduler
in-process where a process adds nothing (NaN factors, signals, cache memory)."""

import concurrent.futures
import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.generate import Decoding, generate_ids
from lorakit.serving.scheduler import Sampling, Scheduler, Sequence
from lorakit.tasks.lm import load_causal_lm
from test_serve_openai import PROMPTS, _adapter_folders


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_gpt2_lm"])
def lm(request, tmp_path_factory):
    """(model folder, adapter folders) for a tiny Llama and a tiny GPT-2."""
    model_dir = request.getfixturevalue(request.param)
    return model_dir, _adapter_folders(model_dir, tmp_path_factory.mktemp("gen-adapters"))


@contextlib.contextmanager
def cli_server(model_dir: str, adapters: dict[str, str], log, *flags: str):
    """A ``lorakit serve`` process on a free loopback port: ``(process, url)`` once it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    named = [arg for name, folder in adapters.items() for arg in ("--adapter", f"{name}={folder}")]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", model_dir, "--port", str(port),
                                 "--precision", "fp32", *named, *flags], stdout=out, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.time() + 120  # (a loaded machine starts it slowly)
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None and time.time() < deadline, open(log).read()
                time.sleep(0.2)
        yield proc, url
    finally:
        proc.kill()
        proc.wait()


def _overflowing_adapter(model_dir: str, folder) -> str:
    """An adapter whose factors are finite but whose update overflows float32 (inf, then NaN)."""
    _, model = load_causal_lm(model_dir)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, alpha=4))
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model):
            p.fill_(1e20)
    lorakit.save_adapter(model, folder)
    (folder / "task.json").write_text(json.dumps({"task": "jsonl", "model": model_dir}))
    return str(folder)


@pytest.fixture(scope="module")
def server(lm, tmp_path_factory):
    """(process, url) of one server for the tests below: small request-head timeout, long keep-alive."""
    model_dir, folders = lm
    root = tmp_path_factory.mktemp("process")
    adapters = {"small": folders["small"], "overflow": _overflowing_adapter(model_dir, root / "overflow")}
    with cli_server(model_dir, adapters, root / "log", "--header-timeout-s", "2", "--keep-alive-s", "60",
                    "--max-length", "64", "--max-new-tokens", "200", "--max-batch-rows", "80",
                    "--verify-adapters", "warn") as running:  # (strict would refuse the overflowing adapter)
        assert "warning: adapter 'overflow' could not be checked against its receipt" in (root / "log").read_text()
        yield running


def _events(lines) -> list[dict]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def test_degenerate_sampling_and_an_overflowing_adapter_leave_the_other_rows_alone(server, lm):
    """Temperatures and nucleus sizes too small to compute with are served (greedy); a row
    whose logits overflow ends alone with a 500 while a stream shares its decode steps."""
    _, url = server
    tokenizer, model = load_causal_lm(lm[0])
    lorakit.load_adapter(model, lm[1]["small"], "small")

    def alone(prompt: str, max_tokens: int, eos: list[int]) -> str:
        ids = generate_ids(model, [tokenizer(prompt)["input_ids"]], pad_id=None, eos_id=eos, adapters=["small"],
                           decoding=Decoding(max_new_tokens=max_tokens))[0]
        return tokenizer.decode(ids, skip_special_tokens=True)

    stream = {"model": "small", "prompt": ["x"] * 64, "temperature": 0, "max_tokens": 200, "ignore_eos": True,
              "stream": True}
    odd = [{"temperature": 1e-40}, {"top_p": 1e-300}, {"temperature": 5e-324, "top_p": 5e-324},
           {"model": "overflow", "temperature": 0}, {"model": "overflow"}]

    def post(fields):
        body = {"model": "small", "prompt": PROMPTS[0], "max_tokens": 8, **fields}
        return httpx.post(f"{url}/v1/completions", json=body, timeout=60)

    with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=60) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        with concurrent.futures.ThreadPoolExecutor(len(odd)) as pool:
            replies = list(pool.map(post, odd))
        running = httpx.get(f"{url}/healthz", timeout=30).json()["running"]
        events = _events([first, *lines])
    assert running == 64  # the stream still ran: the requests above shared its decode steps
    greedy = alone(PROMPTS[0], 8, [tokenizer.eos_token_id])
    for reply in replies[:3]:
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == greedy, reply.text
    for reply in replies[3:]:
        message = reply.json()["error"]["message"]
        assert reply.status_code == 500 and "adapter 'overflow' produced non-finite logits" in message
    assert not [e for e in events if "error" in e]
    want = alone("x", 200, [-1])  # (ignore_eos)
    for i in range(64):
        assert "".join(e["choices"][0]["text"] for e in events if e["choices"][0]["index"] == i) == want, i
    assert httpx.get(f"{url}/healthz", timeout=30).json()["running"] == 0


def test_each_request_head_on_a_kept_alive_connection_has_the_head_timeout(server):
    """After a whole request, a client trickling the next head a line a second (which
    restarts uvicorn's keep-alive timer, 60 s here) is cut after --header-timeout-s (2 s)."""
    _, url = server
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while not reply.endswith(b"}"):
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        answered, closed = time.time(), None
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.settimeout(1)
        while closed is None and time.time() < answered + 30:
            try:
                if sock.recv(1024) == b"":
                    closed = time.time()
                    break
            except TimeoutError:
                pass
            try:
                sock.sendall(b"X-Trickle: 1\r\n")
            except OSError:  # reset: closed too
                closed = time.time()
    assert closed is not None, "a trickled head kept the connection open for 30 s"
    assert closed - answered > 1.0


def test_request_limits_on_chat_names_and_numbers(server, lm):
    _, url = server
    post = lambda path, body: httpx.post(url + path, json=body, timeout=30)  # noqa: E731 (a fresh connection each)

    r = post("/v1/chat/completions", {"model": "small", "messages": [{"role": "user", "content": "word " * 500}]})
    assert r.status_code == 400 and "2500 characters long, over the limit of 64 tokens" in r.json()["error"]["message"]
    chats = [post("/v1/chat/completions", {"model": "small", "temperature": 0, "max_tokens": 10, "messages": [
        {"role": role, "content": "be brief"}, {"role": "user", "content": "hello"}]}).json() for role in ("system", "developer")]
    assert chats[0]["usage"] == chats[1]["usage"] and chats[0]["choices"] == chats[1]["choices"]
    for field in ("max_tokens", "max_completion_tokens"):
        r = post("/v1/chat/completions", {"model": "small", field: 0, "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 400 and f"{field} must be between 1 and 200, got 0" in r.json()["error"]["message"]
    for number in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
        r = httpx.post(url + "/v1/completions", content=b'{"model": "small", "prompt": "x", "temperature": ' + number + b"}")
        assert r.status_code == 400 and "temperature: Input should be a finite number" in r.json()["error"]["message"]
    long = "n" * 100_000
    r = post("/v1/adapters", {"name": long, "path": lm[1]["small"]})
    assert r.status_code == 400 and "an adapter name is 1 to 128 letters" in r.json()["error"] and len(r.text) < 300
    for r in (post("/v1/completions", {"model": long, "prompt": "x"}), httpx.delete(f"{url}/v1/adapters/{long[:5000]}")):
        assert r.status_code == 404 and "nnn... (" in r.text and len(r.text) < 500, r.text[:500]
    assert post("/v1/adapters", {"name": "n" * 128, "path": lm[1]["small"]}).status_code == 201


def test_cli_refuses_a_long_adapter_name_without_echoing_it(lm, capsys):
    model_dir, folders = lm
    with socket.socket() as taken:  # (a server that got past the name would stop here, not serve on)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert main(["serve", "--model", model_dir, "--adapter", f"{'n' * 5000}={folders['small']}", "--port", port]) == 2
    err = capsys.readouterr().err
    assert "an adapter name is 1 to 128 letters" in err and len(err) < 600


def test_ctrl_c_ends_running_streams_with_an_error_and_exits_0(lm, tmp_path):
    """The scheduler runs on the main thread; SIGINT stops it between two steps, every stream
    and queued completion gets a 503 error event, then the HTTP server closes."""
    model_dir, folders = lm
    with cli_server(model_dir, {"small": folders["small"]}, tmp_path / "log", "--max-batch-rows", "1",
                    "--max-new-tokens", "200") as (proc, url):
        # one row at a time: 64 completions of 200 tokens, for many seconds
        body = {"model": "small", "prompt": ["x"] * 64, "max_tokens": 200, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line)
            proc.send_signal(signal.SIGINT)
            rest = [line for line in [first, *lines] if line]
        assert proc.wait(60) == 0, open(tmp_path / "log").read()
    errors = [e["error"] for e in _events(rest) if "error" in e]
    finished = [e for e in _events(rest) if "choices" in e and e["choices"][0]["finish_reason"]]
    assert rest[-1] == "data: [DONE]" and errors and len(errors) + len(finished) == 64
    assert all(e == {"message": "the server is shutting down", "type": "server_error", "code": 503} for e in errors)


def test_a_signal_taken_by_another_thread_still_stops_an_idle_scheduler(lm):
    """Linux may run a process's SIGINT handler on any thread; Python then runs its own
    handler on the main thread only once that thread wakes: an idle scheduler must wake."""
    from lorakit.serving.server import _stop_on_signals

    tokenizer, model = load_causal_lm(lm[0])
    scheduler = Scheduler(model, tokenizer, eos=set(), max_rows=2, max_length=64)
    server = types.SimpleNamespace(should_exit=False, force_exit=False)

    def other() -> None:
        time.sleep(0.5)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)  # received by this thread
        time.sleep(30)
        scheduler.inbox.put(("wake",))  # (what a scheduler asleep for good would need)

    started = time.time()
    with _stop_on_signals(server, scheduler):
        threading.Thread(target=other, daemon=True).start()
        scheduler.run()
    assert server.should_exit and time.time() - started < 20


def test_the_row_cache_gives_memory_back_when_the_load_falls(lm):
    """48 completions at once grow the cache; once all but one end it shrinks (after a few
    steps), and once the scheduler is idle it is back to its starting size."""
    tokenizer, model = load_causal_lm(lm[0])
    scheduler = Scheduler(model, tokenizer, eos=set(), max_rows=48, max_length=200, prefill_chunk=64)

    def size() -> int:
        return sum(t.numel() for t in (*scheduler.cache.k, *scheduler.cache.v))

    start, seen = size(), []
    ids = tokenizer(PROMPTS[3])["input_ids"]
    for i in range(48):
        long = i == 47
        emit = (lambda e: seen.append(size())) if long else (lambda e: None)
        scheduler.submit(Sequence(ids, None, Sampling(max_tokens=150 if long else 20, ignore_eos=True, seed=i), emit))
    scheduler.run_until_done()
    assert max(seen) >= 12 * start  # 48 rows instead of 4
    assert seen[-1] <= start * 4  # one row left: the cache shrank while it ran
    assert size() == start


def test_nan_factors_end_their_rows_alone_and_leave_no_nan_in_the_cache(lm):
    """An adapter whose factors are NaN: its completion ends with a 500, the row it leaves
    is cleared, so the completions sharing or later taking its cache rows (which read past
    their own length, masked, up to the longest row) equal what they produce alone."""
    tokenizer, model = load_causal_lm(lm[0])
    for name in ("small", "mid"):
        lorakit.load_adapter(model, lm[1][name], name)
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model, "mid"):
            p.fill_(float("nan"))
    scheduler = Scheduler(model, tokenizer, eos=set(), max_rows=2, max_length=128, prefill_chunk=64)
    words = tokenizer(" ".join(["word"] * 60), add_special_tokens=False)["input_ids"]
    events: dict[str, list] = {"bad": [], "short": [], "late": []}
    bad = Sequence(words[:30], "mid", Sampling(max_tokens=5, temperature=0), events["bad"].append)
    short = Sequence(words[:3], "small", Sampling(max_tokens=60, temperature=0), events["short"].append)
    late = Sequence(words[:45], "small", Sampling(max_tokens=10, temperature=0), events["late"].append)
    scheduler.submit(bad)
    scheduler.submit(short)
    scheduler._drain(block=False)
    scheduler._step()  # both prefilled: bad ends, short moves into its row
    assert events["bad"] == [("error", (500, events["bad"][0][1][1]))] and "adapter 'mid' produced non-finite" in \
        events["bad"][0][1][1]
    scheduler.submit(late)
    scheduler.run_until_done()
    for seq in (short, late):
        alone = generate_ids(model, [seq.prompt], pad_id=None, eos_id=[-1], adapters=["small"],
                             decoding=Decoding(max_new_tokens=seq.sampling.max_tokens))[0]
        assert seq.tokens == alone and events[("short" if seq is short else "late")][-1] == ("done", "length")


def test_a_family_only_the_model_engine_serves_gives_peft_greedy_text(tiny_gemma2_lm, tmp_path):
    """Gemma 2 (sliding window 4, soft-capping) through a real ``lorakit serve``: the auto engine picks
    the model's own modules; concurrent requests over two adapters and the base, prompts longer than
    the window, each equal to transformers + PEFT ``generate`` alone."""
    peft = pytest.importorskip("peft")
    model_dir = tiny_gemma2_lm
    folders = _adapter_folders(model_dir, tmp_path / "adapters")
    adapters = {name: folders[name] for name in ("small", "wide")}
    tokenizer, base = load_causal_lm(model_dir)

    def expected(prompt: str, adapter: str | None) -> str:
        model = base if adapter is None else peft.PeftModel.from_pretrained(load_causal_lm(model_dir)[1], folders[adapter])
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            out = model.eval().generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                        pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    jobs = [(p, a) for p in PROMPTS if len(tokenizer(p)["input_ids"]) > 4 for a in [None, *adapters]]
    with cli_server(model_dir, adapters, tmp_path / "log") as (_, url):
        health = httpx.get(f"{url}/healthz", timeout=30).json()

        def complete(job):
            prompt, adapter = job
            body = {"model": adapter or model_dir, "prompt": prompt, "temperature": 0, "max_tokens": 12}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:  # a mixed-adapter batch
            served = list(pool.map(complete, jobs))
    assert health["engine"] == "model"
    assert "decoding with the model engine" in (tmp_path / "log").read_text()
    want = [expected(*job) for job in jobs]
    assert served == want
    assert len({text for text, (p, _) in zip(want, jobs) if p == jobs[0][0]}) == 3  # the adapters change the text
