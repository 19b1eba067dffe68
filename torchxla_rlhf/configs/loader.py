"""Typed config trees: nested dataclasses, YAML files with ``base:``, ``key=value`` overrides.

A config tree is a set of nested ``@dataclass``es; each field carries its documentation as a
string literal directly under it (torchtitan style)::

    @dataclass
    class OptimizerConfig:
        lr: float = 5e-7
        \"\"\"Peak learning rate.\"\"\"

The field types a tree may use are what the trainers' trees use: ``bool``, ``int``, ``float``,
``str``, ``Literal[...]``, ``X | None`` and nested dataclasses. The same dotted names are used
everywhere: in YAML (nested mappings), on the command line (``optimizer.lr=1e-6``,
``--optimizer.lr=1e-6`` or ``--optimizer.lr 1e-6``), in error messages and in ``--help``.

Resolution order for :func:`load_config` (later wins)::

    dataclass defaults  <  base: files (recursively)  <  the file itself  <  key=value overrides

Loading is strict: unknown keys, wrong types, missing required keys and the ``ValueError`` of
a section's ``validate()`` (called children first) or ``__post_init__`` are
:class:`ConfigError`\\ s that name the dotted key, where its value came from (``file:line`` or
``override '...'``) and, for typos, the nearest valid key. Coercion is narrow: an ``int`` takes
ints, integral floats and numeric strings (never a bool); a ``float`` takes numbers and numeric
strings (YAML 1.1 reads ``5e-7`` as a string); a ``bool`` only YAML booleans; a ``str`` only
strings in files, and on the command line the raw text (``run_name=2024`` stays a string).
YAML is only read with the safe loader; nothing is ``eval``'d.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import os
import posixpath
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from torchxla_rlhf.errors import UserError

T = TypeVar("T")

BASE_KEY = "base"
"""Reserved top-level YAML key naming the file(s) this one is merged over."""

RELATIVE_PATH = "relative_path"
"""Field metadata key: ``field(metadata={RELATIVE_PATH: True})`` marks a ``str`` field whose
relative local value, when set in a config file, is read from the working directory if it
exists there, else from the folder of the file that sets it (see :func:`resolve_relative`)."""

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
"""The repository's ``configs/``: a ``--config`` name that is not a file is looked up here."""


class ConfigError(UserError, ValueError):
    """A bad config value, key or file: ``str(err)`` is ``"<where>: <message>"``, where
    ``where`` is ``file:line`` or ``override '...'``. ``key`` is the dotted key at fault."""

    def __init__(self, message: str, *, key: str | None = None, where: str | None = None):
        self.message, self.key, self.where = message, key, where
        super().__init__(f"{where}: {message}" if where else message)


class _Raw:
    """A command-line value: YAML-parsed, with the raw text a ``str`` field takes instead."""

    def __init__(self, raw: str, parsed: Any):
        self.raw, self.parsed = raw, parsed


def _value(v: Any) -> Any:
    return v.parsed if isinstance(v, _Raw) else v


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class _Origins(dict):
    """``{dotted key: 'file:line' | "override '...'"}``; a key without an entry reports its
    nearest parent's location, then the file's."""

    def __init__(self, source: str = "<defaults>"):
        super().__init__()
        self.source = source

    def where(self, key: str) -> str:
        while key:
            if key in self:
                return self[key]
            key = key.rpartition(".")[0]
        return self.source

    def drop_under(self, key: str) -> None:
        for k in [k for k in self if k.startswith(key + ".")]:
            del self[k]


# ---------------------------------------------------------------------------------------------
# Introspection


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of the configurable (``init``) fields of a dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported config annotation {tp!r}: only X | None unions")
        return rest[0], True
    return tp, False


def _section_type(tp: Any) -> type | None:
    inner, _ = _optional(tp)
    return inner if _is_section(inner) else None


