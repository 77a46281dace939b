"""Per-patch and per-slide quality control, scored at tiling time on the pixels already decoded.

Every patch (at the target MPP) gets cheap, vectorised scores:

- ``focus``: in each of the patch's 4 x 4 blocks that is at least half tissue, the mean square of the grey
  image's Laplacian at the target MPP over that of the image at half the resolution: fine detail against
  coarse detail, so the measure does not depend on how much stain or how many nuclei a block holds; the
  patch scores its least sharp block, so a patch half out of focus is caught. ``focus_wide``: the same
  against the image at a quarter of the resolution. ``focus_rel`` and ``focus_wide_rel`` are each over the
  slide's 75th percentile (its sharp tissue, even where half the slide is out of focus): blur is judged
  against the slide's own tissue, and only where fine detail falls short against both coarser scales
  (smooth stroma or large nuclei lower one ratio, defocus both), with absolute floors for a slide out of
  focus all over.
- ``pen``: fraction of pixels of a marker hue (``pen_blue``, ``pen_green``, ``pen_black``). H&E has no
  green and its haematoxylin is purple, not blue; black ink is dark and grey, unlike any stain.
- ``fold``: the share of the patch's tissue pixels whose optical density is that of the slide's lighter
  tissue (its stroma: the median over patches of each patch's 25th percentile) doubled. A fold stacks
  tissue on tissue, so its background between cells is twice as dense; a dense cellular lesion is dark
  in its nuclei, which lie far above that band, and keeps a normal background. A fold is also denser
  than the slide's median patch (``density``: the mean optical density over the slide's median).
- ``bubble``: the share of the patch that looks blank (bright, colourless: a washed-out bubble interior,
  glare) beyond what its tissue polygon leaves blank.
- stain: each slide's Macenko haematoxylin and eosin vectors (fitted on a fixed sample of tissue pixels
  of every patch), each patch's mean haematoxylin and eosin concentrations (``stain_h``, ``stain_e``),
  and, across the slides of an output directory, slides whose vectors are outliers.

Colour and stain statistics use every ``pixel_stride``-th pixel in each direction; focus uses all pixels.
``<out>/qc/<slide_id>.parquet`` holds one row per patch in the store's order; ``<out>/qc_summary.csv``
one row per slide (also in the store attribute ``qc``); ``<out>/qc/<slide_id>.qc.png`` shows the flags.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from pathomics.errors import ConfigError, StoreError
from pathomics.io import WrittenFiles
from pathomics.layout import OutputLayout
from pathomics.store import PatchStore, store_fingerprint

REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])  # Macenko et al.'s H and E columns
SAMPLE_GRID = 8  # pixels sampled per patch for the stain fit: an 8x8 grid
FOCUS_BLOCKS = 4  # focus is scored on 4x4 blocks of each patch
OD_BINS = np.geomspace(0.05, 20.0, 64)  # edges of the per-patch histogram of optical density (3 channels summed), 10% apart
SCORE_CHUNK = 16  # patches scored together: 16 of 256 px (3 MB) keep each pass's output in cache for the next


@dataclass(frozen=True)
class QCConfig:
    """Thresholds of the per-patch flags (a patch passes when it raises none) and of the stain outlier test.

    Pixel classes, in OpenCV's HSV (hue 0-180, i.e. degrees / 2; saturation and value 0-255): *blank*
    (glass, glare, a washed-out bubble) when value >= ``blank_value`` and saturation <= ``blank_saturation``,
    *tissue* otherwise; *blue ink* with hue in ``blue_hue`` and *green ink* with hue in ``green_hue``, both
    with saturation >= ``ink_saturation``; *black ink* with value < ``black_value`` and saturation <
    ``black_saturation`` (dark and grey). Flags (defaults calibrated on the synthetic slides of
    ``synthetic.artefacts``, see docs/guide/qc.md; check them on your scanner's slides with the QC thumbnails): ``blur``
    when ``focus_rel < min_focus_rel`` and ``focus_wide_rel < min_focus_wide_rel`` (fine detail short of the slide's
    75th percentile against detail one and two octaves coarser: defocus lowers both, real tissue's own variation
    mostly one), or ``focus < min_focus`` or ``detail < min_detail`` (absolute floors, for a slide out of focus all
    over); ``pen`` when the ink fraction exceeds ``max_pen``;
    ``fold`` when the share of tissue at ``fold_density`` times the slide's stroma density exceeds ``max_fold`` and
    the patch's mean optical density is over ``min_fold_density`` times the slide's median (``density``);
    ``bubble`` when the blank share beyond the tissue polygon's exceeds ``max_bubble``.
    Stain: optical density ``-ln((I + 1) / stain_io)``; Macenko's ``stain_beta`` (OD floor) and
    ``stain_alpha`` (angle percentile). A slide is a stain outlier when its H or E vector lies more than
    ``max(stain_outlier_degrees, stain_outlier_mads x 1.4826 x MAD)`` degrees from the batch's median
    vector, in a batch of at least ``stain_min_slides`` slides.
    """

    min_focus: float = 0.10
    min_focus_rel: float = 0.62
    min_focus_wide_rel: float = 0.45
    min_detail: float = 1.2
    max_pen: float = 0.10
    max_fold: float = 0.25
    fold_density: tuple[float, float] = (1.6, 2.5)
    min_fold_density: float = 1.3
    max_bubble: float = 0.25
    blank_value: int = 215
    blank_saturation: int = 25
    blue_hue: tuple[int, int] = (95, 125)
    green_hue: tuple[int, int] = (35, 85)
    ink_saturation: int = 60
    black_value: int = 70
    black_saturation: int = 110
    pixel_stride: int = 8
    stain_io: int = 240
    stain_beta: float = 0.15
    stain_alpha: float = 1.0
    stain_outlier_degrees: float = 10.0
    stain_outlier_mads: float = 3.0
    stain_min_slides: int = 3

    def __post_init__(self) -> None:
        for name, allowed, ok in (("min_focus", ">= 0", self.min_focus >= 0), ("min_focus_rel", ">= 0", self.min_focus_rel >= 0),
                                  ("min_focus_wide_rel", ">= 0", self.min_focus_wide_rel >= 0),
                                  ("min_detail", ">= 0", self.min_detail >= 0), ("max_pen", "in 0-1", 0 <= self.max_pen <= 1),
                                  ("max_fold", "in 0-1", 0 <= self.max_fold <= 1), ("min_fold_density", ">= 0", self.min_fold_density >= 0),
                                  ("max_bubble", "in 0-1", 0 <= self.max_bubble <= 1),
                                  ("pixel_stride", ">= 1", self.pixel_stride >= 1),
                                  ("stain_min_slides", ">= 2", self.stain_min_slides >= 2), ("stain_io", ">= 1", self.stain_io >= 1)):
            if not ok:
                raise ConfigError(f"QC setting {name}={getattr(self, name)} is out of range: {name} must be {allowed}")

    @classmethod
    def parse(cls, text: str) -> QCConfig:
        """A config from ``name=value,...`` (its number fields, e.g. ``max_pen=0.2,min_focus=1``); others keep defaults."""
        numbers = {f.name: type(f.default) for f in fields(cls) if type(f.default) in (int, float)}
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = (part.strip() for part in item.partition("="))
            if name not in numbers:
                raise ConfigError(f"unknown QC setting {name!r}; choose from {', '.join(numbers)}")
            try:
                values[name] = numbers[name](value)
            except ValueError as exc:
                kind = "a whole number" if numbers[name] is int else "a number"
                raise ConfigError(f"QC setting {item!r}: {name} takes {kind}") from exc
        return cls(**values)


@dataclass(frozen=True)
class BatchScores:
    """Raw per-patch statistics of a batch, before the slide-level steps (stain fit, fold normalisation)."""

    focus: np.ndarray        # (n,) see _focus
    focus_wide: np.ndarray   # (n,) see _focus
    detail: np.ndarray       # (n,) see _focus
    blank: np.ndarray        # (n,) fraction of blank pixels
    pen: np.ndarray          # (n, 3) fractions of blue, green and black ink pixels
    mean_od: np.ndarray      # (n, 3) mean optical density of the tissue pixels
    od_hist: np.ndarray      # (n, len(OD_BINS) + 1) fractions of the tissue pixels per bin of summed optical density
    sample: np.ndarray       # (n, SAMPLE_GRID**2, 3) uint8 RGB pixels for the stain fit


def score_batch(images: np.ndarray, config: QCConfig) -> BatchScores:
    """Raw QC statistics of a batch of (n, P, P, 3) uint8 RGB patches at the target MPP.

    Each patch's statistics depend on its own pixels only (not on the batch), so a resumed slide scores alike.
    A large batch is scored ``SCORE_CHUNK`` patches at a time, so that each pass over the pixels (grey,
    Laplacian, tissue mask) finds the previous one's output still in the CPU cache: 25% less time.
    """
    if len(images) > SCORE_CHUNK:
        parts = [_score_chunk(images[i:i + SCORE_CHUNK], config) for i in range(0, len(images), SCORE_CHUNK)]
        return BatchScores(*(np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(BatchScores)))
    return _score_chunk(images, config)


def _score_chunk(images: np.ndarray, config: QCConfig) -> BatchScores:
    import cv2

    n, p = len(images), images.shape[1] if len(images) else 0
    if n == 0:
        return BatchScores(*(np.zeros((0, *shape), np.float32) for shape in ((), (), (), (), (3,), (3,), (len(OD_BINS) + 1,))),
                           np.zeros((0, SAMPLE_GRID * SAMPLE_GRID, 3), np.uint8))
    sub = np.ascontiguousarray(images[:, ::config.pixel_stride, ::config.pixel_stride])
    s = sub.shape[1]
    classes = pixel_classes(sub.reshape(n * s, s, 3), config)
    blank, blue, green, black = (patch_means(c, n) for c in classes)
    tissue = 255 - classes[0]
    od = cv2.LUT(sub.reshape(n * s, s, 3), _od_table(config.stain_io).astype(np.float32))
    od_sum = patch_means(cv2.multiply(od, cv2.merge([tissue] * 3), scale=1 / 255, dtype=cv2.CV_32F), n)
    mean_od = od_sum / np.maximum(1.0 - blank, 1e-6)[:, None]
    bins = np.searchsorted(OD_BINS, od.sum(axis=2)).reshape(n, s * s) + (np.arange(n) * (len(OD_BINS) + 1))[:, None]
    weights = (tissue.reshape(n, s * s) > 0).astype(np.float32)
    od_hist = np.bincount(bins.ravel(), weights.ravel(), n * (len(OD_BINS) + 1)).reshape(n, -1)
    od_hist /= np.maximum(od_hist.sum(axis=1, keepdims=True), 1.0)
    step = max(1, p // SAMPLE_GRID)
    sample = images[:, step // 2::step, step // 2::step][:, :SAMPLE_GRID, :SAMPLE_GRID].reshape(n, -1, 3)
    return BatchScores(*_focus(images, config), blank, np.stack([blue, green, black], axis=1), mean_od.astype(np.float32),
                       od_hist.astype(np.float32), np.ascontiguousarray(sample))


def pixel_classes(rgb: np.ndarray, config: QCConfig) -> tuple[np.ndarray, ...]:
    """Masks (0 or 255) of blank, blue-ink, green-ink and black-ink pixels of an (h, w, 3) uint8 RGB image."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    return (cv2.inRange(hsv, (0, 0, config.blank_value), (180, config.blank_saturation, 255)),
            cv2.inRange(hsv, (config.blue_hue[0], config.ink_saturation, 0), (config.blue_hue[1] - 1, 255, 255)),
            cv2.inRange(hsv, (config.green_hue[0], config.ink_saturation, 0), (config.green_hue[1] - 1, 255, 255)),
            cv2.inRange(hsv, (0, 0, 0), (180, config.black_saturation - 1, config.black_value - 1)))


