"""Options declared once, on dataclass fields: the CLI flags, the YAML keys and the Python keyword arguments of the
driver all come from the same :func:`option` fields (help text, default, parser, aliases).

A settings dataclass (``TrainConfig``, ``DistillConfig``, the specs of :mod:`minitron.specs`) declares each field
with :func:`option`; then

* :func:`add_options` adds one ``--flag`` per field to an argparse parser, its help text ending with the default;
* :func:`values_from_args` reads them back from the parsed namespace;
* :func:`from_mapping` builds the dataclass from a YAML mapping (unknown keys refused, naming the valid ones;
  the dataclass's own validation errors prefixed with the YAML section);
* :func:`fold` routes legacy keyword arguments onto the specs that own them.

This module imports nothing from minitron (every layer may use it).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

__all__ = ["option", "add_options", "values_from_args", "from_mapping", "fold", "yaml_key", "option_fields"]


def option(default: Any = dataclasses.MISSING, *, help: str, flag: Optional[Sequence[str]] = None,
           yaml: Optional[str] = None, parse: Optional[Callable[[str], Any]] = None,
           choices: Optional[Sequence[Any]] = None, cli: bool = True, default_text: Optional[str] = None,
           aliases: Sequence[str] = ()) -> Any:
    """A dataclass field carrying its user-facing description.

    Args:
        default: the default value (``dataclasses.MISSING``: required).
        help: one sentence for ``--help`` (the default is appended: ``(default: ...)``).
        flag: the CLI flag(s) (default ``--field-name``); a ``--no-...``/``--non-...`` flag on a field whose default
            is True stores False.
        yaml: the YAML key (default: the field name).
        parse: converts the command-line string (default: from the default's / annotation's type).
        choices: allowed values (argparse checks them).
        cli: False keeps the field out of the command line (Python and YAML only).
        default_text: how the default reads in the help (default: ``repr``-like of the value).
        aliases: other keyword names accepted by :func:`fold` (old Python API names).
    """
    meta = {"help": help, "flag": tuple(flag) if flag else None, "yaml": yaml, "parse": parse,
            "choices": tuple(choices) if choices else None, "cli": cli, "default_text": default_text,
            "aliases": tuple(aliases)}
    return dataclasses.field(default=default, metadata=meta)


def option_fields(cls: Any) -> List[dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`option`."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("yaml") or f.name


def _default_text(f: dataclasses.Field, default: Any) -> str:
    if f.metadata.get("default_text"):
        return f.metadata["default_text"]
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None:
        return "none"
    if isinstance(default, (tuple, list)):
        return ",".join(str(v) for v in default) or "none"
    return str(default)


def _parser_of(f: dataclasses.Field, default: Any) -> Callable[[str], Any]:
    if f.metadata.get("parse"):
        return f.metadata["parse"]
    if isinstance(default, bool):
        return str
    if isinstance(default, (int, float)) and default is not None:
        return type(default)
    ann = str(f.type)
    if "float" in ann:
        return float
    if "int" in ann and "str" not in ann:
        return int
    return str


def add_options(parser: Any, cls: Any, *, only: Optional[Iterable[str]] = None, exclude: Iterable[str] = (),
                defaults: Optional[Dict[str, Any]] = None, required: Iterable[str] = ()) -> None:
    """Add one flag per :func:`option` field of ``cls`` (restricted to ``only``, minus ``exclude``) to ``parser``
    (an ``ArgumentParser`` or argument group); ``defaults`` overrides a field's default for this command and the
    fields named in ``required`` must be given."""
    required = set(required)
    only = set(only) if only is not None else None
    defaults = defaults or {}
    for f in option_fields(cls):
        if not f.metadata["cli"] or f.name in set(exclude) or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        flags = list(f.metadata["flag"] or ["--" + f.name.replace("_", "-")])
        text = f"{f.metadata['help']} (default: {_default_text(f, default)})"
        kw: Dict[str, Any] = {"dest": f.name, "help": text.replace("%", "%%")}
        if isinstance(default, bool) and f.metadata.get("parse") is None:
            kw["action"] = "store_false" if default else "store_true"
        elif default is None and "bool" in str(f.type) and f.metadata.get("parse") is None:
            kw.update(action=argparse.BooleanOptionalAction, default=None)
        else:
            kw.update(type=_parser_of(f, default), default=default)
            if f.metadata["choices"]:
                kw["choices"] = list(f.metadata["choices"])
            if f.name in required:
                kw.update(required=True, help=kw["help"].rsplit(" (default: ", 1)[0] + " (required)")
        parser.add_argument(*flags, **kw)


def values_from_args(ns: argparse.Namespace, cls: Any) -> Dict[str, Any]:
    """The values of ``cls``'s fields present in the parsed namespace ``ns`` (by field name)."""
    return {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}


def from_mapping(cls: Any, d: Optional[Dict[str, Any]], where: str, **fixed: Any) -> Any:
    """Build ``cls`` from a YAML mapping keyed by :func:`yaml_key`; errors name ``where`` (the YAML section)."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    keys = {yaml_key(f): f.name for f in dataclasses.fields(cls) if f.name not in fixed}
    unknown = sorted(set(d) - set(keys))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid: {sorted(keys)}")
    kwargs = {keys[k]: v for k, v in d.items()}
    try:
        return cls(**kwargs, **fixed)
    except (TypeError, ValueError) as e:
        msg = str(e).replace(f"{cls.__name__}.", f"{where}.")
        raise type(e)(msg if msg.startswith(where) else f"{where}: {msg}") from None


def fold(where: str, legacy: Dict[str, Any], *specs: Any) -> List[Any]:
    """Route keyword arguments onto every spec owning a field of that name (or alias); returns the new specs
    (``dataclasses.replace``, so each is validated again). An argument no spec owns is a TypeError, as Python
    reports an unexpected keyword."""
    updates: List[Dict[str, Any]] = [{} for _ in specs]
    for key, value in legacy.items():
        owners = 0
        for i, spec in enumerate(specs):
            for f in dataclasses.fields(spec):
                if key == f.name or key in f.metadata.get("aliases", ()):
                    updates[i][f.name] = value
                    owners += 1
        if not owners:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r}")
    return [dataclasses.replace(s, **u) if u else s for s, u in zip(specs, updates)]


def parse_bf16(s: str) -> Any:
    """``--bf16`` values: auto, on/true, off/false."""
    m = {"auto": "auto", "on": True, "true": True, "off": False, "false": False}
    if str(s).lower() not in m:
        raise argparse.ArgumentTypeError("expected auto, on or off")
    return m[str(s).lower()]


def parse_int_list(s: str) -> List[int]:
    """``3,4`` -> ``[3, 4]``."""
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def parse_str_tuple(s: str) -> tuple:
    """``a,b`` -> ``("a", "b")``."""
    return tuple(x.strip() for x in s.split(",") if x.strip())
