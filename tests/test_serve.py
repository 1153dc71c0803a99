"""lorakit serve through a real HTTP client against a server on loopback."""

import concurrent.futures
import contextlib
import json
import shutil
import threading
import time

import httpx
import pytest
import torch

import lorakit
from helpers import randomize
from lorakit import data
from lorakit.cli import main
from lorakit.serving.classify import Engine, Job, length_groups
from lorakit.serving.classify_api import _tokenize
from lorakit.serving.config import ClientError, ServeConfig
from lorakit.serving.server import create_app
from lorakit.tasks.glue import load_classifier

PAIRS = [["The cat sat on the mat.", "A cat was sitting on a mat."], ["Stocks fell sharply.", "It rained all day in Paris."],
         ["He left early", "He did not stay long at all, leaving before the others"]]
SINGLES = ["This sentence is fine.", "Sentence this fine is.", "Colorless green ideas sleep furiously."]

# name -> (task, rank): a 2-label, a 1-output (regression) and a single-sentence task, ranks differing
ADAPTERS = {"mrpc": ("mrpc", 4), "stsb": ("stsb", 2), "cola": ("cola", 8)}


def _make_adapter(folder, model_dir: str, task: str, r: int, seed: int, head_std: float = 30) -> None:
    _, model = load_classifier(model_dir, data.get_task(task))
    lorakit.add_lora(model, lorakit.LoraConfig(r=r, alpha=2 * r, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    randomize(model, seed, std=0.3)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.classifier.copies["default"].parameters():
            p.normal_(0, head_std)  # the tiny base's pooled outputs are small: make the scores far from uniform
    lorakit.save_adapter(model, folder)
    (folder / "task.json").write_text(json.dumps({"task": task, "model": model_dir}))


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, (task, r)) in enumerate(ADAPTERS.items()):
        _make_adapter(root / name, tiny_model, task, r, seed)
    return {name: str(root / name) for name in ADAPTERS}


@contextlib.contextmanager
def running(app, **options):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, "fp32")


@pytest.fixture(scope="module")
def client(engine, adapters):
    config = ServeConfig(max_wait_ms=20, max_rows_per_request=8, max_length=40, max_body_bytes=4096, token="s3cret")
    with running(create_app(engine, config, adapters)) as c:
        yield c


def reference(model_dir: str, folder: str, task: str, row) -> list[float]:
    """One row alone through a fresh model with only this adapter."""
    tokenizer, model = load_classifier(model_dir, data.get_task(task))
    lorakit.load_adapter(model, folder)
    model.eval()
    texts = [row] if isinstance(row, str) else row
    with torch.no_grad():
        logits = model(**tokenizer(*[[t] for t in texts], return_tensors="pt")).logits[0]
    return logits.tolist() if task == "stsb" else logits.softmax(-1).tolist()


def test_concurrent_mixed_requests_match_each_row_alone(client, engine, adapters, tiny_model):
    requests = [("mrpc", PAIRS), ("stsb", PAIRS[:2]), ("cola", SINGLES), ("mrpc", PAIRS[2:])] * 4
    forwards_before = client.get("/healthz").json()["forwards"]
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        replies = list(pool.map(lambda r: client.post("/v1/classify", json={"adapter": r[0], "inputs": r[1]}), requests))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    assert client.get("/healthz").json()["forwards"] - forwards_before < len(requests)  # requests were batched together
    for (name, rows), reply in zip(requests, replies):
        body = reply.json()
        assert body["adapter"] == name and body["task"] == ADAPTERS[name][0]
        for row, scores in zip(rows, body["scores"]):
            expected = reference(tiny_model, adapters[name], ADAPTERS[name][0], row)
            torch.testing.assert_close(torch.tensor(scores).reshape(-1), torch.tensor(expected), rtol=1e-4, atol=1e-5)
        assert torch.tensor(body["scores"]).std() > 0.05  # rows (and so adapters) are told apart
        if name == "stsb":
            assert body["labels"] is None
        else:
            assert body["labels"] == [body["label_names"][max(range(2), key=s.__getitem__)] for s in body["scores"]]


