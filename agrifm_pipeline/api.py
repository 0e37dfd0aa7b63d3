"""Single-ROI API in the peer's shape: ``get_embedding("agrifm", ...)``.

An rs-embed user should feel at home: the same call, the same output modes,
the same metadata keys — plus what the peer leaves out (checkpoint sha256,
the exact settings, package version, non-finite pixel counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from agrifm_pipeline.errors import BackendError
from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions, get_engine
from agrifm_pipeline.preprocess import preprocess_input
from agrifm_pipeline.providers import real_data_providers
from agrifm_pipeline.providers.base import CloudMask, Provider
from agrifm_pipeline.settings import AgriFMSettings, load_settings
from agrifm_pipeline.specs import BBox, OutputSpec, PointBuffer, SensorSpec, TemporalSpec

MODEL_NAMES = ("agrifm",)


@dataclass
class Embedding:
    """``data``: a pooled vector (D,) or a grid ``xarray.DataArray`` (band, y, x); ``meta``: its record."""

    data: np.ndarray | xr.DataArray
    meta: dict[str, Any] = field(default_factory=dict)


def _package_version() -> str:
    from agrifm_pipeline import __version__

    return __version__


def _check_call(
    model: str, backend: str, input_chw: Any, provider: Any, spatial: Any, temporal: Any
) -> None:
    if str(model).lower() not in MODEL_NAMES:
        raise BackendError(f"model={model!r} is not served here; this package embeds with 'agrifm'")
    if input_chw is not None:
        return
    if provider is None and backend not in real_data_providers():
        raise BackendError(
            f"backend={backend!r}: agrifm is provider-only; use backend='gee' or 'local' "
            "(or pass input_chw with a (10, H, W) or (T, 10, H, W) array)"
        )
    if spatial is None or temporal is None:
        raise BackendError(
            "a provider-backed call needs spatial=PointBuffer(...)|BBox(...) and "
            "temporal=TemporalSpec.range(...)|TemporalSpec.year(...)"
        )


def _settings_for_call(
    settings: AgriFMSettings | None, overrides: dict[str, Any]
) -> AgriFMSettings:
    base = settings or load_settings()
    return base.replace(**overrides) if overrides else base


def _features_list_shapes(engine: EmbeddingEngine, t: int, s: int) -> list[list[int]]:
    cfg = getattr(engine.model, "cfg", None)
    if cfg is None:
        return []
    pt, ph, pw = cfg.patch_size
    d, h, w = -(-t // pt), -(-s // ph), -(-s // pw)
    shapes = [[cfg.embed_dim * d, h, w]]
    for i in range(1, len(cfg.depths)):
        d, h, w = -(-d // 2), -(-h // 2), -(-w // 2)
        shapes.append([cfg.embed_dim * 2**i * d, h, w])
    return shapes


@dataclass
class _Sample:
    """One preprocessed input and what is known about where it came from."""

    tensor: torch.Tensor  # (T, 10, S, S)
    record: dict[str, Any]  # preprocessing record (+ provider record)
    source: str
    spatial: PointBuffer | BBox | None
    geobox: Any = None  # odc.geo GeoBox of the fetched pixels, provider path only


def _meta(
    *,
    engine: EmbeddingEngine,
    settings: AgriFMSettings,
    sample: _Sample,
    grid: torch.Tensor,
    output: OutputSpec,
    backend: str,
    temporal: TemporalSpec | None,
    sensor: SensorSpec,
) -> dict[str, Any]:
    ckpt = engine.checkpoint
    untrained = engine.untrained
    d, h, w = grid.shape
    record = sample.record
    t = int(record["input_frames"])
    meta: dict[str, Any] = {
        "model": "agrifm",
        "type": "on_the_fly",
        "backend": backend,
        "source": sample.source,
        "model_source": f"agrifm_pipeline.{engine.encoder}",
        "encoder_backend": engine.encoder,
        "sensor": sensor.as_record(),
        "bands": list(sensor.bands),
        "spatial": None if sample.spatial is None else sample.spatial.as_record(),
        "temporal": None if temporal is None else temporal.as_record(),
        "n_frames": settings.n_frames,
        "n_frames_requested": settings.n_frames,
        "n_distinct_frames": min(int(record["input_original_frames"]), t),
        "n_backfilled_frames": 0,
        "image_size": settings.image_size,
        "norm_mode": settings.norm_mode,
        "feature_shape": [d, h, w],
        "grid_hw": [h, w],
        "feature_list_shapes": _features_list_shapes(engine, t, settings.image_size),
        "device": str(engine.device),
        "precision": engine.precision,
        "batch_size": engine.batch_size,
        "checkpoint": ckpt.get("path") or ckpt.get("spec"),
        "checkpoint_sha256": ckpt.get("sha256"),
        "checkpoint_source": ckpt.get("source"),
        "checkpoint_record": ckpt,
        "untrained": untrained,
        "weights_verified": not untrained,
        "weights_check": "strict load of every encoder tensor"
        + ("; UNTRAINED random weights" if untrained else ""),
        **engine.param_stats,
        "settings": settings.as_record(),
        "package_version": _package_version(),
        **record,
    }
    if output.mode == "pooled":
        meta["pooling"] = output.pooling_label
    return meta


def _output(
    grid: torch.Tensor, output: OutputSpec, meta: dict[str, Any], geobox: Any = None
) -> Embedding:
    """grid: (D, h, w) float32. With a geobox, the grid's cells get x/y in its CRS."""
    if output.mode == "pooled":
        pooled = grid.mean(dim=(1, 2)) if output.pooling == "mean" else grid.amax(dim=(1, 2))
        return Embedding(pooled.numpy().astype(np.float32), meta)
    d, h, w = grid.shape
    coords: dict[str, Any] = {"band": np.arange(d), "y": np.arange(h), "x": np.arange(w)}
    attrs = {"description": "AgriFM encoder features in model feature-map space"}
    if geobox is not None:
        # The ROI's pixels were resized to image_size x image_size, so each cell
        # covers an equal share of the ROI's extent.
        minx, miny, maxx, maxy = geobox.extent.boundingbox
        coords["x"] = minx + (np.arange(w) + 0.5) * (maxx - minx) / w
        coords["y"] = maxy - (np.arange(h) + 0.5) * (maxy - miny) / h
        attrs = {
            "description": "AgriFM encoder features, cell centres in crs units",
            "crs": str(geobox.crs),
        }
    da = xr.DataArray(
        grid.numpy().astype(np.float32),
        dims=("band", "y", "x"),
        coords=coords,
        name="agrifm_embedding",
        attrs=attrs,
    )
    return Embedding(da, meta)


