"""Typed config trees: nested dataclasses, YAML files with ``base:``, ``key=value`` overrides.

A config tree is a set of nested ``@dataclass``es; each field carries its documentation as a
string literal directly under it (torchtitan style)::

    @dataclass
    class OptimizerConfig:
        lr: float = 5e-7
        \"\"\"Peak learning rate.\"\"\"

The same dotted names are used everywhere: in YAML (nested mappings), on the command line
(``optimizer.lr=1e-6`` / ``--optimizer.lr=1e-6`` / ``--optimizer.lr 1e-6``), in error messages
and in ``--help``. Loading is strict: unknown keys, wrong types and missing required keys are
:class:`ConfigError`\\ s that name the dotted key, the file and line it came from, what was
expected and, for typos, the nearest valid key(s).

Resolution order for :func:`load_config` (later wins)::

    dataclass defaults  <  base: files (recursively)  <  the file itself  <  key=value overrides

Then every dataclass in the tree that defines ``validate()`` is called (children first); a
``ValueError`` raised there becomes a ``ConfigError`` prefixed with the section's dotted key.

Type coercion is deliberately narrow ("only where safe"):

- ``int``: ints, floats without a fractional part (``1.0e+3``), numeric strings (``'1e3'``);
  never ``bool``.
- ``float``: floats, ints, and strings that parse as floats (YAML 1.1 reads ``5e-7`` as a str).
- ``bool``: real booleans only (YAML ``true/false``; on the command line ``true/false``).
- ``str``: strings only in files; on the command line the raw text (``run_name=2024`` is fine).
- ``X | None``, ``Literal[...]``, nested dataclasses (from a mapping), ``list[T]``,
  ``tuple[T, ...]``/``tuple[A, B]``, ``dict[str, T]``, ``Enum`` (by value or name), ``Path``.

YAML is only ever read with the safe loader; nothing is ``eval``'d.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import enum
import functools
import inspect
import os
import pathlib
import posixpath
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import yaml
from torchxla_rlhf.errors import UserError

__all__ = [
    "ConfigError",
    "field_docs",
    "from_dict",
    "to_dict",
    "dump_yaml",
    "validate_config",
    "load_config",
    "parse_cli",
    "format_help",
    "cli_main",
    "save_config",
]

T = TypeVar("T")

_BASE_KEY = "base"
"""Reserved top-level YAML key naming the file(s) this one is merged over."""

_NONE_TYPE = type(None)


# ---------------------------------------------------------------------------------------------
# Errors


class ConfigError(UserError, ValueError):
    """A bad config value, key or file.

    ``str(err)`` is ``"<where>: <message>"`` where ``where`` is ``file:line`` (or the command-line
    override, or the ``source`` given to :func:`from_dict`), e.g.
    ``configs/x.yaml:3: unknown key 'optimizer.lrr'; did you mean 'optimizer.lr'?``.

    Attributes:
        message: the message without the location.
        key: the dotted key at fault (``"optimizer.lr"``), or None for file-level errors.
        where: the location prefix, or None.
    """

    def __init__(self, message: str, *, key: str | None = None, where: str | None = None,
                 mismatch: bool = False) -> None:
        self.message = message
        self.key = key
        self.where = where
        # True for "value has the wrong type" at exactly `key`: a Union tries its next member.
        self._mismatch = mismatch
        super().__init__(f"{where}: {message}" if where else message)


class _CliValue:
    """A command-line override value: the YAML-parsed value plus the raw text.

    The raw text is what a ``str`` field gets (``run_name=2024`` or ``run_name=no`` must stay
    strings, not become ``2024`` / ``False``).
    """

    __slots__ = ("raw", "parsed")

    def __init__(self, raw: str, parsed: Any) -> None:
        self.raw = raw
        self.parsed = parsed

    def __repr__(self) -> str:
        return repr(self.parsed)


class _Ctx:
    """Where values came from, for error messages.

    ``origins`` maps dotted keys (``optimizer.lr``, ``data.files[0]``) to ``file:line`` or
    ``override '...'``; a key without an entry uses its nearest parent's, then ``source``.
    """

    def __init__(self, root: type, source: str, origins: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.source = source
        self.origins = dict(origins or {})

    def where(self, key: str) -> str:
        k = key
        while k:
            if k in self.origins:
                return self.origins[k]
            k = _parent_key(k)
        return self.source

    def where_section(self, prefix: str) -> str:
        """Location for a whole section: its own key, else the one place its keys came from."""
        if not prefix or prefix in self.origins:
            return self.where(prefix)
        under = {o for k, o in self.origins.items()
                 if k.startswith(prefix + ".") or k.startswith(prefix + "[")}
        return under.pop() if len(under) == 1 else self.where(prefix)


def _parent_key(key: str) -> str:
    """``a.b[0]`` -> ``a.b`` -> ``a`` -> ``''``."""
    cut = max(key.rfind("."), key.rfind("["))
    return key[:cut] if cut > 0 else ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ---------------------------------------------------------------------------------------------
# Introspection: fields, type hints, docstrings


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_dataclass_type(cls: Any) -> None:
    if not _is_dataclass_type(cls):
        raise TypeError(f"expected a dataclass type, got {cls!r}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (handles ``from __future__ import annotations``)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError) as e:
        raise TypeError(f"cannot resolve the type annotations of {cls.__qualname__}: {e}") from e


def _init_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields a config key can set (``init=False`` fields are derived, not configurable)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


@functools.cache
def _own_field_docs(cls: type) -> dict[str, str]:
    """Docstrings written directly under annotated assignments in ``cls``'s own body."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return {}  # built dynamically or source unavailable: no docs, not an error
    node = next((n for n in ast.walk(tree)
                 if isinstance(n, ast.ClassDef) and n.name == cls.__name__), None)
    if node is None:
        return {}
    docs: dict[str, str] = {}
    body = node.body
    for stmt, nxt in zip(body, body[1:]):
        if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Per-field docstrings of a dataclass: ``{field_name: doc}``.

    Reads the class source with :mod:`ast` and takes the string literal right below each
    annotated field. Base classes are walked too (a subclass's doc wins). Fields without a
    docstring are absent; classes whose source is unavailable give ``{}``.
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        docs.update(_own_field_docs(klass))
    return docs


def _class_doc(cls: type) -> str:
    """The class docstring, ignoring the signature string ``@dataclass`` makes up."""
    doc = cls.__dict__.get("__doc__") or ""
    if not doc or doc.startswith(f"{cls.__name__}("):
        return ""
    return inspect.cleandoc(doc)


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(tp, False)``."""
    if _is_union(tp):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not _NONE_TYPE]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0], True
    return tp, False


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """Readable type: ``float``, ``int | None``, ``'sigmoid' | 'ipo'``, ``list[str]``."""
    if tp is _NONE_TYPE or tp is None:
        return "None"
    if tp is Any:
        return "Any"
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(_fmt_value(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        if not args:
            return name
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{name}[{inner}]"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


def _fmt_value(v: Any) -> str:
    """A value as the user would write it in YAML / on the command line."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return repr(v)
    if isinstance(v, enum.Enum):
        return _fmt_value(v.value)
    plain = _plain(v)
    return yaml.safe_dump(plain, default_flow_style=True, width=10_000).strip().removesuffix(
        "...").strip()


def _all_keys(cls: type, prefix: str = "", seen: frozenset = frozenset()) -> list[str]:
    """Every dotted key of a tree (sections and leaves), for suggestions and help."""
    if cls in seen:
        return []
    keys: list[str] = []
    hints = _hints(cls)
    for name in _init_fields(cls):
        key = _join(prefix, name)
        keys.append(key)
        sub, _ = _strip_optional(hints[name])
        if _is_dataclass_type(sub):
            keys.extend(_all_keys(sub, key, seen | {cls}))
    return keys


def _suggest(key: str, section: type, root: type) -> str:
    """``"; did you mean 'optimizer.lr'?"`` (difflib) or the list of valid keys in the section."""
    prefix, name = _parent_key(key), key[len(_parent_key(key)):].lstrip(".")
    siblings = list(_init_fields(section))
    close = difflib.get_close_matches(name, siblings, n=3, cutoff=0.6)
    matches = [_join(prefix, c) for c in close]
    if not matches:
        # Maybe right name, wrong section (`lr` at top level -> `optimizer.lr`).
        by_leaf: dict[str, list[str]] = {}
        for k in _all_keys(root):
            by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
        for leaf in difflib.get_close_matches(name, list(by_leaf), n=3, cutoff=0.75):
            matches.extend(by_leaf[leaf])
        matches = matches[:3]
    if len(matches) == 1:
        return f"; did you mean '{matches[0]}'?"
    if matches:
        return "; did you mean one of " + ", ".join(f"'{m}'" for m in matches) + "?"
    where = f"'{prefix}'" if prefix else "the top level"
    shown = ", ".join(siblings[:25]) + (", ..." if len(siblings) > 25 else "")
    return f"; valid keys at {where}: {shown}"


# ---------------------------------------------------------------------------------------------
# dict -> dataclass


def from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build a config tree from a plain (YAML-style) nested dict, strictly.

    Unknown keys, wrong types and missing required keys raise :class:`ConfigError` naming the
    dotted key; see the module docstring for the coercions allowed. Omitted keys take the
    dataclass defaults. After construction every dataclass in the tree that defines
    ``validate()`` is called (children first); its ``ValueError`` becomes a ``ConfigError``.

    Args:
        cls: the root dataclass type.
        data: nested mapping of field values (not modified).
        source: what to call the origin of ``data`` in error messages (e.g. a file name).
    """
    _check_dataclass_type(cls)
    return _build_and_validate(cls, data, _Ctx(cls, source))


def _build_and_validate(cls: type[T], data: Any, ctx: _Ctx) -> T:
    cfg = _build(cls, data, "", ctx)
    _validate_tree(cfg, "", ctx)
    return cfg


def _build(cls: type, data: Any, prefix: str, ctx: _Ctx) -> Any:
    """One dataclass from a mapping (no ``validate()`` yet)."""
    if isinstance(data, cls):
        return data
    if isinstance(data, _CliValue):
        data = data.parsed
    if data is None and not prefix:
        data = {}
    if not isinstance(data, Mapping):
        what = f"'{prefix}'" if prefix else "the config"
        raise ConfigError(
            f"{what}: expected a mapping of {cls.__name__} keys, got {_describe(data)}",
            key=prefix or None, where=ctx.where(prefix), mismatch=True)
    fields = _init_fields(cls)
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = _join(prefix, str(name))
        if not isinstance(name, str):
            raise ConfigError(f"key {name!r} in '{prefix or 'the top level'}' must be a string",
                              key=key, where=ctx.where(prefix))
        if name not in fields:
            raise ConfigError(f"unknown key '{key}'" + _suggest(key, cls, ctx.root),
                              key=key, where=ctx.where(key))
        kwargs[name] = _coerce(hints[name], value, key, ctx)
    missing = [n for n, f in fields.items() if n not in kwargs and not _has_default(f)]
    if missing:
        names = ", ".join(f"'{_join(prefix, n)}' ({_type_name(hints[n])})" for n in missing)
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} {names}",
                          key=_join(prefix, missing[0]), where=ctx.where(prefix))
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks
        if isinstance(e, ConfigError):
            raise
        raise _invalid(prefix, e, ctx) from e


def _invalid(prefix: str, e: Exception, ctx: _Ctx) -> ConfigError:
    what = f"'{prefix}'" if prefix else "config"
    return ConfigError(f"invalid {what}: {e}", key=prefix or None,
                       where=ctx.where_section(prefix))


def _describe(value: Any) -> str:
    if isinstance(value, _CliValue):
        value = value.parsed
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list {_fmt_value(list(value))}" if len(value) < 8 else "a list"
    return f"{type(value).__name__} {_fmt_value(value)}"


def _mismatch(tp: Any, value: Any, key: str, ctx: _Ctx, why: str = "") -> ConfigError:
    return ConfigError(f"'{key}': expected {_type_name(tp)}, got {_describe(value)}{why}",
                       key=key, where=ctx.where(key), mismatch=True)


_SCALARS = (bool, int, float, str)


def _exact(tp: Any, value: Any) -> bool:
    """Does ``value`` already have type ``tp`` (used to pick the Union member first)?"""
    v = value.parsed if isinstance(value, _CliValue) else value
    if tp in _SCALARS:
        return type(v) is tp
    origin = typing.get_origin(tp) or tp
    if _is_dataclass_type(tp):
        return isinstance(v, (Mapping, tp))
    if origin in (list, tuple):
        return isinstance(v, (list, tuple))
    if origin is dict:
        return isinstance(v, Mapping)
    return False


def _coerce(tp: Any, value: Any, key: str, ctx: _Ctx) -> Any:
    """Check / convert one value against annotation ``tp``; errors name ``key``."""
    cli = isinstance(value, _CliValue)
    parsed = value.parsed if cli else value

    if tp is Any or tp is object:
        return _plain(parsed)

    if _is_union(tp):
        args = typing.get_args(tp)
        if parsed is None and _NONE_TYPE in args:
            return None
        members = [a for a in args if a is not _NONE_TYPE]
        members.sort(key=lambda a: not _exact(a, value))  # stable: exact matches first
        if len(members) == 1:  # `X | None`: X's own message is the most specific
            return _coerce(members[0], value, key, ctx)
        for i, member in enumerate(members):
            try:
                return _coerce(member, value, key, ctx)
            except ConfigError as e:
                # An error *inside* a member the value clearly meant is the real error.
                if not (e._mismatch and e.key == key) and i == 0 and _exact(member, value):
                    raise
        raise _mismatch(tp, value, key, ctx)

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if origin is Literal:
        candidates = [parsed] + ([value.raw] if cli else [])
        for c in candidates:
            for a in args:
                if type(c) is type(a) and c == a:
                    return a
        hint = ""
        strs = [a for a in args if isinstance(a, str)]
        if isinstance(parsed, str) and strs:
            close = difflib.get_close_matches(parsed, strs, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
        return _raise(ConfigError(
            f"'{key}': expected one of {', '.join(_fmt_value(a) for a in args)}, "
            f"got {_describe(value)}{hint}", key=key, where=ctx.where(key), mismatch=True))

    if tp is _NONE_TYPE:
        if parsed is None:
            return None
        raise _mismatch(tp, value, key, ctx)

    if tp is bool:
        if isinstance(parsed, bool):
            return parsed
        raise _mismatch(tp, value, key, ctx, " (write true or false)")

    if tp is int:
        if isinstance(parsed, bool):
            raise _mismatch(tp, value, key, ctx)
        if isinstance(parsed, int):
            return parsed
        if isinstance(parsed, float):
            if parsed.is_integer():
                return int(parsed)
            raise _mismatch(tp, value, key, ctx, " (has a fractional part)")
        if isinstance(parsed, str):
            n = _parse_int(parsed)
            if n is not None:
                return n
        raise _mismatch(tp, value, key, ctx)

    if tp is float:
        if isinstance(parsed, bool):
            raise _mismatch(tp, value, key, ctx)
        if isinstance(parsed, (int, float)):
            return float(parsed)
        if isinstance(parsed, str):
            # YAML 1.1 reads `5e-7` (no dot) and `1e-6` as strings.
            try:
                return float(parsed.strip())
            except ValueError:
                pass
        raise _mismatch(tp, value, key, ctx)

    if tp is str:
        if isinstance(parsed, str):
            return parsed
        if cli and not isinstance(parsed, (Mapping, list)):
            return value.raw  # `run_name=2024` / `run_name=no`: the user typed text
        raise _mismatch(tp, value, key, ctx, " (quote it to make it a string)")

    if _is_dataclass_type(tp):
        return _build(tp, value, key, ctx)

    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(parsed, (list, tuple)):
            raise _mismatch(tp, value, key, ctx)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(parsed) != len(args):
                raise _mismatch(tp, value, key, ctx, f" (needs exactly {len(args)} items)")
            return tuple(_coerce(a, v, f"{key}[{i}]", ctx)
                         for i, (a, v) in enumerate(zip(args, parsed)))
        elem = args[0] if args else Any
        items = [_coerce(elem, v, f"{key}[{i}]", ctx) for i, v in enumerate(parsed)]
        return tuple(items) if (origin or tp) is tuple else items

    if origin is dict or tp is dict:
        if not isinstance(parsed, Mapping):
            raise _mismatch(tp, value, key, ctx)
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in parsed.items():
            sub = f"{key}.{k}"
            out[_coerce(kt, k, sub, ctx)] = _coerce(vt, v, sub, ctx)
        return out

    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(parsed, tp):
            return parsed
        for m in tp:
            if (type(parsed) is type(m.value) and parsed == m.value) or parsed == m.name:
                return m
        return _raise(ConfigError(
            f"'{key}': expected one of {', '.join(_fmt_value(m.value) for m in tp)}, "
            f"got {_describe(value)}", key=key, where=ctx.where(key), mismatch=True))

    if isinstance(tp, type) and issubclass(tp, pathlib.PurePath):
        if isinstance(parsed, (str, os.PathLike)):
            return tp(parsed)
        raise _mismatch(tp, value, key, ctx)

    if isinstance(tp, type):
        if isinstance(parsed, tp):
            return parsed
        raise _mismatch(tp, value, key, ctx)
    raise TypeError(f"'{key}': unsupported config annotation {tp!r}")


def _raise(e: Exception) -> Any:
    raise e


def _parse_int(s: str) -> int | None:
    """``'12'`` -> 12, ``'1e3'`` -> 1000, ``'2.5'`` -> None."""
    s = s.strip()
    try:
        return int(s)
    except ValueError:
        pass
    try:
        f = float(s)
    except ValueError:
        return None
    return int(f) if f.is_integer() else None


def _validate_tree(obj: Any, prefix: str, ctx: _Ctx) -> None:
    """Call ``validate()`` on every dataclass in the tree, children first."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _validate_tree(getattr(obj, f.name), _join(prefix, f.name), ctx)
        check = getattr(obj, "validate", None)
        if callable(check):
            try:
                check()
            except ConfigError:
                raise
            except ValueError as e:
                raise _invalid(prefix, e, ctx) from e
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _validate_tree(v, f"{prefix}[{i}]", ctx)
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            _validate_tree(v, _join(prefix, str(k)), ctx)


def validate_config(cfg: Any, *, source: str = "<config>") -> None:
    """Run every ``validate()`` in an already-built tree (e.g. one made in Python code)."""
    _validate_tree(cfg, "", _Ctx(type(cfg), source))


# ---------------------------------------------------------------------------------------------
# dataclass -> dict / YAML


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v) if f.init}
    if isinstance(v, _CliValue):
        return _plain(v.parsed)
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, enum.Enum):
        return _plain(v.value)
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config tree as plain nested dicts/lists/scalars (tuples become lists); YAML-able.

    ``from_dict(type(cfg), to_dict(cfg)) == cfg`` for every tree this module can build.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return _plain(cfg)


