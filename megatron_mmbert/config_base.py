"""Typed configuration machinery: dataclasses from YAML dicts, with type checks and CLI overrides.

Every config in the project is a dataclass whose fields carry a docstring (the string literal on
the line after the field, as litgpt does). This module turns a nested dict (from YAML) into those
dataclasses, refusing unknown keys and wrong types with a message that names the key, and applies
``--section.key value`` command-line overrides on top.

Validation has one convention. A config section with rules of its own defines ``validate(self)``
(no arguments), raising :class:`ConfigError` with ``field`` set to the offending field's path *inside
the section*. :func:`from_dict` calls it on every section it builds, nested ones included, and
:func:`check` calls it on every section of a config built in Python (the library entry points do:
a library caller gets the checks a command-line user gets); both report each field as its full
dotted path (``phases.0.tokens``, ``spec.density``). Rules that need two sections, the world size
or the disk are not a section's: ``training/preflight.py`` and the entry points hold those.
"""

from __future__ import annotations

import ast
import copy
import re
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, Callable, Dict, List, Optional, Tuple, Union


_FLOAT = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent.

    ``field`` is the dotted path of the offending field (``spec.density``, ``read.text_key``) when
    one field is to blame, so a command line can say which of its options sets it; ``errors`` holds
    the individual errors when several fields are wrong at once (all are reported together).
    """

    def __init__(self, message: str, field: Optional[str] = None, errors: Optional[List["ConfigError"]] = None):
        super().__init__(message)
        self.field = field
        self.errors: List[ConfigError] = list(errors or [])

    @classmethod
    def combine(cls, errors: List["ConfigError"]) -> "ConfigError":
        """One error reporting every error of ``errors`` (flattened), one per line."""
        flat: List[ConfigError] = []
        for e in errors:
            flat.extend(e.errors or [e])
        if len(flat) == 1:
            return flat[0]
        return cls(f"{len(flat)} problems:\n  " + "\n  ".join(str(e) for e in flat), errors=flat)


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
"""Names that become file or folder names (phase names, language tags, shard prefixes): no
separators, no ``..``, not hidden, not absolute."""


def check_safe_name(value, field: str) -> None:
    """Raise ConfigError unless ``value`` is a :data:`SAFE_NAME`."""
    if not isinstance(value, str) or not SAFE_NAME.match(value):
        raise ConfigError(
            field=field, message=f"{field}={value!r}: use letters, digits and _ . - only (it becomes a file name), at most 64 characters"
        )


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:  # List[str], Optional[float]: the whole annotation, no module paths
        return re.sub(r"\b(?:[A-Za-z_]\w*\.)+([A-Za-z_]\w*)", r"\1", str(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e).removeprefix(f"{where}: "))
        # Say why each alternative failed: "expected a number, got 'x'" beats "is not Optional[float]".
        raise ConfigError(f"{where}: {value!r} is not a {_type_name(tp)} ({'; '.join(errors)})", field=where)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}", field=where)
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}", field=where)
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{where}.{i}") for i, v in enumerate(value)]
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}", field=where)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}", field=where)
        return tuple(_coerce(v, a, f"{where}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}", field=where)
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}", field=where)
        return from_dict(tp, value, where)
    if tp is float:
        # YAML 1.1 reads 1e-3 (no dot) as a string; take it as the number everyone means.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}", field=where)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            # YAML reads 1e9 as a string and 1.0e9 as a float: accept integral floats.
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}", field=where)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}", field=where)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}", field=where)
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}", field=where)
    return value


def from_dict(cls: type, data: Dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and values its ``validate``
    refuses raise ConfigError.

    Every problem of every field (unknown, missing, wrong type, refused, also in nested sections) is
    collected and reported in one error, so a config is fixed in one pass, not one key per run.
    ``where`` is the dotted path of ``cls`` inside the whole config (the prefix of every field named).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    errors: List[ConfigError] = []
    unknown = sorted(set(data) - names)
    if unknown:
        errors.append(ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {cls.__name__}; "
            f"valid keys: {', '.join(sorted(names))}",
            field=prefix + unknown[0],
        ))
    kwargs = {}
    for name, value in data.items():
        if name not in names:
            continue
        try:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
        except ConfigError as e:
            errors.append(e)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    for name in missing:
        errors.append(ConfigError(f"{cls.__name__} needs {prefix + name} (at {where or 'top level'})",
                                  field=prefix + name))
    if errors:
        raise ConfigError.combine(errors)
    obj = cls(**kwargs)
    errors = _own_problems(obj, where)  # nested sections were validated as they were built
    if errors:
        raise ConfigError.combine(errors)
    return obj


def _at(err: ConfigError, where: str) -> ConfigError:
    """``err`` of a section found at ``where``: its field as the full dotted path, and a message that
    begins with the section-relative field name begins with the full path (``tokens must be ...`` ->
    ``phases.0.tokens must be ...``)."""
    if not where:
        return err
    field = f"{where}.{err.field}" if err.field else where
    message = str(err)
    if err.field and message.startswith(err.field):
        message = f"{where}.{message}"
    out = copy.copy(err)
    out.args = (message,)
    out.field = field
    return out


def _own_problems(obj: Any, where: str) -> List[ConfigError]:
    """The problems ``obj.validate()`` finds in ``obj``'s own fields (not its nested sections')."""
    validate = getattr(obj, "validate", None)
    if validate is None:
        return []
    try:
        validate()
    except ConfigError as e:
        return [_at(x, where) for x in (e.errors or [e])]
    return []


def _sections(value: Any, where: str) -> List[Tuple[str, Any]]:
    """(dotted path, section) of the config sections directly inside a field's ``value``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(where, value)]
    if isinstance(value, (list, tuple)):
        return [s for i, v in enumerate(value) for s in _sections(v, f"{where}.{i}")]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _sections(v, f"{where}.{k}")]
    return []


