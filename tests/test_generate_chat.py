"""lorakit generate over conversations (#28 item 4): --messages (the assistant's next turn through the chat template),
--system (a system turn first), and chat adapters prompting in chat form by default."""

import json

import pytest

from lorakit.cli import main
from lorakit.generate import Decoding, generate_ids
from lorakit.tasks import lm

CONVERSATIONS = [
    [{"role": "user", "content": "name[Alimentum]"}],
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "name[Blue Spice]"}]},
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "area[riverside]"}],
]


def _greedy(model_dir: str, prompts: list[list[int]], tokens: int = 6) -> list[str]:
    tokenizer, model = lm.load_causal_lm(model_dir)
    ids = generate_ids(model, prompts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       decoding=Decoding(max_new_tokens=tokens))
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]


def _run(args: list[str], capsys) -> tuple[int, list[dict], str]:
    code = main(["generate", "--max-new-tokens", "6", *args])
    out = capsys.readouterr()
    return code, [json.loads(line) for line in out.out.splitlines() if line.startswith("{")], out.err


def test_messages_generate_each_conversations_next_assistant_turn(tiny_llama, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    code, rows, err = _run(["--model", tiny_llama, "--messages", str(path)], capsys)
    assert code == 0 and "3 conversation(s) in chat form (the chat template)" in err
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    messages = [c if isinstance(c, list) else c["messages"] for c in CONVERSATIONS]
    want = _greedy(tiny_llama, [lm._chat(tokenizer, m, generation_prompt=True) for m in messages])
    assert [r["messages"] for r in rows] == messages and [r["completion"] for r in rows] == want

    code, rows, _ = _run(["--model", tiny_llama, "--messages", str(path), "--system", "You write menus."], capsys)
    system = {"role": "system", "content": "You write menus."}
    with_system = [m if m[0]["role"] == "system" else [system, *m] for m in messages]  # its own system turn kept
    want = _greedy(tiny_llama, [lm._chat(tokenizer, m, generation_prompt=True) for m in with_system])
    assert code == 0 and [r["completion"] for r in rows] == want


def test_system_on_plain_prompts_is_refused_and_chat_form_takes_it(tiny_llama, capsys):
    code, _, err = _run(["--model", tiny_llama, "--prompt", "name[Alimentum]", "--system", "Be brief."], capsys)
    assert code == 2 and "--system is a chat template's system turn" in err
    code, rows, err = _run(["--model", tiny_llama, "--prompt", "name[Alimentum]", "--prompt-format", "chat",
                            "--system", "Be brief."], capsys)
    tokenizer, _ = lm.load_causal_lm(tiny_llama)
    prompt = lm._chat(tokenizer, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "name[Alimentum]"}],
                      generation_prompt=True)
    assert code == 0 and "1 prompt(s) in chat form" in err and [r["completion"] for r in rows] == _greedy(tiny_llama, [prompt])


def test_a_chat_adapter_prompts_in_chat_form_by_default(tiny_llama, tmp_path, capsys):
    """An adapter whose training rows were all conversations records prompt_format chat: a plain --prompt is
    then the user's turn, unless --prompt-format plain says otherwise."""
    import lorakit

    tokenizer, model = lm.load_causal_lm(tiny_llama)
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    folder = tmp_path / "adapter"
    lorakit.save_adapter(model, folder)
    (folder / "task.json").write_text(json.dumps({"task": "jsonl", "model": tiny_llama, "prompt_format": "chat",
                                                  "prompt_separator": "\n"}))
    _, chat_rows, err = _run(["--adapter", str(folder), "--prompt", "name[Alimentum]"], capsys)
    assert "in chat form" in err
    _, plain_rows, err = _run(["--adapter", str(folder), "--prompt", "name[Alimentum]", "--prompt-format", "plain"], capsys)
    assert "in plain form" in err
    want = _greedy(tiny_llama, [lm._chat(tokenizer, [{"role": "user", "content": "name[Alimentum]"}], generation_prompt=True)])
    assert [r["completion"] for r in chat_rows] == want  # (B = 0 at initialisation: the base model's text)
    assert plain_rows[0]["completion"] == _greedy(tiny_llama, [lm.prompt_ids(tokenizer, "name[Alimentum]", "plain")])[0]


@pytest.mark.parametrize("lines, message", [
    ('[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]', "ends on an assistant turn"),
    ('{"messages": [{"role": "user"}]}', "expected a list of"),
    ('[{"role": "user", "content": "a"}', "not valid JSON"),
    ('{"prompt": "a"}', "expected a list of"),
])
def test_bad_conversations_are_refused_by_line(tiny_llama, tmp_path, capsys, lines, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(lines + "\n")
    code, _, err = _run(["--model", tiny_llama, "--messages", str(path)], capsys)
    assert code == 2 and "chats.jsonl:1" in err and message in err


def test_exactly_one_source_of_prompts(tiny_llama, tmp_path, capsys):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(CONVERSATIONS[0]) + "\n")
    for args in ([], ["--prompt", "x", "--messages", str(path)]):
        code, _, err = _run(["--model", tiny_llama, *args], capsys)
        assert code == 2 and "give one of --prompt TEXT (repeatable), --input FILE.jsonl or --messages FILE.jsonl" in err