def field_docs(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field in the class source
    (base classes too; a subclass's doc wins). Missing source gives ``{}``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(_own_field_docs(klass))
    return docs


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = next((n.body for n in ast.walk(tree)
                 if isinstance(n, ast.ClassDef) and n.name == cls.__name__), [])
    return {
        stmt.target.id: inspect.cleandoc(nxt.value.value)
        for stmt, nxt in zip(body, body[1:])
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        and isinstance(nxt.value.value, str)
    }


def _type_name(tp: Any) -> str:
    """``float``, ``int | None``, ``'sigmoid' | 'ipo'``, ``ModelConfig | None``."""
    inner, opt = _optional(tp)
    if typing.get_origin(inner) is Literal:
        name = " | ".join(_fmt(a) for a in typing.get_args(inner))
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} | None" if opt else name


def _fmt(v: Any) -> str:
    """A value as one writes it in YAML."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v)


def _describe(v: Any) -> str:
    v = _value(v)
    return "a mapping" if isinstance(v, Mapping) else f"{type(v).__name__} {_fmt(v)}"


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _hints(cls).items():
        key = _join(prefix, name)
        keys.append(key)
        if (sub := _section_type(tp)) is not None:
            keys += _all_keys(sub, key)
    return keys


def _suggest(key: str, section: type, root: type) -> str:
    """``"; did you mean 'optimizer.lr'?"``, or the valid keys of the section."""
    prefix, _, name = key.rpartition(".")
    siblings = list(_hints(section))
    matches = [_join(prefix, c) for c in difflib.get_close_matches(name, siblings, n=3)]
    if not matches:  # right name in the wrong section: `lr` -> `optimizer.lr`
        keys = _all_keys(root)
        leaves = difflib.get_close_matches(name, {k.rpartition(".")[2] for k in keys}, cutoff=0.75)
        matches = [k for k in keys if k.rpartition(".")[2] in leaves][:3]
    if matches:
        return "; did you mean " + " or ".join(f"'{m}'" for m in matches) + "?"
    return f"; valid keys at {f'{prefix!r}' if prefix else 'the top level'}: {', '.join(siblings)}"


# ---------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build and validate a config tree from a plain nested dict, strictly (see the module
    docstring); ``source`` names the origin of ``data`` in error messages."""
    return _build(cls, data, "", _Origins(source), cls)


def _build(cls: type, data: Any, prefix: str, origins: _Origins, root: type) -> Any:
    """One section: coerce its keys, construct it, then run its ``validate()``."""
    data = {} if data is None and not prefix else _value(data)
    if not isinstance(data, Mapping):
        what = f"'{prefix}'" if prefix else "the config"
        raise ConfigError(f"{what}: expected a mapping of {cls.__name__} keys, got "
                          f"{_describe(data)}", key=prefix, where=origins.where(prefix))
    hints = _hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if name not in hints:
            raise ConfigError(f"unknown key '{key}'" + _suggest(key, cls, root), key=key,
                              where=origins.where(key))
        kwargs[name] = _coerce(hints[name], value, key, origins, root)
    for f in dataclasses.fields(cls):  # sections left at their defaults are validated too
        if f.name in hints and f.name not in kwargs and f.default_factory is not dataclasses.MISSING \
                and (sub := _section_type(hints[f.name])) is not None:
            kwargs[f.name] = _build(sub, {}, _join(prefix, f.name), origins, root)
    for f in dataclasses.fields(cls):
        if f.metadata.get(RELATIVE_PATH) and isinstance(kwargs.get(f.name), str):
            kwargs[f.name] = resolve_relative(kwargs[f.name], origins.where(_join(prefix, f.name)))
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is f.default_factory is dataclasses.MISSING]
    if missing:
        key = _join(prefix, missing[0])
        raise ConfigError(f"missing required key '{key}' ({_type_name(hints[missing[0]])})",
                          key=key, where=origins.where(prefix))
    try:
        cfg = cls(**kwargs)
        if hasattr(cfg, "validate"):
            cfg.validate()
    except ConfigError:
        raise
    except ValueError as e:
        raise _invalid(cls, prefix, str(e), origins) from e
    return cfg


def resolve_relative(path: str, where: str) -> str:
    """A relative local ``path`` set at ``where`` (``file:line``): unchanged when it exists
    relative to the working directory (what TRL and EasyLM users expect), else joined to the
    folder of the config file that sets it when it exists there (so that a shipped config's
    data are found from any directory), else unchanged (the reader's not-found error names
    the working directory). URLs, absolute paths and command-line values stay as they are."""
    m = re.fullmatch(r"(.+):\d+", where)
    if m is None or "://" in path or os.path.isabs(path) or "://" in m.group(1) \
            or os.path.exists(path):
        return path
    beside = os.path.normpath(os.path.join(os.path.dirname(m.group(1)), path))
    return beside if os.path.exists(beside) else path


