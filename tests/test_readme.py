"""The README is tested: every `lorakit ...` command in its code blocks (and in docs/) parses with the CLI's own
parser, so a renamed flag cannot leave it stale; the quick GLUE commands run as written on tiny settings."""

import re
import shlex
from pathlib import Path

import pytest

from helpers import GLUE
from lorakit import cli

ROOT = Path(__file__).resolve().parents[1]


def commands(path: Path) -> list[str]:
    """The ``lorakit`` commands of ``path``'s fenced code blocks (continued lines joined, comments cut)."""
    found, inside, pending, variables = [], False, "", {}
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside, variables = not inside, {}
            continue
        if not inside:
            continue
        line = pending + line.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        line = line.split(" #")[0].strip()
        assignment = re.fullmatch(r'([A-Z_]+)="([^"]*)"', line)  # R="--task mrpc ..." used as $R below it
        if assignment:
            variables[assignment[1]] = assignment[2]
        line = re.sub(r"\$([A-Z_]+)", lambda m: variables.get(m[1], m[0]), line)
        line = re.sub(r"^(torchrun|accelerate launch)\b.*?-m lorakit ", "lorakit ", line)
        if line.startswith("lorakit "):
            found.append(line.removesuffix(" ...").strip())  # "lorakit train --task mrpc ...": any flags
    return found


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALL = [(p.name, c) for p in DOCS for c in commands(p)]


def test_the_readme_has_commands_to_check():
    assert len(commands(ROOT / "README.md")) >= 20


@pytest.mark.parametrize("doc, command", ALL, ids=[f"{d}:{c[:60]}" for d, c in ALL])
def test_every_documented_command_parses(doc, command):
    parser = cli.build_parser()
    try:
        parser.parse_args(shlex.split(command)[1:])
    except SystemExit as e:
        pytest.fail(f"{doc}: `{command}` does not parse (exit {e.code})")


def test_the_readme_glue_commands_run_as_written(tiny_model, tmp_path, monkeypatch, capsys):
    """`lorakit train --task mrpc`, eval, merge and report from the README, in a fresh folder; train gets a tiny
    model and a few rows added after the README's own flags (the flags given later win)."""
    readme = commands(ROOT / "README.md")
    wanted = ["lorakit train --task mrpc", "lorakit eval  --task mrpc --adapter runs/mrpc/seed0/adapter",
              "lorakit merge --adapter runs/mrpc/seed0/adapter --out merged/", "lorakit report runs/mrpc --plot curves.png"]
    for command in wanted:
        assert command in readme, f"the README no longer has `{command}`: update this test with it"
    monkeypatch.chdir(tmp_path)
    tiny = ["--model", tiny_model, "--data-dir", str(GLUE), "--epochs", "1", "--max-train-examples", "16",
            "--max-eval-examples", "16", "--max-length", "32", "--no-progress"]
    for command in wanted:
        args = shlex.split(command)[1:] + (tiny if command.startswith("lorakit train") else [])
        assert cli.main(args) == 0, command
    assert (tmp_path / "merged" / "config.json").is_file() and (tmp_path / "curves.png").is_file()
    assert "| mrpc |" in capsys.readouterr().out