def patch_means(image: np.ndarray, n: int) -> np.ndarray:
    """Per-patch means of a tall (n x s, s[, c]) image of n stacked patches (0-255 masks become fractions)."""
    import cv2

    means = cv2.resize(image.astype(np.float32, copy=False), (1, n), interpolation=cv2.INTER_AREA).reshape(n, -1)
    if means.shape[1] == 1:
        means = means[:, 0]
    return means / 255.0 if image.dtype == np.uint8 else means


def _focus(images: np.ndarray, config: QCConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch, among its FOCUS_BLOCKS² blocks with half or more tissue, the lowest ratio of fine to coarse detail
    one octave apart (``focus``) and two octaves apart (``focus_wide``), and the lowest mean square Laplacian per
    tissue pixel (``detail``: it also falls where a slide's finest scale holds nothing but noise, which the ratios
    then miss).

    Per block, the mean square of the grey image's 4-neighbour Laplacian over that of the image at half (one
    ``pyrDown``) and at a quarter (two) of the resolution: defocus, motion or a tilted focal plane remove fine
    detail first, whatever the block's contrast. Real tissue's own fine detail varies from block to block (smooth
    stroma, large nuclei) and moves the two ratios apart, where defocus lowers both. The Laplacians' edge rows
    and columns are zeroed: they mirror the patch (doubling its edge's coarse detail) or touch a neighbouring
    patch of the batch, so that a patch scores alike in any batch. Taking the worst block catches a patch half
    out of focus. Inf when no block has enough tissue.
    """
    import cv2

    n, p = images.shape[:2]
    k, b = FOCUS_BLOCKS, p // FOCUS_BLOCKS
    grey = cv2.cvtColor(np.ascontiguousarray(images).reshape(n * p, p, 3), cv2.COLOR_RGB2GRAY)
    fine = cv2.Laplacian(grey, cv2.CV_16S, ksize=1)
    half = cv2.pyrDown(grey)
    coarse = cv2.Laplacian(half, cv2.CV_16S, ksize=1)
    q = coarse.shape[0] // n
    coarse.reshape(n, q, -1)[:, [0, 1, -2, -1]] = 0  # pyrDown mixed these rows with the neighbouring patch
    wide = [cv2.Laplacian(cv2.pyrDown(cv2.pyrDown(grey[i * p:(i + 1) * p])), cv2.CV_16S, ksize=1) for i in range(n)]
    for laplacian in (fine.reshape(n, p, p), coarse.reshape(n, q, -1), *wide):
        laplacian[..., [0, -1], :] = 0
        laplacian[..., [0, -1]] = 0
    tissue = cv2.compare(grey, config.blank_value, cv2.CMP_LT)
    if p != k * b:  # blocks cover the first k * b rows and columns
        tissue = np.ascontiguousarray(tissue.reshape(n, p, p)[:, :k * b, :k * b]).reshape(n * k * b, k * b)
    fraction = cv2.resize(tissue, (k, n * k), interpolation=cv2.INTER_AREA).reshape(n, k * k) / 255.0
    h, w = b // 2, b // 4
    energy = np.array([(cv2.norm(fine[i * p + r * b:i * p + (r + 1) * b, c * b:(c + 1) * b], cv2.NORM_L2SQR),
                        cv2.norm(coarse[i * q + r * h:i * q + (r + 1) * h, c * h:(c + 1) * h], cv2.NORM_L2SQR),
                        cv2.norm(wide[i][r * w:(r + 1) * w, c * w:(c + 1) * w], cv2.NORM_L2SQR))
                       for i in range(n) for r in range(k) for c in range(k)], dtype=np.float64).reshape(n, k * k, 3)
    per_pixel = energy[..., 0] / (b * b)
    ratio = per_pixel / np.maximum(energy[..., 1] / (h * h), 1e-3)
    ratio_wide = per_pixel / np.maximum(energy[..., 2] / (w * w), 1e-3)
    detail = energy[..., 0] / np.maximum(fraction * (b * b), 1.0)
    enough = fraction >= 0.5
    return tuple(np.where(enough, x, np.inf).min(axis=1).astype(np.float32) for x in (ratio, ratio_wide, detail))


_OD_TABLES: dict[int, np.ndarray] = {}


def _od_table(io: int) -> np.ndarray:
    """Optical density -ln((v + 1) / io) of each uint8 value (as torchstain's Macenko computes it)."""
    if io not in _OD_TABLES:
        _OD_TABLES[io] = -np.log((np.arange(256, dtype=np.float64) + 1) / io)
    return _OD_TABLES[io]


def macenko_stains(rgb: np.ndarray, config: QCConfig) -> np.ndarray | None:
    """Macenko stain vectors (3, 2): haematoxylin and eosin unit OD columns, or None without enough stained pixels.

    The algorithm of Macenko et al. (2009) as torchstain implements it: OD of the pixels, those with every
    channel above ``stain_beta``, projected on the plane of the two main eigenvectors; the ``stain_alpha``
    and 100 - ``stain_alpha`` percentiles of the angle give the two stains, haematoxylin the one redder in OD.
    """
    od = _od_table(config.stain_io)[np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)]
    od = od[~np.any(od < config.stain_beta, axis=1)]
    if len(od) < 100:
        return None
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = od @ vectors[:, 1:3]
    phi = np.arctan2(plane[:, 1], plane[:, 0])
    lo, hi = np.percentile(phi, config.stain_alpha), np.percentile(phi, 100 - config.stain_alpha)
    v_min = vectors[:, 1:3] @ np.array([np.cos(lo), np.sin(lo)])
    v_max = vectors[:, 1:3] @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v_min, v_max] if v_min[0] > v_max[0] else [v_max, v_min], axis=1)
    stains *= np.where(stains.sum(axis=0) < 0, -1.0, 1.0)  # an eigenvector's sign is arbitrary; OD is positive
    return stains / np.linalg.norm(stains, axis=0)