def dump_yaml(cfg: Any) -> str:
    """The config tree as YAML text (field order kept; floats written so YAML reads floats)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False,
                          allow_unicode=True, width=100)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config as YAML to a local path or a URL (``gs://...``) via fsspec.

    The file loads back with ``load_config(type(cfg), path)``.
    """
    import fsspec  # local import: only needed here

    fs, fpath = fsspec.core.url_to_fs(path)
    parent = posixpath.dirname(fpath) if "://" in path else os.path.dirname(fpath)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    text = f"# resolved {type(cfg).__name__}\n" + dump_yaml(cfg)
    with fs.open(fpath, "w", encoding="utf-8") as f:
        f.write(text)


# ---------------------------------------------------------------------------------------------
# YAML files with `base:` and key=value overrides


def _read_text(path: str) -> str:
    import fsspec

    with fsspec.open(path, "r", encoding="utf-8") as f:
        return f.read()


def _norm_path(path: str) -> str:
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def _resolve_base(including: str, base: str) -> str:
    """``base`` relative to the directory of the including file (absolute / URLs as given)."""
    if "://" in base or os.path.isabs(base):
        return _norm_path(base)
    if "://" in including:
        return _norm_path(posixpath.join(posixpath.dirname(including), base))
    return _norm_path(os.path.join(os.path.dirname(including), base))


