"""Settings files (``lorakit train --config``, ``lorakit serve --config``): a YAML mapping of a
command's flags, each value checked against the type of the field it sets.

The YAML is read defensively: at most :data:`MAX_BYTES`, no anchors or aliases (``&a`` /
``*a``: a few lines of nested aliases expand to gigabytes, the "billion laughs"), no nesting
deeper than a flat list or mapping under a key, at most :data:`MAX_ITEMS` entries in one value.
Every refusal is one ``ValueError`` naming the file and the key.

Types follow the fields' annotations: ``int`` takes integers only (not ``2.5``, not ``true``),
``float`` takes integers and numbers, and also a string that reads as a finite number,
because YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as the string ``"1e-4"``; ``str`` takes
strings only (``out: 5`` is refused, not turned into ``"5"``); ``bool`` takes ``true`` /
``false``; ``X | None`` also takes ``null``; ``dict[str, int]`` / ``dict[str, float]`` take a
flat mapping of names to such numbers (``rank_pattern: {q_proj: 16}``). Numbers must be finite (``.inf`` and ``.nan`` are
refused). A null value means "not set": the default (or the preset's value) applies.
"""

from __future__ import annotations

import math
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["read_yaml", "typed", "string_list", "int_list", "number_mapping", "pattern_text", "type_error", "check_fields",
           "MAX_BYTES", "MAX_ITEMS"]

MAX_BYTES = 1 << 20  # a settings file is a few hundred bytes; a megabyte is room for hundreds of adapters
MAX_ITEMS = 1000  # entries in one list or mapping value
_MAX_DEPTH = 4  # the document's mapping, a value, a list's items, one more level (to name the key in the refusal)
_INT64 = 1 << 63


def _loader(text: str):
    """A PyYAML SafeLoader over ``text`` that refuses anchors, aliases and deep nesting while
    composing, before any node is built (``yaml.safe_load`` expands aliases)."""
    import yaml

    class Refused(yaml.YAMLError):
        pass

    class SettingsLoader(yaml.SafeLoader):
        depth = 0
        key = None  # the setting being composed

        def compose_node(self, parent, index):
            event = self.peek_event()
            if self.depth == 1:  # a key of the settings (index None) or its value (index: the key's node)
                self.key = getattr(index, "value", None)
            where = f"line {event.start_mark.line + 1}" + (f", {self.key}" if isinstance(self.key, str) else "")
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise Refused(f"{where}: YAML anchors and aliases (&name, *name) are not allowed in settings")
            if self.depth >= _MAX_DEPTH:
                raise Refused(f"{where}: nested too deeply; a setting is a value, or a flat list or mapping of values")
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return SettingsLoader(text)


def read_yaml(path: str | Path, known: set[str]) -> dict[str, Any]:
    """A YAML mapping of settings whose keys are all in ``known`` (else an error naming them);
    the values are as YAML gives them (check them with :func:`typed`)."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise ValueError(f"the config file {path} is {size:,} bytes; a settings file is at most {MAX_BYTES:,}")
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"the config file {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    loader = _loader(text)
    try:
        values = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ValueError(f"cannot read the config file {path}: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}")
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown[:20]}; the keys are the command's flags (underscores): "
                         f"{', '.join(sorted(known))}")
    return values


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def type_error(key: str, value: Any, expected: str) -> ValueError:
    """``key must be <expected>, got <value> (<type>)``, the value shortened."""
    return ValueError(f"{key} must be {expected}, got {_shown(value)} ({type(value).__name__})")


def _number(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            raise type_error(key, value, "a number") from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise type_error(key, value, "a number")
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value}")
    return value


def _integer(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(key, value, "an integer")
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"{key} must fit in 64 bits, got {_shown(value)}")
    return value


def typed(key: str, value: Any, hint: Any) -> Any:
    """``value`` as a field annotated ``hint`` takes it (see the module doc), or a ValueError
    naming ``key``. Handles ``bool``, ``int``, ``float``, ``str`` and ``X | None``."""
    if value is None:
        return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [t for t in typing.get_args(hint) if t is not type(None)]
    if typing.get_origin(hint) is dict:
        return number_mapping(key, value, typing.get_args(hint)[1])
    if hint is bool:
        if not isinstance(value, bool):
            raise type_error(key, value, "true or false")
        return value
    if hint is int:
        return _integer(key, value)
    if hint is float:
        return _number(key, value)
    if hint is str:
        if not isinstance(value, str):
            raise type_error(key, value, "a string (quote it)")
        return value
    raise TypeError(f"no settings check for {key}: {hint}")  # a field type this module does not know yet


def string_list(key: str, value: Any) -> list[str]:
    """One string or a flat list of strings (at most :data:`MAX_ITEMS`)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise type_error(key, value, "a string or a flat list of strings")
    if len(items) > MAX_ITEMS:
        raise ValueError(f"{key} has {len(items)} entries; at most {MAX_ITEMS}")
    return items