@dataclass(frozen=True)
class Artefact:
    """A kind of per-patch artefact: its flag's name, the QC table column it is judged on, when it is raised
    (from the table's scores and the config), its colour on the QC thumbnail (RGB), and a line of help."""

    name: str
    score: str
    raised: Callable[[Any, QCConfig], Any]
    color: tuple[int, int, int]
    help: str


# Every QC flag, in the order drawn on the thumbnail (the likelier cause on top: ink also looks out of focus).
# Adding a flag: an entry here (its score computed in score_batch/slide_qc, its threshold in QCConfig).
ARTEFACTS = (
    Artefact("blur", "focus", lambda t, c: ((t.focus_rel < c.min_focus_rel) & (t.focus_wide_rel < c.min_focus_wide_rel))
             | (t.focus < c.min_focus) | (t.detail < c.min_detail),
             (255, 200, 0), "out of focus: focus_rel < min_focus_rel and focus_wide_rel < min_focus_wide_rel (each against the "
             "slide's 75th percentile), or focus < min_focus or detail < min_detail"),
    Artefact("fold", "fold", lambda t, c: (t.fold > c.max_fold) & (t.density > c.min_fold_density), (220, 0, 0),
             "tissue folded on itself: fold (share of doubled stroma density) > max_fold and density > min_fold_density"),
    Artefact("bubble", "bubble", lambda t, c: t.bubble > c.max_bubble, (0, 200, 255),
             "air bubble or glare: bubble (blank share beyond the tissue polygon's) > max_bubble"),
    Artefact("pen", "pen", lambda t, c: t.pen > c.max_pen, (255, 0, 255),
             "marker ink: pen (blue, green or black ink share) > max_pen"),
)
FLAGS = tuple(a.name for a in ARTEFACTS)
FLAG_COLORS = {a.name: a.color for a in ARTEFACTS}


