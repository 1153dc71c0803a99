"""The serving package's layout: imports point one way (issue #29, item 7)."""

import ast
import subprocess
import sys
from pathlib import Path

import lorakit.serving

PACKAGE = Path(lorakit.serving.__file__).parent
# Bottom to top: a module may import only the ones before it (so there is no import circle).
LAYERS = ["config", "adapters", "verify", "metrics", "classify", "decoder", "model_decoder", "prefix_cache", "sampling",
          "scheduler", "generation", "tokens", "openai_requests", "http", "classify_api", "openai", "server"]


def _imports(name: str, path: Path | None = None) -> set[str]:
    """The absolute names of the lorakit modules that ``lorakit.serving.<name>`` (or the module at ``path``)
    imports, lazily or not."""
    path = path or PACKAGE / f"{name}.py"
    tree = ast.parse(path.read_text())
    here = ["lorakit", *path.parent.relative_to(PACKAGE.parent).parts]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # (from . import x: x may be a module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m.startswith("lorakit.")}


def test_every_serving_module_is_in_the_layer_list():
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == sorted(LAYERS)


def test_serving_modules_import_only_the_ones_below_them():
    for i, name in enumerate(LAYERS):
        inside = {m.split(".")[2] for m in _imports(name) if m.startswith("lorakit.serving.")}
        assert inside <= set(LAYERS[:i]), f"{name} imports {sorted(inside - set(LAYERS[:i]))}, which are above it"


def test_the_http_shell_knows_no_engine_and_no_api():
    inside = {m.split(".")[2] for m in _imports("http") if m.startswith("lorakit.serving.")}
    assert inside <= {"config", "adapters", "metrics"}


def test_serving_never_imports_training_and_only_the_cli_imports_serving():
    for name in LAYERS:
        assert not [m for m in _imports(name) if m.startswith("lorakit.training")], name
    src = PACKAGE.parent
    users = {p.relative_to(src).as_posix() for p in src.rglob("*.py") if p.relative_to(src).parts[0] != "serving"
             and any(m.startswith("lorakit.serving") for m in _imports("", p))}
    assert users <= {"cli.py"}, users


def test_each_module_imports_alone():
    """In a fresh interpreter, each module first (an import circle fails only in some orders)."""
    code = ("import importlib, sys\n"
            f"for name in {LAYERS!r}:\n"
            "    for m in [m for m in sys.modules if m == 'lorakit' or m.startswith('lorakit.')]:\n"
            "        del sys.modules[m]\n"
            "    importlib.import_module('lorakit.serving.' + name)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