def int_list(key: str, value: Any) -> list[int]:
    """One integer or a flat list of integers (at most :data:`MAX_ITEMS`)."""
    items = value if isinstance(value, list) else [value]
    if len(items) > MAX_ITEMS:
        raise ValueError(f"{key} has {len(items)} entries; at most {MAX_ITEMS}")
    try:
        return [_integer(key, v) for v in items]
    except ValueError:
        raise type_error(key, value, "an integer or a flat list of integers") from None


def number_mapping(key: str, value: Any, kind: type) -> dict[str, int | float]:
    """A flat mapping of non-empty names to integers (``kind`` int) or numbers (float), at most
    :data:`MAX_ITEMS` entries; each value checked as ``int`` / ``float`` fields are."""
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise type_error(key, value, f"a mapping of names to {'integers' if kind is int else 'numbers'}")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"{key} has {len(value)} entries; at most {MAX_ITEMS}")
    check = _integer if kind is int else _number
    return {name: check(f"{key}[{name!r}]", v) for name, v in value.items()}


def pattern_text(key: str, text: str, kind: type) -> dict[str, int | float]:
    """``'q_proj=16,v_proj=4'``, the command line's form of a mapping of names to numbers (the
    last ``=`` of an entry splits it); an empty text is the empty mapping."""
    items: dict[str, Any] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, sep, number = entry.rpartition("=")
        if not sep or not name.strip():
            raise ValueError(f"{key} must be name=value entries separated by commas, e.g. 'q_proj=16,v_proj=4'; "
                             f"got {text!r}")
        try:
            items[name.strip()] = int(number) if kind is int else float(number)
        except ValueError:
            raise type_error(f"{key}[{name.strip()!r}]", number, "an integer" if kind is int else "a number") from None
    return number_mapping(key, items, kind)


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(config: Any, hints: dict[str, Any]) -> None:
    """For a dataclass built in Python (no conversions here): each field holds its annotated
    type, ``hints`` (``typing.get_type_hints``; a bool is not an int, an int is a float, a
    ``tuple[int, ...]`` field takes a tuple or list of ints), else a TypeError naming the
    field; every number is finite, else a ValueError."""
    for name, hint in hints.items():
        value = getattr(config, name)
        optional = isinstance(hint, types.UnionType)
        kind = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint
        if value is None and optional:
            continue
        if typing.get_origin(kind) is tuple:
            ok = isinstance(value, (tuple, list)) and all(_is_int(v) for v in value)
        elif typing.get_origin(kind) is dict:
            of = typing.get_args(kind)[1]
            ok = isinstance(value, dict) and all(isinstance(k, str) and (_is_int(v) or (of is float and isinstance(
                v, float))) for k, v in value.items())
        elif kind is float:
            ok = _is_int(value) or isinstance(value, float)
        else:
            ok = _is_int(value) if kind is int else isinstance(value, kind)
        if not ok:
            expected = _KIND_NAMES.get(kind, "a mapping of names to numbers" if typing.get_origin(kind) is dict
                                       else "a sequence of integers")
            raise TypeError(f"{type(config).__name__}.{name} must be {expected}, "
                            f"got {_shown(value)} ({type(value).__name__})")
        if kind is float and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
