"""The command-line reference as Markdown, generated from the argparse parsers themselves.

The docs site renders it at build time (``docs/hooks.py``), so the reference lists exactly the options the
installed ``pathomics`` accepts, with the help text and defaults ``--help`` prints.
"""

from __future__ import annotations

import argparse
import html
import re
from collections.abc import Iterator


def commands(parser: argparse.ArgumentParser, prog: str = "pathomics") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and sub-command, depth first: ("pathomics", parser), ("pathomics tile", ...), ..."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{prog} {name}")


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The arguments a command documents: its options and positionals, without --help and sub-command lists."""
    return [a for a in parser._actions
            if a.help is not argparse.SUPPRESS and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]


def _escape(text: str) -> str:
    """Help text as Markdown: HTML-escaped outside `code spans` (``<slide_id>`` is text, not a tag)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(part if part.startswith("`") else html.escape(part, quote=False) for part in parts)


def _subcommand_help(parser: argparse.ArgumentParser) -> list[str]:
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            lines += [f"- [`{name}`](#{anchor(f'{parser.prog} {name}')}): {_escape(helps.get(name) or '')}"
                      for name in action.choices]
    return lines


def anchor(command: str) -> str:
    """The heading id of a command's section."""
    return command.replace(" ", "-")


def command_markdown(command: str, parser: argparse.ArgumentParser, level: int = 2) -> str:
    """One command's section: description, usage, sub-commands and arguments by group."""
    from pathomics.cli.common import HelpFormatter

    parser.formatter_class = lambda prog: HelpFormatter(prog, width=100, max_help_position=40)
    formatter = parser._get_formatter()
    out = [f"{'#' * level} `{command}` {{#{anchor(command)}}}", ""]
    if parser.description:
        out += [_escape(parser.description), ""]
    out += ["```text", parser.format_usage().strip(), "```", ""]
    subcommands = _subcommand_help(parser)
    if subcommands:
        out += subcommands + [""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a in documented_actions(parser)]
        if not actions:
            continue
        out += [f"**{group.title}**", ""]
        for action in actions:
            invocation = formatter._format_action_invocation(action)
            helptext = formatter._expand_help(action) if action.help else ""
            out.append(f"- `{invocation}`" + (f": {_escape(' '.join(helptext.split()))}" if helptext else ""))
        out.append("")
    return "\n".join(out)


def cli_reference(parser: argparse.ArgumentParser | None = None) -> str:
    """The whole reference: one section per command and sub-command, in the order ``--help`` lists them."""
    if parser is None:
        from pathomics.cli.main import build_parser

        parser = build_parser()
    return "\n".join(command_markdown(command, sub, level=min(2 + command.count(" "), 4))
                     for command, sub in commands(parser))