def _prepare_array(x: Any, cfg: AgriFMSettings, sensor: SensorSpec, spatial: Any) -> _Sample:
    p = preprocess_input(
        x,
        n_frames=cfg.n_frames,
        image_size=cfg.image_size,
        norm_mode=cfg.norm_mode,
        fill_value=sensor.fill_value,
    )
    return _Sample(p.tensor, p.record, "input_chw", spatial)


def _prepare_fetched(
    provider: Provider,
    spatial: PointBuffer | BBox,
    temporal: TemporalSpec,
    cfg: AgriFMSettings,
    sensor: SensorSpec,
    cloud_mask: CloudMask,
) -> _Sample:
    from agrifm_pipeline.frames import range_windows
    from agrifm_pipeline.roi import roi_geobox

    gbox = roi_geobox(spatial, sensor.scale_m)
    windows = range_windows(temporal.start, temporal.end, cfg.n_frames)
    stack = provider.fetch(gbox, windows, sensor, cloud_mask)
    p = preprocess_input(
        stack.data.values,
        n_frames=cfg.n_frames,
        image_size=cfg.image_size,
        norm_mode=cfg.norm_mode,
        fill_value=sensor.fill_value,
    )
    prov = stack.record()
    record = {
        **p.record,
        **prov,
        "cloud_mask": cloud_mask.as_record(),
        "input_crs": str(gbox.crs),
        "input_bounds": list(gbox.extent.boundingbox),
    }
    return _Sample(p.tensor, record, f"provider:{stack.provider}", spatial, gbox)


def _resolve_provider(
    backend: str, provider: Provider | None, options: dict[str, Any] | None
) -> Provider:
    if provider is not None:
        return provider
    from agrifm_pipeline.providers import make_provider

    return make_provider(backend, **(options or {}))