def _identity(path: str) -> str:
    return path if "://" in path else os.path.realpath(path)


def _collect_origins(node: yaml.Node, prefix: str, path: str, origins: dict[str, str]) -> None:
    """Record ``file:line`` of every key (and list item); reject duplicate keys."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode) or k.tag == "tag:yaml.org,2002:merge":
                _collect_origins(v, prefix, path, origins)  # `<<: *anchor` merges
                continue
            key = _join(prefix, k.value)
            line = k.start_mark.line + 1
            if k.value in seen:
                raise ConfigError(f"duplicate key '{key}' (first set at line {seen[k.value]})",
                                  key=key, where=f"{path}:{line}")
            seen[k.value] = line
            origins[key] = f"{path}:{line}"
            _collect_origins(v, key, path, origins)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            key = f"{prefix}[{i}]"
            origins[key] = f"{path}:{v.start_mark.line + 1}"
            _collect_origins(v, key, path, origins)


def _parse_yaml(text: str, path: str) -> tuple[Any, dict[str, str]]:
    """Safe-load one YAML document, with the ``file:line`` of each key."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        origins: dict[str, str] = {}
        if node is None:
            return None, origins
        _collect_origins(node, "", path, origins)
        return loader.construct_document(node), origins
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"invalid YAML: {problem}", where=where) from e
    finally:
        loader.dispose()


