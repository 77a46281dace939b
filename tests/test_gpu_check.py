"""benchmarks/gpu_check.sh, the one-command GPU check, run here in its CPU smoke mode: one JSON with every part,
the GPU-only ones skipped with their reason and the others measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"gpu_tests", "tiling", "embed_resnet50_trunc", "embed_vit_l16", "mil"}


@pytest.mark.slow
def test_the_gpu_check_writes_every_part_skipping_the_gpu_ones_with_a_reason(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--smoke", "--patches", "24",
                           "--unique-patches", "8", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    check = json.loads(out.read_text())
    parts = check["parts"]
    assert set(parts) == PARTS and check["device"] == "cpu" and check["passed"] is None
    assert parts["gpu_tests"] == {"skipped": "no CUDA device"}
    assert check["gpu_sampling"]["skipped"] in ("no nvidia-smi on PATH", "not a CUDA device")
    for name in PARTS - {"gpu_tests"}:
        assert "skipped" not in parts[name], parts[name]
        assert parts[name]["peak_rss_mib"] > 0
    assert parts["tiling"]["patches"] > 0 and parts["tiling"]["patches_per_s"] > 0 and parts["tiling"]["threads"] == os.cpu_count()
    for name in ("embed_resnet50_trunc", "embed_vit_l16"):
        assert parts[name]["patches"] == 24 and parts[name]["decoder"] == "nvimgcodec" and parts[name]["patches_per_s"] > 0
    assert parts["mil"]["train_patches_per_s"] > 0
    assert {(t["part"], t["metric"]) for t in check["targets"]} == {
        (p, m) for p in ("embed_resnet50_trunc", "embed_vit_l16") for m in ("patches_per_s", "gpu_busy_mean_pct")}
    assert all(t["pass"] is None and t["not_judged"] == "a --smoke run" for t in check["targets"])


def test_nvidia_smi_samples_are_parsed_and_summarised() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu_check import parse_smi_line, summarize_samples
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    samples = [parse_smi_line(line) for line in ("90, 1000\n", "80, 3000", "[N/A], 10", "")]
    assert samples == [(90.0, 1000.0), (80.0, 3000.0), None, None]
    assert summarize_samples([s for s in samples if s]) == {
        "gpu_samples": 2, "gpu_busy_mean_pct": 85.0, "gpu_busy_median_pct": 85.0, "gpu_memory_used_peak_mib": 3000.0}
    assert summarize_samples([]) == {"gpu_samples": 0}
