"""Maps as files: Cloud-Optimised GeoTIFFs for GIS tools, PNGs for people.

cog_bytes        a (bands, H, W) or (H, W) array on a grid -> COG bytes (tags, palette)
similarity_png   a similarity raster in a colour ramp, the query marked, with its scale
class_png        a class map in its palette beside a legend (and each class's accuracy)
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# A perceptual ramp (dark violet -> blue -> green -> yellow), interpolated between anchors.
RAMP = np.array(
    [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64
)
# Distinct colours for classes (the first ten of a common qualitative palette).
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip
CLASS_NODATA = 255
FILL_RGB = (205, 205, 205)
HATCH_RGB = (170, 170, 170)
QUERY_RGB = (230, 20, 20)


def class_colour(i: int) -> tuple[int, int, int]:
    """Class ``i``'s colour: the palette, then seeded colours past its end."""
    if i < len(PALETTE):
        return PALETTE[i]
    rng = np.random.default_rng(i)
    r, g, b = (int(v) for v in rng.integers(40, 230, size=3))
    return (r, g, b)


def cog_bytes(
    values: np.ndarray,
    crs: Any,
    transform: Any,
    *,
    nodata: float | None,
    tags: Mapping[str, Any] | None = None,
    descriptions: Sequence[str] | None = None,
    colormap: Mapping[int, tuple[int, int, int]] | None = None,
) -> bytes:
    """A Cloud-Optimised GeoTIFF (deflate, tiled, overviews when large) of ``values``."""
    from rasterio.io import MemoryFile

    arr = values[None] if values.ndim == 2 else values
    count, height, width = arr.shape
    with MemoryFile() as mem:
        with mem.open(
            driver="COG",
            width=width,
            height=height,
            count=count,
            dtype=arr.dtype,
            crs=crs,
            transform=transform,
            nodata=nodata,
            compress="deflate",
        ) as dst:
            dst.write(arr)
            if tags:
                dst.update_tags(**{k: str(v) for k, v in tags.items()})
            for i, text in enumerate(descriptions or (), start=1):
                dst.set_band_description(i, text)
            if colormap:
                dst.write_colormap(1, {k: (*v, 255) for k, v in colormap.items()})
        return bytes(mem.read())


def _panel(rgb: np.ndarray, valid: np.ndarray, size: int) -> Any:
    """An RGB panel whose longer side is ``size`` px (nearest: one block per cell), hatched
    grey where not ``valid``."""
    from PIL import Image

    h, w = valid.shape
    scale = max(1, size // max(h, w))
    big = np.repeat(np.repeat(rgb, scale, axis=0), scale, axis=1)
    mask = np.repeat(np.repeat(valid, scale, axis=0), scale, axis=1)
    yy, xx = np.mgrid[0 : big.shape[0], 0 : big.shape[1]]
    hatch = np.where(((yy + xx) % 10 < 2)[..., None], HATCH_RGB, FILL_RGB).astype(np.uint8)
    big = np.where(mask[..., None], big, hatch).astype(np.uint8)
    return Image.fromarray(big), scale


def ramp(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 colours of :data:`RAMP`."""
    t = np.clip(np.nan_to_num(values), 0, 1) * (len(RAMP) - 1)
    i = np.minimum(t.astype(int), len(RAMP) - 2)
    f = (t - i)[..., None]
    return (RAMP[i] * (1 - f) + RAMP[i + 1] * f).round().astype(np.uint8)


def similarity_png(
    similarity: np.ndarray,
    query_cells: np.ndarray,
    *,
    lo: float,
    hi: float = 1.0,
    title: str = "",
    size: int = 480,
) -> bytes:
    """The similarity raster in :data:`RAMP` from ``lo`` to ``hi``, the query's cells
    outlined in red, a scale bar and ``title`` below; no data hatched grey."""
    from PIL import Image, ImageDraw

    valid = np.isfinite(similarity)
    rgb = ramp((similarity - lo) / max(hi - lo, 1e-9))
    img, scale = _panel(rgb, valid, size)
    draw = ImageDraw.Draw(img)
    for r, c in zip(*np.nonzero(query_cells), strict=True):
        x0, y0 = int(c) * scale, int(r) * scale
        draw.rectangle((x0, y0, x0 + scale - 1, y0 + scale - 1), outline=QUERY_RGB, width=2)
    bar_h, caption = 14, 44
    canvas = Image.new("RGB", (max(img.width, 360), img.height + bar_h + caption), "white")
    canvas.paste(img, (0, 0))
    bar = ramp(np.linspace(0, 1, 256))[None].repeat(bar_h, axis=0)
    canvas.paste(Image.fromarray(bar).resize((256, bar_h)), (4, img.height + 4))
    d = ImageDraw.Draw(canvas)
    d.text((264, img.height + 4), f"{lo:.2f} .. {hi:.2f} cosine", fill=(0, 0, 0))
    d.text((4, img.height + bar_h + 8), title, fill=(0, 0, 0))
    d.text(
        (4, img.height + bar_h + 24),
        "red: the query's cells; hatched grey: no data",
        fill=(0, 0, 0),
    )
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def class_png(
    classes: np.ndarray,
    names: Sequence[str],
    *,
    notes: Sequence[str] = (),
    title: str = "",
    size: int = 480,
) -> bytes:
    """The class map (indices into ``names``, :data:`CLASS_NODATA` where none) in its
    palette, a legend beside it (each name with ``notes[i]``) and ``title`` below."""
    from PIL import Image, ImageDraw

    valid = classes != CLASS_NODATA
    lut = np.array([class_colour(i) for i in range(len(names))] + [FILL_RGB], dtype=np.uint8)
    rgb = lut[np.where(valid, classes, len(names)).astype(int)]
    img, _ = _panel(rgb, valid, size)
    line = 18
    legend_w = 260
    height = max(img.height, line * (len(names) + 1)) + 26
    canvas = Image.new("RGB", (img.width + legend_w, height), "white")
    canvas.paste(img, (0, 0))
    d = ImageDraw.Draw(canvas)
    x = img.width + 10
    d.text((x, 4), "classes", fill=(0, 0, 0))
    for i, name in enumerate(names):
        y = 4 + line * (i + 1)
        d.rectangle((x, y, x + 12, y + 12), fill=class_colour(i), outline=(0, 0, 0))
        note = f"  {notes[i]}" if i < len(notes) and notes[i] else ""
        d.text((x + 18, y), f"{name}{note}", fill=(0, 0, 0))
    d.text((4, height - 20), title, fill=(0, 0, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