def _deep_merge(base: Any, over: Any) -> Any:
    """``over`` on top of ``base``: mappings merge key by key, anything else replaces."""
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(base[k], v) if k in base else _copy(v)
        return out
    return _copy(over)


def _copy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


def _load_file(path: str, stack: list[str], origins: dict[str, str],
               included_at: str | None = None) -> dict[str, Any]:
    """One file merged over its ``base:`` chain; fills ``origins``. ``stack``: cycle check."""
    ident = _identity(path)
    if ident in [_identity(p) for p in stack]:
        chain = " -> ".join(stack + [path])
        raise ConfigError(f"'base' cycle: {chain}", key=_BASE_KEY, where=included_at or path)
    try:
        text = _read_text(path)
    except FileNotFoundError as e:
        what = f"base config file not found: {path}" if included_at else \
            f"config file not found: {path}"
        raise ConfigError(what, where=included_at) from e
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e}", where=included_at) from e
    data, own = _parse_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {_describe(data)}",
                          where=path)
    bases = data.pop(_BASE_KEY, None)
    base_at = own.pop(_BASE_KEY, path)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    if not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"'{_BASE_KEY}' must be a file path or a list of file paths, got "
                          f"{_describe(bases)}", key=_BASE_KEY, where=base_at)
    merged: dict[str, Any] = {}
    for b in bases:
        merged = _deep_merge(merged, _load_file(_resolve_base(path, b), stack + [path], origins,
                                                included_at=base_at))
    _drop_origins_replaced(origins, data, "")
    origins.update(own)
    return _deep_merge(merged, data)


