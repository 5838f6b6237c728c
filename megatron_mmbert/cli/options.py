"""Command lines generated from typed config dataclasses: one config system for every tool.

A tool declares its options once, as a dataclass whose fields carry docstrings (see
:mod:`megatron_mmbert.config_base`). This module turns it into an ``argparse`` parser:

* one flag per scalar or list field, spelled ``--field-name`` (nested sections: the leaf name,
  ``read.text_key`` -> ``--text-key``, or the whole path, ``--read.split``, when the leaf name is
  taken), unless the tool gives a spelling (``inputs`` -> ``--input``);
  booleans get ``--name`` and ``--no-name``; the help is the field's docstring and default;
* ``--config FILE.yaml``: the same options as YAML, keyed by field name (flags given win);
* ``--help-config``: every field with its type, default, docstring and flag.

New fields of the dataclass appear on the command line, in YAML and in ``--help-config`` with no
change here. Library code raises :class:`ConfigError` naming the *field*; :func:`explain` adds the
flag that sets it, so only this layer knows flag spellings.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from megatron_mmbert.config_base import ConfigError, YAMLTooLarge, describe_tree, field_docs, from_dict, safe_load_yaml
from megatron_mmbert.fileio import OutputRefused


@dataclasses.dataclass
class Flag:
    """How one field is spelled on the command line when its name is not the flag."""

    flag: str
    """The flag, e.g. ``--chunk-mb``."""
    type: Optional[Callable[[str], Any]] = None
    """Parser of the flag's text when it differs from the field's type (e.g. MiB for bytes)."""
    to_field: Optional[Callable[[Any], Any]] = None
    """Turns the parsed flag value into the field's value (e.g. MiB -> bytes)."""
    help: Optional[str] = None
    """Help text when the field's docstring does not describe the flag's unit."""


@dataclasses.dataclass
class Option:
    """One generated flag and the field it sets."""

    path: str
    flag: str
    dest: str
    to_field: Optional[Callable[[Any], Any]] = None


def _strip_optional(tp: Any) -> Tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_kwargs(tp: Any) -> Optional[Dict[str, Any]]:
    """argparse keyword arguments for a scalar annotation; None if it has no flag form."""
    if tp in (int, float, str):
        return {"type": tp}
    if typing.get_origin(tp) is typing.Literal:
        return {"choices": list(typing.get_args(tp))}
    return None


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "" if f.default is None else f" (default: {f.default})"
    if f.default_factory is not dataclasses.MISSING:
        return ""
    return " (required: give it here or in --config)"


