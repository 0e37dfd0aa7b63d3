"""The AgriFM S2 encoder: our implementation, its configuration and its loader.

* :mod:`~agrifm_pipeline.model.agrifm`: the modules (a modified Video Swin Transformer);
* :mod:`~agrifm_pipeline.model.config`: the architecture and pretrained metadata, as data;
* :mod:`~agrifm_pipeline.model.factory`: building, loading, device and precision;
* :mod:`~agrifm_pipeline.model.cpu`: CPU kernels and the matmul-library choice;
* :mod:`~agrifm_pipeline.model.layout` and :mod:`~agrifm_pipeline.model.weights`:
  checkpoint key layouts, and deterministic untrained weights;
* :mod:`~agrifm_pipeline.model.checks`: whether a checkpoint fits the encoder;
* :mod:`~agrifm_pipeline.model.official`: the official AgriFM source tree's encoder.

Where the weights come from is :mod:`agrifm_pipeline.checkpoint`'s, below this package.
"""

from __future__ import annotations

from agrifm_pipeline.model.agrifm import AgriFMEncoder
from agrifm_pipeline.model.config import AGRIFM_P422, AGRIFM_P444, DEFAULT_CFG, EncoderConfig
from agrifm_pipeline.model.cpu import cpu_matmul_library, native_bf16_cpu
from agrifm_pipeline.model.factory import (
    cast_for_autocast,
    checkpoint_filter_fn,
    load_encoder,
    load_state_dict_strict,
    resolve_device,
    resolve_precision,
)
from agrifm_pipeline.model.weights import untrained_state_dict

__all__ = [
    "AGRIFM_P422",
    "AGRIFM_P444",
    "DEFAULT_CFG",
    "AgriFMEncoder",
    "EncoderConfig",
    "cast_for_autocast",
    "checkpoint_filter_fn",
    "cpu_matmul_library",
    "load_encoder",
    "load_state_dict_strict",
    "native_bf16_cpu",
    "resolve_device",
    "resolve_precision",
    "untrained_state_dict",
]
