"""lorakit generate in chat form (issue #28 item 4): --messages conversations, --system, and prompts of a chat
adapter wrapped as user turns by default, with the form said on stderr and every refusal one line by name.

The prompts handed to generation are captured and compared with the tokenizer's own ``apply_chat_template``
(the oracle); one test also compares the generated text with transformers' ``generate`` on each prompt alone."""

import json
import shutil

import pytest
import torch

import lorakit
import lorakit.generate
from helpers import randomize
from lorakit import LoraConfig
from lorakit.cli import main
from lorakit.tasks import lm

NO_SYSTEM = (  # as Gemma's: a system message raises
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}[unused1]{{ m['role'] }}\n{{ m['content'] }}[SEP]\n{% endfor %}"
    "{% if add_generation_prompt %}[unused1]assistant\n{% endif %}"
)
DROPS_SYSTEM = (  # a template that renders user and assistant turns only
    "{% for m in messages %}{% if m['role'] != 'system' %}[unused1]{{ m['role'] }}\n{{ m['content'] }}[SEP]\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}[unused1]assistant\n{% endif %}"
)
HI = [{"role": "user", "content": "hello there"}]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "blue"}, {"role": "user", "content": "another"}]


def _adapter(model_folder, out, prompt_format: str | None):
    """A LoRA adapter with random B on ``model_folder``, its task.json recording ``prompt_format`` as
    lorakit train does (None: no task.json, as a PEFT adapter)."""
    _, model = lm.load_causal_lm(model_folder)
    lorakit.add_lora(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize(model, seed=3, std=0.3)
    lorakit.save_adapter(model, out)
    info = {"task": "jsonl", "model": model_folder, "prompt_format": prompt_format, "prompt_separator": "\n"}
    if prompt_format is not None:
        (out / "task.json").write_text(json.dumps(info))
    return str(out)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    return {form: _adapter(tiny_llama, folder / form, form) for form in ("chat", "plain")}


def _template(model_folder, tmp_path, template: str | None) -> str:
    """A copy of ``model_folder`` whose tokenizer has ``template`` as its chat template (None: none)."""
    from transformers import AutoTokenizer

    copy = tmp_path / "model"
    shutil.copytree(model_folder, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(copy)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(copy)
    assert AutoTokenizer.from_pretrained(copy).chat_template == template
    return str(copy)


@pytest.fixture
def captured(monkeypatch):
    """The prompts (token ids) and adapter names each generate call receives; completions are empty."""
    calls = []

    def fake(model, prompts, **kw):
        calls.append({"prompts": prompts, "adapters": kw["adapters"]})
        return [[] for _ in prompts]

    monkeypatch.setattr(lorakit.generate, "generate_ids", fake)
    return calls


def _chat_ids(model_folder, messages) -> list[int]:
    tokenizer, _ = lm.load_causal_lm(model_folder)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def _outputs(text: str) -> list[dict]:
    return [json.loads(line) for line in text.strip().splitlines()]


def test_messages_generate_each_assistant_reply_as_transformers_does_alone(tiny_llama, adapters, tmp_path, capsys):
    rows = _jsonl(tmp_path / "rows.jsonl", [HI, {"messages": CHAT}])  # a bare list, and an object
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--adapter", adapters["chat"], "--messages", rows, "--max-new-tokens", "6",
                 "--batch-size", "1", "--precision", "fp32", "--output", str(out)]) == 0
    got = _outputs(out.read_text())
    assert [r["messages"] for r in got] == [HI, CHAT] and {r["adapter"] for r in got} == {"default"}
    assert f"lorakit generate: chat form: each conversation of {rows} through the chat template" in capsys.readouterr().err
    tokenizer, model = lm.load_causal_lm(tiny_llama)
    lorakit.load_adapter(model, adapters["chat"])
    expected = []
    for messages in (HI, CHAT):
        ids = torch.tensor([_chat_ids(tiny_llama, messages)])
        with torch.no_grad():
            new = model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        expected.append(tokenizer.decode(new[0, ids.shape[1] :], skip_special_tokens=True).strip())
    assert [r["completion"] for r in got] == expected
    assert all(expected)


def test_messages_rows_may_name_their_adapter(tiny_llama, adapters, tmp_path, captured, capsys):
    rows = _jsonl(tmp_path / "rows.jsonl", [{"messages": HI, "adapter": "b"}, HI, {"messages": CHAT, "adapter": "a"}])
    assert main(["generate", "--adapter", f"a={adapters['chat']}", "--adapter", f"b={adapters['plain']}",
                 "--messages", rows]) == 0
    assert captured[0]["adapters"] == ["b", "a", "a"]  # a row without a name: the first adapter
    assert captured[0]["prompts"] == [_chat_ids(tiny_llama, m) for m in (HI, HI, CHAT)]
    assert [r["adapter"] for r in _outputs(capsys.readouterr().out)] == ["b", "a", "a"]


def test_a_chat_adapter_wraps_prompts_as_user_turns_by_default_and_says_so(tiny_llama, adapters, captured, capsys):
    assert main(["generate", "--adapter", adapters["chat"], "--prompt", "hello there"]) == 0
    assert captured[-1]["prompts"] == [_chat_ids(tiny_llama, HI)]
    assert ("lorakit generate: chat form (the adapter was trained on chat, says its task.json): each prompt is a user "
            "turn in the chat template; --prompt-format plain sends prompts as they are") in capsys.readouterr().err
    assert main(["generate", "--adapter", adapters["chat"], "--prompt", "hello there", "--prompt-format", "plain"]) == 0
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    assert captured[-1]["prompts"] == [tokenizer("hello there\n")["input_ids"]]
    assert "lorakit generate: plain form: each prompt as it is, then '\\n'" in capsys.readouterr().err