def _drop_origins_replaced(origins: dict[str, str], data: Mapping, prefix: str) -> None:
    """Keys under a value the overlay replaces wholesale no longer come from the base file."""
    for k, v in data.items():
        key = _join(prefix, str(k))
        if isinstance(v, Mapping):
            _drop_origins_replaced(origins, v, key)
        else:
            for o in [o for o in origins if o.startswith(key + ".") or o.startswith(key + "[")]:
                del origins[o]


def _section_of(tp: Any) -> tuple[str, Any] | None:
    """What a dotted key can descend into: ('section', cls) / ('dict', value_type) / None."""
    inner, _ = _strip_optional(tp)
    if _is_dataclass_type(inner):
        return "section", inner
    if typing.get_origin(inner) is dict or inner is dict:
        args = typing.get_args(inner)
        return "dict", (args[1] if args else Any)
    return None


def _resolve_key(root: type, key: str, where: str) -> Any:
    """The annotation of dotted ``key`` in tree ``root``; ConfigError naming the bad part."""
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"malformed key '{key}'", key=key, where=where)
    kind, cur = "section", root
    tp: Any = root
    for i, part in enumerate(parts):
        dotted = ".".join(parts[: i + 1])
        if kind == "section":
            if part not in _init_fields(cur):
                raise ConfigError(f"unknown key '{dotted}'" + _suggest(dotted, cur, root),
                                  key=dotted, where=where)
            tp = _hints(cur)[part]
        else:
            tp = cur
        if i < len(parts) - 1:
            sec = _section_of(tp)
            if sec is None:
                raise ConfigError(
                    f"cannot set '{key}': '{dotted}' is a {_type_name(tp)} field, not a section",
                    key=dotted, where=where)
            kind, cur = sec
    return tp