def _invalid(cls: type, prefix: str, message: str, origins: _Origins) -> ConfigError:
    """A section's ``ValueError``, located at the field its message starts with
    (``"warmup_ratio: ..."`` or ``"DatasetConfig.path: ..."``) when there is one, else at the
    last override into the section: an override's mistake is reported against the override,
    not the file's section line."""
    m = re.match(r"(?:\w+\.)?(\w+)\b", message)
    field = m.group(1) if m and m.group(1) in _hints(cls) else None
    where = origins.where(_join(prefix, field) if field else prefix)
    if field is None:  # the section as a whole: the last override into it, if any
        under = [o for k, o in origins.items() if o.startswith("override ")
                 and (not prefix or k == prefix or k.startswith(prefix + "."))]
        where = under[-1] if under else where
    return ConfigError(f"invalid {f'{prefix!r}' if prefix else 'config'}: {message}",
                       key=prefix, where=where)


def _coerce(tp: Any, value: Any, key: str, origins: _Origins, root: type) -> Any:
    """Check / convert one value against annotation ``tp``; errors name ``key``."""
    tp, optional = _optional(tp)
    v = _value(value)
    if v is None and optional:
        return None
    if _is_section(tp):
        return _build(tp, value, key, origins, root)

    def mismatch(why: str = "") -> ConfigError:
        return ConfigError(f"'{key}': expected {_type_name(tp)}, got {_describe(value)}{why}",
                           key=key, where=origins.where(key))

    if typing.get_origin(tp) is Literal:
        choices = typing.get_args(tp)
        for c in (v, value.raw) if isinstance(value, _Raw) else (v,):
            if c in choices and not isinstance(c, bool):
                return c
        close = difflib.get_close_matches(str(v), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"'{key}': expected one of {', '.join(map(_fmt, choices))}, got "
                          f"{_describe(value)}{hint}", key=key, where=origins.where(key))
    if tp is bool:
        if isinstance(v, bool):
            return v
        raise mismatch(" (write true or false)")
    if tp in (int, float) and not isinstance(v, bool):
        number = v
        if isinstance(v, str):
            try:
                number = float(v.strip())
            except ValueError:
                raise mismatch() from None
        if isinstance(number, (int, float)):
            if isinstance(number, float) and not math.isfinite(number):
                # A NaN or infinite hyperparameter trains to the end and publishes garbage.
                raise mismatch(" (must be a finite number)")
            if tp is float:
                return float(number)
            if isinstance(number, int) or number.is_integer():
                return int(number)
            raise mismatch(" (has a fractional part)" if number == number else "")
        raise mismatch()
    if tp is str:
        if isinstance(v, str):
            return v
        if isinstance(value, _Raw) and not isinstance(v, (Mapping, list)):
            return value.raw  # `run_name=2024` / `run_name=no`: the user typed text
        raise mismatch(" (quote it to make it a string)")
    if tp in (int, float):
        raise mismatch()
    raise TypeError(f"'{key}': unsupported config annotation {tp!r}")