def check(config: Any, where: str = "") -> None:
    """Run ``validate()`` of ``config`` and of every section nested in it (in lists and mappings too);
    every problem in one :class:`ConfigError`, each field as its full dotted path.

    :func:`from_dict` does this as it builds; the library entry points call it on what they are given,
    so a config built (or changed) in Python meets the same rules as one read from YAML or flags."""
    errors = _problems(config, where)
    if errors:
        raise ConfigError.combine(errors)


def _problems(config: Any, where: str) -> List[ConfigError]:
    errors = _own_problems(config, where)
    for f in dataclasses.fields(config):
        path = f"{where}.{f.name}" if where else f.name
        for sub_where, sub in _sections(getattr(config, f.name), path):
            errors += _problems(sub, sub_where)
    return errors


def to_dict(obj: Any) -> Any:
    """A plain, YAML-safe dict of a (nested) config dataclass; derived fields (``init=False``) are
    left out, so :func:`from_dict` reads the dict back."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


MAX_YAML_VALUES = 1_000_000
"""A YAML document may stand for at most this many values once its aliases are expanded: a config is
a few thousand, an alias bomb (``a: &a [x, x]``, ``b: &b [*a, *a]``, ...) billions."""


class YAMLTooLarge(ConfigError):
    """A YAML document whose aliases expand past :data:`MAX_YAML_VALUES` (a config refused)."""


def safe_load_yaml(stream: Any, where: str = "YAML") -> Any:
    """``yaml.safe_load`` that refuses a document expanding (through aliases) to more than
    :data:`MAX_YAML_VALUES` values, before anything walks or prints it (one short error naming ``where``)."""
    import yaml

    class _Loader(yaml.SafeLoader):
        def get_single_node(self):
            node = super().get_single_node()
            if node is not None:
                _check_expanded_size(node, where)
            return node

    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _check_expanded_size(root: Any, where: str) -> None:
    import yaml

    sizes: Dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # post-order without recursion: sizes of children first, each node once
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = 0
        order.append(node)
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(v for kv in node.value for v in kv)
    for node in reversed(order):
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [v for kv in node.value for v in kv]
        else:
            children = []
        sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_VALUES + 1)
    if sizes[id(root)] > MAX_YAML_VALUES:
        raise YAMLTooLarge(f"{where}: its aliases expand to more than {MAX_YAML_VALUES:,} values (an alias bomb?); "
                           "a config needs a few thousand at most")


def parse_cli_value(text: str) -> Any:
    """Parse an override value: YAML scalars and flow lists (``[a, b]``), else the raw string."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Dict[str, Any], overrides: List[str]) -> Dict[str, Any]:
    """Apply ``--a.b.c value`` / ``--a.b.c=value`` pairs to a nested dict (in place, returned).

    List elements are addressed by index or by name: ``--phases.1.mask_rate 0.2``,
    ``--phases.mid.mask_rate 0.2``.
    """
    i = 0
    while i < len(overrides):
        item = overrides[i]
        if not item.startswith("--"):
            raise ConfigError(f"override {item!r} must look like --section.key value")
        key = item[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override --{key} has no value")
            raw = overrides[i + 1]
            i += 2
        parts = key.replace("-", "_").split(".")
        node: Any = data
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, key)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override --{key}: {'.'.join(parts[:depth + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(node, last, key)] = parse_cli_value(raw)
        else:
            node[last] = parse_cli_value(raw)
    return data


def _list_index(node: list, part: str, key: str) -> int:
    """A list element by position, or by its ``name`` (``--phases.decay.mask_rate 0.1``)."""
    if part.isdigit() and int(part) < len(node):
        return int(part)
    names = [item.get("name") if isinstance(item, dict) else None for item in node]
    if part in names:
        return names.index(part)
    raise ConfigError(
        f"override --{key}: {part!r} is neither an index below {len(node)} nor a name among "
        f"{[n for n in names if n is not None]}"
    )


def field_docs(cls: type) -> Dict[str, str]:
    """The docstring under each field of dataclass ``cls`` (used by --help and the docs test); the
    fields a dataclass inherits keep their base class's docstrings."""
    docs: Dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if base is not cls and dataclasses.is_dataclass(base):
            docs.update(_own_field_docs(base))
    docs.update(_own_field_docs(cls))
    return docs


def _own_field_docs(cls: type) -> Dict[str, str]:
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    tree = ast.parse(textwrap.dedent(source))  # classes defined inside a function are indented
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: Dict[str, str] = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                if isinstance(nxt.value.value, str):
                    docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<required>"


def describe(cls: type, indent: str = "", prefix: str = "",
             annotate: Optional[Callable[[str], str]] = None) -> str:
    """Human-readable list of fields, types, defaults and docstrings (for ``--help-config``).

    ``annotate(path)`` may add a note after a field's line (a command line adds its flag); ``prefix``
    is the dotted path of ``cls`` inside the config it belongs to.
    """
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = _default_of(f)
        if dataclasses.is_dataclass(default):
            default = "{...}"
        note = annotate(prefix + f.name) if annotate else ""
        lines.append(f"{indent}{f.name}: {_type_name(hints[f.name])} = {default!r}{note}")
        if f.name in docs:
            lines.extend(f"{indent}    {line}" for line in docs[f.name].splitlines())
    return "\n".join(lines)


def _nested_sections(cls: type, prefix: str) -> List[Tuple[str, type]]:
    """(dotted path, dataclass) of every section nested in ``cls``; list items as ``path[]``."""
    out: List[Tuple[str, type]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) in (Union, types.UnionType) and len(args) == 1:
            tp = args[0]
        if dataclasses.is_dataclass(tp):
            out.append((prefix + f.name, tp))
            out += _nested_sections(tp, prefix + f.name + ".")
        elif typing.get_origin(tp) in (list, List) and typing.get_args(tp) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out.append((prefix + f.name + "[]", typing.get_args(tp)[0]))
    return out


def describe_tree(cls: type, annotate: Optional[Callable[[str], str]] = None) -> str:
    """:func:`describe` of ``cls`` and of every section nested in it, each under its dotted path."""
    out = [f"{cls.__name__}:", describe(cls, "  ", "", annotate)]
    for path, sub in _nested_sections(cls, ""):
        out += ["", f"{path}:  ({sub.__name__})", describe(sub, "  ", path.removesuffix("[]") + ".", annotate)]
    return "\n".join(out)


__all__ = [
    "ConfigError",
    "check",
    "from_dict",
    "to_dict",
    "apply_overrides",
    "parse_cli_value",
    "field_docs",
    "describe",
    "describe_tree",
    "Optional",
]
