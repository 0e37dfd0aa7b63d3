"""The AgriFM S2 encoder: our implementation, its configuration and its loader."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agrifm_pipeline.errors import PerformanceWarning, SettingsError
from agrifm_pipeline.model.agrifm import (
    AgriFMEncoder,
    checkpoint_filter_fn,
    load_state_dict_strict,
    native_bf16_cpu,
    use_cpu_matmul,
)
from agrifm_pipeline.model.config import AGRIFM_P422, AGRIFM_P444, DEFAULT_CFG, EncoderConfig
from agrifm_pipeline.model.layout import infer_config, to_upstream_layout
from agrifm_pipeline.model.weights import untrained_state_dict

if TYPE_CHECKING:
    from agrifm_pipeline.checkpoint import ResolvedCheckpoint
    from agrifm_pipeline.settings import AgriFMSettings

__all__ = [
    "AGRIFM_P422",
    "AGRIFM_P444",
    "DEFAULT_CFG",
    "AgriFMEncoder",
    "EncoderConfig",
    "checkpoint_filter_fn",
    "load_encoder",
    "resolve_device",
    "resolve_precision",
    "untrained_state_dict",
]

PRECISIONS = {
    "float32": None,
    "fp32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device = "cpu") -> torch.device:
    """``cpu``, ``cuda[:N]`` or ``auto`` (CUDA when available) -> a torch device."""
    if isinstance(device, torch.device):
        return device
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SettingsError(
            f"device={device!r} but CUDA is not available here; use 'cpu' or 'auto'"
        )
    try:
        return torch.device(name)
    except RuntimeError:
        raise SettingsError(
            f"device={device!r} is not a device; use 'cpu', 'cuda' or 'auto'"
        ) from None


def resolve_precision(precision: str) -> tuple[str, torch.dtype | None]:
    """``float32`` or ``bfloat16`` (autocast) -> (canonical name, autocast dtype)."""
    key = str(precision).strip().lower()
    if key not in PRECISIONS:
        raise SettingsError(
            f"precision={precision!r} is not supported; use 'float32' or 'bfloat16' (autocast)"
        )
    dtype = PRECISIONS[key]
    return ("float32" if dtype is None else "bfloat16"), dtype


def load_encoder(
    checkpoint: str | Path | Mapping[str, Any] | ResolvedCheckpoint | None = None,
    device: str | torch.device = "cpu",
    precision: str = "float32",
    *,
    settings: AgriFMSettings | None = None,
) -> AgriFMEncoder:
    """Build our AgriFM S2 encoder from a checkpoint and load it strictly, in eval mode.

    Args:
        checkpoint: a file path, ``untrained:<seed>[:p422]``, a resolved
            checkpoint, a state dict, or None for the settings' resolution
            (``RS_EMBED_AGRIFM_CKPT`` -> cache -> download).
        device: ``cpu``, ``cuda`` or ``auto``.
        precision: ``float32`` or ``bfloat16`` (autocast; outputs stay float32).

    The patch size is read off the checkpoint's patch-embed kernel. The
    returned module carries ``checkpoint_info`` (sha256, source, layout, keys
    ignored) for lineage.

    Raises:
        CheckpointError: the checkpoint cannot be resolved, read, or does not fit.
    """
    dev = resolve_device(device)
    precision_name, autocast_dtype = resolve_precision(precision)
    cpu_matmul = use_cpu_matmul() if dev.type == "cpu" else None
    if dev.type == "cpu" and autocast_dtype is not None and not native_bf16_cpu():
        warnings.warn(
            f"precision={precision!r} on this CPU ({torch.backends.cpu.get_cpu_capability()}, "
            "no AVX512-BF16 or AMX): PyTorch multiplies bfloat16 in software here, roughly "
            "10x slower than float32 for the encoder; use precision='float32' on this machine",
            PerformanceWarning,
            stacklevel=2,
        )
    resolved: ResolvedCheckpoint | None
    if isinstance(checkpoint, Mapping):
        resolved, raw, source = None, checkpoint, "state dict"
    else:
        from agrifm_pipeline.checkpoint import (
            ResolvedCheckpoint,
            checkpoint_tensors,
            resolve_checkpoint,
        )

        resolved = (
            checkpoint
            if isinstance(checkpoint, ResolvedCheckpoint)
            else resolve_checkpoint(checkpoint, settings)
        )
        raw = checkpoint_tensors(resolved)
        source = resolved.spec if resolved.untrained else str(resolved.path)

    upstream = to_upstream_layout(raw, source=source)
    cfg = infer_config(upstream.tensors)
    with torch.device("meta"):
        model = AgriFMEncoder(cfg)
    state, info = checkpoint_filter_fn(raw, model, source=source)
    model = model.to_empty(device="cpu")
    _rebuild_buffers(model)  # index buffers are not in the state dict
    load_state_dict_strict(model, state, source=source)
    model = model.to(dev).eval()
    model.requires_grad_(False)
    model.autocast_dtype = autocast_dtype
    if autocast_dtype is not None:
        _cast_matmul_weights(model, autocast_dtype)
    model.checkpoint_info = {  # type: ignore[assignment]
        **(resolved.as_record() if resolved is not None else {"source": "state dict"}),
        "layout": info["layout"],
        "ignored_keys": info["ignored_keys"],
        "index_buffers_in_file": len(info["dropped_buffers"]),
        "untrained": bool(resolved is not None and resolved.untrained),
        "model_config": cfg.as_record(),
        "device": str(dev),
        "precision": precision_name,
    }
    model.cpu_matmul = cpu_matmul  # recorded with the embeddings (see cpu_matmul_library)
    return model


def _cast_matmul_weights(model: AgriFMEncoder, dtype: torch.dtype) -> None:
    """Store Linear/Conv weights in ``dtype`` once, instead of autocast casting them every forward.

    Autocast rounds these weights to ``dtype`` anyway, so outputs are unchanged;
    LayerNorm parameters and position-bias tables stay float32, as autocast
    would use them.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv3d):
            module.to(dtype)


def _rebuild_buffers(model: AgriFMEncoder) -> None:
    from agrifm_pipeline.model.agrifm import WindowAttention3D, relative_position_index

    for module in model.modules():
        if isinstance(module, WindowAttention3D):
            module.relative_position_index = relative_position_index(module.window)