@dataclass(frozen=True)
class SlideQC:
    """A slide's QC: one row per patch (store order), as columns, and the per-slide summary."""

    table: dict[str, np.ndarray]  # column name -> one value per patch, in the QC table's column order
    summary: dict[str, Any]


def slide_qc(batches: Sequence[BatchScores], coords: np.ndarray, tissue_fraction: np.ndarray, config: QCConfig,
             slide_id: str) -> SlideQC:
    """Slide-level QC from the raw scores of all its patches (in store order): stain fit, scores, flags, summary.

    Plain numpy columns, no dataframe: importing pandas cost a tiling process a third of a second.
    """
    raw = BatchScores(*(np.concatenate([getattr(b, f) for b in batches]) if batches else np.zeros((0, *shape), dtype)
                        for f, shape, dtype in (("focus", (), np.float32), ("focus_wide", (), np.float32), ("detail", (), np.float32), ("blank", (), np.float32), ("pen", (3,), np.float32),
                                                ("mean_od", (3,), np.float32), ("od_hist", (len(OD_BINS) + 1,), np.float32),
                                                ("sample", (SAMPLE_GRID ** 2, 3), np.uint8))))
    if len(raw.focus) != len(coords):
        raise StoreError(f"{slide_id}: QC scored {len(raw.focus)} patches of {len(coords)}")
    stains, fit = _slide_stains(raw.sample, config)
    conc = np.linalg.lstsq(stains, raw.mean_od.T.astype(np.float64), rcond=None)[0].T if len(coords) else np.zeros((0, 2))
    table = {
        "x": coords[:, 0].astype(np.int64), "y": coords[:, 1].astype(np.int64), "focus": raw.focus,
        "focus_rel": _relative(raw.focus, 75), "focus_wide": raw.focus_wide, "focus_wide_rel": _relative(raw.focus_wide, 75),
        "detail": raw.detail,
        "pen": raw.pen.sum(axis=1), "pen_blue": raw.pen[:, 0], "pen_green": raw.pen[:, 1], "pen_black": raw.pen[:, 2],
        "fold": doubled_share(raw.od_hist, config), "density": _relative(raw.mean_od.sum(axis=1), 50),
        "bubble": np.maximum(raw.blank - (1.0 - np.asarray(tissue_fraction, np.float32)), 0.0),
        "stain_h": conc[:, 0].astype(np.float32), "stain_e": conc[:, 1].astype(np.float32),
    }
    scores = SimpleNamespace(**table)
    for artefact in ARTEFACTS:
        table[f"flag_{artefact.name}"] = np.asarray(artefact.raised(scores, config), dtype=bool)
    flags = np.stack([table[f"flag_{f}"] for f in FLAGS], axis=1)
    table["qc_pass"] = ~flags.any(axis=1)
    summary: dict[str, Any] = {"slide_id": slide_id, "patches": len(coords)}
    summary.update({f"frac_{f}": _fraction(table[f"flag_{f}"]) for f in FLAGS})
    summary["frac_fail"] = _fraction(~table["qc_pass"])
    summary.update({f"stain_{s}_{c}": round(float(stains[i, j]), 6) for j, s in enumerate("he") for i, c in enumerate("rgb")})
    summary["stain_fit"] = fit
    return SlideQC(table, summary)


