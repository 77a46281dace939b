"""Synthetic slides with planted artefacts whose extent is known: the ground truth of quality control.

Builds on ``synthetic.write_slide`` through its ``paint`` hook, which alters every rendered level-0 block
(so every pyramid level shows the artefacts, area-downsampled like the tissue):

- pen strokes (blue, green, black marker): the ink's transmittance multiplies the tissue under it;
- out-of-focus regions: the tissue rendered with a margin and blurred: a Gaussian (defocus), a line
  (motion during the scan), or a Gaussian growing across the region (a tilted focal plane, sharper on one side);
- folds: a second layer of tissue (the same texture, shifted) lies on the first, so optical densities add;
- air bubbles: the tissue under the bubble washed out towards white, inside a dark refraction rim;
- an off-stain scan: every optical density mapped by a 3x3 matrix that turns the synthetic haematoxylin
  and eosin directions into other ones (a different lab's stain), glass unchanged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import LineString, MultiPolygon

from pathomics.errors import ConfigError
from pathomics.synthetic.slides import (
    GLASS,
    NUCLEUS,
    STROMA,
    Ellipse,
    Painter,
    SlideTruth,
    as_multipolygon,
    boxes_overlap,
    write_slide,
)

BLUR_KINDS = ("gaussian", "motion", "tilt")
INK_TRANSMITTANCE = {"blue": (0.22, 0.42, 0.92), "green": (0.30, 0.78, 0.45), "black": (0.12, 0.12, 0.13)}
BUBBLE_WASH, BUBBLE_RIM, BUBBLE_RIM_COLOR = 0.9, 0.08, (90, 90, 95)  # washed-out fraction, rim width / radius


@dataclass(frozen=True)
class Stroke:
    """A marker stroke: a polyline in level-0 pixels, ``width`` pixels wide, ink ``color`` (blue, green, black)."""

    points: tuple[tuple[float, float], ...]
    width: float
    color: str

    def __post_init__(self) -> None:
        if self.color not in INK_TRANSMITTANCE:
            raise ConfigError(f"unknown ink {self.color!r}; choose one of {', '.join(INK_TRANSMITTANCE)}")

    def polygon(self) -> MultiPolygon:
        return as_multipolygon(LineString(self.points).buffer(self.width / 2))  # round caps, as OpenCV draws them


@dataclass(frozen=True)
class Artefacts:
    """What to plant on a slide; ``stain`` gives the (haematoxylin, eosin) RGB colours of an off-stain scan."""

    strokes: tuple[Stroke, ...] = ()
    blur: tuple[Ellipse, ...] = ()
    blur_sigma: float = 5.0  # level-0 pixels: the Gaussian's sigma, or the motion line's / the tilt's mean standard deviation
    blur_kind: str = "gaussian"  # one of BLUR_KINDS
    folds: tuple[Ellipse, ...] = ()
    fold_shift: tuple[int, int] = (300, 170)  # where the folded-over layer comes from, level-0 pixels
    bubbles: tuple[Ellipse, ...] = ()
    stain: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        if self.blur_kind not in BLUR_KINDS:
            raise ConfigError(f"unknown blur kind {self.blur_kind!r}; choose one of {', '.join(BLUR_KINDS)}")

    def regions(self) -> dict[str, MultiPolygon]:
        """Each planted artefact kind (``pen_blue``, ``pen_green``, ``pen_black``, ``blur``, ``fold``, ``bubble``) as polygons."""
        out = {f"pen_{c}": _union([s.polygon() for s in self.strokes if s.color == c]) for c in INK_TRANSMITTANCE}
        out.update(blur=_union([e.polygon() for e in self.blur]), fold=_union([e.polygon() for e in self.folds]),
                   bubble=_union([e.polygon() for e in self.bubbles]))
        return out

    def painter(self) -> Painter:
        """The ``paint`` hook of ``write_slide`` that plants these artefacts."""
        stain = stain_transform(*self.stain) if self.stain else None

        def paint(block: np.ndarray, x0: int, y0: int, render: Callable[[int, int, int], np.ndarray]) -> np.ndarray:
            size = block.shape[0]
            box = (x0, y0, x0 + size, y0 + size)
            blur, folds, bubbles = ([e for e in group if boxes_overlap(e.bounds(), box)] for group in (self.blur, self.folds, self.bubbles))
            strokes = [s for s in self.strokes if boxes_overlap(s.polygon().bounds, box)]
            if not (blur or folds or bubbles or strokes or stain is not None):
                return block
            out = block.astype(np.float32)
            for e in blur:
                out = np.where(_ellipse_mask(e, x0, y0, size)[..., None], self._blurred(e, render, x0, y0, size), out)
            for e in folds:
                layer = render(x0 + self.fold_shift[0], y0 + self.fold_shift[1], size).astype(np.float32)
                out = np.where(_ellipse_mask(e, x0, y0, size)[..., None], out * layer / np.float32(GLASS), out)
            for stroke in strokes:
                out = np.where(_stroke_mask(stroke, x0, y0, size)[..., None], out * np.float32(INK_TRANSMITTANCE[stroke.color]), out)
            for e in bubbles:
                out = _bubble(out, e, x0, y0)
            if stain is not None:
                out = apply_stain(out, stain)
            return out.clip(0, 255).round().astype(np.uint8)

        return paint

    def _blurred(self, e: Ellipse, render: Callable[[int, int, int], np.ndarray], x0: int, y0: int, size: int) -> np.ndarray:
        """The block out of focus: Gaussian; motion, a line of the same standard deviation at 30 degrees; tilt, a
        Gaussian whose sigma grows from 0.5 to 1.5 ``blur_sigma`` across the ellipse from left to right (4 bands)."""
        import cv2

        m = math.ceil(6 * self.blur_sigma)
        big = render(x0 - m, y0 - m, size + 2 * m).astype(np.float32)
        if self.blur_kind == "motion":
            return cv2.filter2D(big, -1, _line_kernel(self.blur_sigma * math.sqrt(12), 30.0))[m:m + size, m:m + size]
        if self.blur_kind == "gaussian":
            return cv2.GaussianBlur(big, (0, 0), self.blur_sigma)[m:m + size, m:m + size]
        across = (x0 + np.arange(size) + 0.5 - (e.cx - e.rx)) / (2 * e.rx)  # 0 at the ellipse's left, 1 at its right
        band = np.clip((across * 4).astype(int), 0, 3)
        out = np.empty((size, size, 3), np.float32)
        for k in range(4):
            sigma = self.blur_sigma * (0.5 + (k + 0.5) / 4)
            out[:, band == k] = cv2.GaussianBlur(big, (0, 0), sigma)[m:m + size, m:m + size][:, band == k]
        return out


def _line_kernel(length: float, angle: float) -> np.ndarray:
    """A normalised line kernel ``length`` pixels long at ``angle`` degrees: uniform motion during exposure."""
    import cv2

    n = 2 * math.ceil(length / 2) + 1
    kernel = np.zeros((n, n), np.float32)
    dx, dy = length / 2 * math.cos(math.radians(angle)), length / 2 * math.sin(math.radians(angle))
    c = n // 2
    cv2.line(kernel, (round(c - dx), round(c - dy)), (round(c + dx), round(c + dy)), 1.0, 1, cv2.LINE_AA)
    return kernel / kernel.sum()


def write_artefact_slide(path: str | os.PathLike, width: int, height: int, artefacts: Artefacts, **kwargs) -> SlideTruth:
    """``write_slide`` with ``artefacts`` planted (same keyword arguments)."""
    return write_slide(path, width, height, paint=artefacts.painter(), **kwargs)


def stain_transform(haematoxylin: tuple[int, int, int], eosin: tuple[int, int, int]) -> np.ndarray:
    """3x3 matrix on optical densities mapping the synthetic stains' directions to those of these colours."""
    def basis(h: tuple[int, int, int], e: tuple[int, int, int]) -> np.ndarray:
        hv, ev = _od_direction(h), _od_direction(e)
        third = np.cross(hv, ev)
        return np.stack([hv, ev, third / np.linalg.norm(third)], axis=1)

    return basis(haematoxylin, eosin) @ np.linalg.inv(basis(NUCLEUS, STROMA))


