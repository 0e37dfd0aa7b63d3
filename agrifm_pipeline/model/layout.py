"""Checkpoint key layouts of AgriFM, normalised onto the upstream module names.

Two layouts exist in the wild (see the facts sheet):

* **released** — a flat dict: ``encoder.S2_patch_emd.weights`` / ``.bias``,
  ``encoder.backbone.<SwinTransformer3D key>``, plus other sensors' patch
  embeds (``encoder.HLSL30_patch_emd.*``, ``encoder.Modis_patch_emd.*``);
* **mmengine** — optionally wrapped in ``state_dict``/``model``, keys maybe
  prefixed ``module.``, with ``patch_emd.proj.*`` and ``backbone.*``.

:func:`to_upstream_layout` maps either onto the upstream encoder's own names
(``patch_emd.proj.weight``, ``backbone.layers.0...``) and returns what it set
aside. Both our encoder's ``checkpoint_filter_fn`` and the official-source
backend start from this one mapping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from agrifm_pipeline.checkpoint import unwrap_checkpoint
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model.config import EncoderConfig

_S2_PATCH = re.compile(r"^(?:encoder\.)?(?:S2_patch_emd|patch_emd)\.(?:proj\.)?(weights?|bias)$")
_BACKBONE = re.compile(r"^(?:encoder\.)?backbone\.(.+)$")
_REL_INDEX = "relative_position_index"


@dataclass
class UpstreamStateDict:
    """Encoder tensors under upstream names, and what was left out."""

    tensors: dict[str, torch.Tensor]
    layout: str  # "released" or "mmengine"
    ignored_keys: list[str] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)


def to_upstream_layout(
    state_dict: Mapping[str, Any], *, source: str = "checkpoint"
) -> UpstreamStateDict:
    """Map a released or mmengine-style AgriFM state dict onto upstream encoder names.

    ``relative_position_index`` buffers are dropped: they are fixed functions of
    the window size that the model builds itself (the file may or may not
    carry them). Keys of other sensors, necks and heads are listed in
    ``ignored_keys``.
    """
    flat = unwrap_checkpoint(state_dict, source=source)
    released = any(k.startswith("encoder.") or "S2_patch_emd" in k for k in flat)
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    dropped: list[str] = []
    for key, value in flat.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        if m := _S2_PATCH.match(name):
            kind = "weight" if m.group(1).startswith("weight") else "bias"
            target = f"patch_emd.proj.{kind}"
        elif m := _BACKBONE.match(name):
            if m.group(1).endswith(_REL_INDEX):
                dropped.append(key)
                continue
            target = f"backbone.{m.group(1)}"
        else:
            ignored.append(key)
            continue
        if target in out:
            raise CheckpointError(f"{source}: two tensors map onto {target!r} (one is {key!r})")
        out[target] = value
    if not out:
        raise CheckpointError(
            f"{source} has no AgriFM S2 encoder tensors (no 'encoder.S2_patch_emd.*', "
            f"'patch_emd.proj.*' or 'backbone.*' keys; first keys: {sorted(flat)[:5]})"
        )
    return UpstreamStateDict(
        tensors=out,
        layout="released" if released else "mmengine",
        ignored_keys=sorted(ignored),
        dropped_buffers=sorted(dropped),
    )


def infer_config(
    upstream: Mapping[str, torch.Tensor], base: EncoderConfig | None = None
) -> EncoderConfig:
    """Read the architecture off the tensors: patch size, width, depths and heads.

    The window size cannot be read off uniquely; it is taken from ``base``
    (default (8, 7, 7)) and checked against the position-bias tables.
    """
    base = base or EncoderConfig()
    w = upstream.get("patch_emd.proj.weight")
    if w is None or w.ndim != 5:
        shape = None if w is None else tuple(w.shape)
        raise CheckpointError(
            f"patch embed weight missing or not a Conv3d kernel (shape {shape}); "
            "expected (embed_dim, 10, pt, ph, pw)"
        )
    embed_dim, in_chans, pt, ph, pw = (int(s) for s in w.shape)
    depths: list[int] = []
    heads: list[int] = []
    stage = 0
    while any(k.startswith(f"backbone.layers.{stage}.") for k in upstream):
        n_blocks = 0
        while f"backbone.layers.{stage}.blocks.{n_blocks}.norm1.weight" in upstream:
            n_blocks += 1
        table = upstream.get(f"backbone.layers.{stage}.blocks.0.attn.relative_position_bias_table")
        if n_blocks == 0 or table is None:
            raise CheckpointError(f"stage {stage} of the backbone has no blocks in the checkpoint")
        depths.append(n_blocks)
        heads.append(int(table.shape[1]))
        stage += 1
    if not depths:
        raise CheckpointError("checkpoint has no backbone stages ('backbone.layers.N.*')")
    wd, wh, ww = base.window_size
    expected_table = (2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1)
    table0 = upstream["backbone.layers.0.blocks.0.attn.relative_position_bias_table"]
    if int(table0.shape[0]) != expected_table:
        raise CheckpointError(
            f"position-bias table has {table0.shape[0]} rows, but window {base.window_size} "
            f"needs {expected_table}; this is not an AgriFM (8, 7, 7)-window checkpoint"
        )
    return EncoderConfig(
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=base.window_size,
        patch_size=(pt, ph, pw),
        mlp_ratio=base.mlp_ratio,
        qkv_bias="backbone.layers.0.blocks.0.attn.qkv.bias" in upstream,
        layer_norm_eps=base.layer_norm_eps,
        mean_frame_down=base.mean_frame_down,
    )