def _relative(score: np.ndarray, percentile: float) -> np.ndarray:
    """``score`` over its ``percentile`` among the patches with enough tissue to be scored (finite)."""
    finite = score[np.isfinite(score)]
    reference = float(np.percentile(finite, percentile)) if len(finite) else 0.0
    return (score / reference if reference > 0 else np.full(len(score), np.inf)).astype(np.float32)


def doubled_share(od_hist: np.ndarray, config: QCConfig) -> np.ndarray:
    """Per patch, the share of its tissue pixels at ``fold_density`` times the slide's stroma density (tissue on tissue).

    The stroma density is the median over patches with tissue of each patch's 25th percentile of summed optical
    density (from the ``od_hist`` histograms): the lighter quarter of nearly every patch is its background.
    """
    if len(od_hist) == 0:
        return np.zeros(0, np.float32)
    centres = np.sqrt(OD_BINS[:-1] * OD_BINS[1:])
    centres = np.concatenate([[OD_BINS[0]], centres, [OD_BINS[-1]]])
    has_tissue = od_hist.sum(axis=1) > 0
    if not has_tissue.any():
        return np.zeros(len(od_hist), np.float32)
    quartile = np.argmax(np.cumsum(od_hist[has_tissue], axis=1) >= 0.25, axis=1)
    stroma = float(np.median(centres[quartile]))
    lo, hi = config.fold_density
    band = (centres > lo * stroma) & (centres < hi * stroma)
    return od_hist[:, band].sum(axis=1).astype(np.float32)