def _apply_override(root: type, data: dict[str, Any], origins: dict[str, str], text: str) -> None:
    """Apply one ``dotted.key=value`` (value parsed as YAML) to the nested dict ``data``."""
    where = f"override '{text}'"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("expected key=value (e.g. optimizer.lr=1e-6)", where=where)
    _resolve_key(root, key, where)  # unknown keys / non-sections fail here, with suggestions
    try:
        parsed = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"'{key}': cannot parse value {raw!r} as YAML: "
                          f"{getattr(e, 'problem', e)}", key=key, where=where) from e
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        cur = node.get(part)
        if isinstance(cur, _CliValue):  # set by an earlier override (`eval=null`)
            cur = cur.parsed
        if cur is None:
            # Absent, or an optional section that is null: start it from its defaults.
            node[part] = {}
        elif dataclasses.is_dataclass(cur) and not isinstance(cur, type):
            node[part] = to_dict(cur)
        elif not isinstance(cur, Mapping):
            dotted = ".".join(parts[: i + 1])
            raise ConfigError(f"cannot set '{key}': '{dotted}' is {_describe(cur)} (set at "
                              f"{origins.get(dotted, 'an earlier override')}), not a mapping",
                              key=dotted, where=where)
        else:
            node[part] = dict(cur)
        node = node[part]
    last = parts[-1]
    if isinstance(parsed, (Mapping, list)):
        node[last] = _deep_merge(node.get(last), parsed)
    else:
        node[last] = _CliValue(raw.strip(), parsed)
    for o in [o for o in origins if o.startswith(key + ".") or o.startswith(key + "[")]:
        del origins[o]
    origins[key] = where