@pytest.mark.parametrize("request_kwargs, status, message", [
    (dict(json={"adapter": "nope", "inputs": [["a", "b"]]}), 404, "no adapter named 'nope'; loaded: ['cola', 'mrpc', 'stsb']"),
    (dict(content=b'{"adapter": "mrpc", "inputs": [', headers={"content-type": "application/json"}), 400, "malformed JSON"),
    (dict(json={"adapter": "mrpc"}), 400, "invalid request: inputs: Field required"),
    (dict(json={"adapter": "mrpc", "inputs": [["a", "b"]], "extra": 1}), 400, "extra: Extra inputs are not permitted"),
    (dict(json={"adapter": "mrpc", "inputs": []}), 400, "'inputs' is empty"),
    (dict(json={"adapter": "mrpc", "inputs": ["only one"]}), 400, 'inputs[0]: task mrpc takes [string, string] per row, got "only one"'),
    (dict(json={"adapter": "cola", "inputs": [["a", "b"]]}), 400, "inputs[0]: task cola takes a string or [string] per row"),
    (dict(json={"adapter": "mrpc", "inputs": [["a", "b"]] * 9}), 413, "9 rows in one request; the limit is 8"),
    (dict(json={"adapter": "cola", "inputs": ["word " * 50]}), 413, "inputs[0] is 52 tokens long; the limit is 40"),
    (dict(json={"adapter": "cola", "inputs": ["x" * 5000]}), 413, "request body over the limit of 4096 bytes"),
])
def test_bad_requests_get_a_4xx_and_the_server_stays_up(client, request_kwargs, status, message):
    reply = client.post("/v1/classify", **request_kwargs)
    assert reply.status_code == status
    assert message in reply.json()["error"]
    assert client.post("/v1/classify", json={"adapter": "cola", "inputs": SINGLES[:1]}).status_code == 200


def test_json_body_is_read_whatever_the_content_type(client):  # `curl -d` sends a form content type
    body = json.dumps({"adapter": "cola", "inputs": SINGLES[:2]})
    reply = client.post("/v1/classify", content=body, headers={"content-type": "application/x-www-form-urlencoded"})
    assert reply.status_code == 200 and len(reply.json()["labels"]) == 2


def test_chunked_body_over_the_limit_is_refused(client):
    reply = client.post("/v1/classify", content=iter([b'{"adapter": "cola", "inputs": ["', b"x" * 5000, b'"]}']),
                        headers={"content-type": "application/json"})
    assert reply.status_code == 413


