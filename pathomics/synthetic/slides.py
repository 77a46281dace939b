"""Synthetic whole-slide images with known tissue geometry, written as real pyramidal JPEG TIFFs.

Slides are generated tile by tile (memory stays bounded whatever their size) and saved either
Aperio-SVS-flavoured (ImageDescription with ``MPP = ...``, so OpenSlide reports vendor ``aperio``) or
as generic tiled TIFF with resolution tags (or none, for a slide without MPP). Every pyramid level is
the area-downsampled level 0, as a scanner writes it. Tissue is a union of ellipses (holes allowed)
filled with an H&E-like texture: pink stroma with purple nucleus-like blobs. Optional lesion regions
(also ellipses) carry nuclei that are denser, larger, darker and more irregular in proportion to their
``atypia`` (0 looks like the background tissue, 1 is high grade): the planted pathology signal of the
demo cohort.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from shapely.geometry import MultiPolygon, Polygon

from pathomics.errors import ConfigError
from pathomics.layout import CohortFiles

GLASS = (242, 242, 240)
STROMA = (232, 160, 196)
NUCLEUS = (86, 42, 128)
ATLAS = 1024  # period of the tissue texture, level-0 pixels


@dataclass(frozen=True)
class Ellipse:
    """An ellipse of tissue (or a hole, when ``hole``), in level-0 pixels; ``angle`` in degrees."""

    cx: float
    cy: float
    rx: float
    ry: float
    angle: float = 0.0
    hole: bool = False

    def inside(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        t = math.radians(self.angle)
        dx, dy = xs - self.cx, ys - self.cy
        u = (dx * math.cos(t) + dy * math.sin(t)) / self.rx
        v = (-dx * math.sin(t) + dy * math.cos(t)) / self.ry
        return u * u + v * v <= 1.0

    def polygon(self, vertices: int = 512) -> Polygon:
        a = np.linspace(0, 2 * math.pi, vertices, endpoint=False)
        t = math.radians(self.angle)
        x, y = self.rx * np.cos(a), self.ry * np.sin(a)
        return Polygon(np.c_[self.cx + x * math.cos(t) - y * math.sin(t), self.cy + x * math.sin(t) + y * math.cos(t)])

    def bounds(self) -> tuple[float, float, float, float]:
        r = max(self.rx, self.ry)
        return self.cx - r, self.cy - r, self.cx + r, self.cy + r


@dataclass(frozen=True)
class SlideTruth:
    """What a synthetic slide really contains."""

    path: Path
    width: int
    height: int
    mpp: float | None
    shapes: tuple[Ellipse, ...]
    regions: tuple[Ellipse, ...] = ()

    def tissue(self) -> MultiPolygon:
        """The true tissue as polygons in level-0 pixels."""
        geom = MultiPolygon()
        for shape in self.shapes:
            geom = geom.difference(shape.polygon()) if shape.hole else geom.union(shape.polygon())
        return as_multipolygon(geom)

    def lesions(self) -> MultiPolygon:
        """The planted lesion tissue (``regions`` within the tissue) as polygons in level-0 pixels."""
        regions = MultiPolygon([r.polygon() for r in self.regions]) if self.regions else MultiPolygon()
        return as_multipolygon(regions.buffer(0).intersection(self.tissue()))

    def mask(self, x0: int, y0: int, width: int, height: int, step: float = 1.0,
             shapes: tuple[Ellipse, ...] | None = None) -> np.ndarray:
        """True inside ``shapes`` (default: the tissue) at the centres of a ``step``-spaced grid from level-0 (x0, y0)."""
        ys = (y0 + (np.arange(height) + 0.5) * step)[:, None]
        xs = (x0 + (np.arange(width) + 0.5) * step)[None, :]
        inside = np.zeros((height, width), dtype=bool)
        for shape in self.shapes if shapes is None else shapes:
            if boxes_overlap(shape.bounds(), (x0, y0, x0 + width * step, y0 + height * step)):
                hit = shape.inside(xs, ys)
                inside = inside & ~hit if shape.hole else inside | hit
        return inside


LAYOUTS = ("blob", "pieces", "ring", "none")


def tissue_layout(layout: str, width: int, height: int) -> tuple[Ellipse, ...]:
    """Named tissue geometries, scaled to the slide: one blob, several pieces, a ring with a lumen, none."""
    w, h = width, height
    if layout == "blob":
        return (Ellipse(0.5 * w, 0.5 * h, 0.33 * w, 0.3 * h, 20),)
    if layout == "pieces":
        return (Ellipse(0.25 * w, 0.35 * h, 0.18 * w, 0.22 * h, -30), Ellipse(0.68 * w, 0.55 * h, 0.2 * w, 0.14 * h, 10),
                Ellipse(0.35 * w, 0.8 * h, 0.1 * w, 0.08 * h))
    if layout == "ring":
        return (Ellipse(0.5 * w, 0.5 * h, 0.4 * w, 0.4 * h), Ellipse(0.5 * w, 0.5 * h, 0.18 * w, 0.2 * h, hole=True))
    if layout == "none":
        return ()
    raise ConfigError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")


def write_slide(path: str | os.PathLike, width: int, height: int, mpp: float | None = 0.25, flavour: str = "aperio",
                layout: str = "blob", seed: int = 0, tile: int = 256, quality: int = 90,
                level_factor: int = 4, min_level_size: int = 512, shapes: tuple[Ellipse, ...] | None = None,
                regions: tuple[Ellipse, ...] = (), atypia: float = 1.0, paint: Painter | None = None,
                rgb_jpeg: bool = False, compression: str = "jpeg") -> SlideTruth:
    """Write a pyramidal, tiled, JPEG-compressed TIFF slide and return its truth.

    ``flavour`` "aperio" writes an SVS-style description (needs ``mpp``); "generic" writes TIFF
    resolution tags in centimetres, or none when ``mpp`` is None. ``shapes`` replaces the named
    ``layout``; ``regions`` are painted with nuclei of the given ``atypia`` (0 to 1, see ``Nuclei.atypical``).
    ``paint`` alters each rendered level-0 block of tissue (planted artefacts, see ``synthetic.artefacts``).
    ``rgb_jpeg`` stores tiles the way Aperio scanners do: RGB samples without a colour transform or any
    marker saying so, as abbreviated streams sharing the page's JPEGTables (default: tifffile's YCbCr JPEG).
    ``compression`` other than "jpeg" (e.g. "lzw", "none") writes lossless tiles instead.
    """
    import tifffile

    if flavour not in ("aperio", "generic"):
        raise ConfigError(f"unknown flavour {flavour!r}; choose aperio or generic")
    if flavour == "aperio" and mpp is None:
        raise ConfigError("an Aperio-flavoured slide needs an mpp")
    path = Path(path)
    truth = SlideTruth(path, width, height, mpp, shapes if shapes is not None else tissue_layout(layout, width, height), regions)
    if not 0 <= atypia <= 1:
        raise ConfigError(f"atypia must be in [0, 1], got {atypia}")
    atlas = (_texture_atlas(seed, LOW_GRADE), _texture_atlas(seed + 1, LOW_GRADE.atypical(atypia)))
    downsamples = [1]
    while max(width, height) // (downsamples[-1] * level_factor) >= min_level_size:
        downsamples.append(downsamples[-1] * level_factor)
    options = dict(tile=(tile, tile), compression=compression, photometric="rgb", metadata=None,
                   compressionargs={"level": quality} if compression == "jpeg" else {})
    with tifffile.TiffWriter(path, bigtiff=width * height > 2**31) as writer:
        for i, ds in enumerate(downsamples):
            lw, lh = -(-width // ds), -(-height // ds)
            extra: dict[str, object] = {"subfiletype": 1} if i else {}
            if i == 0 and flavour == "aperio":
                extra["description"] = (f"Aperio Image Library v12.0.15\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
                                        f"JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp}")
            if flavour == "generic" and mpp is not None:
                extra.update(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            tiles = _level_tiles(truth, atlas, ds, lw, lh, tile, paint)
            if rgb_jpeg:
                tables, tiles = _aperio_jpeg(tiles, quality)
                extra.update(jpegtables=tables, compressionargs={"outcolorspace": "RGB"})
            writer.write(tiles, shape=(lh, lw, 3), dtype=np.uint8, **{**options, **extra})
    return truth


def _aperio_jpeg(tiles: Iterator[np.ndarray], quality: int) -> tuple[bytes, Iterator[bytes]]:
    """Encode tiles as Aperio does (RGB, 4:4:4, no JFIF/Adobe marker, component ids 1-3): (JPEGTables, abbreviated tiles)."""
    import imagecodecs

    from pathomics.slide.jpeg import split_tables

    def encode(tile: np.ndarray) -> bytes:
        return _plain_component_ids(imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB",
                                                             subsampling="444", optimize=False))

    first = encode(next(tiles))
    return split_tables(first)[0], (split_tables(stream)[1] for stream in itertools.chain([first], map(encode, tiles)))


def _plain_component_ids(stream: bytes) -> bytes:
    """The stream with component ids 1, 2, 3 in its frame and scan headers (ids a marker-less decoder takes for YCbCr)."""
    out, i = bytearray(stream), 2
    while True:
        marker, length = out[i + 1], int.from_bytes(out[i + 2:i + 4], "big")
        if marker == 0xC0:  # SOF0: length, precision, height, width, count, then (id, sampling, table) per component
            for c in range(out[i + 9]):
                out[i + 10 + 3 * c] = c + 1
        elif marker == 0xDA:  # SOS: length, count, then (id, tables) per component
            for c in range(out[i + 4]):
                out[i + 5 + 2 * c] = c + 1
            return bytes(out)
        i += 2 + length


# paint(block, x0, y0, render) -> block: alters the level-0 block at (x0, y0); render(x, y, size) renders any other block
Painter = Callable[[np.ndarray, int, int, Callable[[int, int, int], np.ndarray]], np.ndarray]


def _level_tiles(truth: SlideTruth, atlas: tuple[np.ndarray, np.ndarray], ds: int, lw: int, lh: int, tile: int,
                 paint: Painter | None = None) -> Iterator[np.ndarray]:
    """Tiles of one pyramid level in row-major order, each the area-downsampled level-0 block."""
    import cv2

    glass = np.empty((tile, tile, 3), dtype=np.uint8)
    glass[:] = GLASS
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            x0, y0, size = tx * ds, ty * ds, tile * ds
            if not any(boxes_overlap(s.bounds(), (x0, y0, x0 + size, y0 + size)) for s in truth.shapes if not s.hole):
                yield glass
                continue
            block = _render(truth, atlas, x0, y0, size)
            if paint is not None:
                block = paint(block, x0, y0, lambda x, y, s: _render(truth, atlas, x, y, s))
            yield block if ds == 1 else cv2.resize(block, (tile, tile), interpolation=cv2.INTER_AREA)


def _render(truth: SlideTruth, atlas: tuple[np.ndarray, np.ndarray], x0: int, y0: int, size: int) -> np.ndarray:
    """Level-0 pixels of the square block at (x0, y0): texture where there is tissue, glass elsewhere."""
    ys = (y0 + np.arange(size)) % ATLAS
    xs = (x0 + np.arange(size)) % ATLAS
    texture = atlas[0][ys[:, None], xs[None, :]]
    if truth.regions and any(boxes_overlap(r.bounds(), (x0, y0, x0 + size, y0 + size)) for r in truth.regions):
        lesion = truth.mask(x0, y0, size, size, shapes=truth.regions)
        texture = np.where(lesion[..., None], atlas[1][ys[:, None], xs[None, :]], texture)
    mask = truth.mask(x0, y0, size, size)
    return np.where(mask[..., None], texture, np.asarray(GLASS, dtype=np.uint8))


@dataclass(frozen=True)
class Nuclei:
    """How nuclei look in a texture: count per 1024² px, radius range (px at 0.25 µm/px), colour, irregularity."""

    per_atlas: int
    radius: tuple[int, int]
    color: tuple[int, int, int]
    elongation: float

    def atypical(self, atypia: float) -> Nuclei:
        """These nuclei moved ``atypia`` of the way (0 to 1) towards ``HIGH_GRADE``."""
        def towards(a: float, b: float) -> float:
            return a + atypia * (b - a)

        return Nuclei(round(towards(self.per_atlas, HIGH_GRADE.per_atlas)),
                      (round(towards(self.radius[0], HIGH_GRADE.radius[0])), round(towards(self.radius[1], HIGH_GRADE.radius[1]))),
                      tuple(round(towards(a, b)) for a, b in zip(self.color, HIGH_GRADE.color)),
                      towards(self.elongation, HIGH_GRADE.elongation))


LOW_GRADE = Nuclei(350, (8, 17), NUCLEUS, 0.1)
HIGH_GRADE = Nuclei(1100, (12, 24), (60, 24, 100), 0.6)


def _texture_atlas(seed: int, nuclei: Nuclei = LOW_GRADE) -> np.ndarray:
    """A periodic H&E-like texture: noisy pink stroma with purple nucleus-like blobs."""
    import cv2

    rng = np.random.default_rng(seed)
    atlas = np.empty((ATLAS, ATLAS, 3), dtype=np.float32)
    atlas[:] = STROMA
    atlas += rng.normal(0, 5, size=(ATLAS, ATLAS, 1))
    for _ in range(nuclei.per_atlas):
        x, y = rng.integers(0, ATLAS, size=2)
        r = int(rng.integers(*nuclei.radius))
        axes = (r, max(3, int(r * (1 - nuclei.elongation * rng.random()))))
        angle = float(rng.uniform(0, 180))
        color = np.asarray(nuclei.color) + rng.normal(0, 12, size=3)
        for dx in (-ATLAS, 0, ATLAS):  # draw wrapped copies so the texture tiles seamlessly
            for dy in (-ATLAS, 0, ATLAS):
                cv2.ellipse(atlas, (int(x + dx), int(y + dy)), axes, angle, 0, 360, color.tolist(), -1)
    pad = 8  # blur a wrapped copy so the seams stay invisible
    atlas = cv2.GaussianBlur(np.pad(atlas, ((pad, pad), (pad, pad), (0, 0)), mode="wrap"), (0, 0), 1.5)[pad:-pad, pad:-pad]
    return atlas.clip(0, 255).astype(np.uint8)


def as_multipolygon(geom) -> MultiPolygon:
    if isinstance(geom, MultiPolygon):
        return geom
    if isinstance(geom, Polygon):
        return MultiPolygon([geom] if not geom.is_empty else [])
    return MultiPolygon([g for g in getattr(geom, "geoms", []) if isinstance(g, Polygon)])


def boxes_overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def write_cohort(out_dir: str | os.PathLike, n_patients: int = 80, seed: int = 0, slide_size: tuple[int, int] = (4096, 3072),
                 mpp: float = 0.5, max_slides: int = 2) -> CohortFiles:
    """A cohort with a planted pathology signal: slides, manifest, clinical and radiology tables, and the truth.

    Each patient's pathology component (from ``simulate_cohort_tables``, which also plants the clinical
    and radiology effects on a Weibull–Cox recurrence time) sets the atypia of the lesions on their slides
    (its normal CDF, jittered per slide), as tumour grade is read from the tumour: low for the lowest,
    high grade for the highest. How much of the tissue is lesion (10–35%) is drawn independently of the
    grade, so a model must look at the lesions rather than count them. Slides are Aperio-flavoured SVS files.
    """
    import json

    from scipy.stats import norm

    from pathomics.synthetic.cohort import simulate_cohort_tables

    files = CohortFiles(Path(out_dir))
    files.slide("").parent.mkdir(parents=True, exist_ok=True)
    clinical, radiology, signatures, truth = simulate_cohort_tables(n_patients, seed, max_slides=max_slides)
    rng = np.random.default_rng(seed + 1)
    records, slides_truth = [], {}
    for slide_id, patient_id in signatures[["slide_id", "patient_id"]].itertuples(index=False):
        grade = float(truth.components.loc[patient_id, "pathology"])
        atypia = float(norm.cdf(grade + 0.2 * rng.standard_normal()))
        fraction = float(rng.uniform(0.10, 0.35))
        tissue, regions = _planted_layout(slide_size, fraction, rng)
        path, texture_seed = files.slide(slide_id), int(rng.integers(1 << 30))  # drawn even when kept
        if not path.exists():
            tmp = path.with_name(f".{path.name}.partial")
            write_slide(tmp, *slide_size, mpp=mpp, shapes=(tissue,), regions=regions, atypia=atypia, seed=texture_seed)
            os.replace(tmp, path)
        records.append({"slide_path": str(path.relative_to(files.root)), "slide_id": slide_id, "patient_id": patient_id})
        slides_truth[slide_id] = {"patient_id": patient_id, "latent_grade": grade, "atypia": atypia,
                                  "lesion_fraction": fraction, "regions": [vars(r) for r in regions], "tissue": vars(tissue)}
    import pandas as pd

    pd.DataFrame(records).to_csv(files.manifest, index=False)
    clinical.to_csv(files.clinical, index=False)
    radiology.to_csv(files.radiology, index=False)
    files.truth.write_text(json.dumps({
        "strengths": truth.strengths, "weibull_shape": truth.weibull_shape, "weibull_scale": truth.weibull_scale,
        "patients": truth.components.reset_index().to_dict("records"), "slides": slides_truth,
        "slide_size": list(slide_size), "mpp": mpp, "seed": seed,
    }, indent=1))
    return files


def read_cohort_truth(path: str | os.PathLike) -> dict[str, SlideTruth]:
    """The per-slide truth saved by ``write_cohort``, keyed by slide_id (paths relative to the cohort folder)."""
    import json

    data = json.loads(Path(path).read_text())
    width, height = data["slide_size"]
    files = CohortFiles(Path(path).parent)
    return {sid: SlideTruth(files.slide(sid), width, height, data["mpp"],
                            (Ellipse(**s["tissue"]),), tuple(Ellipse(**r) for r in s["regions"]))
            for sid, s in data["slides"].items()}


def _planted_layout(size: tuple[int, int], fraction: float, rng: np.random.Generator) -> tuple[Ellipse, tuple[Ellipse, ...]]:
    """A tissue ellipse and 1-3 lesion ellipses inside it covering about ``fraction`` of its area."""
    w, h = size
    tissue = Ellipse(w * rng.uniform(0.45, 0.55), h * rng.uniform(0.45, 0.55), w * rng.uniform(0.34, 0.42),
                     h * rng.uniform(0.34, 0.42), float(rng.uniform(-20, 20)))
    count = int(rng.integers(1, 4))
    area = fraction * tissue.rx * tissue.ry / count  # per region, in units of pi
    regions = []
    for _ in range(count):
        aspect = rng.uniform(0.7, 1.4)
        rx, ry = (area * aspect) ** 0.5, (area / aspect) ** 0.5
        t, r = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.45)
        cx = tissue.cx + r * (tissue.rx - rx) * math.cos(t)
        cy = tissue.cy + r * (tissue.ry - ry) * math.sin(t)
        regions.append(Ellipse(cx, cy, rx, ry, float(rng.uniform(0, 180))))
    return tissue, tuple(regions)
