"""Per-window compositing, shared by every provider that composites on our side.

Steps for each frame window:

1. scene-level filter: a scene passes when its cloudy percentage is
   ``<= cloudy_pct`` (inclusive, as Earth Engine's ``CLOUDY_PIXEL_PERCENTAGE``
   filter); a scene with no cloudy percentage passes;
2. per-pixel mask, one for all bands: a pixel is used only where every band
   has data (no band is 0, the no-data value; Earth Engine masks each band by
   its own footprint, and a pixel one band lacks is not an observation) and
   SCL is not 0; with ``CloudMask(mode="scl")`` the listed SCL classes are
   masked too;
3. per-pixel composite over the clear observations: ``median`` (even counts:
   mean of the two middle values, rounded half up, as the Earth Engine
   provider rounds its median) or ``mosaic`` (the most recent clear
   observation);
4. ``fill_value`` where a pixel has no clear observation, rounded to a DN by
   :func:`fill_dn` (shared with the Earth Engine provider).

A window with no clear observation at all is back-filled with the contract's
rule: the whole-range composite (every scene of the range), and only if that
is unavailable the nearest non-empty window (the earlier one on ties). Every
frame gets a :class:`FrameRecord` saying what happened.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agrifm_pipeline.errors import ProviderError
from agrifm_pipeline.frames import FrameWindow
from agrifm_pipeline.providers.base import CloudMask, FrameRecord
from agrifm_pipeline.specs import SensorSpec

#: What a scene loader returns: reflectance (C, H, W) uint16 and SCL (H, W) uint8 or None.
SceneArrays = tuple[np.ndarray, np.ndarray | None]


@dataclass
class Scene:
    """One acquisition on the target grid, loaded on demand."""

    id: str
    date: dt.date
    cloudy_pct: float | None
    load: Callable[[], SceneArrays]


def loaded(data: np.ndarray, scl: np.ndarray | None) -> Callable[[], SceneArrays]:
    """A loader for arrays already in memory."""

    def load() -> SceneArrays:
        return data, scl

    return load


def passes_scene_filter(scene: Scene, cloudy_pct: float) -> bool:
    return scene.cloudy_pct is None or scene.cloudy_pct <= cloudy_pct


def fill_dn(fill_value: float) -> int:
    """The DN written where nothing is clear: ``fill_value`` rounded half to even, within uint16."""
    return int(np.clip(round(fill_value), 0, 65535))


def clear_mask(data: np.ndarray, scl: np.ndarray | None, cloud_mask: CloudMask) -> np.ndarray:
    """(H, W) bool: True where the observation may be used (every band has data)."""
    ok = np.all(data != 0, axis=0)  # 0 is no data in any band
    if scl is not None:
        ok &= scl != 0
        if cloud_mask.mode == "scl":
            ok &= ~np.isin(scl, cloud_mask.scl_classes)
    return ok


SORTING_NETWORK_MAX = 16


def _sort_planes(planes: np.ndarray) -> np.ndarray:
    """Sort (n, H, W) along n, in place.

    For the few observations a window usually has, an odd-even transposition
    network of whole-plane min/max is several times faster than a per-pixel
    sort; past ``SORTING_NETWORK_MAX`` observations numpy's sort wins.
    """
    n = planes.shape[0]
    if n > SORTING_NETWORK_MAX:
        planes.sort(axis=0)
        return planes
    tmp = np.empty_like(planes[0])
    for p in range(n):
        for i in range(p % 2, n - 1, 2):
            np.minimum(planes[i], planes[i + 1], out=tmp)
            np.maximum(planes[i], planes[i + 1], out=planes[i + 1])
            planes[i] = tmp
    return planes


def _median(values: np.ndarray, clear: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Per-pixel median over clear observations.

    values (n, H, W) uint16, clear (n, H, W) bool, count (H, W) clear observations per pixel.
    """
    ranked = _sort_planes(np.where(clear, values, np.iinfo(values.dtype).max))  # masked sort last
    lo = np.clip((count - 1) // 2, 0, None)[None]
    hi = np.clip(count // 2, 0, values.shape[0] - 1)[None]
    a = np.take_along_axis(ranked, lo, axis=0)[0].astype(np.uint32)
    b = np.take_along_axis(ranked, hi, axis=0)[0].astype(np.uint32)
    return ((a + b + 1) // 2).astype(np.uint16)


def composite(
    scenes: Sequence[tuple[dt.date, np.ndarray, np.ndarray]],
    method: str,
    fill_value: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Composite loaded observations.

    Args:
        scenes: (date, data (C, H, W) uint16, clear (H, W) bool) per observation.
        method: ``median`` or ``mosaic``.
        fill_value: value where a pixel has no clear observation.

    Returns:
        (C, H, W) uint16 composite and the (H, W) bool "has a clear observation" mask.
    """
    c, h, w = scenes[0][1].shape
    clear = np.stack([s[2] for s in scenes])  # (n, H, W)
    has_any = clear.any(axis=0)
    fill = np.uint16(fill_dn(fill_value))
    out = np.full((c, h, w), fill, dtype=np.uint16)
    if method == "median":
        # Work only inside the box of pixels that have an observation (partial coverage).
        rows, cols = (
            np.flatnonzero(np.any(has_any, axis=1)),
            np.flatnonzero(np.any(has_any, axis=0)),
        )
        if rows.size:
            box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            clear_box = clear[(slice(None), *box)]
            count = clear_box.sum(axis=0)
            for band in range(c):  # one band at a time keeps memory to (n, h, w)
                values = np.stack([s[1][band][box] for s in scenes])
                out[(band, *box)] = _median(values, clear_box, count)
    elif method == "mosaic":
        filled = np.zeros((h, w), dtype=bool)
        for _, data, ok in sorted(scenes, key=lambda s: s[0], reverse=True):
            take = ok & ~filled
            out[:, take] = data[:, take]
            filled |= take
    else:
        raise ProviderError(f"composite={method!r}; use 'median' or 'mosaic'")
    out[:, ~has_any] = fill
    return out, np.asarray(has_any)


def backfill_sources(empty: Sequence[bool], whole_range_available: bool) -> list[str | None]:
    """For each window: None (not empty), "whole_range", or "frame:<i>" (nearest non-empty, earlier on ties)."""
    full = [i for i, e in enumerate(empty) if not e]
    out: list[str | None] = []
    for i, e in enumerate(empty):
        if not e:
            out.append(None)
        elif whole_range_available:
            out.append("whole_range")
        elif full:
            nearest = min(full, key=lambda j: (abs(j - i), j))
            out.append(f"frame:{nearest}")
        else:
            out.append(None)
    return out


def composite_windows(
    scenes: Sequence[Scene],
    windows: Sequence[FrameWindow],
    sensor: SensorSpec,
    cloud_mask: CloudMask,
    *,
    area_label: str = "area",
) -> tuple[np.ndarray, list[FrameRecord]]:
    """Composite one frame per window; back-fill empty windows; record every frame.

    Returns:
        (T, C, H, W) uint16 frames and one FrameRecord per window.

    Raises:
        ProviderError: no clear observation anywhere in the range.
    """
    passing = [s for s in scenes if passes_scene_filter(s, sensor.cloudy_pct)]
    cache: dict[str, tuple[dt.date, np.ndarray, np.ndarray]] = {}

    def load(scene: Scene) -> tuple[dt.date, np.ndarray, np.ndarray]:
        if scene.id not in cache:
            data, scl = scene.load()
            cache[scene.id] = (scene.date, data, clear_mask(data, scl, cloud_mask))
        return cache[scene.id]

    frames: list[np.ndarray | None] = []
    records: list[FrameRecord] = []
    for win in windows:
        members = sorted((s for s in passing if win.contains(s.date)), key=lambda s: s.date)
        obs = [load(s) for s in members]
        obs = [o for o in obs if o[2].any()]
        rec = FrameRecord(
            win.index, win.start, win.end, n_scenes=len(members), scenes=[s.id for s in members]
        )
        if obs:
            data, has_any = composite(obs, sensor.composite, sensor.fill_value)
            rec.clear_fraction = float(has_any.mean())
            frames.append(data)
        else:
            frames.append(None)
        records.append(rec)
        cache.clear()  # a back-fill reloads what it needs; memory stays at one window

    empty = [f is None for f in frames]
    if all(empty):
        raise ProviderError(
            f"no clear observation of {area_label} in [{windows[0].start}, {windows[-1].end}) "
            f"({len(scenes)} scenes, {len(passing)} pass cloudy_pct <= {sensor.cloudy_pct}); "
            "widen the range, raise cloudy_pct, or use cloud_mask='none'"
        )
    if any(empty):
        in_range = [s for s in passing if windows[0].start <= s.date < windows[-1].end]
        whole = [o for o in (load(s) for s in in_range) if o[2].any()]
        whole_data, whole_any = (
            composite(whole, sensor.composite, sensor.fill_value) if whole else (None, None)
        )
        cache.clear()
        for i, source in enumerate(backfill_sources(empty, whole_data is not None)):
            if source is None:
                continue
            rec = records[i]
            rec.backfilled, rec.backfill_source = True, source
            if whole_data is not None and whole_any is not None:
                frames[i], rec.clear_fraction = whole_data, float(whole_any.mean())
            else:
                j = int(source.split(":")[1])
                frames[i], rec.clear_fraction = frames[j], records[j].clear_fraction
    return np.stack([f for f in frames if f is not None]), records