def test_admin_routes_load_and_unload_adapters_behind_the_token(client, adapters):
    auth = {"authorization": "Bearer s3cret"}
    body = {"name": "mrpc2", "path": adapters["mrpc"]}
    assert client.post("/v1/adapters", json=body).status_code == 401
    assert client.post("/v1/adapters", json=body, headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.delete("/v1/adapters/mrpc").status_code == 401
    reply = client.post("/v1/adapters", json=body, headers=auth)
    assert reply.status_code == 201 and reply.json()["task"] == "mrpc"
    assert client.post("/v1/adapters", json=body, headers=auth).status_code == 409
    missing = client.post("/v1/adapters", json={"name": "x", "path": "/no/such/dir"}, headers=auth)
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]
    names = [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    assert names == ["mrpc", "stsb", "cola", "mrpc2"]
    one = client.post("/v1/classify", json={"adapter": "mrpc", "inputs": PAIRS}).json()
    two = client.post("/v1/classify", json={"adapter": "mrpc2", "inputs": PAIRS}).json()
    torch.testing.assert_close(torch.tensor(one["scores"]), torch.tensor(two["scores"]))
    assert client.delete("/v1/adapters/mrpc2", headers=auth).json() == {"deleted": "mrpc2"}
    assert client.delete("/v1/adapters/mrpc2", headers=auth).status_code == 404
    assert client.post("/v1/classify", json={"adapter": "mrpc2", "inputs": PAIRS}).status_code == 404
    # the first adapter loaded (the model's active one) can go and come back
    assert client.delete("/v1/adapters/mrpc", headers=auth).status_code == 200
    assert client.post("/v1/adapters", json={"name": "mrpc", "path": adapters["mrpc"]}, headers=auth).status_code == 201
    again = client.post("/v1/classify", json={"adapter": "mrpc", "inputs": PAIRS}).json()
    torch.testing.assert_close(torch.tensor(again["scores"]), torch.tensor(one["scores"]))


@pytest.mark.parametrize("body, message", [
    ({"task": "mnli"}, "has a head with 2 outputs, but task mnli has 3"),
    ({"task": "nope"}, "unknown task 'nope'; choose one of cola"),
    ({"path": "HEADLESS"}, "has no classification head of its own"),
    ({"path": "BADJSON"}, "task.json' is unreadable"),
])
def test_adapters_that_cannot_classify_are_refused(client, adapters, tiny_model, tmp_path, body, message):
    headless, bad_json = tmp_path / "headless", tmp_path / "bad-json"
    _, model = load_classifier(tiny_model, data.get_task("mrpc"))
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["query", "value"]))
    lorakit.save_adapter(model, headless)
    (headless / "task.json").write_text(json.dumps({"task": "mrpc", "model": tiny_model}))
    shutil.copytree(adapters["mrpc"], bad_json)
    (bad_json / "task.json").write_text("{not json")
    path = {"HEADLESS": str(headless), "BADJSON": str(bad_json)}.get(body.get("path"), adapters["mrpc"])
    reply = client.post("/v1/adapters", json={"name": "x", **body, "path": path}, headers={"authorization": "Bearer s3cret"})
    assert reply.status_code == 400 and message in reply.json()["error"], reply.text
    assert "x" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]


def test_requests_for_an_adapter_replaced_while_they_waited_get_404(tiny_model, adapters):
    engine = Engine(tiny_model, "fp32")
    old = engine.load("a", adapters["mrpc"])
    features = _tokenize(engine.tokenizer, [tuple(PAIRS[0])], 32)
    engine.unload("a")
    new = engine.load("a", adapters["stsb"])
    stale, fresh = Job(old, features, None), Job(new, features, None)
    results = engine.classify([stale, fresh])
    assert isinstance(results[0], ClientError) and results[0].status == 404
    assert results[1]["task"] == "stsb"


def test_full_queue_answers_503(tiny_model, adapters):
    engine = Engine(tiny_model, "fp32")
    real, entered, release = engine.classify, threading.Event(), threading.Event()

    def blocked_classify(requests):
        entered.set()
        release.wait(30)
        return real(requests)

    engine.classify = blocked_classify
    config = ServeConfig(max_queue=1, max_batch_rows=1, max_wait_ms=0)
    body = {"adapter": "cola", "inputs": SINGLES[:1]}
    with running(create_app(engine, config, {"cola": adapters["cola"]})) as client:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.post, "/v1/classify", json=body)  # taken by the worker, which blocks
            assert entered.wait(30)
            second = pool.submit(client.post, "/v1/classify", json=body)  # fills the queue of 1
            deadline = time.time() + 30
            while client.get("/healthz").json()["queued"] < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            third = client.post("/v1/classify", json=body)
            release.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    assert third.status_code == 503 and "1 requests already queued" in third.json()["error"]


def test_adapter_from_another_base_is_refused(tiny_model, adapters, tmp_path):
    moved = tmp_path / "other"
    shutil.copytree(adapters["cola"], moved)
    (moved / "task.json").write_text(json.dumps({"task": "cola", "model": "minilm"}))
    with pytest.raises(ValueError, match="was trained on 'minilm', but this server runs"):
        create_app(Engine(tiny_model, "fp32"), ServeConfig(), {"x": str(moved)})


def test_cli_serve_bad_adapter_spec(capsys):
    assert main(["serve", "--adapter", "no-equals-sign"]) == 2
    assert "--adapter takes NAME=FOLDER, got 'no-equals-sign'" in capsys.readouterr().err


