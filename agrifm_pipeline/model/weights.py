"""Deterministic, explicitly untrained AgriFM weights for offline runs and benchmarks.

``untrained:<seed>`` (patch (4, 4, 4)) or ``untrained:<seed>:p422`` builds a
full-size state dict in the *released* key layout, so it goes through exactly
the same key map and strict load as the real checkpoint. It is never used as a
fallback for a checkpoint that failed to load, and every output made with it
says ``untrained`` in its metadata.

Each tensor is drawn from its own generator, seeded from the CRC-32 of its
released key name plus ``seed`` in the upper 32 bits, so weights do not depend
on key order. Scales keep activations near unit variance and make the position
bias matter: bias tables ~ N(0, 1); matrices and kernels ~ N(0, 1/fan_in);
LayerNorm weights 1 + 0.1 N(0, 1); biases 0.1 N(0, 1).
"""

from __future__ import annotations

import math
import zlib

import torch

from agrifm_pipeline.model.config import EncoderConfig

RELEASED_PATCH_WEIGHT = "encoder.S2_patch_emd.weights"
RELEASED_PATCH_BIAS = "encoder.S2_patch_emd.bias"


def released_key(own_key: str) -> str:
    """Our module's key -> the released checkpoint's key."""
    if own_key == "patch_embed.proj.weight":
        return RELEASED_PATCH_WEIGHT
    if own_key == "patch_embed.proj.bias":
        return RELEASED_PATCH_BIAS
    return f"encoder.backbone.{own_key}"


def untrained_tensor(key: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """One deterministic tensor for the released key ``key``."""
    if not 0 <= seed < 2**32:
        raise ValueError(f"untrained seed {seed} is outside 0..2**32-1")
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")) + (seed << 32))
    z = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith("relative_position_bias_table"):
        return z
    if len(shape) >= 2:
        return z / math.sqrt(math.prod(shape[1:]))
    if key.endswith(".weight"):  # every 1-D weight is a LayerNorm scale
        return 1.0 + 0.1 * z
    return 0.1 * z


def untrained_state_dict(
    seed: int = 0, cfg: EncoderConfig | None = None
) -> dict[str, torch.Tensor]:
    """Full state dict for ``cfg`` (default: AgriFM, patch (4, 4, 4)) in the released layout."""
    from agrifm_pipeline.model.agrifm import AgriFMEncoder

    cfg = cfg or EncoderConfig()
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AgriFMEncoder(cfg).state_dict().items()}
    return {
        released_key(k): untrained_tensor(released_key(k), shape, seed)
        for k, shape in shapes.items()
    }
