"""Single-ROI API in the peer's shape: ``get_embedding("agrifm", ...)``.

An rs-embed user should feel at home: the same call, the same output modes,
the same metadata keys — plus what the peer leaves out (checkpoint sha256,
the exact settings, package version, non-finite pixel counts).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from agrifm_pipeline.errors import BackendError
from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions, get_engine
from agrifm_pipeline.model.config import AGRIFM_S2_BANDS
from agrifm_pipeline.preprocess import preprocess_input
from agrifm_pipeline.settings import AgriFMSettings, load_settings
from agrifm_pipeline.specs import BBox, OutputSpec, PointBuffer, SensorSpec, TemporalSpec

MODEL_NAMES = ("agrifm",)
PROVIDER_BACKENDS = ("gee", "local")


@dataclass
class Embedding:
    """``data``: a pooled vector (D,) or a grid ``xarray.DataArray`` (band, y, x); ``meta``: its record."""

    data: np.ndarray | xr.DataArray
    meta: dict[str, Any] = field(default_factory=dict)


def _package_version() -> str:
    from agrifm_pipeline import __version__

    return __version__


def _check_call(model: str, backend: str, input_chw: Any) -> None:
    if str(model).lower() not in MODEL_NAMES:
        raise BackendError(f"model={model!r} is not served here; this package embeds with 'agrifm'")
    if input_chw is not None:
        return
    if backend in PROVIDER_BACKENDS:
        raise BackendError(
            f"backend={backend!r} fetches Sentinel-2 through a provider, which is not available "
            "yet in this version; pass input_chw=<(10, H, W) or (T, 10, H, W) array> instead"
        )
    raise BackendError(
        f"backend={backend!r}: agrifm is provider-only; use backend='gee' or 'local' "
        "(or pass input_chw with a (10, H, W) or (T, 10, H, W) array)"
    )


def _settings_for_call(settings: AgriFMSettings | None, overrides: dict[str, Any]) -> AgriFMSettings:
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


def _meta(
    *,
    engine: EmbeddingEngine,
    settings: AgriFMSettings,
    record: dict[str, Any],
    grid: torch.Tensor,
    output: OutputSpec,
    backend: str,
    spatial: PointBuffer | BBox | None,
    temporal: TemporalSpec | None,
    sensor: SensorSpec,
) -> dict[str, Any]:
    ckpt = engine.checkpoint
    untrained = engine.untrained
    d, h, w = grid.shape
    t = int(record["input_frames"])
    meta: dict[str, Any] = {
        "model": "agrifm",
        "type": "on_the_fly",
        "backend": backend,
        "source": "input_chw",
        "model_source": f"agrifm_pipeline.{engine.encoder}",
        "encoder_backend": engine.encoder,
        "sensor": sensor.as_record(),
        "bands": list(sensor.bands),
        "spatial": None if spatial is None else spatial.as_record(),
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


def _output(grid: torch.Tensor, output: OutputSpec, meta: dict[str, Any]) -> Embedding:
    """grid: (D, h, w) float32."""
    if output.mode == "pooled":
        pooled = grid.mean(dim=(1, 2)) if output.pooling == "mean" else grid.amax(dim=(1, 2))
        return Embedding(pooled.numpy().astype(np.float32), meta)
    d, h, w = grid.shape
    da = xr.DataArray(
        grid.numpy().astype(np.float32),
        dims=("band", "y", "x"),
        coords={"band": np.arange(d), "y": np.arange(h), "x": np.arange(w)},
        name="agrifm_embedding",
        attrs={"description": "AgriFM encoder features in model feature-map space (not georeferenced)"},
    )
    return Embedding(da, meta)


def get_embeddings_batch(
    model: str = "agrifm",
    *,
    inputs: Sequence[Any],
    spatials: Sequence[PointBuffer | BBox | None] | None = None,
    temporal: TemporalSpec | None = None,
    sensor: SensorSpec | None = None,
    output: OutputSpec | None = None,
    backend: str = "auto",
    checkpoint: str | Path | None = None,
    device: str = "auto",
    precision: str = "float32",
    batch_size: int = 8,
    encoder: str = "ours",
    settings: AgriFMSettings | None = None,
    **setting_overrides: Any,
) -> list[Embedding]:
    """Embed many ``input_chw`` arrays with one model load, in shared batches.

    ``setting_overrides`` are settings fields (``n_frames``, ``image_size``,
    ``norm_mode``, ...) that win over ``RS_EMBED_AGRIFM_*`` for this call.
    """
    output = output or OutputSpec.pooled()
    sensor = sensor or SensorSpec()
    if not inputs:
        return []
    _check_call(model, backend, inputs[0])
    if spatials is not None and len(spatials) != len(inputs):
        raise BackendError(f"{len(spatials)} spatial specs for {len(inputs)} inputs; give one per input")
    cfg = _settings_for_call(settings, setting_overrides)
    engine = get_engine(
        checkpoint,
        settings=cfg,
        options=InferenceOptions(device=device, precision=precision, batch_size=batch_size, encoder=encoder),
    )
    prepared = [
        preprocess_input(
            x,
            n_frames=cfg.n_frames,
            image_size=cfg.image_size,
            norm_mode=cfg.norm_mode,
            fill_value=sensor.fill_value,
        )
        for x in inputs
    ]
    grids = engine.embed(torch.stack([p.tensor for p in prepared]))
    results = []
    for i, (p, grid) in enumerate(zip(prepared, grids, strict=True)):
        meta = _meta(
            engine=engine,
            settings=cfg,
            record=p.record,
            grid=grid,
            output=output,
            backend=backend,
            spatial=None if spatials is None else spatials[i],
            temporal=temporal,
            sensor=sensor,
        )
        results.append(_output(grid, output, meta))
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
    checkpoint: str | Path | None = None,
    device: str = "auto",
    precision: str = "float32",
    encoder: str = "ours",
    settings: AgriFMSettings | None = None,
    **setting_overrides: Any,
) -> Embedding:
    """One AgriFM embedding, pooled (``OutputSpec.pooled()``) or as a grid (``OutputSpec.grid()``).

    With ``input_chw`` — a ``(10, H, W)`` frame (repeated to T) or a
    ``(T, 10, H, W)`` stack (padded with its last frame or truncated to T) of
    raw S2 SR digital numbers — ``spatial`` and ``temporal`` may be omitted and
    are only recorded. Provider-backed calls (``backend='gee'|'local'``
    without ``input_chw``) arrive with the providers.

    Raises:
        InputContractError: ``input_chw`` has a shape the contract does not accept.
        SettingsError: a setting is invalid.
        CheckpointError: the checkpoint cannot be resolved or loaded.
        BackendError: the model or backend is not one this call supports.
    """
    _check_call(model, backend, input_chw)
    return get_embeddings_batch(
        model,
        inputs=[input_chw],
        spatials=[spatial],
        temporal=temporal,
        sensor=sensor,
        output=output,
        backend=backend,
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
    "Embedding",
    "OutputSpec",
    "PointBuffer",
    "SensorSpec",
    "TemporalSpec",
    "get_embedding",
    "get_embeddings_batch",
]
