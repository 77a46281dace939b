"""The HTML report: self-contained, escaped, and it opens with every image decoded in a real browser."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from browser import CHROMIUM, SKIP_REASON, headless_flags
from helpers.survival import SYNTHETIC_COVARIATES

from pathomics.survival import SurvivalConfig, survival_fit
from pathomics.survival.figures import Section, html_report, image_html, table_html
from pathomics.synthetic.cohort import simulate_cohort_tables

# Writes each image's decoded width into the DOM once the page has loaded; dumped with --dump-dom.
PROBE = """<script>window.addEventListener("load", () => {
  const widths = Array.from(document.images, img => img.complete ? img.naturalWidth : -1);
  const out = document.createElement("pre"); out.id = "probe"; out.textContent = "widths=" + widths.join(",");
  document.body.appendChild(out);
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    clinical, radiology, signatures, _ = simulate_cohort_tables(250, seed=11)
    out = tmp_path_factory.mktemp("report")
    survival_fit(
        SurvivalConfig(covariates=SYNTHETIC_COVARIATES, n_bootstrap=10, time_unit="days"),
        clinical,
        radiology,
        signatures,
        out=out,
    )
    return out / "survival" / "report.html"


def test_html_helpers_escape_and_embed() -> None:
    png = b"\x89PNG\r\n\x1a\nnot really"
    page = html_report(
        "A <b> title", [Section("x & y", table_html(pd.DataFrame({"a<": [1.23456, float("nan")]})) + image_html(png, 'say "hi"'))]
    )
    assert "<title>A &lt;b&gt; title</title>" in page and "<h2>x &amp; y</h2>" in page
    assert "<th>a&lt;</th>" in page and "<td>1.23</td>" in page and "<td>—</td>" in page
    assert 'alt="say &quot;hi&quot;" src="data:image/png;base64,iVBORw0KGgpub3QgcmVhbGx5"' in page


def test_survival_report_is_self_contained(report: Path) -> None:
    page = report.read_text(encoding="utf-8")
    sources = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(sources) == 6 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http" not in page.replace("http-equiv", "")
    for heading in (
        "Cohort",
        "Model comparison",
        "Kaplan–Meier risk groups",
        "Time-dependent AUC",
        "Calibration",
        "Calibration slope and intercept",
        "Decision curves",
        "Nomogram",
        "Hazard ratios",
    ):
        assert f"<h2>{heading}</h2>" in page
    assert "time unit: days" in page and "Follow-up time unit: days" in page
    assert "<td>clinical+radiology+pathology</td><td>250</td>" in page.replace("\n", "").replace(" ", "")
    assert 'alt="forest plot of hazard ratios"' in page and "Small-cohort warning" not in page


def test_a_small_cohort_is_flagged_and_availability_counted(tmp_path: Path) -> None:
    """24 patients, radiology for a third and no slides for five: the report warns before the cohort table, and
    metrics.json counts patients per combination of modalities."""
    import json
    import warnings

    from pathomics.errors import FitWarning

    clinical, radiology, signatures, _ = simulate_cohort_tables(24, seed=2)
    radiology = radiology.iloc[::3]
    signatures = signatures[~signatures["patient_id"].isin(clinical["patient_id"].iloc[:5])]
    config = SurvivalConfig(covariates=SYNTHETIC_COVARIATES, n_bootstrap=10, folds=3, missing="impute")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FitWarning)  # so few patients: some fits need the stabilising ridge
        survival_fit(config, clinical, radiology, signatures, out=tmp_path)
    availability = json.loads((tmp_path / "survival" / "metrics.json").read_text())["cohort"]["availability"]
    assert availability == {"clinical+pathology": 13, "clinical+radiology+pathology": 6, "clinical": 3,
                            "clinical+radiology": 2}
    page = (tmp_path / "survival" / "report.html").read_text(encoding="utf-8")
    assert page.index("<h2>Small-cohort warning</h2>") < page.index("<h2>Cohort</h2>")
    assert "spans most of [0, 1]" in page or "two orders of magnitude" in page
    assert all(f"<td>{name}</td>" in page for name in ("clinical", "radiology", "pathology", "combined"))


@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_report_opens_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    done = subprocess.run(
        [CHROMIUM, *headless_flags(tmp_path / "profile"), "--dump-dom", "--virtual-time-budget=5000", probed.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "<h1>pathomics survival report</h1>" in done.stdout
    widths = re.search(r"<pre id=\"probe\">widths=([-\d,]+)</pre>", done.stdout)
    assert widths, done.stdout[-2000:]
    decoded = [int(w) for w in widths.group(1).split(",")]
    assert len(decoded) == 6 and all(w > 100 for w in decoded), decoded


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole `run` on eight tiny slides (2 MIL folds of 2 epochs, 2 survival folds): its report is the run's."""
    import warnings

    from pathomics.embed import EmbedConfig
    from pathomics.errors import DataWarning, FitWarning
    from pathomics.manifest import read_manifest
    from pathomics.mil import MILConfig
    from pathomics.runner.pipeline import RunConfig, run_archive
    from pathomics.synthetic import write_cohort
    from pathomics.tiling import TileConfig

    cohort = write_cohort(tmp_path_factory.mktemp("cohort"), n_patients=8, seed=3, slide_size=(2048, 1536), max_slides=1)
    config = RunConfig(
        tile=TileConfig(target_mpp=2.0, patch_size=64, threads=1),
        embed=EmbedConfig(model="shufflenet-v2", weights="random", precision="fp32", batch_size=64, num_workers=0, input_size=64),
        mil=MILConfig(task="survival", folds=2, epochs=2, hidden_dim=16, ensemble=1),
        survival=SurvivalConfig(covariates=("age", "tumour_size"), folds=2, n_bootstrap=10), workers=1)
    out = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DataWarning, FitWarning))  # eight patients: folds without admissible pairs
        run_archive(read_manifest(cohort.manifest), cohort.clinical, out, config, radiology=cohort.radiology)
    return out


RUN_SECTIONS = ("Slides, encoder and settings", "Quality control", "Slides", "Attention heatmaps", "Cohort",
                "Model comparison", "Kaplan–Meier risk groups", "Calibration", "Hazard ratios")


@pytest.mark.slow
def test_a_run_report_says_what_the_slides_were(run_out: Path) -> None:
    """Encoder and RANDOM weights in the title, tiling and MIL settings, QC counts per flag, and one row per slide
    linking its heatmap, which exists beside the report."""
    from pathomics.layout import OutputLayout
    from pathomics.qc import FLAGS

    layout = OutputLayout(run_out)
    page = layout.report.read_text(encoding="utf-8")
    assert "<h1>pathomics run report (RANDOM backbone weights)</h1>" in page
    assert all(f"<h2>{h}</h2>" in page for h in RUN_SECTIONS)
    for setting, value in (("encoder", "shufflenet-v2"), ("weights", "random"), ("tiling: target mpp", "2.0"),
                           ("tiling: patch size", "64"), ("tiling: compression", "zstd"), ("MIL aggregator", "abmil"),
                           ("MIL folds", "2"), ("MIL epochs", "2"), ("MIL ensemble", "1")):
        assert f"<td>{setting}</td><td>{value}</td>" in page, setting
    assert all(f"<td>{flag}</td>" in page for flag in FLAGS) and "<td>any flag</td>" in page
    signatures = pd.read_parquet(layout.signatures)
    for slide_id in signatures.slide_id:
        assert f'<td>{slide_id}</td>' in page and f'<a href="heatmaps/{slide_id}.png">heatmap</a>' in page
        assert layout.heatmap(slide_id).is_file()
    assert page.count('alt="attention heatmap of ') == 4


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
def test_a_run_report_in_headless_chromium_shows_its_heatmaps_at_a_readable_size(run_out: Path, tmp_path: Path) -> None:
    from contextlib import closing

    from browser import Browser
    from PIL import Image

    from pathomics.layout import OutputLayout

    report = OutputLayout(run_out).report
    with closing(Browser(tmp_path / "profile", 1200, 900)) as page:
        page.open(report.as_uri(), "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        headings = page.evaluate("Array.from(document.querySelectorAll('h2'), h => h.textContent)")
        widths = page.evaluate("Array.from(document.images).filter(i => i.alt.startsWith('attention heatmap'))"
                               ".map(i => i.naturalWidth)")
        linked = page.evaluate("Array.from(document.querySelectorAll('a[href$=\".png\"]'), a => a.href)")
        page.evaluate("document.querySelector('img[alt^=\"attention heatmap\"]').scrollIntoView()")
        shot = page.screenshot()
    assert set(RUN_SECTIONS) <= set(headings)
    assert len(widths) == 4 and min(widths) >= 800, widths
    assert linked and all(Path(link.removeprefix("file://")).is_file() for link in linked)
    Image.fromarray(shot).save(tmp_path / "report.png")
    assert shot.shape[:2] == (900, 1200) and shot.reshape(-1, 3).std(axis=0).min() > 20  # the heatmap on screen, not a blank page