# ---------------------------------------------------------------------------------------------
# dataclass -> dict / YAML


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config tree as plain nested dicts and scalars: ``from_dict(type(c), to_dict(c)) == c``."""
    return {f.name: (to_dict(v) if dataclasses.is_dataclass(v := getattr(cfg, f.name)) else v)
            for f in dataclasses.fields(cfg) if f.init}


def dump_yaml(cfg: Any) -> str:
    """The tree as YAML (field order kept; floats written so that YAML reads floats back)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True, width=100)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML to a local path or a URL (``gs://...``); it loads back
    with ``load_config(type(cfg), path)``."""
    import fsspec

    fs, fpath = fsspec.core.url_to_fs(path)
    parent = posixpath.dirname(fpath) if "://" in path else os.path.dirname(fpath)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(fpath, "w", encoding="utf-8") as f:
        f.write(f"# resolved {type(cfg).__name__}\n" + dump_yaml(cfg))


# ---------------------------------------------------------------------------------------------
# YAML files with `base:`


def _norm(path: str) -> str:
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def find_config(name: str) -> str:
    """``name`` itself when it is a URL or an existing file, else the shipped config of that
    name (``ppo_13b.yaml`` -> ``configs/ppo_13b.yaml``; ``tiny/dpo`` -> ``configs/tiny/dpo.yaml``;
    ``configs/tiny/dpo.yaml`` from another directory);
    a :class:`ConfigError` listing the shipped configs when there is none."""
    if "://" in name or os.path.exists(name):
        return name
    bare = name.removeprefix("configs/")
    for candidate in (bare, f"{bare}.yaml"):
        if (SHIPPED_CONFIGS / candidate).is_file():
            return str(SHIPPED_CONFIGS / candidate)
    shipped = sorted(str(p.relative_to(SHIPPED_CONFIGS)) for p in SHIPPED_CONFIGS.rglob("*.yaml"))
    raise ConfigError(f"config file not found: {name} (not a file, nor one of the shipped "
                      f"configs in {SHIPPED_CONFIGS}: {', '.join(shipped) or 'none'})")


def _parse_yaml(text: str, path: str, origins: dict[str, str]) -> Any:
    """Safe-load one YAML document, recording the ``file:line`` of every key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _collect_lines(node, "", path, origins)
        return None if node is None else loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', None) or e}", where=where) from e
    finally:
        loader.dispose()


def _collect_lines(node: yaml.Node, prefix: str, path: str, origins: dict[str, str],
                   open_nodes: tuple[int, ...] = ()) -> None:
    """Record the ``file:line`` of every key under ``node``; refuse what a config cannot be:
    a key that is not a plain scalar (a sequence or mapping as a key) and an alias inside the
    node it names (a recursive structure, which no config key takes)."""
    if id(node) in open_nodes:
        raise ConfigError(f"'{prefix or '<top level>'}': an alias refers to a node that contains "
                          "it (a recursive structure); write the value out instead",
                          key=prefix or None, where=f"{path}:{node.start_mark.line + 1}")
    open_nodes = (*open_nodes, id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _collect_lines(item, prefix, path, {}, open_nodes)
        return
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, int] = {}
    for k, v in node.value:
        line = k.start_mark.line + 1
        if not isinstance(k, yaml.ScalarNode):
            what = "a sequence" if isinstance(k, yaml.SequenceNode) else "a mapping"
            raise ConfigError(f"a key {f'under {prefix!r} ' if prefix else ''}is {what}; "
                              "keys must be plain names", key=prefix or None, where=f"{path}:{line}")
        key = _join(prefix, k.value)
        if k.value in seen:
            raise ConfigError(f"duplicate key '{key}' (first set at line {seen[k.value]})",
                              key=key, where=f"{path}:{line}")
        seen[k.value] = line
        origins[key] = f"{path}:{line}"
        _collect_lines(v, key, path, origins, open_nodes)


def _merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def _load_file(path: str, chain: list[str], origins: _Origins, included_at: str | None) -> dict:
    """One file merged over its ``base:`` chain; fills ``origins``. ``chain``: the files that
    include this one, to report cycles."""
    same = os.path.realpath if "://" not in path else str
    if any(same(p) == same(path) for p in chain):
        raise ConfigError(f"'{BASE_KEY}' cycle: {' -> '.join([*chain, path])}", key=BASE_KEY,
                          where=included_at)
    import fsspec

    what = f"{'base ' if included_at else ''}config file"
    try:
        with fsspec.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise ConfigError(f"{what} not found: {path}", where=included_at) from e
    except IsADirectoryError as e:
        raise ConfigError(f"{what} {path} is a directory; name a YAML file in it",
                          where=included_at) from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
                          f"offset {e.start}); save it as UTF-8 YAML", where=included_at) from e
    own: dict[str, str] = {}
    data = _parse_yaml(text, path, own)
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {_describe(data)}",
                          where=path)
    bases = data.pop(BASE_KEY, [])
    base_at = own.pop(BASE_KEY, path)
    bases = [bases] if isinstance(bases, str) else bases
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"'{BASE_KEY}' must be a file path or a list of file paths, got "
                          f"{_describe(bases)}", key=BASE_KEY, where=base_at)
    merged: dict = {}
    for b in bases:
        if "://" not in b and not os.path.isabs(b):  # relative to the including file
            b = (posixpath if "://" in path else os.path).join(os.path.dirname(path), b)
        merged = _merge(merged, _load_file(_norm(b), [*chain, path], origins, base_at))
    for key in own:  # a non-mapping value replaces what the bases said under its key
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if not isinstance(node, Mapping):
            origins.drop_under(key)
    origins.update(own)
    return _merge(merged, data)


