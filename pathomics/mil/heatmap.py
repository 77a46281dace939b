"""Attention heatmaps drawn over the patch stores' thumbnails."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pathomics import __version__
from pathomics.errors import StoreError
from pathomics.layout import OutputLayout
from pathomics.mil.artifacts import read_attention
from pathomics.batch import DONE, SKIPPED, Outcome, SlideJob, StatusRow, run_jobs
from pathomics.io import atomic_path
from pathomics.store import open_patch_store

BESIDE_GAP = 12  # pixels between the thumbnail and the heatmap drawn beside it
COLOUR_BAR_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)  # rank percentiles labelled with the attention weight found there


def draw_heatmap(thumbnail: Image.Image, slide_size: tuple[int, int], coords: np.ndarray, patch_size_level0: int,
                 attention: np.ndarray, alpha: float = 0.5, cmap: str = "inferno") -> Image.Image:
    """Attention over a whole-slide thumbnail (PIL image covering the level-0 ``slide_size`` (w, h)).

    Attention is shown as its rank percentile within the slide (raw attention spans orders of magnitude);
    each patch's square is coloured and blended with weight ``alpha``; overlapping patches are averaged.
    """
    from matplotlib import colormaps
    from PIL import Image  # noqa: F811 - the runtime import of the name typed above
    from scipy.stats import rankdata

    base = np.asarray(thumbnail.convert("RGB"), dtype=np.float32)
    h, w = base.shape[:2]
    sx, sy = w / slide_size[0], h / slide_size[1]
    x0 = np.clip(np.floor(coords[:, 0] * sx).astype(int), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] * sy).astype(int), 0, h - 1)
    x1 = np.clip(np.maximum(np.ceil((coords[:, 0] + patch_size_level0) * sx).astype(int), x0 + 1), 1, w)
    y1 = np.clip(np.maximum(np.ceil((coords[:, 1] + patch_size_level0) * sy).astype(int), y0 + 1), 1, h)
    value = rankdata(attention) / len(attention)
    total, count = _paint(value, x0, y0, x1, y1, (h, w)), _paint(np.ones_like(value), x0, y0, x1, y1, (h, w))
    covered = count > 0.5
    colour = colormaps[cmap](np.where(covered, total / np.maximum(count, 1), 0))[..., :3] * 255
    base[covered] = (1 - alpha) * base[covered] + alpha * colour[covered]
    return Image.fromarray(np.round(base).astype(np.uint8))


def _paint(values: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
           shape: tuple[int, int]) -> np.ndarray:
    """Sum of ``values`` over axis-aligned boxes [y0, y1) × [x0, x1), by a 2-D difference array."""
    diff = np.zeros((shape[0] + 1, shape[1] + 1))
    for ys, xs, sign in ((y0, x0, 1), (y0, x1, -1), (y1, x0, -1), (y1, x1, 1)):
        np.add.at(diff, (ys, xs), sign * values)
    return diff.cumsum(0).cumsum(1)[:-1, :-1]


def colour_bar_ticks(attention: np.ndarray) -> dict[str, float]:
    """The attention weight at each labelled rank percentile of the colour bar (``"0.25"`` -> weight)."""
    return {f"{q:g}": float(np.quantile(attention, q)) for q in COLOUR_BAR_TICKS}


def add_colour_bar(image: Image.Image, ticks: dict[str, float], start: int = 0, cmap: str = "inferno") -> Image.Image:
    """``image`` above a horizontal colour bar of the colours' rank scale under its pixels from ``start`` on, each
    tick labelled with the attention weight at that rank percentile."""
    from matplotlib import colormaps, font_manager
    from PIL import Image, ImageDraw, ImageFont  # noqa: F811 - the runtime import of the name typed above

    bar_h, pad, font_px = 16, 8, 13
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), font_px)
    out = Image.new("RGB", (image.width, image.height + pad + bar_h + 2 * font_px + 3 * pad), "white")
    out.paste(image, (0, 0))
    left, right = start + pad + 4 * font_px, image.width - pad - 4 * font_px  # room for the end labels
    gradient = colormaps[cmap](np.linspace(0, 1, max(right - left, 2)))[:, :3] * 255
    top = image.height + pad
    out.paste(Image.fromarray(np.repeat(gradient[None].round().astype(np.uint8), bar_h, axis=0)), (left, top))
    draw = ImageDraw.Draw(out)
    for q, weight in ticks.items():
        x = left + float(q) * (right - left - 1)
        draw.line([(x, top + bar_h), (x, top + bar_h + 4)], fill="black")
        draw.text((x, top + bar_h + 5), f"{weight:.2g}", fill="black", font=font, anchor="ma")
    caption = "attention weight (colour: rank within the slide, low to high)"
    draw.text(((left + right) / 2, top + bar_h + font_px + 2 * pad), caption, fill="black", font=font, anchor="ma")
    return out


def render_heatmap(attention_path: str | os.PathLike, tiles_out: str | os.PathLike, out_png: str | os.PathLike,
                   alpha: float = 0.5, size: int | None = None, beside: bool = False) -> Path:
    """Draw one slide's attention file over its patch store's plain thumbnail, above a colour bar of attention weights.

    ``size``: each panel's width in pixels (thumbnails are small; a heatmap to read wants ~800 px).
    ``beside``: the plain thumbnail on the left, the heatmap on the right. Stores tiled before plain thumbnails
    were written fall back to the thumbnail with the tissue outline and patch grid drawn on it.
    """
    from PIL import Image, PngImagePlugin

    result = read_attention(attention_path)
    tiles = OutputLayout(tiles_out)
    store = open_patch_store(tiles.store(result.slide_id))
    thumb_path = next((p for p in (tiles.plain_thumbnail(result.slide_id), tiles.thumbnail(result.slide_id)) if p.is_file()),
                      tiles.thumbnail(result.slide_id))
    missing = [k for k in ("slide_width", "slide_height") if k not in store.attrs]
    if missing or not thumb_path.is_file():
        raise StoreError(f"{store.path}: no thumbnail or slide size ({', '.join(missing) or thumb_path.name}); "
                         "re-run `pathomics tile`")
    with Image.open(thumb_path) as opened:
        thumb = opened.convert("RGB") if size is None else opened.convert("RGB").resize(
            (size, max(1, round(opened.height * size / opened.width))), Image.Resampling.LANCZOS)
    image = draw_heatmap(thumb, (int(store.attrs["slide_width"]), int(store.attrs["slide_height"])),
                         result.coords, int(store.attrs["patch_size_level0"]), result.attention, alpha)
    start = image.width + BESIDE_GAP if beside else 0
    if beside:
        pair = Image.new("RGB", (start + image.width, image.height), "white")
        pair.paste(thumb, (0, 0))
        pair.paste(image, (start, 0))
        image = pair
    ticks = colour_bar_ticks(result.attention)
    info = PngImagePlugin.PngInfo()
    info.add_text("pathomics", json.dumps({"slide_id": result.slide_id, "attention": str(attention_path),
                                           **_drawing(alpha, size, beside), "colour_bar": ticks,
                                           "pathomics_version": __version__}))
    with atomic_path(out_png) as tmp:
        add_colour_bar(image, ticks, start).save(tmp, format="PNG", pnginfo=info)
    return Path(out_png)


def _drawing(alpha: float, size: int | None, beside: bool) -> dict[str, Any]:
    """The settings a heatmap was drawn with, as its PNG records them."""
    return {"alpha": alpha, "size": size, "beside": beside}


def _is_current(png: Path, attention: Path, drawing: dict[str, Any]) -> bool:
    """Whether ``png`` is newer than ``attention`` and was drawn with these settings."""
    from PIL import Image

    if not (png.exists() and attention.exists() and png.stat().st_mtime >= attention.stat().st_mtime):
        return False
    try:
        with Image.open(png) as image:
            recorded = json.loads(image.text.get("pathomics", "{}"))
    except (OSError, ValueError):
        return False
    return all(recorded.get(k) == v for k, v in drawing.items())


def render_heatmaps(run_dir: str | os.PathLike, tiles_out: str | os.PathLike, slide_ids: Sequence[str] | None = None,
                    alpha: float = 0.5, show_progress: bool = True, size: int | None = None,
                    beside: bool = False) -> list[StatusRow]:
    """``<run_dir>/heatmaps/<slide_id>.png`` for each attention file of a run; failures isolated in status.csv.

    A heatmap newer than its attention file and drawn with the same settings is skipped.
    """
    run_dir = Path(run_dir)
    layout = OutputLayout(run_dir)
    ids = list(slide_ids) if slide_ids is not None else sorted(p.stem for p in layout.attention.glob("*.h5"))
    if not ids:
        raise StoreError(f"{run_dir}: no attention files; run `pathomics mil train` or `predict` first")

    def job(slide_id: str) -> SlideJob:
        def run() -> Outcome:
            attention, png = layout.attention_file(slide_id), layout.heatmap(slide_id)
            if _is_current(png, attention, _drawing(alpha, size, beside)):
                return SKIPPED, 0
            render_heatmap(attention, tiles_out, png, alpha, size, beside)
            return DONE, 0

        return SlideJob(slide_id, run)

    return run_jobs("mil-heatmap", [job(s) for s in ids], run_dir, show_progress)
