"""Input contract and preprocessing, exactly as the adapter contract states.

Order: coerce to exactly ``T`` frames -> non-finite values to the fill value
(counted) -> clip to 0..10000 -> normalise -> resize every frame to
``image_size`` x ``image_size`` (bilinear, ``align_corners=False``, no
antialias). A non-square frame is first centre-padded to a square, as the
peer (rs-embed's ``center_pad_to_square``) does: by reflection while the whole
pad on the short axis (long side − short side, both halves together) is
smaller than the short side, by edge replication otherwise (a 30 x 70 frame,
pad 40, is edge-padded); the odd pixel of an odd pad goes to the bottom/right.

``n_frames``, ``image_size`` and ``norm_mode`` are normalised by their one function
in :mod:`agrifm_pipeline.settings`, as every settings type does: a value is accepted
(and an alias spelt canonically) here exactly as it is there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.model.config import AGRIFM_S2_MEAN, AGRIFM_S2_STD, RAW_MAX, STD_FLOOR
from agrifm_pipeline.settings import (
    canonical_image_size,
    canonical_n_frames,
    canonical_norm_mode,
)

N_BANDS = 10
ACCEPTED_SHAPES = "(10, H, W) [one frame, repeated to T] or (T, 10, H, W) [padded/truncated to T]"

_MEAN = torch.tensor(AGRIFM_S2_MEAN, dtype=torch.float32)
_STD = torch.tensor(AGRIFM_S2_STD, dtype=torch.float32).clamp_min(STD_FLOOR)


def _as_tensor(x: Any, name: str = "input_chw", *, own: bool = False) -> torch.Tensor:
    """Any real numeric array -> float32 tensor.

    With ``own=True`` the result never shares memory with ``x`` (the caller's
    array is never modified by the in-place steps that follow).
    """
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # any conversion failure is a contract error
            raise InputContractError(
                f"{name} cannot be read as an array ({exc}); accepted: {ACCEPTED_SHAPES}"
            ) from exc
        if arr.dtype.kind not in "biuf":
            raise InputContractError(
                f"{name} has dtype {arr.dtype} and shape {arr.shape}; give real numbers (uint16 DN or float) "
                f"shaped {ACCEPTED_SHAPES}"
            )
        if arr.dtype.kind == "b":
            arr = arr.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex():
        raise InputContractError(f"{name} is complex-valued; give real S2 SR digital numbers")
    if t.dtype == torch.float32:
        return t.clone() if own else t
    return t.to(torch.float32)


def coerce_frames(x: Any, n_frames: int) -> tuple[np.ndarray, dict[str, Any]]:
    """(10, H, W) or (T, 10, H, W) -> exactly (n_frames, 10, H, W) float32, and its record."""
    t, record = _coerce(x, n_frames)
    return t.numpy(), record


def _coerce(x: Any, n_frames: int) -> tuple[torch.Tensor, dict[str, Any]]:
    n_frames = canonical_n_frames(n_frames)
    t = _as_tensor(x)
    shape = tuple(t.shape)
    if t.ndim == 3 and shape[0] == N_BANDS and shape[1] > 0 and shape[2] > 0:
        return t.unsqueeze(0).expand(n_frames, *shape).contiguous(), {
            "input_mode": "chw_repeated",
            "input_original_frames": 1,
            "input_frames": n_frames,
            "input_repeated_to_t": True,
            "input_hw": [shape[1], shape[2]],
        }
    if t.ndim == 4 and shape[1] == N_BANDS and shape[0] > 0 and shape[2] > 0 and shape[3] > 0:
        orig = shape[0]
        if orig < n_frames:
            pad = t[-1:].expand(n_frames - orig, *shape[1:])
            t, mode = torch.cat([t, pad], dim=0), "tchw_padded"
        elif orig > n_frames:
            t, mode = t[:n_frames].clone(), "tchw_truncated"
        else:
            t, mode = t.clone(), "tchw_exact"
        return t.contiguous(), {
            "input_mode": mode,
            "input_original_frames": orig,
            "input_frames": n_frames,
            "input_repeated_to_t": orig < n_frames,
            "input_hw": [shape[2], shape[3]],
        }
    raise InputContractError(
        f"input_chw has shape {shape}; accepted: {ACCEPTED_SHAPES} with H, W > 0"
    )


def replace_nonfinite(x: np.ndarray, fill_value: float) -> tuple[np.ndarray, int]:
    """NaN/±inf -> ``fill_value`` in place on a float array; returns (array, count)."""
    bad = ~np.isfinite(x)
    count = int(bad.sum())
    if count:
        x[bad] = fill_value
    return x, count


def _replace_nonfinite_(t: torch.Tensor, fill_value: float) -> int:
    bad = ~torch.isfinite(t)
    count = int(bad.sum())
    if count:
        t.masked_fill_(bad, fill_value)
    return count


def normalize(x: np.ndarray | torch.Tensor, mode: str) -> np.ndarray | torch.Tensor:
    """Normalise clipped DN; band axis is -3. Returns the same kind of array."""
    mode = canonical_norm_mode(mode)
    t = _as_tensor(x, "x") if not isinstance(x, torch.Tensor) else x.to(torch.float32)
    if mode == "agrifm_stats":
        shape = (-1, 1, 1)
        out = (t - _MEAN.view(shape)) / _STD.view(shape)
    elif mode == "unit_scale":
        out = (t / RAW_MAX).clamp_(0.0, 1.0)
    else:
        out = t.clone() if t is x else t
    return out if isinstance(x, torch.Tensor) else out.numpy()


def _normalize_(t: torch.Tensor, mode: str) -> torch.Tensor:
    """In-place variant on a float32 tensor whose band axis is -3."""
    if mode == "agrifm_stats":
        t.sub_(_MEAN.view(-1, 1, 1)).div_(_STD.view(-1, 1, 1))
    elif mode == "unit_scale":
        t.div_(RAW_MAX).clamp_(0.0, 1.0)
    return t


def square_pad(h: int, w: int) -> dict[str, Any] | None:
    """The centre pad that makes an h x w frame square, or None if it is square.

    Reflection only while the whole pad (both sides) is smaller than the short
    side; the peer decides on the whole pad, not on the larger half.
    """
    if h == w:
        return None
    total = abs(h - w)
    before, after = total // 2, total - total // 2
    side = min(h, w)
    mode = "reflect" if total < side else "replicate"
    axis = "y" if h < w else "x"
    return {"axis": axis, "before": before, "after": after, "mode": mode}


def resize_frames(x: torch.Tensor, image_size: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """(..., H, W) -> (..., S, S): centre square pad if needed, then bilinear resize."""
    image_size = canonical_image_size(image_size)
    *lead, h, w = x.shape
    planes = x.reshape(-1, 1, h, w)
    pad = square_pad(h, w)
    if pad is not None:
        amounts = (
            (0, 0, pad["before"], pad["after"])
            if pad["axis"] == "y"
            else (pad["before"], pad["after"], 0, 0)
        )
        planes = F.pad(planes, amounts, mode=pad["mode"])
    side = planes.shape[-1]
    if side != image_size:
        planes = F.interpolate(
            planes,
            size=(image_size, image_size),
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )
    out = planes.reshape(*lead, image_size, image_size)
    return out, {
        "resized_hw": [image_size, image_size],
        "square_pad": pad,
        "resized": side != image_size,
    }


@dataclass
class Preprocessed:
    """A model-ready tensor and the record of how it was made."""

    tensor: torch.Tensor  # (T, 10, S, S) or (N, T, 10, S, S) float32
    record: dict[str, Any]


def _clip_and_normalise(t: torch.Tensor, norm_mode: str, fill_value: float) -> dict[str, Any]:
    nonfinite = _replace_nonfinite_(t, fill_value)
    low = int((t < 0).sum())
    high = int((t > RAW_MAX).sum())
    t.clamp_(0.0, RAW_MAX)
    _normalize_(t, norm_mode)
    return {"nonfinite_pixels": nonfinite, "clipped_low": low, "clipped_high": high}


_TORCH_INTS = (np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64)


def _from_integers(arr: np.ndarray) -> tuple[torch.Tensor, dict[str, int]]:
    """Integer DN (any strides, e.g. a chip view of a tile) -> clipped float32 tensor
    (fresh, contiguous memory) and the clip counts.

    One strided copy with the type conversion, on torch's threads: reordering
    a tile into chips and converting to float32 are the same pass.
    """
    out = torch.empty(arr.shape, dtype=torch.float32)
    if arr.dtype.type in _TORCH_INTS and all(s >= 0 for s in arr.strides):
        out.copy_(torch.from_numpy(arr))
    else:  # integer types torch cannot wrap (uint32, uint64): numpy converts
        out.copy_(torch.from_numpy(arr.astype(np.float32, order="C")))
    high = int(torch.count_nonzero(out > RAW_MAX)) if out.numel() and out.max() > RAW_MAX else 0
    low = (
        int(torch.count_nonzero(out < 0))
        if arr.dtype.kind == "i" and out.numel() and out.min() < 0
        else 0
    )
    if high or low:
        out.clamp_(0.0, RAW_MAX)
    return out, {"clipped_low": low, "clipped_high": high}


def preprocess_input(
    x: Any, *, n_frames: int, image_size: int, norm_mode: str, fill_value: float = 0.0
) -> Preprocessed:
    """One ``input_chw``: (10, H, W) or (T, 10, H, W) raw DN -> (n_frames, 10, S, S)."""
    mode = canonical_norm_mode(norm_mode)
    image_size = canonical_image_size(image_size)
    t, record = _coerce(x, n_frames)  # always a fresh tensor
    record.update(_clip_and_normalise(t, mode, fill_value))
    t, resize_rec = resize_frames(t, image_size)
    record.update(resize_rec, norm_mode=mode, image_size=image_size, fill_value=fill_value)
    return Preprocessed(t.contiguous(), record)


def preprocess_chips(
    chips: Any, *, n_frames: int, image_size: int, norm_mode: str, fill_value: float = 0.0
) -> Preprocessed:
    """Raw chips (N, T, 10, H, W), or a tile's block of them (rows, cols, T, 10, H, W),
    T == n_frames -> (N, T, 10, S, S) with N = rows x cols in row-major order, vectorised."""
    mode = canonical_norm_mode(norm_mode)
    image_size = canonical_image_size(image_size)
    shape = tuple(getattr(chips, "shape", ()))
    lead = shape[:-4]
    if len(lead) not in (1, 2) or shape[-4] != n_frames or shape[-3] != N_BANDS or 0 in shape:
        raise InputContractError(
            f"chips have shape {shape}; expected (N, {n_frames}, {N_BANDS}, H, W) or "
            f"(rows, cols, {n_frames}, {N_BANDS}, H, W) raw DN"
        )
    n = math.prod(lead)
    record: dict[str, Any] = {"input_hw": [int(shape[-2]), int(shape[-1])], "n_chips": n}
    if isinstance(chips, np.ndarray) and chips.dtype.kind in "ui":
        # Raw DN as integers (what providers give): nothing can be non-finite, and the
        # clip bounds are counted after one strided conversion pass to float32.
        t, counts = _from_integers(chips)
        record.update(nonfinite_pixels=0, **counts)
        t = t.view(n, *shape[-4:])
        _normalize_(t, mode)
    else:
        t = _as_tensor(chips, "chips", own=True).reshape(n, *shape[-4:])
        record.update(_clip_and_normalise(t, mode, fill_value))
    t, resize_rec = resize_frames(t, image_size)
    record.update(
        resize_rec,
        norm_mode=mode,
        image_size=image_size,
        fill_value=fill_value,
        input_frames=n_frames,
    )
    return Preprocessed(t.contiguous(), record)