def test_length_groups_cover_every_row_once_and_bound_padding():
    assert length_groups([100, 10, 50, 10, 50, 10, 50, 100, 10, 50], waste=0.1, min_tokens=30) == [
        [1, 3, 5, 8], [2, 4, 6, 9], [0, 7]]
    assert length_groups([10, 13], waste=0.1, min_tokens=10) == [[0], [1]]  # 13 * 2 > 1.1 * 23
    assert length_groups([10, 12], waste=0.1, min_tokens=10) == [[0, 1]]  # 12 * 2 <= 1.1 * 22
    assert length_groups([10, 500], min_tokens=10_000) == [[0, 1]]  # too few tokens to split
    assert length_groups([]) == [] and length_groups([5]) == [[0]]
    lengths = [50, 12, 90, 48, 51, 13, 88, 30, 49, 52, 91, 47] * 3
    assert sorted(i for g in length_groups(lengths) for i in g) == list(range(len(lengths)))


def _variant(src: str, dst, config: dict | None = None, task_json=None, tensors=None) -> str:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if task_json is not None:
        (dst / "task.json").write_text(json.dumps(task_json))
    if tensors is not None:
        from safetensors.torch import load_file, save_file

        save_file({**load_file(dst / "adapter_model.safetensors"), **tensors}, dst / "adapter_model.safetensors")
    return str(dst)


