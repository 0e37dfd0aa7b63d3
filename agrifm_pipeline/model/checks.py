"""Whether a resolved checkpoint fits the AgriFM S2 encoder, judged without building it.

:mod:`agrifm_pipeline.checkpoint` says where the weights come from; this module
says whether the encoder can use them: a file that is plainly no torch checkpoint
(a web page, a Git LFS pointer), one smaller than ``RS_EMBED_AGRIFM_CKPT_MIN_BYTES``,
or one whose tensors do not fit the encoder's names and shapes is refused, with
the reason. The names and shapes are checked by the strict load itself, on an
encoder built on the meta device (no storage, nothing copied).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from agrifm_pipeline.checkpoint import (
    REFETCH_ADVICE,
    ResolvedCheckpoint,
    not_a_checkpoint,
    read_checkpoint,
)
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model.agrifm import AgriFMEncoder
from agrifm_pipeline.model.factory import checkpoint_filter_fn, load_state_dict_strict
from agrifm_pipeline.model.layout import infer_config, to_upstream_layout
from agrifm_pipeline.settings import AgriFMSettings, load_settings

# sha256 and the settings it was judged under -> why it is unusable ("" when it is usable).
_JUDGED: dict[tuple[str, int], str] = {}


def checkpoint_problem(
    resolved: ResolvedCheckpoint, settings: AgriFMSettings | None = None
) -> str | None:
    """Why the encoder could not use ``resolved``, or None when it can.

    Checked without building the model: at least ``RS_EMBED_AGRIFM_CKPT_MIN_BYTES``,
    loadable with ``weights_only=True``, and the AgriFM S2 encoder's tensors under
    their names with their shapes. The answer is kept per sha256 for this process.
    """
    if resolved.untrained or resolved.path is None:
        return None
    settings = settings or load_settings()
    key = (resolved.sha256, settings.ckpt_min_bytes)
    if key not in _JUDGED:
        _JUDGED[key] = _judge(resolved.path, settings) or ""
    return _JUDGED[key] or None


def _judge(path: Path, settings: AgriFMSettings) -> str | None:
    try:
        what = not_a_checkpoint(path)
        if what is not None:
            return f"{path} is {what}, not a torch checkpoint; {REFETCH_ADVICE}"
        size = path.stat().st_size
        if size < settings.ckpt_min_bytes:
            return (
                f"{path} has {size} bytes, fewer than RS_EMBED_AGRIFM_CKPT_MIN_BYTES="
                f"{settings.ckpt_min_bytes} (the full AgriFM checkpoint is larger); {REFETCH_ADVICE}, "
                "or lower the setting if this smaller checkpoint is meant"
            )
        _check_fits_encoder(read_checkpoint(path, mmap=True), str(path))
    except CheckpointError as exc:
        return str(exc)
    except OSError as exc:
        return f"{path} cannot be read: {exc}"
    return None


def _check_fits_encoder(tensors: dict[str, torch.Tensor], source: str) -> None:
    """The strict load's checks of names and shapes, on an encoder without storage."""
    cfg = infer_config(to_upstream_layout(tensors, source=source).tensors)
    with torch.device("meta"):
        model = AgriFMEncoder(cfg)
    state, _ = checkpoint_filter_fn(tensors, model, source=source)
    with warnings.catch_warnings():
        # Loading into storage-less parameters copies nothing (torch says so): only checked.
        warnings.simplefilter("ignore", UserWarning)
        load_state_dict_strict(model, state, source=source)


def validate_checkpoint(
    resolved: ResolvedCheckpoint, settings: AgriFMSettings | None = None
) -> None:
    """Raise CheckpointError with :func:`checkpoint_problem`'s reason, if there is one."""
    problem = checkpoint_problem(resolved, settings)
    if problem is not None:
        raise CheckpointError(problem)