def _fraction(flags: Any) -> float:
    return round(float(np.mean(flags)), 6) if len(flags) else 0.0


def _slide_stains(sample: np.ndarray, config: QCConfig) -> tuple[np.ndarray, str]:
    """Macenko vectors from the sampled pixels that are neither blank nor ink; the reference vectors if too few."""
    pixels = sample.reshape(-1, 1, 3)
    if len(pixels):
        pixels = pixels[np.max(np.stack(pixel_classes(pixels, config)), axis=0).ravel() == 0]
    stains = macenko_stains(pixels, config) if len(pixels) else None
    return (stains, "macenko") if stains is not None else (REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=0), "reference")


def _metadata(store: Any, config: QCConfig) -> dict[str, Any]:
    return {"store_key": store_fingerprint(store), "config": json.loads(json.dumps(asdict(config)))}


def read_qc(path: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
    """A QC table and its provenance (``store_key``, ``config``)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"pathomics_qc", b"{}"))
    return table.to_pandas(), meta


def is_current(out_dir: str | os.PathLike, store: Any, config: QCConfig) -> bool:
    """Whether the slide's QC table was computed from this very store with this configuration."""
    path = OutputLayout(out_dir).qc_table(store.slide_id)
    try:
        return path.exists() and read_qc(path)[1] == _metadata(store, config)
    except (OSError, ValueError):
        return False


def update_slide_qc(out_dir: str | os.PathLike, store: PatchStore, config: QCConfig | None,
                    batches: Sequence[BatchScores] = (), batch_size: int = 256,
                    thumbnail: np.ndarray | None = None) -> SlideQC | None:
    """Write a slide's QC outputs unless they are current: the table, its summary row and store attribute, the thumbnail.

    ``batches`` score the store's last patches (those this run decoded); earlier ones (a resumed store) and
    all of a skipped store are read back from the store. Nothing for a coords-only store or ``config`` None.
    """
    if config is None or not store.has_pixels or (not batches and is_current(out_dir, store, config)):
        return None
    scored = sum(len(b.focus) for b in batches)
    head = [score_batch(store.read_images(i, min(i + batch_size, len(store) - scored)), config)
            for i in range(0, len(store) - scored, batch_size)]
    result = slide_qc([*head, *batches], store.coords, store.tissue_fraction, config, store.slide_id)
    write_qc(out_dir, store, result, config, thumbnail)
    return result


def write_qc(out_dir: str | os.PathLike, store: Any, result: SlideQC, config: QCConfig,
             thumbnail: np.ndarray | None = None) -> None:
    """The table (atomically, with its provenance), the store's ``qc`` attribute, the summary row and the thumbnail
    (drawn over ``thumbnail``, the tiling thumbnail in BGR, when the caller has it: not read back from its PNG)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathomics.io import atomic_path
    from pathomics.store import update_store_attrs

    table = pa.Table.from_arrays([arrow_column(v) for v in result.table.values()], names=list(result.table))
    table = table.replace_schema_metadata({b"pathomics_qc": json.dumps(_metadata(store, config)).encode()})
    with atomic_path(OutputLayout(out_dir).qc_table(store.slide_id)) as tmp:
        pq.write_table(table, tmp)
    update_store_attrs(store.path, qc={**result.summary, "config": asdict(config)})
    update_summary(out_dir, result.summary, config)
    write_thumbnail(out_dir, store, result.table, thumbnail)


def arrow_column(values: np.ndarray) -> Any:
    """A numpy column as a pyarrow array, built from its buffer: ``pa.array`` would import pandas (a third of a second)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    data = np.packbits(values, bitorder="little") if values.dtype == bool else values  # arrow packs booleans in bits
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(data)])


