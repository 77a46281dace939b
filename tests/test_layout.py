"""Every file under an output directory is named in ``pathomics/layout.py`` and nowhere else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pathomics.layout import OutputLayout, ResultFiles, store_slide_id

PACKAGE = Path(__file__).resolve().parents[1] / "pathomics"
FILE_NAME = re.compile(r"[\w{}.-]*[\w}]\.(json|png|csv|pkl|pt|html|parquet|h5|h5ad|geojson|zarr|svs|lock)$")
# names of files pathomics reads that other software writes or ships, not outputs
NOT_OUTPUTS = {"zarr.json", "config.json", "preprocessor_config.json", "index.html", "/index.html"}


def literal_text(node: ast.AST) -> str | None:
    """A string constant, or an f-string with each placeholder written as ``{}``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def file_name_literals(path: Path, root: Path = PACKAGE.parent) -> list[str]:
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                  and n.body and isinstance(n.body[0], ast.Expr)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for value in node.values:  # the parts of an f-string are visited as the whole
                docstrings.add(id(value))
        text = literal_text(node)
        if text is not None and id(node) not in docstrings and FILE_NAME.fullmatch(text) and text not in NOT_OUTPUTS:
            found.append(f"{path.relative_to(root)}:{node.lineno}: {text!r}")
    return found


def test_output_file_names_live_in_layout_only() -> None:
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path.name != "layout.py" for hit in file_name_literals(path)]
    assert not found, "name these files through pathomics.layout:\n" + "\n".join(found)


def test_the_check_finds_a_file_name(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text('def f(d, s):\n    """Writes metrics.json."""\n    return d / "metrics.json", d / f"{s}.h5", ".png"\n')
    assert [hit.split(": ")[1] for hit in file_name_literals(source, tmp_path)] == ["'metrics.json'", "'{}.h5'"]


def test_layout_paths(tmp_path: Path) -> None:
    layout = OutputLayout(tmp_path)
    assert layout.store("s1") == tmp_path / "tiles" / "s1.zarr"
    assert store_slide_id(layout.store("s1")) == "s1" and store_slide_id(tmp_path / "s2.zarr.partial") == "s2"
    assert layout.survival_files == ResultFiles(tmp_path / "survival")
    assert layout.survival_files.table("coefficients") == tmp_path / "survival" / "coefficients.csv"
    assert layout.cohort.slide("p1-s0") == tmp_path / "cohort" / "slides" / "p1-s0.svs"
