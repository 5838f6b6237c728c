"""Command lines generated from typed config dataclasses: one config system, one grammar, every tool.

A tool declares its options once, as a dataclass whose fields carry docstrings (see
:mod:`megatron_mmbert.config_base`). This module -- the one place that spells flags -- turns it
into an ``argparse`` parser:

* one flag per scalar or list field, spelled exactly as its YAML key: ``--`` and the field's dotted
  path (``workers`` -> ``--workers``, ``read.text_key`` -> ``--read.text_key``), in the field's
  own units -- the grammar of ``mmbert-pretrain --section.key value``. A flag copied into YAML is
  the key, and the other way round. Booleans take an optional value: ``--verify`` (true),
  ``--verify false``; the help is the field's docstring and default;
* the first release's spellings (``--text-key``, ``--no-verify``, ``--chunk-mb`` in MiB) still
  work for one release as deprecated aliases: ``--help`` marks them and using one prints the
  flag that replaces it;
* ``--config FILE.yaml``: the same options as YAML (flags given win); ``--help-config``: every
  field with its type, default, docstring and flag; ``--print-config``: the effective config as
  YAML (YAML, then flags), and exit; ``--version``.

New fields of the dataclass appear on the command line, in YAML and in ``--help-config`` with no
change here. Library code raises :class:`ConfigError` naming the *field*; :func:`explain` adds the
flag that sets it. :func:`tool_main` gives each tool's ``main`` the same ending: a closed pipe
(``--help-config | head``) ends it quietly.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import types
import typing
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from megatron_mmbert import __version__
from megatron_mmbert.config_base import (ConfigError, describe_tree, field_docs, from_dict,
                                         safe_load_yaml, to_dict)


@dataclasses.dataclass
class Flag:
    """A deprecated spelling of one field (the first release's command line), kept for one release."""

    flag: str
    """The old flag, e.g. ``--chunk-mb``."""
    type: Optional[Callable[[str], Any]] = None
    """Parser of the flag's text when it differs from the field's type (e.g. MiB for bytes)."""
    to_field: Optional[Callable[[Any], Any]] = None
    """Turns the parsed flag value into the field's value (e.g. MiB -> bytes)."""
    help: Optional[str] = None
    """Help text when the old flag's unit differs from the field's."""


@dataclasses.dataclass
class Option:
    """One flag and the field it sets (``deprecated``: an old spelling of the field's flag)."""

    path: str
    flag: str
    dest: str
    to_field: Optional[Callable[[Any], Any]] = None
    deprecated: bool = False


def flag_of(path: str) -> str:
    """The flag of a field: ``--`` and its dotted path, the same string as its YAML key."""
    return "--" + path


def parse_bool(text: str) -> bool:
    """A boolean flag's value, as YAML spells it (true/false, yes/no, on/off, 1/0)."""
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


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


def _legacy_spelling(path: str, taken: set) -> str:
    """The first release's flag of a field: its leaf name with hyphens, or the whole path when the
    leaf was taken by another section."""
    leaf = "--" + path.rsplit(".", 1)[-1].replace("_", "-")
    return "--" + path.replace("_", "-") if leaf in taken else leaf


class ConfigParser:
    """The ``argparse`` parser of one config dataclass (or of several, one per subcommand).

    ``aliases`` maps a field's dotted path to its deprecated spelling when the first release's
    flag was not the generated one (``inputs`` -> ``--input``; a :class:`Flag` when its unit
    differed). Hyphenated leaf spellings (``--text-key``) are kept as aliases by themselves.
    """

    def __init__(self, cls: type, aliases: Optional[Dict[str, Union[str, Flag]]] = None,
                 config_help: str = "YAML file of these options, keyed by field name (flags given win)",
                 prog: Optional[str] = None):
        self.cls = cls
        self.aliases = {k: (Flag(v) if isinstance(v, str) else v) for k, v in (aliases or {}).items()}
        self.config_help = config_help
        self.prog = prog
        self.options: List[Option] = []
        self._legacy_taken: set = set()

    # -- building ----------------------------------------------------------------------------

    def add_to(self, parser: argparse.ArgumentParser, config_flag: bool = True) -> argparse.ArgumentParser:
        """Add ``--config``, ``--help-config``, ``--print-config`` and one flag per field."""
        self.prog = self.prog or parser.prog
        if config_flag:
            parser.add_argument("--config", metavar="FILE.yaml", help=self.config_help)
        parser.add_argument("--help-config", action="store_true",
                            help="print every option with its type, default, description and flag, and exit")
        parser.add_argument("--print-config", action="store_true",
                            help="print the effective config (YAML, then flags) as YAML and exit")
        self._add_fields(parser, self.cls, "")
        unknown = set(self.aliases) - {o.path for o in self.options}
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
            kwargs = self._value_kwargs(tp)
            if kwargs is None:
                continue  # mappings, lists of sections: YAML only
            doc = (docs.get(f.name, "").split("\n\n")[0].replace("\n", " ")).replace("%", "%%")
            self._add_field(parser, path, tp, kwargs, doc + _default_text(f).replace("%", "%%"))

    @staticmethod
    def _value_kwargs(tp: Any) -> Optional[Dict[str, Any]]:
        """argparse keyword arguments for a field's values (None: the field has no flag form)."""
        if tp is bool:
            return {"nargs": "?", "const": True, "type": parse_bool, "metavar": "BOOL"}
        if typing.get_origin(tp) in (list, List, tuple, typing.Tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            item_kwargs = _scalar_kwargs(_strip_optional(item)[0])
            return None if item_kwargs is None else dict(item_kwargs, nargs="+")
        return _scalar_kwargs(tp)

    def _add_field(self, parser: argparse.ArgumentParser, path: str, tp: Any, kwargs: Dict[str, Any], doc: str) -> None:
        flag, dest = flag_of(path), "cfg__" + path.replace(".", "__")
        legacy = self.aliases.get(path) or Flag(_legacy_spelling(path, self._legacy_taken))
        self._legacy_taken.add(legacy.flag)
        if tp is bool:
            positive = legacy.flag[5:] if legacy.flag.startswith("--no-") else legacy.flag[2:]
            self._legacy_taken.add("--no-" + positive)
            old = [s for s in (f"--{positive}", f"--no-{positive}") if s != flag]
            note = f" [deprecated: {', '.join(old)}]" if old else ""
            parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=doc + note, **kwargs)
            self.options.append(Option(path, flag, dest))
            for spelling, value in ((f"--{positive}", True), (f"--no-{positive}", False)):
                if spelling != flag:
                    alias_dest = f"{dest}__{len(self.options)}"
                    parser.add_argument(spelling, dest=alias_dest, action="store_const", const=value,
                                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                    self.options.append(Option(path, spelling, alias_dest, deprecated=True))
            return
        if legacy.type is None and legacy.help is None:  # same unit: one action, both spellings
            strings = [flag] + ([legacy.flag] if legacy.flag != flag else [])
            note = f" [deprecated: {legacy.flag}]" if legacy.flag != flag else ""
            metavar = None if "choices" in kwargs else path.rsplit(".", 1)[-1].upper()
            parser.add_argument(*strings, dest=dest, default=argparse.SUPPRESS, metavar=metavar,
                                help=doc + note, **kwargs)
            self.options.append(Option(path, flag, dest))
            if legacy.flag != flag:
                self.options.append(Option(path, legacy.flag, dest, deprecated=True))
            return
        # an old spelling in another unit: its own action, converted to the field's unit
        metavar = None if "choices" in kwargs else path.rsplit(".", 1)[-1].upper()
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=metavar, help=doc, **kwargs)
        self.options.append(Option(path, flag, dest))
        alias_dest = f"{dest}__{len(self.options)}"
        parser.add_argument(legacy.flag, dest=alias_dest, type=legacy.type, default=argparse.SUPPRESS,
                            metavar=legacy.flag.lstrip("-").replace("-", "_").upper(),
                            help=f"deprecated: {legacy.help or 'use ' + flag}".replace("%", "%%"))
        self.options.append(Option(path, legacy.flag, alias_dest, legacy.to_field, deprecated=True))

    # -- parsing -----------------------------------------------------------------------------

    def given(self, args: argparse.Namespace, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """The options given as flags, as a nested dict keyed by field name (a field's own flag
        wins over its deprecated spelling). With ``argv``, a deprecated spelling used is named on
        stderr with the flag that replaces it."""
        data: Dict[str, Any] = {}
        for opt in sorted(self.options, key=lambda o: not o.deprecated):
            if hasattr(args, opt.dest):
                value = getattr(args, opt.dest)
                if opt.to_field is not None:
                    value = opt.to_field(value)
                node = data
                *parents, last = opt.path.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[last] = value
        for opt in self.options:
            if opt.deprecated and argv is not None and any(a == opt.flag or a.startswith(opt.flag + "=")
                                                            for a in argv):
                print(f"{self.prog or 'warning'}: {opt.flag} is deprecated and goes in the next release; "
                      f"use {flag_of(opt.path)}", file=sys.stderr)
        return data

    def build(self, args: argparse.Namespace, base: Optional[Dict[str, Any]] = None,
              argv: Optional[Sequence[str]] = None) -> Any:
        """The config: ``base`` (e.g. from ``--config``), then the flags given on top."""
        data = merge_dicts(dict(base or {}), self.given(args, argv))
        return from_dict(self.cls, data)

    # -- messages ----------------------------------------------------------------------------

    def flag_for(self, field: Optional[str]) -> Optional[str]:
        """The flag that sets ``field`` (a dotted path, or a path inside a nested section)."""
        if not field:
            return None
        current = [o for o in self.options if not o.deprecated]
        for opt in current:
            if opt.path == field:
                return opt.flag
        matches = [o.flag for o in current if o.path.endswith("." + field)]
        return matches[0] if len(matches) == 1 else None

    def explain(self, err: ConfigError) -> str:
        """``err`` with the flag that sets each named field: ``density: ... [--spec.density]``."""
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


def load_yaml(path: str, what: str = "options", list_key: Optional[str] = None) -> Dict[str, Any]:
    """A YAML mapping of options; a clear error if the file is missing or not a mapping. With
    ``list_key``, a YAML list is read as ``{list_key: [...]}`` (``build_data_index``'s list of phases)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load_yaml(f, f"--config {path}")
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    if data is None:
        return {}
    if list_key is not None and isinstance(data, list):
        return {list_key: data}
    if not isinstance(data, dict):
        also = f" or a list of {list_key}" if list_key else ""
        raise ConfigError(f"--config {path}: expected a mapping of {what} (field: value){also}, "
                          f"got {type(data).__name__}")
    return data


def os_error_text(exc: OSError) -> str:
    """An ``OSError`` as a tool prints it: the reason and the file, no traceback (read-only output,
    full disk, missing file)."""
    return f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}"


def run_reporting(body: Callable[[], int], prefix: str = "", spec: Optional["ConfigParser"] = None) -> int:
    """``body()``'s exit status; a tool's expected failures printed as one line instead of a
    traceback: bad input or options (``ConfigError`` and its kinds: ``OutputRefused``,
    ``CheckpointError``, ...) exit 2, an ``OSError`` exits 1. With ``spec``, a ``ConfigError``
    naming a field also names its flag."""
    try:
        return body()
    except ConfigError as exc:
        text = spec.explain(exc) if spec is not None else exc
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


def tool_parser(prog: str, description: str, raw: bool = False) -> argparse.ArgumentParser:
    """A tool's ``argparse`` parser: ``prog`` is its console-script name, ``--version`` included."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter if raw else argparse.HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s (megatron-mmbert) {__version__}")
    return parser


def config_yaml(cfg: Any) -> str:
    """A config as YAML, keyed as ``--config`` reads it (``--print-config``)."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def parse_config(parser: argparse.ArgumentParser, spec: ConfigParser, argv: Optional[Sequence[str]]) -> Tuple[Any, argparse.Namespace]:
    """Parse ``argv`` into ``spec``'s config (``--config`` YAML first, flags on top).

    Returns ``(None, args)`` after printing ``--help-config`` or ``--print-config``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.help_config:
        print(spec.describe())
        return None, args
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    cfg = spec.build(args, base, argv)
    if getattr(args, "print_config", False):
        print(config_yaml(cfg), end="")
        return None, args
    return cfg, args


def tool_main(main: Callable[..., int]) -> Callable[..., int]:
    """A tool's ``main``, ending quietly when its reader goes away (``--help-config | head``): the
    rest of the output is dropped and the exit status is 141, as for a process killed by SIGPIPE."""
    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> int:
        try:
            code = main(*args, **kwargs)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            # Python's advice: point stdout at devnull so the interpreter's final flush is silent.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141

    return wrapped


__all__ = ["Flag", "Option", "ConfigParser", "config_yaml", "flag_of", "merge_dicts", "load_yaml", "os_error_text",
           "parse_bool", "parse_config", "run_reporting", "tool_main", "tool_parser"]