def update_summary(out_dir: str | os.PathLike, row: dict[str, Any], config: QCConfig) -> None:
    """Merge a slide's row into ``<out>/qc_summary.csv`` and re-test every slide's stain against the batch (under a lock).

    Other slides' rows are kept as written (text); columns are the union of the old and new rows', in order. The
    table this process wrote last, unchanged since, is not read again: at 5,000 slides a row cost 55-66 ms to read
    and rewrite the table from dictionaries, and 8 ms from its cells kept as text (``StainTable``).
    """
    from pathomics.locks import exclusive_lock

    layout = OutputLayout(out_dir)
    path = layout.qc_summary
    with exclusive_lock(layout.lock("qc_summary"), wait=True):
        table = _summaries.take(path)
        if table is None or not table.put(row):
            table = StainTable.read(path, row)
        table.write(path, config)
        _summaries.wrote(path, table)


DERIVED_COLUMNS = ("stain_angle", "stain_outlier")  # qc_summary.csv's columns computed from the whole batch


@dataclass
class StainTable:
    """qc_summary.csv as text: each slide's cells but the derived ones, CSV-encoded, and its stain vectors."""

    columns: list[str]
    cells: dict[str, str]
    vectors: dict[str, tuple[float, ...]]

    @classmethod
    def read(cls, path: Path, row: dict[str, Any]) -> StainTable:
        """The table in ``path`` (if any) with ``row`` put in last, replacing the slide's earlier row."""
        import csv

        rows: list[dict[str, Any]] = []
        if path.exists():
            with path.open(newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r["slide_id"] != str(row["slide_id"])]
        rows.append(row)
        table = cls([*dict.fromkeys(k for r in rows for k in r if k not in DERIVED_COLUMNS)], {}, {})
        for r in rows:
            table.put(r)
        return table

    def put(self, row: dict[str, Any]) -> bool:
        """Put ``row`` in last (replacing the slide's row); False, changing nothing, if it has a column the table lacks."""
        if any(k not in self.columns and k not in DERIVED_COLUMNS for k in row):
            return False
        slide_id = str(row["slide_id"])
        self.cells.pop(slide_id, None)
        self.vectors.pop(slide_id, None)
        self.cells[slide_id] = _csv_line([row.get(c, "") for c in self.columns])
        self.vectors[slide_id] = tuple(float(row[f"stain_{s}_{c}"]) for s in "he" for c in "rgb")
        return True

    def write(self, path: Path, config: QCConfig) -> None:
        """Write the table atomically, each slide's stain re-tested against all the others'."""
        from pathomics.io import atomic_path

        angle, outlier = stain_outliers(np.array(list(self.vectors.values())), config)
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            fh.write(_csv_line([*self.columns, *DERIVED_COLUMNS]) + "\r\n")
            fh.writelines(f"{cells},{float(a)},{bool(o)}\r\n" for cells, a, o in zip(self.cells.values(), angle.round(3), outlier))