def get_embeddings_batch(
    model: str = "agrifm",
    *,
    inputs: Sequence[Any] | None = None,
    spatials: Sequence[PointBuffer | BBox | None] | None = None,
    temporal: TemporalSpec | None = None,
    sensor: SensorSpec | None = None,
    output: OutputSpec | None = None,
    backend: str = "auto",
    provider: Provider | None = None,
    provider_options: dict[str, Any] | None = None,
    cloud_mask: CloudMask | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    precision: str = "float32",
    batch_size: int = 8,
    encoder: str = "ours",
    settings: AgriFMSettings | None = None,
    **setting_overrides: Any,
) -> list[Embedding]:
    """Embed many ROIs (or ``input_chw`` arrays) with one model load, in shared batches.

    Provider-backed: give ``spatials`` and ``temporal`` and ``backend='gee'|'local'``
    (or a ``provider`` instance); up to ``RS_EMBED_AGRIFM_FETCH_WORKERS`` ROIs
    are fetched at once, in order. ``setting_overrides`` are settings fields
    (``n_frames``, ``image_size``, ``norm_mode``, ...) that win over the
    environment for this call.
    """
    output = output or OutputSpec.pooled()
    sensor = sensor or SensorSpec()
    cloud_mask = cloud_mask or CloudMask()
    if inputs is not None and spatials is not None and len(spatials) != len(inputs):
        raise BackendError(
            f"{len(spatials)} spatial specs for {len(inputs)} inputs; give one per input"
        )
    n = len(inputs) if inputs is not None else len(spatials or [])
    if n == 0:
        return []
    first_spatial = spatials[0] if spatials else None
    _check_call(
        model, backend, None if inputs is None else inputs[0], provider, first_spatial, temporal
    )
    cfg = _settings_for_call(settings, setting_overrides)
    engine = get_engine(
        checkpoint,
        settings=cfg,
        options=InferenceOptions(
            device=device, precision=precision, batch_size=batch_size, encoder=encoder
        ),
    )
    if inputs is not None:
        samples = [
            _prepare_array(x, cfg, sensor, spatials[i] if spatials else None)
            for i, x in enumerate(inputs)
        ]
    else:
        assert spatials is not None and temporal is not None
        if any(s is None for s in spatials):
            raise BackendError("every ROI of a provider-backed batch needs a PointBuffer or BBox")
        src = _resolve_provider(backend, provider, provider_options)
        with ThreadPoolExecutor(max_workers=min(cfg.fetch_workers, n)) as pool:
            samples = list(
                pool.map(
                    lambda sp: _prepare_fetched(src, sp, temporal, cfg, sensor, cloud_mask),
                    spatials,
                )
            )
    grids = engine.embed(torch.stack([smp.tensor for smp in samples]))
    results = []
    for smp, grid in zip(samples, grids, strict=True):
        meta = _meta(
            engine=engine,
            settings=cfg,
            sample=smp,
            grid=grid,
            output=output,
            backend=backend
            if provider is None or inputs is not None
            else f"provider:{provider.name}",
            temporal=temporal,
            sensor=sensor,
        )
        results.append(_output(grid, output, meta, smp.geobox))
    return results


def get_embedding(
    model: str = "agrifm",
    *,
    spatial: PointBuffer | BBox | None = None,
    temporal: TemporalSpec | None = None,
    sensor: SensorSpec | None = None,
    output: OutputSpec | None = None,
    backend: str = "auto",
    input_chw: Any = None,
    provider: Provider | None = None,
    provider_options: dict[str, Any] | None = None,
    cloud_mask: CloudMask | None = None,
    checkpoint: str | Path | None = None,
    device: str = "auto",
    precision: str = "float32",
    encoder: str = "ours",
    settings: AgriFMSettings | None = None,
    **setting_overrides: Any,
) -> Embedding:
    """One AgriFM embedding, pooled (``OutputSpec.pooled()``) or as a grid (``OutputSpec.grid()``).

    Provider-backed (the contract's main path): ``spatial`` (``PointBuffer`` /
    ``BBox``), ``temporal`` (``TemporalSpec.range`` / ``.year``) and
    ``backend='gee'`` or ``'local'`` (with ``provider_options``, e.g.
    ``{'root': 'data/s2_sample'}``); the range is split into ``n_frames``
    windows, each composited per pixel, then preprocessed and embedded.

    With ``input_chw`` — a ``(10, H, W)`` frame (repeated to T) or a
    ``(T, 10, H, W)`` stack (padded with its last frame or truncated to T) of
    raw S2 SR digital numbers — ``spatial`` and ``temporal`` may be omitted and
    are only recorded.

    Raises:
        InputContractError: ``input_chw`` has a shape the contract does not accept.
        SettingsError: a setting is invalid.
        CheckpointError: the checkpoint cannot be resolved or loaded.
        BackendError: the model or backend is not one this call supports.
        ProviderError: the provider cannot deliver the frames.
    """
    _check_call(model, backend, input_chw, provider, spatial, temporal)
    return get_embeddings_batch(
        model,
        inputs=None if input_chw is None else [input_chw],
        spatials=[spatial],
        temporal=temporal,
        sensor=sensor,
        output=output,
        backend=backend,
        provider=provider,
        provider_options=provider_options,
        cloud_mask=cloud_mask,
        checkpoint=checkpoint,
        device=device,
        precision=precision,
        batch_size=1,
        encoder=encoder,
        settings=settings,
        **setting_overrides,
    )[0]


__all__ = [
    "BBox",
    "CloudMask",
    "Embedding",
    "OutputSpec",
    "PointBuffer",
    "SensorSpec",
    "TemporalSpec",
    "get_embedding",
    "get_embeddings_batch",
]