def test_a_plain_adapter_keeps_plain_prompts_and_points_at_the_chat_form(tiny_llama, adapters, captured, capsys):
    assert main(["generate", "--adapter", adapters["plain"], "--prompt", "hello there"]) == 0
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    assert captured[-1]["prompts"] == [tokenizer("hello there\n")["input_ids"]]
    assert ("lorakit generate: plain form: each prompt as it is, then '\\n'; the tokenizer has a chat template: "
            "--prompt-format chat makes each prompt a user turn") in capsys.readouterr().err
    assert main(["generate", "--model", tiny_llama, "--prompt", "hello there", "--prompt-format", "chat"]) == 0
    assert captured[-1]["prompts"] == [_chat_ids(tiny_llama, HI)]
    assert "lorakit generate: chat form (--prompt-format chat)" in capsys.readouterr().err


def test_system_comes_before_each_prompt_and_each_conversation(tiny_llama, adapters, tmp_path, captured, capsys):
    system = {"role": "system", "content": "answer in french"}
    assert main(["generate", "--adapter", adapters["chat"], "--prompt", "hello there", "--system", "answer in french"]) == 0
    assert captured[-1]["prompts"] == [_chat_ids(tiny_llama, [system, *HI])]
    assert "each prompt is a user turn after the --system message in the chat template" in capsys.readouterr().err
    rows = _jsonl(tmp_path / "rows.jsonl", [HI, CHAT[1:]])
    assert main(["generate", "--model", tiny_llama, "--messages", rows, "--system", "answer in french"]) == 0
    assert captured[-1]["prompts"] == [_chat_ids(tiny_llama, [system, *m]) for m in (HI, CHAT[1:])]
    assert f"each conversation of {rows} after the --system message through the chat template" in capsys.readouterr().err


def _error(args, capsys) -> str:
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize(("template", "why"), [(NO_SYSTEM, "it raises 'System role not supported'"),
                                               (DROPS_SYSTEM, "it drops system messages"),
                                               (None, None)], ids=["raises", "drops", "none"])
def test_system_is_refused_by_name_when_the_template_has_no_system_role(tiny_llama, tmp_path, captured, capsys,
                                                                        template, why):
    model = _template(tiny_llama, tmp_path, template)
    err = _error(["--model", model, "--prompt", "hi", "--prompt-format", "chat", "--system", "be brief"], capsys)
    if why is None:
        assert err == f"lorakit: error: --system needs a chat template; the tokenizer of {model} has none"
    else:
        assert err == (f"lorakit: error: --system: the chat template of {model} has no system role ({why}); put the "
                       "instructions in the user turn instead")
        assert main(["generate", "--model", model, "--prompt", "hi", "--prompt-format", "chat"]) == 0  # no --system: fine
    assert len(captured) == (0 if why is None else 1)


def test_refusals_name_the_flag(tiny_llama, adapters, tmp_path, captured, capsys):
    rows = _jsonl(tmp_path / "rows.jsonl", [HI, CHAT])
    assert _error(["--model", tiny_llama, "--prompt", "hi", "--system", "x"], capsys) == (
        "lorakit: error: --system is a chat turn, but prompts are in plain form (the default without a chat adapter); "
        "add --prompt-format chat")
    assert _error(["--adapter", adapters["plain"], "--prompt", "hi", "--system", "x"], capsys) == (
        "lorakit: error: --system is a chat turn, but prompts are in plain form (the adapter was trained on plain "
        "prompts, says its task.json); add --prompt-format chat")
    assert _error(["--model", tiny_llama, "--prompt", "hi", "--messages", rows], capsys) == (
        "lorakit: error: give one of --prompt TEXT (repeatable), --input FILE.jsonl or --messages FILE.jsonl")
    assert _error(["--model", tiny_llama, "--messages", rows, "--prompt-format", "plain"], capsys) == (
        "lorakit: error: --messages rows are conversations, always put in the chat template; drop --prompt-format plain")
    assert _error(["--model", tiny_llama, "--messages", rows, "--prompt-separator", ""], capsys) == (
        "lorakit: error: --messages rows are conversations, always put in the chat template; drop --prompt-separator")
    assert _error(["--model", tiny_llama, "--messages", rows, "--system", "x"], capsys) == (
        f"lorakit: error: --system: conversations [2] of {rows} open with their own system message; drop --system or "
        "those messages")
    assert _error(["--model", _template(tiny_llama, tmp_path, None), "--messages", rows], capsys).endswith(
        "--messages needs a chat template; the tokenizer of " + str(tmp_path / "model") + " has none")
    assert captured == []


@pytest.mark.parametrize(("line", "message"), [
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]',
     r"rows\.jsonl:2: the conversation ends with an assistant turn; end it with the turn to answer"),
    ('{"prompt": "hi"}', r'rows\.jsonl:2: expected a JSON list of \{"role", "content"\} messages or an object '
                         r'\{"messages": \[...\]\}'),
    ('{"messages": [], "adapter": "a"}', r"rows\.jsonl:2: 'messages' must be a non-empty list"),
    ('[{"role": "user"}]', r"rows\.jsonl:2: 'messages' must be a non-empty list of \{\"role\": str, \"content\": str\}"),
    ('{"messages": [{"role": "user", "content": "hi"}], "adapter": 3}', r"rows\.jsonl:2: expected a JSON list"),
    ("[{", r"rows\.jsonl:2: not valid JSON"),
])
def test_conversation_files_are_checked_line_by_line(tmp_path, line, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(HI) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        lm.read_conversations(path)
    path.write_text("\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl: no rows \(expected one conversation per line\)"):
        lm.read_conversations(path)