_summaries: WrittenFiles[StainTable] = WrittenFiles()  # QC summaries as this process left them


def _csv_line(values: Sequence[Any]) -> str:
    """``values`` as one CSV record, quoted as ``csv.writer`` quotes them, without its line end."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer).writerow(values)
    return buffer.getvalue().removesuffix("\r\n")


def stain_outliers(vectors: np.ndarray, config: QCConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per slide (rows: H rgb then E rgb), the angle in degrees of its farther stain vector from the batch's median,
    and whether that makes it an outlier (see QCConfig); nobody is an outlier in a batch under ``stain_min_slides``."""
    if len(vectors) == 0:
        return np.zeros(0), np.zeros(0, dtype=bool)
    angles = []
    for part in (vectors[:, :3], vectors[:, 3:]):
        unit = part / np.linalg.norm(part, axis=1, keepdims=True)
        median = np.median(unit, axis=0)
        angles.append(np.degrees(np.arccos(np.clip(unit @ (median / np.linalg.norm(median)), -1.0, 1.0))))
    angle = np.maximum(*angles)
    spread = config.stain_outlier_mads * 1.4826 * np.median(np.abs(angle - np.median(angle)))
    outlier = (angle > max(config.stain_outlier_degrees, spread)) & (len(vectors) >= config.stain_min_slides)
    return angle, outlier


def write_thumbnail(out_dir: str | os.PathLike, store: Any, table: dict[str, np.ndarray],
                    background: np.ndarray | None = None) -> Path | None:
    """``<out>/qc/<slide_id>.qc.png``: the tiling thumbnail (``background``, else read from its PNG) with each flagged
    patch filled in its flag's colour."""
    import cv2

    from pathomics.io import write_png

    path = OutputLayout(out_dir).thumbnail(store.slide_id)
    image = background if background is not None else cv2.imread(str(path)) if path.exists() else None
    if image is None:
        return None
    scale = 1.0 / float(store.attrs.get("thumbnail_downsample") or 1.0)
    size = max(1, round(int(store.attrs["patch_size_level0"]) * scale))
    overlay = image.copy()
    for artefact in ARTEFACTS:
        rgb = artefact.color
        flagged = table[f"flag_{artefact.name}"]
        for x, y in zip(table["x"][flagged], table["y"][flagged]):
            x0, y0 = round(x * scale), round(y * scale)
            cv2.rectangle(overlay, (x0, y0), (x0 + size - 1, y0 + size - 1), rgb[::-1], -1)
    return write_png(OutputLayout(out_dir).qc_thumbnail(store.slide_id), cv2.addWeighted(overlay, 0.6, image, 0.4, 0))



def check_flags(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, refusing any that is not a QC flag."""
    unknown = sorted(set(names) - set(FLAGS))
    if unknown:
        raise ConfigError(f"unknown QC flag(s) {', '.join(unknown)}; choose from {', '.join(FLAGS)}")
    return tuple(names)


def keep_mask(store: Any, exclude: Sequence[str]) -> np.ndarray:
    """Which patches of ``store`` (in order) raise none of the ``exclude`` flags, from its current QC table
    (in the output directory the store was tiled into: ``<out>/tiles/<slide_id>.zarr`` -> ``<out>/qc/``)."""
    exclude = check_flags(exclude)
    path = OutputLayout(Path(store.path).parent.parent).qc_table(store.slide_id)
    if not path.exists():
        raise StoreError(f"{path}: no QC table for {store.slide_id}; re-run `pathomics tile` with pixels (not --no-pixels) "
                         "to write it, or drop --qc-exclude")
    table, meta = read_qc(path)
    if meta.get("store_key") != store_fingerprint(store) or len(table) != len(store):
        raise StoreError(f"{path}: QC table is older than the patch store {store.path}; re-run `pathomics tile` to refresh it")
    return ~table[[f"flag_{f}" for f in exclude]].any(axis=1).to_numpy() if exclude else np.ones(len(store), dtype=bool)
