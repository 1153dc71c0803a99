"""What both engines check of an adapter folder before loading it, and the base model it names."""

import json
import re
from pathlib import Path
from typing import Any

from ..config import LoraConfig
from .config import ClientError

__all__ = ["clip", "check_name", "adapter_folder", "task_info", "base_of"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


def clip(text: str, limit: int = 64) -> str:
    """``text`` cut to ``limit`` characters for an error message (a client's string is never echoed whole)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_name(name: str) -> None:
    """An adapter's name: 1 to 128 letters, digits, '_' or '-' (it is echoed in lists and errors)."""
    if not _NAME.fullmatch(name):
        raise ClientError(400, f"an adapter name is 1 to 128 letters, digits, '_' or '-'; got {clip(name)!r}")


def adapter_folder(path: str) -> Path:
    """``path`` as a folder that exists (else a 400)."""
    shown = path if len(path) <= 200 else path[:200] + "..."
    try:
        if not Path(path).is_dir():
            raise ClientError(400, f"adapter folder {shown!r} does not exist")
    except OSError as e:  # e.g. a name too long for the file system
        raise ClientError(400, f"adapter folder {shown!r} cannot be read: {e.strerror or e}") from None
    return Path(path)


def task_info(folder: Path) -> dict[str, Any]:
    """The folder's ``task.json`` (``{}`` if absent); ``task`` and ``model`` must be strings."""
    info_file = folder / "task.json"
    try:
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        wrong = [k for k in ("task", "model") if k in info and not isinstance(info[k], str)]
        if wrong:
            raise ValueError(f"{wrong} must be strings")
    except (OSError, ValueError) as e:
        raise ClientError(400, f"{str(info_file)!r} is unreadable: {e}") from None
    return info


def base_of(adapter: str | None) -> str:
    """The base model of ``adapter``, as eval, generate and merge read it: its ``task.json``'s model,
    else the ``base_model_name_or_path`` of its ``adapter_config.json`` (a PEFT adapter)."""
    found = None
    if adapter is not None:
        try:
            found = task_info(Path(adapter)).get("model") or LoraConfig.load(adapter).base_model_name_or_path
        except ClientError as e:
            raise ValueError(str(e)) from None
    if not found:
        raise ValueError("name the base model with --model (no adapter that names its base: task.json's model or "
                         "adapter_config.json's base_model_name_or_path)")
    return found

