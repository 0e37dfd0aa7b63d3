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

:func:`untrained_tensors` makes them once per node (kept in the cache directory),
and :func:`checkpoint_tensors` gives the tensors of any resolved checkpoint: read
from its file, or these.
"""

from __future__ import annotations

import math
import os
import zlib

import torch

from agrifm_pipeline.checkpoint import ResolvedCheckpoint, node_lock, read_checkpoint
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model.config import EncoderConfig
from agrifm_pipeline.settings import AgriFMSettings, load_settings

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


def checkpoint_tensors(resolved: ResolvedCheckpoint) -> dict[str, torch.Tensor]:
    """The tensors a resolved checkpoint names: read from its file, or built for ``untrained``."""
    if resolved.untrained:
        return untrained_tensors(resolved.untrained_seed or 0, resolved.untrained_patch)
    if resolved.path is None:  # a pinned URL resolved with downloads off
        raise CheckpointError(
            f"checkpoint {resolved.spec} is known by its pin only on this node; resolve it "
            "with downloads on (RS_EMBED_AGRIFM_AUTO_DOWNLOAD=1) to load the weights"
        )
    return read_checkpoint(resolved.path)


# Bump when :func:`untrained_tensor` changes what it makes.
UNTRAINED_FORMAT = 1


def untrained_tensors(
    seed: int, patch: tuple[int, int, int] | None = None, settings: AgriFMSettings | None = None
) -> dict[str, torch.Tensor]:
    """``untrained:<seed>`` weights, made once per node: generating the full encoder's 88 M
    values costs seconds in every process, so the first process writes them to the cache
    directory (under a file lock, mode 0644) and the others map that file. A cache that
    cannot be written, or a cached file that cannot be read, only means they are made."""
    patch = patch or (4, 4, 4)
    settings = settings or load_settings()
    name = f"seed{seed}-p{''.join(map(str, patch))}-f{UNTRAINED_FORMAT}.pt"
    path = settings.cache_dir / "untrained" / name
    if path.is_file():
        try:
            return read_checkpoint(path, mmap=True)
        except (CheckpointError, OSError, RuntimeError):
            pass  # damaged: made again, and replaced below
    state = untrained_state_dict(seed, EncoderConfig(patch_size=patch))
    try:
        with node_lock(path):
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            try:
                torch.save(state, tmp)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
    except (OSError, TimeoutError):
        pass  # a read-only or full cache: made in each process instead
    return state