class ConfigParser:
    """The ``argparse`` parser of one config dataclass (or of several, one per subcommand)."""

    def __init__(self, cls: type, flags: Optional[Dict[str, Union[str, Flag]]] = None,
                 config_help: str = "YAML file of these options, keyed by field name (flags given win)"):
        self.cls = cls
        self.flags = {k: (Flag(v) if isinstance(v, str) else v) for k, v in (flags or {}).items()}
        self.config_help = config_help
        self.options: List[Option] = []

    # -- building ----------------------------------------------------------------------------

    def add_to(self, parser: argparse.ArgumentParser, config_flag: bool = True) -> argparse.ArgumentParser:
        """Add ``--config``, ``--help-config`` and one flag per field of the dataclass."""
        if config_flag:
            parser.add_argument("--config", metavar="FILE.yaml", help=self.config_help)
        parser.add_argument("--help-config", action="store_true",
                            help="print every option with its type, default, description and flag, and exit")
        self._add_fields(parser, self.cls, "")
        unknown = set(self.flags) - {o.path for o in self.options}
        if unknown:  # a spelling for a field that does not exist: a bug of the tool, say so early
            raise ConfigError(f"flag spellings for unknown fields {sorted(unknown)} of {self.cls.__name__}")
        return parser

    def _add_fields(self, parser: argparse.ArgumentParser, cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            path = prefix + f.name
            tp, _ = _strip_optional(hints[f.name])
            if dataclasses.is_dataclass(tp):
                self._add_fields(parser, tp, path + ".")
                continue
            spelling = self.flags.get(path) or Flag("--" + f.name.replace("_", "-"))
            taken = {spelling.flag, "--no-" + spelling.flag[2:]} & set(parser._option_string_actions)
            if taken and path not in self.flags:  # two sections share a leaf name: spell the whole path
                spelling = Flag("--" + path.replace("_", "-"))
            doc = (docs.get(f.name, "").split("\n\n")[0].replace("\n", " ")).replace("%", "%%")
            help_text = (spelling.help or doc) + ("" if spelling.help else _default_text(f).replace("%", "%%"))
            dest = "cfg__" + path.replace(".", "__")
            kwargs: Dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
            if tp is not bool and typing.get_origin(tp) is not typing.Literal:
                kwargs["metavar"] = spelling.flag.lstrip("-").replace("-", "_").upper()
            if tp is bool and spelling.type is None:
                flag = spelling.flag
                positive = flag[5:] if flag.startswith("--no-") else flag[2:]
                parser.add_argument(f"--{positive}", action="store_true", **kwargs)
                parser.add_argument(f"--no-{positive}", action="store_false", dest=dest, default=argparse.SUPPRESS,
                                    help=f"opposite of --{positive}")
                self.options.append(Option(path, flag, dest))
                continue
            if spelling.type is not None:
                kwargs["type"] = spelling.type
            else:
                origin = typing.get_origin(tp)
                if origin in (list, List, tuple, typing.Tuple):
                    item = typing.get_args(tp)[0] if typing.get_args(tp) else str
                    item_kwargs = _scalar_kwargs(_strip_optional(item)[0])
                    if item_kwargs is None:
                        continue  # lists of sections: YAML only
                    kwargs.update(item_kwargs, nargs="+")
                else:
                    scalar = _scalar_kwargs(tp)
                    if scalar is None:
                        continue  # mappings and the like: YAML only
                    kwargs.update(scalar)
            parser.add_argument(spelling.flag, **kwargs)
            self.options.append(Option(path, spelling.flag, dest, spelling.to_field))

    # -- parsing -----------------------------------------------------------------------------

    def given(self, args: argparse.Namespace) -> Dict[str, Any]:
        """The options given as flags, as a nested dict keyed by field name."""
        data: Dict[str, Any] = {}
        for opt in self.options:
            if hasattr(args, opt.dest):
                value = getattr(args, opt.dest)
                if opt.to_field is not None:
                    value = opt.to_field(value)
                node = data
                *parents, last = opt.path.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[last] = value
        return data

    def build(self, args: argparse.Namespace, base: Optional[Dict[str, Any]] = None) -> Any:
        """The config: ``base`` (e.g. from ``--config``), then the flags given on top."""
        data = merge_dicts(dict(base or {}), self.given(args))
        return from_dict(self.cls, data)

    # -- messages ----------------------------------------------------------------------------

    def flag_for(self, field: Optional[str]) -> Optional[str]:
        """The flag that sets ``field`` (a dotted path, or a path inside a nested section)."""
        if not field:
            return None
        for opt in self.options:
            if opt.path == field:
                return opt.flag
        matches = [o.flag for o in self.options if o.path.endswith("." + field)]
        return matches[0] if len(matches) == 1 else None

    def explain(self, err: ConfigError) -> str:
        """``err`` with the flag that sets each named field: ``density: ... (flag --density)``."""
        errors = err.errors or [err]
        lines = []
        for e in errors:
            flag = self.flag_for(getattr(e, "field", None))
            lines.append(f"{e} [{flag}]" if flag else str(e))
        if len(lines) == 1:
            return lines[0]
        return f"{len(lines)} problems:\n  " + "\n  ".join(lines)

    def describe(self) -> str:
        """``--help-config``: every field, nested sections included, with the flag that sets it."""
        def annotate(path: str) -> str:
            flag = self.flag_for(path) if any(o.path == path for o in self.options) else None
            return f"    [{flag}]" if flag else ""

        return describe_tree(self.cls, annotate)


def merge_dicts(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """``top`` over ``base``, section by section (returns ``base``, updated)."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_dicts(base[key], value)
        else:
            base[key] = value
    return base


def load_yaml(path: str, what: str = "options") -> Dict[str, Any]:
    """A YAML mapping of options; a clear error if the file is missing or not a mapping."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_yaml(f, f"--config {path}")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except YAMLTooLarge as e:
        raise ConfigError(str(e)) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of {what} (field: value), got {type(data).__name__}")
    return data


def os_error_text(exc: OSError) -> str:
    """An ``OSError`` as a tool prints it: the reason and the file, no traceback (read-only output,
    full disk, missing file)."""
    return f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"


def run_reporting(body: Callable[[], int], prefix: str = "", spec: Optional["ConfigParser"] = None) -> int:
    """``body()``'s exit status; a tool's expected failures printed as one line instead of a
    traceback: bad input or options (``ConfigError``, ``OutputRefused``) exit 2, an ``OSError``
    exits 1. With ``spec``, a ``ConfigError`` naming a field also names its flag."""
    try:
        return body()
    except (ConfigError, OutputRefused) as exc:
        text = spec.explain(exc) if spec is not None and isinstance(exc, ConfigError) else exc
        print(f"{prefix}error: {text}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prefix}error: {os_error_text(exc)}", file=sys.stderr)
        return 1
    except BaseException as exc:  # a disk error a library wrapped (torch.save, safetensors, torch DCP)
        from megatron_mmbert.fileio import disk_error

        err = None if isinstance(exc, (KeyboardInterrupt, SystemExit)) else disk_error(exc)
        if err is None:
            raise
        print(f"{prefix}error: {os_error_text(err)}", file=sys.stderr)
        return 1


def parse_config(parser: argparse.ArgumentParser, spec: ConfigParser, argv: Optional[Sequence[str]]) -> Tuple[Any, argparse.Namespace]:
    """Parse ``argv`` into ``spec``'s config (``--config`` YAML first, flags on top).

    Returns ``(None, args)`` after printing ``--help-config``.
    """
    args = parser.parse_args(argv)
    if args.help_config:
        print(spec.describe())
        return None, args
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return spec.build(args, base), args


__all__ = ["Flag", "Option", "ConfigParser", "merge_dicts", "load_yaml", "os_error_text", "parse_config",
           "run_reporting"]
