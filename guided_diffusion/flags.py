"""Typed settings from command-line flags: one dataclass field per flag, declared once with its help.

A settings class is a frozen dataclass whose fields are made with :func:`option`; the field's name is the flag
(``--forward_steps``), its annotation the type, its default the default and its help the one line ``--help`` shows::

    @dataclass(frozen=True)
    class Batches:
        batch_size: int = option(32, "test slices per batch, over all processes")
        resume: bool = option(True, "reuse finished batches of an earlier run in the same output folder")

:func:`add_options` puts a class's flags into a parser (or an argument group); :func:`build` makes the object from
the parsed values. Booleans take ``true/false``, ``1/0``, ``yes/no`` in any case (upstream's ``True``/``False`` too).
Lists take several values (``--modality 0 3``) or one comma-separated value (``--w 1,2``). A flag that only keeps an
upstream command line working is ``hidden``: accepted, not listed by ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Type, TypeVar

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def parse_bool(value: Any) -> bool:
    """``true/false``, ``1/0``, ``yes/no``, ``t/f``, ``y/n`` in any case; an error naming the value otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "t", "yes", "y", "1"):
        return True
    if text in ("false", "f", "no", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false, 1/0), got {value!r}")


parse_bool.__name__ = "boolean"  # argparse names the type in its error message


def option(default: Any, help: str, *, choices: Optional[Sequence[Any]] = None, metavar: Optional[str] = None,
           hidden: bool = False, comma_list: bool = False) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring).

    ``default`` may be a list (copied for each instance); ``hidden`` keeps an upstream flag working without listing
    it; ``comma_list`` lets a list flag also take ``1,2,3`` as one value.
    """
    meta = {"help": help, "choices": choices, "metavar": metavar, "hidden": hidden, "comma_list": comma_list}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fields_of(cls: type) -> List[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is _MISSING else f.default


def _resolved_types(cls: type) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _element_type(annotation: Any) -> tuple:
    """``(scalar type, is_list, optional)`` of a field annotation."""
    optional = False
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin in (list, tuple, List, Sequence):
        inner = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return (inner[0] if inner else str), True, optional
    return annotation, False, optional


def _converter(kind: Any) -> Any:
    return parse_bool if kind is bool else kind


class _CommaList(argparse.Action):
    """``--w 1 2`` and ``--w 1,2`` alike."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: D102
        out = []
        for value in values:
            for part in str(value).split(","):
                if part.strip():
                    try:
                        out.append(self.type_(part.strip()))
                    except (TypeError, ValueError):
                        parser.error(f"argument {option_string}: invalid value {part!r}")
        setattr(namespace, self.dest, out)


def _describe_default(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value) or "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if value == "" else str(value)


def add_options(parser: Any, cls: type, *, exclude: Iterable[str] = (), defaults: Optional[Mapping[str, Any]] = None,
                known: Optional[Set[str]] = None) -> None:
    """Add the flags of settings class ``cls`` to ``parser`` (an ``ArgumentParser`` or argument group).

    ``defaults`` replace the class's defaults for this command; flags named in ``exclude`` or already in ``known``
    (a set of dests, updated) are skipped, so two classes sharing a flag add it once.
    """
    hints = _resolved_types(cls)
    skip = set(exclude)
    for f in fields_of(cls):
        if f.name in skip or (known is not None and f.name in known):
            continue
        meta = f.metadata
        kind, is_list, _ = _element_type(hints[f.name])
        default = (defaults or {}).get(f.name, default_of(f))
        shown = _describe_default(default)
        text = meta["help"] + (f" (default: {shown})" if shown and "default" not in meta["help"] else "")
        kwargs: Dict[str, Any] = {"default": default, "dest": f.name,
                                  "help": argparse.SUPPRESS if meta["hidden"] else text.replace("%", "%%")}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["choices"] is not None:
            kwargs["choices"] = list(meta["choices"])
        if is_list:
            kwargs["nargs"] = "+"
            if meta["comma_list"]:
                kwargs["action"] = _CommaList
                kwargs.setdefault("metavar", kind.__name__.upper())
                action = parser.add_argument(f"--{f.name}", **kwargs)
                action.type_ = _converter(kind)
                if known is not None:
                    known.add(f.name)
                continue
            kwargs["type"] = _converter(kind)
        elif kind is bool:
            kwargs["type"] = parse_bool
            kwargs.setdefault("metavar", "BOOL")
        else:
            kwargs["type"] = kind
        parser.add_argument(f"--{f.name}", **kwargs)
        if known is not None:
            known.add(f.name)


def flag_names(cls: type) -> List[str]:
    return [f.name for f in fields_of(cls)]


def build(cls: Type[T], values: Any, **overrides: Any) -> T:
    """``cls`` from the parsed values (a Namespace or a mapping) of its flags; ``overrides`` win."""
    get = values.get if isinstance(values, Mapping) else (lambda k, d=None: getattr(values, k, d))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif "help" in f.metadata:
            value = get(f.name, _MISSING)
            if value is not _MISSING:
                kwargs[f.name] = list(value) if isinstance(value, tuple) else value
    return cls(**kwargs)


def explicit_flags(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> Set[str]:
    """The ``dest`` names of the flags that ``argv`` (default ``sys.argv[1:]``) sets explicitly."""
    saved = [(action, action.default) for action in parser._actions]
    saved_defaults = dict(parser._defaults)  # set_defaults() values (e.g. a preset's) would count as given
    try:
        parser._defaults.clear()
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        parser._defaults.update(saved_defaults)
        for action, default in saved:
            action.default = default
    return set(vars(given))


def settings_dict(settings: Any) -> Dict[str, Any]:
    """The flags of a settings object as a plain JSON-able dict (lists for tuples)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(settings).items()}


def output_folder(output: str, default: Optional[str], env: Optional[str] = "OPENAI_LOGDIR") -> str:
    """The absolute output folder of a command: ``output`` (``--output``), else ``$OPENAI_LOGDIR`` (upstream's
    variable), else ``default`` (None: "" for the command to refuse); a relative path is the caller's, resolved
    against the current folder."""
    import os

    chosen = output or (os.environ.get(env, "") if env else "") or default
    return os.path.abspath(os.path.expanduser(chosen)) if chosen else ""


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line naming the flag (not a usage dump of every flag)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists the flags)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks; a little wider flag column."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=34, width=110)