def apply_stain(rgb: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Re-stain float RGB pixels: optical density relative to the glass, mapped by ``transform``."""
    glass = np.float32(GLASS)
    od = -np.log(np.clip(rgb, 1.0, glass) / glass)
    return glass * np.exp(-(od @ transform.T.astype(np.float32)))


def patch_coverage(region: MultiPolygon, coords: np.ndarray, size0: int) -> np.ndarray:
    """Fraction of each patch (level-0 top-left ``coords``, side ``size0``) that ``region`` covers."""
    from pathomics.tiling import tissue_fractions

    if region.is_empty or len(coords) == 0:
        return np.zeros(len(coords))
    return tissue_fractions(region, coords[:, 0], coords[:, 1], size0)


def _od_direction(rgb: tuple[int, int, int]) -> np.ndarray:
    od = -np.log(np.asarray(rgb, dtype=np.float64) / np.asarray(GLASS, dtype=np.float64))
    return od / np.linalg.norm(od)


def _union(polygons: list[MultiPolygon]) -> MultiPolygon:
    return as_multipolygon(shapely.union_all(polygons)) if polygons else MultiPolygon()


def _ellipse_mask(e: Ellipse, x0: int, y0: int, size: int) -> np.ndarray:
    """True at the centres of the level-0 pixels of the block at (x0, y0) that lie inside ``e``."""
    centres = np.arange(size) + 0.5
    return e.inside((x0 + centres)[None, :], (y0 + centres)[:, None])


def _stroke_mask(stroke: Stroke, x0: int, y0: int, size: int) -> np.ndarray:
    """The stroke's pixels in the block at (x0, y0), drawn on a margin (OpenCV clips a line before thickening it)."""
    import cv2

    pad = math.ceil(stroke.width)
    mask = np.zeros((size + 2 * pad, size + 2 * pad), dtype=np.uint8)
    pts = np.rint(np.asarray(stroke.points) - (x0 - pad, y0 - pad)).astype(np.int32)
    cv2.polylines(mask, [pts], False, 1, thickness=max(1, round(stroke.width)))
    return mask[pad:pad + size, pad:pad + size].astype(bool)


def _bubble(out: np.ndarray, e: Ellipse, x0: int, y0: int) -> np.ndarray:
    """The tissue under a bubble washed out towards white, with a dark rim of ``BUBBLE_RIM`` of its radius."""
    centres = np.arange(out.shape[0]) + 0.5
    r = np.hypot((x0 + centres[None, :] - e.cx) / e.rx, (y0 + centres[:, None] - e.cy) / e.ry)
    inside, rim = r <= 1 - BUBBLE_RIM, (r > 1 - BUBBLE_RIM) & (r <= 1)
    out = np.where(inside[..., None], out + BUBBLE_WASH * (250 - out), out)
    return np.where(rim[..., None], 0.3 * out + 0.7 * np.float32(BUBBLE_RIM_COLOR), out)


OWN_FLAG = {"pen_blue": "pen", "pen_green": "pen", "pen_black": "pen", "blur": "blur", "fold": "fold", "bubble": "bubble"}
INSIDE = 0.5  # a patch is inside an artefact when the artefact covers at least this fraction of it


def artefact_layout(width: int, height: int) -> tuple[Ellipse, Artefacts]:
    """One tissue ellipse with every artefact kind planted on it, apart from each other, scaled to the slide.

    Drawn for 4096 x 3072 px at 0.5 µm/px: marker strokes 175 µm wide, a blurred region (sigma 1.5 µm), a fold,
    two bubbles; every artefact covers 19-33 patches of 128 px at 0.5 µm/px.
    """
    sx, sy = width / 4096, height / 3072
    s = (sx * sy) ** 0.5

    def xy(x: float, y: float) -> tuple[float, float]:
        return x * sx, y * sy

    def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> Ellipse:
        return Ellipse(cx * sx, cy * sy, rx * sx, ry * sy, angle)

    artefacts = Artefacts(
        strokes=(Stroke((xy(600, 750), xy(1900, 650)), 350 * s, "blue"), Stroke((xy(2300, 650), xy(3500, 850)), 350 * s, "green"),
                 Stroke((xy(750, 2300), xy(1850, 2500)), 350 * s, "black")),
        blur=(ellipse(1000, 1525, 380, 300),), blur_sigma=3.0 * s, folds=(ellipse(2150, 1650, 420, 280, 15),),
        fold_shift=(round(150 * sx), round(85 * sy)), bubbles=(ellipse(3150, 1550, 240, 240), ellipse(3150, 2275, 210, 210)))
    return ellipse(2048, 1536, 1950, 1450), artefacts


def qc_confusion(artefacts: Artefacts, table, size0: int):
    """Per planted artefact: patches inside it, how many its own flag and any flag caught; then the clean patches
    (touching no artefact) and how many any flag raised. ``table``: a QC table (``pathomics.qc``)."""
    import pandas as pd

    coords = table[["x", "y"]].to_numpy()
    coverage = {kind: patch_coverage(region, coords, size0) for kind, region in artefacts.regions().items()}
    failed = ~table.qc_pass.to_numpy()
    rows = []
    for kind, cover in coverage.items():
        inside = cover >= INSIDE
        own = table[f"flag_{OWN_FLAG[kind]}"].to_numpy()
        rows.append({"artefact": kind, "patches": int(inside.sum()), "flagged_own": int((own & inside).sum()),
                     "flagged_any": int((failed & inside).sum()), "missed": int((inside & ~own).sum())})
    clean = np.max(np.stack(list(coverage.values())), axis=0) == 0 if coverage else np.ones(len(table), bool)
    rows.append({"artefact": "clean", "patches": int(clean.sum()), "flagged_own": 0,
                 "flagged_any": int((failed & clean).sum()), "missed": 0})
    out = pd.DataFrame(rows)
    out["rate_own"] = (out.flagged_own / out.patches.clip(lower=1)).round(3)
    out["rate_any"] = (out.flagged_any / out.patches.clip(lower=1)).round(3)
    return out