def load_config(cls: type[T], path: str | None = None, overrides: Sequence[str] = ()) -> T:
    """Load a config tree: defaults < ``base:`` chain < YAML file < ``key=value`` overrides.

    Args:
        cls: root dataclass type.
        path: YAML file (local or fsspec URL) or None for defaults only. A top-level
            ``base: other.yaml`` (or a list of files) names files, relative to this one, that
            are deep-merged *under* this file's keys; bases may have bases; cycles are errors.
        overrides: ``"optimizer.lr=1e-6"``-style strings, applied in order. Values are parsed
            with ``yaml.safe_load`` (``use_ipo=true``, ``eval_dataset=null``,
            ``mesh_dim='1,2,2'``, ``layers=[1, 2]``); a ``str`` field gets the raw text. A
            dotted key into an optional section that is null creates it from its defaults.

    Raises:
        ConfigError: naming the file:line (or override) and dotted key at fault.
    """
    _check_dataclass_type(cls)
    origins: dict[str, str] = {}
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = _norm_path(os.fspath(path))
        data = _load_file(path, [], origins)
        source = path
    for text in overrides:
        _apply_override(cls, data, origins, text)
    return _build_and_validate(cls, data, _Ctx(cls, source, origins))


# ---------------------------------------------------------------------------------------------
# Command line


def _default_prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "train"


def _usage(prog: str) -> str:
    return f"usage: {prog} [-h] [--config FILE] [key=value | --key=value | --key value ...]"


def _is_bool(tp: Any) -> bool:
    inner, _ = _strip_optional(tp)
    return inner is bool


def _looks_bool(text: str) -> bool:
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return v is None or isinstance(v, bool)


def _cli_key(root: type, key: str) -> str:
    """``--warmup-ratio`` -> ``warmup_ratio`` when only the underscore spelling exists."""
    if "-" in key:
        alt = key.replace("-", "_")
        try:
            _resolve_key(root, key, "")
        except ConfigError:
            return alt
    return key


def parse_cli(cls: type[T], argv: Sequence[str] | None = None, prog: str | None = None) -> T:
    """Parse ``[--config FILE] key=value ...`` into a config tree.

    Accepted forms (mixable, applied left to right after the file): ``key=value``,
    ``--key=value``, ``--key value``, and a bare ``--flag`` for bool fields (= true).
    ``-h/--help`` prints every key with type, default and docstring and exits 0.

    Raises:
        ConfigError: bad arguments or config (use :func:`cli_main` for exit-code-2 behaviour).
        SystemExit(0): after ``--help``.
    """
    _check_dataclass_type(cls)
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or _default_prog()
    if any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(format_help(cls, prog))
        raise SystemExit(0)
    config: str | None = None
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        where = f"argument '{tok}'"
        if tok == "--config" or tok.startswith("--config="):
            if config is not None:
                raise ConfigError("--config given more than once", where=where)
            if "=" in tok:
                config = tok.split("=", 1)[1]
            elif i + 1 < len(argv):
                config, i = argv[i + 1], i + 1
            else:
                raise ConfigError("--config needs a file name", where=where)
            if not config:
                raise ConfigError("--config needs a file name", where=where)
        elif tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                k, v = body.split("=", 1)
                overrides.append(f"{_cli_key(cls, k)}={v}")
            else:
                k = _cli_key(cls, body)
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                has_value = nxt is not None and not nxt.startswith("--")
                if _is_bool(_resolve_key(cls, k, where)) and has_value:
                    # `--use_ipo false` takes the value; `--use_ipo lr=1` is a bare flag.
                    has_value = _looks_bool(nxt)
                if has_value:
                    overrides.append(f"{k}={nxt}")
                    i += 1
                elif _is_bool(_resolve_key(cls, k, where)):
                    overrides.append(f"{k}=true")
                else:
                    raise ConfigError(f"'{k}' needs a value (--{k} VALUE or --{k}=VALUE)",
                                      key=k, where=where)
        elif "=" in tok and not tok.startswith("-"):
            overrides.append(tok)
        else:
            raise ConfigError(
                "expected key=value, --key=value, --key value or --config FILE", where=where)
        i += 1
    return load_config(cls, config, overrides)