def test_hostile_adapter_loads_get_json_400(client, adapters, tmp_path):
    src = adapters["mrpc"]
    head = "base_model.model.classifier.weight"
    cases = {
        "x" * 3_000: "cannot be read: File name too long",  # (the test server takes 4 kB bodies)
        _variant(src, tmp_path / "huge-r", config={"r": 10**12}): "has r=1000000000000 in its config",
        _variant(src, tmp_path / "bad-targets", config={"target_modules": 5}): "target_modules must be a list of module names",
        _variant(src, tmp_path / "bad-task", task_json={"task": 5}): "['task'] must be strings",
        _variant(src, tmp_path / "other-base", task_json={"task": "mrpc", "model": "minilm"}): "was trained on 'minilm'",
        _variant(src, tmp_path / "bad-head", tensors={head: torch.ones(2, 7)}): "fails on a probe input",
        _variant(src, tmp_path / "nan", tensors={head: torch.full((2, 32), float("nan"))}): "NaN or infinite values",
    }
    for path, message in cases.items():
        reply = client.post("/v1/adapters", json={"name": "h", "path": path}, headers={"authorization": "Bearer s3cret"})
        assert reply.status_code == 400 and message in reply.json()["error"], (path[:80], reply.text[:500])
    assert "h" not in [a["name"] for a in client.get("/v1/adapters").json()["adapters"]]
    ok = client.post("/v1/adapters", json={"name": "h", "path": src}, headers={"authorization": "Bearer s3cret"})
    assert ok.status_code == 201  # nothing was left behind under the name
    assert client.delete("/v1/adapters/h", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_adapter_names_are_bounded_and_never_echoed_whole(client, adapters):
    auth = {"authorization": "Bearer s3cret"}
    for name in ("n" * 1000, "a b", ""):
        reply = client.post("/v1/adapters", json={"name": name, "path": adapters["mrpc"]}, headers=auth)
        assert reply.status_code == 400 and "an adapter name is 1 to 128 letters" in reply.json()["error"]
        assert len(reply.text) < 300
    for reply in (client.post("/v1/classify", json={"adapter": "n" * 1000, "inputs": ["x"]}),
                  client.delete("/v1/adapters/" + "n" * 1000, headers=auth)):
        assert reply.status_code == 404 and "nnn... (1000 characters)" in reply.json()["error"] and len(reply.text) < 300


def test_paths_are_for_admins_and_tokenless_admin_posts_need_json(client, adapters, tiny_model):
    listed = client.get("/v1/adapters").json()["adapters"]
    assert listed and all("path" not in a for a in listed)
    auth = {"authorization": "Bearer s3cret"}
    assert all("path" in a for a in client.get("/v1/adapters", headers=auth).json()["adapters"])
    with running(create_app(Engine(tiny_model, "fp32"), ServeConfig())) as open_client:  # no token
        body = json.dumps({"name": "m", "path": adapters["mrpc"]})
        forged = open_client.post("/v1/adapters", content=body, headers={"content-type": "text/plain"})
        assert forged.status_code == 415 and "application/json" in forged.json()["error"]
        assert open_client.post("/v1/adapters", content=body, headers={"content-type": "application/json"}).status_code == 201
        assert open_client.post("/v1/classify", content=json.dumps({"adapter": "m", "inputs": PAIRS[:1]}),
                                headers={"content-type": "text/plain"}).status_code == 200  # curl -d still classifies


def test_a_large_request_runs_in_parts_and_small_ones_get_in_between(tiny_model, adapters):
    import concurrent.futures

    engine = Engine(tiny_model, "fp32")
    forwards, real = [], engine.classify

    def slow_classify(requests):
        forwards.append(sum(len(r.features) for r in requests))
        time.sleep(0.3)  # a slow forward pass: the small request arrives while the large one runs
        return real(requests)

    engine.classify = slow_classify
    big = PAIRS * 4  # 12 rows of 12-25 tokens: parts of at most 60 tokens
    config = ServeConfig(max_batch_tokens=60, max_wait_ms=0, max_length=40, max_rows_per_request=16)
    with running(create_app(engine, config, {"mrpc": adapters["mrpc"]})) as client, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        done: dict[str, float] = {}

        def call(name, inputs):
            reply = client.post("/v1/classify", json={"adapter": "mrpc", "inputs": inputs})
            done[name] = time.perf_counter()
            return reply.json()

        large = pool.submit(call, "large", big)
        time.sleep(0.4)
        small = pool.submit(call, "small", PAIRS[:1])
        large, small = large.result(), small.result()
    assert len(forwards) >= 4 and done["small"] < done["large"]  # it did not wait for the whole large request
    assert len(large["scores"]) == len(large["labels"]) == 12
    for row, scores in zip(big[:3], large["scores"]):  # parts put back together in order
        torch.testing.assert_close(torch.tensor(scores), torch.tensor(reference(tiny_model, adapters["mrpc"], "mrpc", row)),
                                   rtol=1e-4, atol=1e-4)


def test_rows_far_over_the_token_limit_are_refused_before_tokenizing(client):
    reply = client.post("/v1/classify", json={"adapter": "cola", "inputs": ["word " * 400]})
    assert reply.status_code == 413 and "2000 characters long; the limit is 40 tokens" in reply.json()["error"]


def test_slow_and_idle_connections_are_cut_and_connections_limited(tiny_model, adapters):
    import socket

    from lorakit.serving.http import uvicorn_options

    # uvicorn refuses a request when the open connections, its own included, reach the limit
    config = ServeConfig(header_timeout_s=1.5, body_timeout_s=1.5, keep_alive_s=1.5, max_connections=3)
    with running(create_app(Engine(tiny_model, "fp32"), config), **uvicorn_options(config)) as client:
        port = int(str(client.base_url).rstrip("/").rsplit(":", 1)[1])

        def connect(first: bytes) -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(first)
            time.sleep(0.2)  # let the server take it in before the next one
            return sock

        slow_head = connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        trickle = connect(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # nor the body
        busy = client.get("/healthz", headers={"connection": "close"})
        assert busy.status_code == 503  # both other slots are held
        time.sleep(2.0)
        assert slow_head.recv(1024) == b""  # closed without a word
        assert trickle.recv(4096).split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout"
        idle = connect(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(2.0)  # kept alive, then idle past keep_alive_s
        assert idle.recv(1024) == b""
        assert client.get("/healthz").status_code == 200  # slots free again


def test_scores_are_deterministic_with_lora_dropout(tiny_model, tmp_path):
    """An adapter trained with dropout 0.5: the server (eval mode) never applies it."""
    _, model = load_classifier(tiny_model, data.get_task("mrpc"))
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.5, target_modules=["query", "value"],
                                               modules_to_save=["classifier"]))
    randomize(model, 3, std=0.5)
    lorakit.save_adapter(model, tmp_path / "drop")
    (tmp_path / "drop" / "task.json").write_text(json.dumps({"task": "mrpc", "model": tiny_model}))
    with running(create_app(Engine(tiny_model, "fp32"), ServeConfig(), {"drop": str(tmp_path / "drop")})) as client:
        replies = [client.post("/v1/classify", json={"adapter": "drop", "inputs": PAIRS}).json()["scores"] for _ in range(5)]
    assert all(r == replies[0] for r in replies)
    torch.testing.assert_close(torch.tensor(replies[0][0]), torch.tensor(reference(tiny_model, str(tmp_path / "drop"), "mrpc", PAIRS[0])),
                               rtol=1e-4, atol=1e-4)


def test_mean_pooled_classifiers_are_served_beside_first_token_ones(tiny_model, tmp_path):
    """An adapter trained with --pooling mean (the best MRPC adapters) is served: its rows read the masked mean,
    the other adapters' rows in the same forward their first token; scores equal each adapter evaluated alone."""
    _make_adapter(tmp_path / "mean", tiny_model, "mrpc", 4, seed=5, head_std=3)
    info = json.loads((tmp_path / "mean" / "task.json").read_text())
    (tmp_path / "mean" / "task.json").write_text(json.dumps({**info, "pooling": "mean"}))
    _make_adapter(tmp_path / "cls", tiny_model, "mrpc", 4, seed=5, head_std=3)  # the same factors, first token
    expected = {}
    for name, pooling in (("mean", "mean"), ("cls", "cls")):
        tokenizer, model = load_classifier(tiny_model, data.get_task("mrpc"), pooling)
        lorakit.load_adapter(model, tmp_path / name)
        with torch.inference_mode():
            expected[name] = model.eval()(**tokenizer(*zip(*PAIRS), return_tensors="pt", padding=True)).logits.softmax(-1)
    assert not torch.allclose(expected["mean"], expected["cls"], atol=1e-3)  # the pooling matters here
    # the "mean" adapter's receipt was made with first-token pooling (its task.json was edited above): seen at load
    with pytest.raises(ClientError, match="adapter 'mean' does not reproduce its receipt on this server"):
        Engine(tiny_model, "fp32").load("mean", str(tmp_path / "mean"))
    engine = Engine(tiny_model, "fp32", ServeConfig(verify_adapters="off"))
    with running(create_app(engine, ServeConfig(max_wait_ms=50), {n: str(tmp_path / n) for n in ("cls", "mean")})) as c:
        assert {a["name"]: a["pooling"] for a in c.get("/v1/adapters").json()["adapters"]} == {"cls": "cls", "mean": "mean"}
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # both adapters' rows in shared forward passes
            answers = list(pool.map(lambda n: (n, c.post("/v1/classify", json={"adapter": n, "inputs": PAIRS})),
                                    ["mean", "cls"] * 3))
    for name, answer in answers:
        assert answer.status_code == 200, answer.text
        torch.testing.assert_close(torch.tensor(answer.json()["scores"]), expected[name], rtol=1e-4, atol=1e-5)


def test_the_served_base_defaults_to_the_adapters_own_as_for_eval_and_merge(tiny_model, adapters, tmp_path):
    from lorakit.serving.adapters import base_of

    assert base_of(adapters["mrpc"]) == tiny_model  # task.json's model
    peft_style = tmp_path / "peft"  # no task.json: adapter_config.json's base_model_name_or_path, as PEFT writes it
    shutil.copytree(adapters["mrpc"], peft_style)
    (peft_style / "task.json").unlink()
    assert base_of(str(peft_style)) == tiny_model
    config = json.loads((peft_style / "adapter_config.json").read_text())
    (peft_style / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match="name the base model with --model"):
        base_of(str(peft_style))
