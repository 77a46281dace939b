"""The documentation: the generated CLI reference lists every option, the package lists its public names,
the README stays a short guide and the licence matches the package metadata."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pathomics
from pathomics.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]


def walk(parser: argparse.ArgumentParser, prog: str = "pathomics") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command and sub-command of the parser, found independently of the reference's own walk."""
    found = [(prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += walk(sub, f"{prog} {name}")
    return found


def rendered_cli_page() -> str:
    """docs/reference/cli.md as the docs build renders it: through the hook mkdocs.yml names."""
    hooks = ROOT / "docs" / "hooks.py"
    assert "docs/hooks.py" in (ROOT / "mkdocs.yml").read_text()
    spec = importlib.util.spec_from_file_location("docs_hooks", hooks)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.on_page_markdown((ROOT / "docs" / "reference" / "cli.md").read_text())


def sections(markdown: str) -> dict[str, str]:
    """The reference's sections by command: '## `pathomics mil train` {#...}' up to the next heading."""
    parts = re.split(r"(?m)^#{2,6} `([^`]+)`.*$", markdown)
    return dict(zip(parts[1::2], parts[2::2]))


def test_every_cli_option_is_in_the_reference():
    by_command = sections(rendered_cli_page())
    commands = walk(build_parser())
    assert set(by_command) == {name for name, _ in commands}
    for name, parser in commands:
        for action in parser._actions:
            if action.help is argparse.SUPPRESS or isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            names = action.option_strings or [action.metavar or action.dest]
            for option in names:
                assert re.search(rf"`[^`]*(?<![\w-]){re.escape(option)}(?![\w-])", by_command[name]), (name, option)


def resolve(identifier: str) -> object:
    """The object a ``::: dotted.name`` line of the API reference documents (module, then attributes)."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(identifier)


@pytest.mark.parametrize("identifier", sorted({m for p in (ROOT / "docs").rglob("*.md")
                                               for m in re.findall(r"(?m)^::: ([\w.]+)", p.read_text())}))
def test_every_api_reference_entry_exists_and_has_a_docstring(identifier):
    assert resolve(identifier).__doc__, identifier


def test_reference_escapes_angle_brackets_outside_code():
    page = rendered_cli_page()
    assert "<slide_id>" not in re.sub(r"`[^`]*`", "", page)  # as text it would be swallowed as an HTML tag


def test_dir_lists_the_public_names_and_each_resolves():
    public = [name for name in dir(pathomics) if not name.startswith("_")]
    assert public == sorted(pathomics.__all__)
    assert {"tile_slide", "embed_store", "train_mil", "survival_fit", "CoxModel", "run_archive"} <= set(public)
    for name in public:
        assert getattr(pathomics, name).__name__ == name
    with pytest.raises(AttributeError):
        pathomics.no_such_name  # noqa: B018


def test_the_tiling_api_does_not_import_torch():
    code = ("import sys, pathomics; dir(pathomics); "
            "[getattr(pathomics, n) for n in ('tile_slide', 'TileConfig', 'open_slide', 'open_patch_store', 'OutputLayout')]; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"]


def test_readme_is_a_short_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert "make test" in readme  # CI runs the README's test command


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))])
def test_pages_carry_no_internal_labels(page):
    """Design labels ("S1", "seed S5", "issue 10") mean nothing to a reader."""
    text = (ROOT / page).read_text()
    assert not re.findall(r"(?<![\w-])(?:S[0-9]+|issue [0-9]+|sessions?)\b", text), page


def test_licence_file_matches_the_package_metadata():
    assert re.search(r'(?m)^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text())
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_docstrings_use_markdown_not_sphinx_roles():
    """The API reference renders docstrings as Markdown (mkdocstrings): a Sphinx role such as :class:`X` shows as
    literal text there."""
    role = re.compile(r":(?:func|class|meth|attr|mod|data|obj):`")
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "pathomics").rglob("*.py"))
             for n, line in enumerate(p.read_text().splitlines(), 1) if role.search(line)]
    assert not found, found