def format_help(cls: type, prog: str | None = None) -> str:
    """The ``--help`` text: every key with its type, default and docstring, by section."""
    prog = prog or _default_prog()
    out = [_usage(prog), ""]
    doc = _class_doc(cls)
    if doc:
        out += [doc, ""]
    out += [
        "options:",
        "  -h, --help       show this help and exit",
        "  --config FILE    YAML config file (local or gs://); a top-level `base: other.yaml`",
        "                   (relative to the file) is merged under its keys",
        "  key=value        set one key after the file; the value is read as YAML, e.g.",
        "                   optimizer.lr=1e-6 mesh_dim='1,2,2' use_ipo=true eval_dataset=null",
        "                   (also --key=value and --key value; bare --flag sets a bool to true)",
        "",
        "keys (nest them by section in YAML):",
    ]
    _help_section(cls, "", out, None, frozenset())
    return "\n".join(out).rstrip() + "\n"


def _help_section(cls: type, prefix: str, out: list[str], header: str | None,
                  seen: frozenset) -> None:
    if cls in seen:
        return
    hints, docs = _hints(cls), field_docs(cls)
    fields = _init_fields(cls)
    subsections = []
    leaves = []
    for name, f in fields.items():
        sub, _ = _strip_optional(hints[name])
        (subsections if _is_dataclass_type(sub) else leaves).append((name, f, sub))
    if header is not None:
        out += ["", header]
        cdoc = _class_doc(cls)
        if cdoc:
            out += [textwrap.indent(cdoc, "    ")]
    for name, f, _ in leaves:
        key = _join(prefix, name)
        default = _default_of(f)
        dflt = "(required)" if default is dataclasses.MISSING else f"= {_fmt_value(default)}"
        out.append(f"  {key}: {_type_name(hints[name])} {dflt}")
        if name in docs:
            out.append(textwrap.indent(docs[name], "      "))
    for name, f, sub in subsections:
        key = _join(prefix, name)
        default = _default_of(f)
        note = ""
        if default is None:
            note = f" = null (set any {key}.<key>=... to enable it with these defaults)"
        elif default is dataclasses.MISSING:
            note = " (required)"
        hdr = f"[{key}] {_type_name(hints[name])}{note}"
        if name in docs:
            hdr += "\n" + textwrap.indent(docs[name], "    ")
        _help_section(sub, key, out, hdr, seen | {cls})


def cli_main(cls: type[T], main_fn: Callable[[T], Any], argv: Sequence[str] | None = None,
             prog: str | None = None) -> Any:
    """Entry-point wrapper: parse the command line, run ``main_fn(cfg)``, return its result.

    The command line's error boundary (:func:`torchxla_rlhf.errors.run_guarded`): a config
    error prints the usage line and ``prog: error: <message>``; any other user error (data,
    mesh, files, URLs, models, resume, output_dir) prints its one line; both exit 2. A
    preempted run exits 75. ``--debug`` (or ``TORCHXLA_RLHF_DEBUG=1``) shows tracebacks.
    """
    from torchxla_rlhf.errors import debug_requested, run_guarded

    prog = prog or _default_prog()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        cfg = parse_cli(cls, argv, prog=prog)
    except ConfigError as e:
        print(_usage(prog), file=sys.stderr)
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return run_guarded(lambda: main_fn(cfg), prog, debug)
