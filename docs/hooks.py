"""MkDocs hook: the CLI reference page is generated from the argparse parsers at build time.

A page holding the marker ``{{ cli_reference }}`` gets it replaced by ``pathomics.cli.reference.cli_reference()``,
so the reference cannot drift from the options ``pathomics`` accepts.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

MARKER = "{{ cli_reference }}"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # document this checkout, whichever pathomics is installed


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    from pathomics.cli.reference import cli_reference

    return markdown.replace(MARKER, cli_reference())
