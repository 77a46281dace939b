"""Arguments, help and checks shared by the verbs.

Every parser is a `Parser`, whose help formatter shows each option's default as "(default: X)": the
argparse default, or, for an option that fills a config field (`config_options`), the config's own default, read
from the dataclass when help is printed. Choices and name lists come from the library's registries
(`Names`), loaded when first needed so that building the parser imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pathomics.errors import InputError, PathomicsError

C = TypeVar("C")
FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction, argparse._HelpAction,
                argparse._VersionAction, argparse._SubParsersAction)


class Names:
    """The names of a library registry, read when used (``--help``, a choice check), so building the parser
    imports nothing heavy and names registered later are listed too; ``str`` joins them."""

    def __init__(self, load: Callable[[], Iterable[str]]) -> None:
        self._load = load

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._load()))

    def __contains__(self, name: object) -> bool:
        return name in tuple(self._load())

    def __len__(self) -> int:
        return len(tuple(self._load()))

    def __str__(self) -> str:
        return ", ".join(self._load())


def registry(module: str, name: str) -> Names:
    """The names in ``module.name`` (a collection, or a function returning one), imported when first needed."""

    def load() -> Iterable[str]:
        found = getattr(importlib.import_module(module), name)
        return found() if callable(found) else found

    return Names(load)


def show(value: Any) -> str:
    """A default as --help prints it: tuples comma-separated, an empty one as none."""
    if value == () or value == []:
        return "none"
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def shown_default(action: argparse.Action) -> Any:
    """What an option does when left out: the config field's default it fills, else its argparse default."""
    source = getattr(action, "config_field", None)
    if source is None:
        return action.default
    path, field = source
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    found = next(f for f in dataclasses.fields(cls) if f.name == field)
    if found.default is not dataclasses.MISSING:
        return found.default
    return None if found.default_factory is dataclasses.MISSING else found.default_factory()


class HelpFormatter(argparse.HelpFormatter):
    """Help with "(default: X)" after every option whose help does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or isinstance(action, FLAG_ACTIONS) or "default" in text:
            return text
        shown = shown_default(action)
        if shown is None or shown is argparse.SUPPRESS:
            return text
        return f"{text} (default: {show(shown).replace('%', '%%')})".strip()


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its sub-command parsers are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def config_options(parser: argparse._ActionsContainer, config: str) -> Callable[..., argparse.Action]:
    """``add_argument`` for options that fill a field (``field``, else their dest) of ``config``, a dotted class path
    such as "pathomics.tiling.TileConfig": --help shows the field's default, read only when help is printed."""

    def add(*flags: str, field: str | None = None, **kwargs: Any) -> argparse.Action:
        action = parser.add_argument(*flags, **kwargs)
        action.config_field = (config, field or action.dest)  # type: ignore[attr-defined]
        return action

    return add


def comma_list(text: str) -> tuple[str, ...]:
    """``a, b,c`` -> ("a", "b", "c"); '' -> ()."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_slide_arguments(parser: argparse.ArgumentParser) -> None:
    """SLIDES... | --manifest CSV, and --slide-mpp for slides whose metadata lacks it."""
    parser.add_argument("slides", nargs="*", metavar="SLIDES", help="slide files or folders of slides")
    parser.add_argument("--manifest", type=Path, help="CSV with slide_path and optional slide_id, patient_id, mpp, "
                                                      "tissue_geojson (default: the SLIDES given instead)")
    parser.add_argument("--slide-mpp", type=float, help="level-0 microns per pixel for slides (overrides their "
                                                        "metadata; default: the slide's own)")


def slide_entries(args: argparse.Namespace) -> list:
    """The slides named on the command line or in the manifest (not both)."""
    from pathomics.manifest import entries_from_paths, patient_ids_from_names, read_manifest

    if bool(args.slides) == bool(args.manifest):
        raise InputError("give either slide paths or --manifest CSV (exactly one of them)")
    if args.manifest:
        entries = read_manifest(args.manifest)
        if args.slide_mpp is not None:
            from dataclasses import replace

            entries = [e if e.mpp is not None else replace(e, mpp=args.slide_mpp) for e in entries]
    else:
        entries = entries_from_paths(args.slides, args.slide_mpp)
    pattern = getattr(args, "patient_id_regex", None)
    return patient_ids_from_names(entries, pattern) if pattern else entries


def writable_dir(path: Path) -> Path:
    """Create ``path`` if needed and prove it is writable, or fail with one clear message."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PathomicsError(f"cannot write to output directory {path} ({exc.strerror or exc}); choose a writable --out") from exc
    return path


def config_values(cls: type, args: argparse.Namespace, **values: Any) -> dict[str, Any]:
    """The fields of ``cls`` (a config dataclass) that options named like them give, plus ``values``.

    Options not given (absent, or None) are left out, so the config's default applies; a given value, falsy or
    not, is passed on for the config to validate, so `--mpp 0` is an error, never a silent default.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    return {**given(**{k: v for k, v in vars(args).items() if k in names}), **given(**values)}  # a value given here wins


def given(**values: Any) -> dict[str, Any]:
    """``values`` less those that are None (not given: the config's default applies)."""
    return {k: v for k, v in values.items() if v is not None}


def config_from_args(cls: type[C], args: argparse.Namespace, **values: Any) -> C:
    """``cls`` built from `config_values`."""
    return cls(**config_values(cls, args, **values))