# ---------------------------------------------------------------------------------------------
# Overrides and load_config


def _apply_override(root: type, data: dict, origins: _Origins, text: str) -> None:
    """Apply one ``dotted.key=value`` (the value read as YAML) to the nested dict ``data``."""
    where = f"override '{text}'"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("expected key=value (e.g. optimizer.lr=1e-6)", where=where)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed key '{key}'", key=key, where=where)
    section, node = root, data
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if part not in _hints(section):
            raise ConfigError(f"unknown key '{dotted}'" + _suggest(dotted, section, root),
                              key=dotted, where=where)
        tp = _hints(section)[part]
        section = _section_type(tp)
        if i < len(parts) - 1:
            if section is None:
                raise ConfigError(f"cannot set '{key}': '{dotted}' is a {_type_name(tp)} field, "
                                  "not a section", key=dotted, where=where)
            current = _value(node.get(part))
            if current is not None and not isinstance(current, Mapping):
                raise ConfigError(f"cannot set '{key}': '{dotted}' is {_describe(current)} (set "
                                  f"at {origins.where(dotted)}), not a mapping",
                                  key=dotted, where=where)
            node[part] = dict(current or {})  # a null optional section starts from defaults
            node = node[part]
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"'{key}': cannot parse value {raw!r} as YAML", key=key,
                          where=where) from e
    node[parts[-1]] = (_merge(_value(node.get(parts[-1])), parsed) if isinstance(parsed, Mapping)
                       else _Raw(raw.strip(), parsed))
    origins.drop_under(key)
    origins[key] = where


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a config tree: defaults < ``base:`` chain < YAML file < ``key=value`` overrides.

    ``path`` is a YAML file (local or fsspec URL), a shipped config's name (see
    :func:`find_config`), or None for the defaults. A top-level ``base: other.yaml`` (or a list)
    names files, relative to this one, deep-merged *under* its keys. ``overrides`` are
    ``"optimizer.lr=1e-6"`` strings applied in order, values read as YAML
    (``eval_dataset=null``, ``mesh_dim='1,2,2'``); a dotted key into a null optional section
    creates it from its defaults. Raises :class:`ConfigError` naming file:line or override.
    """
    origins = _Origins()
    data: dict[str, Any] = {}
    if path is not None:
        origins.source = path = _norm(find_config(os.fspath(path)))
        data = _load_file(path, [], origins, None)
        _check_declared_trainer(cls, data, origins)
    for text in overrides:
        _apply_override(cls, data, origins, text)
    return _build(cls, data, "", origins, cls)


TRAINER_KEY = "trainer"
"""Top-level key naming the trainer a file is for (a field of every trainer's config tree)."""


def _check_declared_trainer(cls: type, data: dict, origins: _Origins) -> None:
    """A file for another trainer says so before its keys are checked (a PPO file given to
    the DPO command would otherwise fail on 'unknown key reward_model')."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    own = fields[TRAINER_KEY].default if TRAINER_KEY in fields else None
    declared = _value(data.get(TRAINER_KEY))
    if own and isinstance(declared, str) and declared != own:
        raise ConfigError(
            f"trainer: this file is a {declared!r} config, this command trains {own!r} "
            f"(run python -m torchxla_rlhf.{declared} --config ...)",
            key=TRAINER_KEY, where=origins.where(TRAINER_KEY))


def declared_value(path: str, key: str) -> tuple[Any, str]:
    """``(value, where)`` of top-level ``key`` in config file ``path`` (a shipped name works)
    merged over its ``base:`` chain, without building a config tree: ``(None, path)`` when
    no file of the chain sets it. How ``plan`` learns which trainer a file is for."""
    origins = _Origins()
    origins.source = path = _norm(find_config(os.fspath(path)))
    data = _load_file(path, [], origins, None)
    return data.get(key), origins.where(key)


# ---------------------------------------------------------------------------------------------
# Command line


def _usage(prog: str) -> str:
    return (f"usage: {prog} [-h] [--config FILE] [--print-config | --check [--devices N]] "
            "[key=value | --key=value | --key value ...]")


ACTIONS = ("--print-config", "--check")
"""Flags that replace the run: print the resolved config, or run the device-free checks."""


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, prog: str = "train") -> T:
    """``[--config FILE] key=value ...`` into a config tree. Overrides may also be spelled
    ``--key=value`` or, as EasyLM's flags, ``--key value``. ``-h/--help`` prints every key with
    its type, default and docstring and exits 0."""
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = "-h" in argv or "--help" in argv
    if wants_help:
        argv = [a for a in argv if a not in ("-h", "--help")]
        if "--config" not in argv and not any(a.startswith(("--config=", "config=")) for a in argv):
            sys.stdout.write(format_help(cls, prog))
            raise SystemExit(0)
    config, overrides = None, []
    args = iter(argv)
    for arg in args:
        where = f"argument '{arg}'"
        name, eq, value = arg.removeprefix("--").partition("=")
        if not eq and arg.startswith("--"):
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"'{name}' needs a value (--{name} VALUE or --{name}=VALUE)",
                                  key=name, where=where)
        elif not eq or arg.startswith("-") and not arg.startswith("--"):
            raise ConfigError("expected key=value, --key=value, --key value or --config FILE",
                              where=where)
        if name == "config":
            if config is not None:
                raise ConfigError("--config given more than once", where=where)
            config = value
        else:
            overrides.append(f"{name}={value}")
    cfg = load_config(cls, config, overrides)
    if wants_help:  # --config FILE --help: the keys with FILE's (and the overrides') values
        sys.stdout.write(format_help(cls, prog, cfg, source=config, overrides=len(overrides)))
        raise SystemExit(0)
    return cfg


def format_help(cls: type, prog: str = "train", cfg: Any = None, *, source: str | None = None,
                overrides: int = 0) -> str:
    """The ``--help`` text: every key with its type, default and docstring, by section; with
    ``cfg`` (``--config FILE --help``) each key shows ``cfg``'s value, and its default where
    that differs."""
    out = [_usage(prog), ""]
    if doc := _class_doc(cls):
        out += [doc, ""]
    out += [
        "options:",
        "  -h, --help       show this help and exit; after --config FILE (and overrides), show",
        "                   FILE's resolved values",
        "  --config FILE    YAML config file (local, gs://, or a shipped config's name such as",
        "                   ppo_13b.yaml or tiny/dpo.yaml); a top-level `base: other.yaml`",
        "                   (relative to the file) is merged under its keys",
        "  key=value        set one key after the file; the value is read as YAML, e.g.",
        "                   optimizer.lr=1e-6 mesh_dim='1,2,2' use_ipo=true eval_dataset=null",
        "                   (also --key=value and --key value)",
        "  --print-config   print the resolved config as YAML and exit",
        "  --check          run every start-up check that needs no device (config, remote paths,",
        "                   output_dir, W&B settings, model configs, data report, mesh, memory",
        "                   plan) and exit: 0 if all pass, 2 if any fails",
        "  --devices N      with --check: the device count to check the mesh on (default: the",
        "                   mesh_dim's product, or with a -1 axis this machine's devices)",
        "  --debug          show the traceback of a user error",
        "",
    ]
    if cfg is None:
        out.append("keys (nest them by section in YAML):")
    else:
        what = f"{source}" + (f" and {overrides} override(s)" if overrides else "")
        out.append(f"keys with the values resolved from {what} (nest them by section in YAML):")
    _help_section(cls, "", out, cfg)
    return "\n".join(out).rstrip() + "\n"


def _class_doc(cls: type) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(f"{cls.__name__}(") else inspect.cleandoc(doc)


def _help_section(cls: type, prefix: str, out: list[str], values: Any = None) -> None:
    """The section's own keys first, then its subsections, each under a ``[key]`` header.
    ``values``: the section's resolved instance (its values are shown), or None (defaults)."""
    docs, fields = field_docs(cls), {f.name: f for f in dataclasses.fields(cls)}
    subsections = []
    for name, tp in _hints(cls).items():
        key, f = _join(prefix, name), fields[name]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
            else f.default
        value = getattr(values, name) if values is not None else dataclasses.MISSING
        if _section_type(tp) is not None:
            subsections.append((key, tp, default, docs.get(name), value))
            continue
        if value is dataclasses.MISSING:
            shown = "(required)" if default is dataclasses.MISSING else f"= {_fmt(default)}"
        elif default is dataclasses.MISSING or _fmt(value) == _fmt(default):
            shown = f"= {_fmt(value)}"
        else:
            shown = f"= {_fmt(value)}   (default: {_fmt(default)})"
        out.append(f"  {key}: {_type_name(tp)} {shown}")
        if name in docs:
            out.append(textwrap.indent(docs[name], "      "))
    for key, tp, default, doc, value in subsections:
        shows_null = value is None or (value is dataclasses.MISSING and default is None)
        note = f" = null (set any {key}.<key>=... to enable it with these defaults)" \
            if shows_null else ""
        out += ["", f"[{key}] {_type_name(tp)}{note}"]
        if doc:
            out.append(textwrap.indent(doc, "    "))
        if cdoc := _class_doc(_section_type(tp)):
            out.append(textwrap.indent(cdoc, "    "))
        _help_section(_section_type(tp), key, out,
                      value if value is not dataclasses.MISSING and value is not None else None)


def _pop_actions(argv: list[str]) -> tuple[list[str], str | None, int | None]:
    """``argv`` without ``--print-config`` / ``--check`` / ``--devices N``, the action asked
    for, and the device count."""
    rest, action, devices = [], None, None
    args = iter(argv)
    for arg in args:
        if arg in ACTIONS:
            if action is not None and action != arg:
                raise ConfigError(f"{action} and {arg} cannot be combined",
                                  where=f"argument '{arg}'")
            action = arg
        elif arg == "--devices" or arg.startswith("--devices="):
            text = arg.partition("=")[2] if "=" in arg else next(args, "")
            if not text.isdigit() or int(text) < 1:
                raise ConfigError(f"--devices: expected a device count >= 1, got {text!r}",
                                  where="argument '--devices'")
            devices = int(text)
        else:
            rest.append(arg)
    if devices is not None and action != "--check":
        raise ConfigError("--devices is only used with --check", where="argument '--devices'")
    return rest, action, devices


def cli_main(cls: type[T], main_fn: Callable[[T], Any], argv: Sequence[str] | None = None,
             prog: str = "train", check: Callable[[T, int | None], int] | None = None) -> Any:
    """Parse the command line and return ``main_fn(cfg)``: the command line's error boundary
    (:func:`torchxla_rlhf.errors.run_guarded`). A :class:`ConfigError` from parsing prints the
    usage and ``prog: error: ...``; any other user error (data, mesh, files, URLs, models,
    resume, output_dir) prints its one line; both exit 2, as argparse does. A preempted run
    exits 75. ``--debug`` (or ``TORCHXLA_RLHF_DEBUG=1``) shows tracebacks.

    ``--print-config`` prints the resolved config as YAML and exits 0; ``--check [--devices
    N]`` exits with ``check(cfg, devices)`` instead of running (``check`` is the entry point's
    device-free start-up checks). Parsing, ``--help`` and ``--print-config`` import nothing
    heavier than PyYAML."""
    from torchxla_rlhf.errors import debug_requested, run_guarded

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        argv, action, devices = _pop_actions(argv)
        if action == "--check" and check is None:
            raise ConfigError(f"{prog} has no --check", where="argument '--check'")
        cfg = parse_cli(cls, argv, prog)
    except ConfigError as e:
        print(_usage(prog), file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if action == "--print-config":
        sys.stdout.write(f"# resolved {cls.__name__}\n" + dump_yaml(cfg))
        raise SystemExit(0)
    if action == "--check":
        raise SystemExit(run_guarded(lambda: check(cfg, devices), prog, debug))
    return run_guarded(lambda: main_fn(cfg), prog, debug)
