"""Building and loading the AgriFM S2 encoder (timm's ``_builder`` habit).

:func:`load_encoder` resolves a checkpoint, maps its keys onto our modules
(:func:`checkpoint_filter_fn`), builds the encoder with the runtime choices
resolved once here (the CPU matmul library), loads strictly and returns it in
eval mode, fp32, on its device. Precision is not the model's: the inference
engine runs it under ``torch.autocast`` and, for that, stores its matmul
weights in the low precision once (:func:`cast_for_autocast`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from agrifm_pipeline.errors import CheckpointError, SettingsError
from agrifm_pipeline.model.agrifm import AgriFMEncoder, WindowAttention3D, relative_position_index
from agrifm_pipeline.model.config import EncoderConfig
from agrifm_pipeline.model.cpu import cpu_matmul_library
from agrifm_pipeline.model.layout import infer_config, to_upstream_layout

if TYPE_CHECKING:
    from agrifm_pipeline.checkpoint import ResolvedCheckpoint
    from agrifm_pipeline.settings import AgriFMSettings

#: Precision names -> the autocast dtype (None: plain float32).
PRECISIONS: dict[str, torch.dtype | None] = {
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


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: AgriFMEncoder | None = None, *, source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Map a released or mmengine-style checkpoint onto :class:`AgriFMEncoder` names.

    Returns ``(state_dict, info)``; ``info`` lists the layout, the ignored keys
    (other sensors, necks, heads) and the dropped index buffers. Index buffers
    that are present must equal the ones we build.
    """
    up = to_upstream_layout(state_dict, source=source)
    window = model.cfg.window_size if model is not None else EncoderConfig().window_size
    if up.dropped_buffers:
        expected = relative_position_index(window)
        flat = {
            k[len("module.") :] if k.startswith("module.") else k: v for k, v in state_dict.items()
        }
        for key in up.dropped_buffers:
            value = flat.get(key[len("module.") :] if key.startswith("module.") else key)
            if isinstance(value, torch.Tensor) and (
                value.shape != expected.shape or not torch.equal(value.to(expected.dtype), expected)
            ):
                raise CheckpointError(
                    f"{source}: buffer {key!r} differs from the (8, 7, 7) window's position index; "
                    "this checkpoint was made for a different window"
                )
    out: dict[str, torch.Tensor] = {}
    for key, value in up.tensors.items():
        if key.startswith("patch_emd.proj."):
            out["patch_embed.proj." + key[len("patch_emd.proj.") :]] = value
        else:
            out[key[len("backbone.") :]] = value
    info = {
        "layout": up.layout,
        "ignored_keys": up.ignored_keys,
        "dropped_buffers": up.dropped_buffers,
    }
    return out, info


def load_state_dict_strict(
    model: AgriFMEncoder,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str,
    assign: bool = False,
    copy: bool = False,
) -> None:
    """Strict load that reports every missing, unexpected and mis-shaped tensor at once.

    ``assign=True`` makes the given tensors the model's parameters instead of copying
    them into the model's own storage (a model built on the meta device has none): a
    tensor already in the parameter's dtype and contiguous is taken as it is, others
    are converted; ``copy=True`` copies every one (tensors the caller keeps and may change).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = ", ".join(items[:20]) + (
                    f", ... ({len(items)} in all)" if len(items) > 20 else ""
                )
                parts.append(f"{label}: {shown}")
        raise CheckpointError(
            f"{source} does not fit the AgriFM S2 encoder ({model.cfg.patch_label}); "
            + "; ".join(parts)
        )
    if assign:
        state_dict = {
            k: v.to(dtype=own[k].dtype, copy=copy).contiguous() for k, v in state_dict.items()
        }
    model.load_state_dict(dict(state_dict), strict=True, assign=assign)


def _rebuild_index_buffers(model: AgriFMEncoder) -> None:
    """Fill the position-index buffers, which are not in the state dict."""
    for module in model.modules():
        if isinstance(module, WindowAttention3D):
            module.relative_position_index = relative_position_index(module.window)


def load_encoder(
    checkpoint: str | Path | Mapping[str, Any] | ResolvedCheckpoint | None = None,
    device: str | torch.device = "cpu",
    *,
    cpu_matmul: str | None = None,
    settings: AgriFMSettings | None = None,
) -> AgriFMEncoder:
    """Build our AgriFM S2 encoder from a checkpoint and load it strictly, in eval mode.

    Args:
        checkpoint: a file path, ``untrained:<seed>[:p422]``, a resolved
            checkpoint, a state dict, or None for the settings' resolution
            (``RS_EMBED_AGRIFM_CKPT`` -> cache -> download).
        device: ``cpu``, ``cuda`` or ``auto``.
        cpu_matmul: ``auto``, ``blas`` or ``onednn`` for the fp32 linear layers
            on a CPU; default ``AGRIFM_PIPELINE_CPU_MATMUL`` (see
            :func:`~agrifm_pipeline.model.cpu.cpu_matmul_library`). Resolved
            here, once, and built into every layer; ``model.cpu_matmul`` says
            which. Not read off the CPU, where these layers are ``nn.Linear``.

    The model is float32 with gradients off. To run it in bfloat16, call it under
    ``torch.autocast`` (as :class:`~agrifm_pipeline.inference.EmbeddingEngine`
    does). The patch size is read off the checkpoint's patch-embed kernel. The
    returned module carries ``checkpoint_info`` (sha256, source, layout, keys
    ignored) for lineage.

    Raises:
        CheckpointError: the checkpoint cannot be resolved, read, or does not fit.
        SettingsError: an unknown device or ``cpu_matmul``.
    """
    dev = resolve_device(device)
    matmul = cpu_matmul_library(cpu_matmul) if dev.type == "cpu" else "blas"
    resolved: ResolvedCheckpoint | None
    if isinstance(checkpoint, Mapping):
        resolved, raw, source = None, checkpoint, "state dict"
    else:
        from agrifm_pipeline.checkpoint import ResolvedCheckpoint, resolve_checkpoint
        from agrifm_pipeline.model.weights import checkpoint_tensors

        resolved = (
            checkpoint
            if isinstance(checkpoint, ResolvedCheckpoint)
            else resolve_checkpoint(checkpoint, settings)
        )
        raw = checkpoint_tensors(resolved)
        source = resolved.spec if resolved.untrained else str(resolved.path)

    cfg = infer_config(to_upstream_layout(raw, source=source).tensors)
    with torch.device("meta"):
        model = AgriFMEncoder(cfg, cpu_matmul=matmul)
    state, info = checkpoint_filter_fn(raw, model, source=source)
    # The model was built without storage and takes the checkpoint's tensors as its
    # parameters (no second copy of 88 M values; from the node's cache of untrained
    # weights they stay mapped pages shared by every process on the node). A state dict
    # handed in by the caller is the caller's: the model gets its own copies.
    load_state_dict_strict(model, state, source=source, assign=True, copy=resolved is None)
    _rebuild_index_buffers(model)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # pragma: no cover - a model attribute neither in the state dict nor rebuilt
        raise RuntimeError(f"encoder tensors without storage after loading: {left[:5]}")
    model = model.to(dev).eval()
    model.requires_grad_(False)
    model.checkpoint_info = {
        **(resolved.as_record() if resolved is not None else {"source": "state dict"}),
        "layout": info["layout"],
        "ignored_keys": info["ignored_keys"],
        "index_buffers_in_file": len(info["dropped_buffers"]),
        "untrained": bool(resolved is not None and resolved.untrained),
        "model_config": cfg.as_record(),
        "device": str(dev),
    }
    return model


def cast_for_autocast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the Linear and Conv3d weights in ``dtype`` once, for a model run under autocast.

    Autocast rounds these weights to ``dtype`` on every call anyway (its cast
    cache serves only weights that require grad), so outputs are unchanged;
    LayerNorm parameters and position-bias tables stay float32, as autocast
    uses them. The model then runs only under autocast to ``dtype``.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv3d):
            module.to(dtype)
