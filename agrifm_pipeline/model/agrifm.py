"""AgriFM Sentinel-2 encoder: a modified Video Swin Transformer.

Our own implementation, written to load the official ``AgriFM.pth`` tensors and
reproduce the official outputs (proven by the reference fixtures in the tests).

Layout of the network (time first, as AgriFM feeds it)::

    x (N, T, 10, H, W)
      -> PatchEmbed3D        Conv3d, kernel = stride = patch (pt, ph, pw)  -> (N, D, H', W', E)
      -> Stage 0..2          windowed attention blocks, then PatchMerging (frames averaged in
                              pairs, 2x2 spatial phases concatenated, 4C -> 2C)
      -> Stage 3             windowed attention blocks, no merging
      -> LayerNorm(8E)
      -> fold time into channels: channel = c * D_last + d             -> (N, 8E * D_last, h, w)

Everything runs channels-last, ``(B, D, H, W, C)``, between the patch embed and
the final fold, so no layout permutes happen inside a stage.

Behaviours of the official code that the released weights were trained with and
that are reproduced on purpose (see the facts sheet):

* the relative-position index is built once for the full (8, 7, 7) window and
  sliced ``[:N, :N]`` when a feature map is smaller than the window;
* padded tokens (after ``norm1``) take part in attention unmasked;
* the shift mask uses -100, not -inf;
* PatchMerging averages an odd or single remaining frame with a zero frame.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agrifm_pipeline.errors import CheckpointError, SettingsError
from agrifm_pipeline.model.config import EncoderConfig
from agrifm_pipeline.model.layout import to_upstream_layout

Size3 = tuple[int, int, int]

SHIFT_MASK_VALUE = -100.0


def effective_window(size: Size3, window: Size3, shift: Size3) -> tuple[Size3, Size3]:
    """Window and shift actually used on a feature map of ``size`` (D, H, W).

    An axis no longer than the window is covered whole and not shifted
    (``<=``: a temporal size of exactly 8 gets no temporal shift).
    """
    win = tuple(s if s <= w else w for s, w in zip(size, window, strict=True))
    sft = tuple(0 if s <= w else h for s, w, h in zip(size, window, shift, strict=True))
    return win, sft  # type: ignore[return-value]


def relative_position_index(window: Size3) -> torch.Tensor:
    """Pairwise index into the position-bias table for a full window: (N, N) int64."""
    wd, wh, ww = window
    coords = torch.stack(
        torch.meshgrid(torch.arange(wd), torch.arange(wh), torch.arange(ww), indexing="ij")
    ).flatten(1)  # (3, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3)
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1])
    strides = torch.tensor([(2 * wh - 1) * (2 * ww - 1), 2 * ww - 1, 1])
    return (rel * strides).sum(-1)  # (N, N)


def window_partition(x: torch.Tensor, window: Size3) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, nW, N, C) with N = wd * wh * ww, windows in (d, h, w) order."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.view(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, d', h', w', wd, wh, ww, C)
    return x.reshape(b, -1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: Size3, size: Size3) -> torch.Tensor:
    """(B, nW, N, C) -> (B, D, H, W, C); inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    d, h, w = size
    wd, wh, ww = window
    x = windows.view(b, d // wd, h // wh, w // ww, wd, wh, ww, c)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, d', wd, h', wh, w', ww, C)
    return x.reshape(b, d, h, w, c)


def shift_window_mask(
    padded: Size3, window: Size3, shift: Size3, device: torch.device
) -> torch.Tensor:
    """Additive mask (nW, N, N) that keeps a shifted window's regions apart."""
    labels = torch.zeros((1, *padded, 1), device=device)
    region = 0
    spans = [
        ((0, p - w), (p - w, p - s), (p - s, p))
        for p, w, s in zip(padded, window, shift, strict=True)
    ]
    for d0, d1 in spans[0]:
        for h0, h1 in spans[1]:
            for w0, w1 in spans[2]:
                labels[:, d0:d1, h0:h1, w0:w1, :] = region
                region += 1
    win_labels = window_partition(labels, window)[0, :, :, 0]  # (nW, N)
    differ = win_labels[:, None, :] != win_labels[:, :, None]  # (nW, N, N)
    return torch.zeros(differ.shape, device=device).masked_fill(differ, SHIFT_MASK_VALUE)


def _version(t: torch.Tensor) -> tuple[int, int | None]:
    """Storage and in-place version of ``t`` (inference tensors have no version counter)."""
    try:
        return t.data_ptr(), t._version
    except RuntimeError:
        return t.data_ptr(), None


def _no_grad() -> bool:
    """True when no autograd graph is being recorded (in-place updates are safe)."""
    return not torch.is_grad_enabled() or torch.is_inference_mode_enabled()


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


CPU_MATMUL_ENV = "AGRIFM_PIPELINE_CPU_MATMUL"
CPU_MATMUL_CHOICES = ("auto", "blas", "onednn")


def cpu_matmul_library(setting: str | None = None) -> str:
    """``"onednn"`` or ``"blas"``: which library runs the encoder's fp32 linear layers on a CPU.

    ``setting`` (default: ``AGRIFM_PIPELINE_CPU_MATMUL``, else ``auto``) is one of
    ``blas`` (PyTorch's default, MKL on x86-64 builds), ``onednn``, or ``auto``.
    ``auto`` picks by the CPU's vector width, as measured at this encoder's
    matmul shapes (``bench/bench_encoder.py``):

    * AVX-512 (an AMD EPYC Zen 4): oneDNN is 7-20 % faster than MKL, whole
      encoder 7 % faster;
    * AVX2 only (an AMD EPYC Zen 3): MKL is 5-25 % faster than oneDNN.

    The two agree to ~1e-6; the choice is recorded with every embedding.
    """
    raw = os.environ.get(CPU_MATMUL_ENV, "") if setting is None else setting
    value = str(raw).strip().lower() or "auto"
    if value not in CPU_MATMUL_CHOICES:
        raise SettingsError(
            f"{CPU_MATMUL_ENV}={raw!r} is not known; use one of {', '.join(CPU_MATMUL_CHOICES)}"
        )
    available = _onednn_linear_available()
    if value == "onednn" and not available:
        raise SettingsError(
            f"{CPU_MATMUL_ENV}=onednn but this PyTorch build has no oneDNN linear op; "
            "use 'auto' or 'blas'"
        )
    if value == "auto":
        wide = torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
        value = "onednn" if available and wide else "blas"
    return value


def _initial_choice() -> bool:
    try:
        return cpu_matmul_library() == "onednn"
    except SettingsError:
        return False  # load_encoder raises it with the fix; importing must not fail


# Set at import from the environment; load_encoder re-reads it (and raises on a bad value).
ONEDNN_LINEAR = _initial_choice()


def use_cpu_matmul(setting: str | None = None) -> str:
    """Resolve :func:`cpu_matmul_library` and make it the process's choice; returns it."""
    global ONEDNN_LINEAR
    choice = cpu_matmul_library(setting)
    ONEDNN_LINEAR = choice == "onednn"
    return choice


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX) for oneDNN.

    Without it PyTorch's bf16 matmuls on a CPU run in software: on an AVX2-only
    AMD EPYC, 2048² bf16 ran at ~1 GFLOP/s against 170 in fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# A linear layer with at most this many input rows runs on the BLAS as one matmul per
# thread, each over its share of the output columns (see Linear).
SPLIT_ROWS_MAX = 256


def _linear_by_column_blocks(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, parts: int
) -> torch.Tensor:
    """``F.linear`` as ``parts`` matmuls side by side, each on N / parts output columns.

    The weight (N, K) is viewed, not copied, as ``parts`` transposed blocks; one
    ``baddbmm`` runs them, a thread each, and the (parts, M, N / parts) result is
    laid back out as (M, N). Every output element is the same dot product as in
    ``F.linear``, so the values are identical.
    """
    k, n = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, k)  # (M, K)
    m = rows.shape[0]
    w = weight.view(parts, n // parts, k).transpose(1, 2)  # (parts, K, N/parts)
    b = bias.view(parts, 1, n // parts)
    y = torch.baddbmm(b, rows.expand(parts, m, k), w)  # (parts, M, N/parts)
    return y.transpose(0, 1).reshape(*x.shape[:-1], n)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with a faster CPU inference path.

    PyTorch sends an fp32 matmul on a CPU to its BLAS (MKL on x86-64). On
    AVX-512 hosts oneDNN's matmul, which PyTorch ships too, is faster at this
    encoder's shapes, and it writes into a fresh output instead of copying the
    bias first; on AVX2 hosts MKL is faster (see :func:`cpu_matmul_library`,
    which sets ``ONEDNN_LINEAR``). The oneDNN path is taken only for fp32 CPU
    inputs with no autograd graph, no autocast and no ``torch.compile`` tracing
    (the op needs constant weights there); everything else is ``nn.Linear``.

    On the BLAS, a layer with few input rows (one chip's tokens in the last
    stages at batch 1: 196 and 49) runs as one matmul per thread, each over
    its share of the output columns (:func:`_linear_by_column_blocks`). MKL
    appears to split such a matmul by rows, each thread packing the whole
    weight for a few rows: on 2 threads of an AVX2 AMD EPYC, 49 rows ran
    at 97-128 GFLOP/s one way and 116-144 the other, 196-256 rows at 123-164
    and 137-174. Above ``SPLIT_ROWS_MAX`` rows, or with more than 4 threads
    (not measured), or fewer than 256 columns a thread, it is ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and _no_grad()
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # Inductor lowers nn.Linear itself
        ):
            if ONEDNN_LINEAR:
                return torch.ops.mkldnn._linear_pointwise(
                    x.contiguous(), self.weight, self.bias, "none", [], ""
                )
            if self.bias is not None and x.numel() <= SPLIT_ROWS_MAX * x.shape[-1]:
                parts = torch.get_num_threads()
                n = self.out_features
                if 2 <= parts <= 4 and n % parts == 0 and n // parts >= 256:
                    return _linear_by_column_blocks(x, self.weight, self.bias, parts)
        return super().forward(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if _no_grad():
            torch.ops.aten.gelu_(h)  # in place: fc1's output is ours, nothing else holds it
        else:
            h = self.act(h)
        return self.fc2(h)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v as two batched matmuls and a softmax: (..., N, hd).

    Used on a CPU in bfloat16, where PyTorch's fused attention kernel runs at
    35-60 GFLOP/s on these small windows (49-392 tokens) and strided q/k/v, 2-5x
    slower than this (measured on an AMD EPYC with AVX512-BF16). The scores
    tensor is small at window sizes. fp32 keeps the fused kernel: there the two
    are equally fast and the fused one never holds the N x N scores.
    """
    scores = torch.matmul(q, k.transpose(-2, -1))  # (..., N, N)
    scores.mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(scores.softmax(-1), v)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3-D windows with a relative-position bias."""

    def __init__(self, dim: int, num_heads: int, window: Size3, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window = window
        wd, wh, ww = window
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), num_heads)
        )
        # A fixed function of the window; not part of the state dict.
        self.relative_position_index: torch.Tensor
        self.register_buffer(
            "relative_position_index", relative_position_index(window), persistent=False
        )
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim)
        self._bias_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def position_bias(self, n: int) -> torch.Tensor:
        """(nH, n, n) bias for an effective window of ``n`` tokens.

        The index is the full window's, sliced ``[:n, :n]`` as upstream does.
        """
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)  # (nH, n, n)

    def attention_bias(
        self, n: int, mask: torch.Tensor | None, mask_key: Any, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive attention bias, cached while the weights are frozen.

        Without a mask: the position bias, (1, nH, n, n). With a shift mask
        (nW, n, n): position bias + mask per window, flattened to
        (1, nW * nH, n, n) so that windows and heads share one broadcastable
        batch axis. ``mask_key`` names the mask (padded size, window, shift);
        the table's version counter drops stale entries after an in-place load.
        """
        table = self.relative_position_bias_table
        cacheable = not (torch.is_grad_enabled() and table.requires_grad)
        key = (n, mask_key, dtype, table.device, _version(table))
        if cacheable and key in self._bias_cache:
            return self._bias_cache[key]
        bias = self.position_bias(n).unsqueeze(0)  # (1, nH, n, n)
        if mask is not None:
            bias = (bias + mask.unsqueeze(1)).reshape(1, -1, n, n)  # (1, nW * nH, n, n)
        bias = bias.to(dtype).contiguous()
        if cacheable:
            stale = [k for k in self._bias_cache if k[4] != key[4] or len(self._bias_cache) > 8]
            for k in stale:
                del self._bias_cache[k]
            self._bias_cache[key] = bias
        return bias

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_key: Any = None
    ) -> torch.Tensor:
        """x: (B, nW, N, C); mask: (nW, N, N) additive or None. Returns (B, nW, N, C)."""
        b, nw, n, c = x.shape
        nh, hd = self.num_heads, self.head_dim
        qkv = (
            self.qkv(x).view(b, nw, n, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)
        )  # (3, B, nW, nH, N, hd)
        bias = self.attention_bias(n, mask, mask_key, qkv.dtype)
        if mask is None:
            qkv = qkv.reshape(3, b * nw, nh, n, hd)  # a view: windows join the batch axis
        else:
            qkv = qkv.reshape(3, b, nw * nh, n, hd)  # windows join the head axis, like the bias
        q, k, v = qkv.unbind(0)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            out = explicit_attention(q, k, v, bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(b, nw, nh, n, hd).transpose(2, 3).reshape(b, nw, n, c)  # (B, nW, N, C)
        return self.proj(out)


class SwinBlock3D(nn.Module):
    """Pre-norm block: (shifted) window attention, then MLP, each with a residual."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window: Size3,
        shift: Size3,
        mlp_ratio: float,
        qkv_bias: bool,
        eps: float,
    ) -> None:
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = WindowAttention3D(dim, num_heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, window: Size3, shift: Size3, mask: torch.Tensor | None, mask_key: Any
    ) -> torch.Tensor:
        """x: (B, D, H, W, C) -> same shape. ``window``/``shift`` are the effective ones."""
        _, d, h, w, _ = x.shape
        y = self.norm1(x)
        pads = [(-s) % win for s, win in zip((d, h, w), window, strict=True)]
        if any(pads):
            # Zero tokens after the norm, attended to like any other (as upstream).
            y = F.pad(y, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
        padded: Size3 = (d + pads[0], h + pads[1], w + pads[2])
        shifted = any(shift)
        if shifted:
            y = torch.roll(y, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
        y = window_reverse(
            self.attn(
                window_partition(y, window), *((mask, mask_key) if shifted else (None, None))
            ),
            window,
            padded,
        )  # (B, Dp, Hp, Wp, C)
        if shifted:
            y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
        if any(pads):
            y = y[:, :d, :h, :w, :]
        if not _no_grad():
            x = x + y
            return x + self.mlp(self.norm2(x))
        # Inference: the residual sums go into buffers this block made (``y``, then the
        # MLP output), never into ``x``, which the caller may still hold.
        x = y.add_(x)
        return self.mlp(self.norm2(x)).add_(x)


class PatchMerging3D(nn.Module):
    """Halve time (frame mean) and space (2x2 phases concatenated), then 4C -> 2C."""

    def __init__(self, dim: int, eps: float, mean_frame_down: bool = True) -> None:
        super().__init__()
        self.mean_frame_down = mean_frame_down
        self.norm = nn.LayerNorm(4 * dim, eps=eps)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) -> (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C)."""
        _, d, h, w, _ = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        if self.mean_frame_down:
            if d % 2:
                # An odd last frame is averaged with a zero frame (upstream behaviour).
                x = F.pad(x, (0, 0, 0, 0, 0, 0, 0, 1))
            x = (x[:, 0::2] + x[:, 1::2]) / 2  # (B, D/2, H, W, C)
        else:
            x = x[:, 0::2]
        x = torch.cat(
            [x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]],
            dim=-1,
        )  # (B, D/2, H/2, W/2, 4C)
        return self.reduction(self.norm(x))


class SwinStage3D(nn.Module):
    """Blocks alternating plain and shifted windows, then optional merging."""

    def __init__(
        self, dim: int, depth: int, num_heads: int, cfg: EncoderConfig, downsample: bool
    ) -> None:
        super().__init__()
        self.window: Size3 = cfg.window_size
        self.shift: Size3 = tuple(s // 2 for s in cfg.window_size)  # type: ignore[assignment]
        self.blocks = nn.ModuleList(
            SwinBlock3D(
                dim,
                num_heads,
                cfg.window_size,
                (0, 0, 0) if i % 2 == 0 else self.shift,
                cfg.mlp_ratio,
                cfg.qkv_bias,
                cfg.layer_norm_eps,
            )
            for i in range(depth)
        )
        self.downsample = (
            PatchMerging3D(dim, cfg.layer_norm_eps, cfg.mean_frame_down) if downsample else None
        )
        self._mask_cache: dict[tuple[Any, ...], torch.Tensor] = {}

    def shift_mask(
        self, size: Size3, device: torch.device
    ) -> tuple[Size3, Size3, torch.Tensor | None, Any]:
        """Effective window and shift for ``size``, the shift mask and a key naming it."""
        window, shift = effective_window(size, self.window, self.shift)
        if not any(shift):
            return window, shift, None, None
        padded = tuple(-(-s // w) * w for s, w in zip(size, window, strict=True))
        key = (padded, window, shift, device)
        mask = self._mask_cache.get(key)
        if mask is None:
            if len(self._mask_cache) > 8:
                self._mask_cache.clear()
            mask = self._mask_cache[key] = shift_window_mask(padded, window, shift, device)  # type: ignore[arg-type]
        return window, shift, mask, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) -> blocks -> merged (B, D', H', W', C') or unchanged shape."""
        _, d, h, w, _ = x.shape
        window, shift, mask, mask_key = self.shift_mask((d, h, w), x.device)
        for i, block in enumerate(self.blocks):
            if i % 2 == 1:
                x = block(x, window, shift, mask, mask_key)
            else:
                x = block(x, window, (0, 0, 0), None, None)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class PatchEmbed3D(nn.Module):
    """Non-overlapping 3-D patches; input zero-padded at the end of W, H, then T."""

    def __init__(self, patch: Size3, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, C, H, W) -> (N, D, H', W', E), channels last.

        The convolution reads the input through a (N, C, T, H, W) view (no
        transposed copy) with its weight in channels-last-3d memory, so the
        output comes out channels-last and the final permute is a view. With
        oneDNN on a CPU this is 1.5x faster than the same convolution written as
        a matmul over gathered patches (the gather is a strided copy of the
        whole input) and 1.15x faster than a default-layout Conv3d. On a CPU it
        runs one sample at a time: oneDNN reorders its input into a blocked
        layout first, and a sample's reorder stays in cache where a batch's does
        not (8 chips of T=8: 61 against 103 ms on an AMD EPYC).
        """
        if x.device.type == "cpu" and x.shape[0] > 1:
            return torch.cat([self._project(sample) for sample in x.split(1)])
        return self._project(x)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        t, h, w = x.shape[1], x.shape[3], x.shape[4]
        pt, ph, pw = self.patch
        x = x.transpose(1, 2)  # (N, C, T, H, W), a view
        pads = ((-w) % pw, (-h) % ph, (-t) % pt)
        if any(pads):
            x = F.pad(x, (0, pads[0], 0, pads[1], 0, pads[2]))
        weight = self.proj.weight.contiguous(memory_format=torch.channels_last_3d)
        y = F.conv3d(x, weight, self.proj.bias, stride=self.patch)  # (N, E, D, H', W')
        return y.permute(0, 2, 3, 4, 1).contiguous()  # a view when y is channels-last


def fold_time(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, C * D, H, W) with channel index c * D + d."""
    b, d, h, w, c = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b, c * d, h, w)


class AgriFMEncoder(nn.Module):
    """AgriFM S2 encoder. ``forward`` returns ``encoder_features`` (N, D, H/stride, W/stride)."""

    def __init__(self, cfg: EncoderConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        dims = cfg.stage_dims()
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.layers = nn.ModuleList(
            SwinStage3D(dims[i], cfg.depths[i], cfg.num_heads[i], cfg, downsample=i < len(dims) - 1)
            for i in range(len(dims))
        )
        self.norm = nn.LayerNorm(cfg.num_features, eps=cfg.layer_norm_eps)
        # Set by load_encoder: bfloat16 runs the forward under autocast, output float32.
        self.autocast_dtype: torch.dtype | None = None
        # Set by load_encoder on a CPU: "onednn" or "blas" for the fp32 linear layers.
        self.cpu_matmul: str | None = None
        # On a CPU, stages run on at most this many tokens at a time (whole samples
        # per chunk), so the early, token-heavy stages stay cache-resident. A GPU
        # wants the opposite (big launches), so it is never chunked. 0 = off.
        self.chunk_tokens = 8192

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(1)  # (N, C, H, W) is one frame
        if x.ndim != 5 or x.shape[2] != self.cfg.in_chans:
            raise ValueError(
                f"encoder input must be (N, T, {self.cfg.in_chans}, H, W) or "
                f"(N, {self.cfg.in_chans}, H, W); got {tuple(x.shape)}"
            )
        return self.patch_embed(x)  # (N, D, H', W', E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, 10, H, W) normalised float -> (N, 8E * D_last, h, w) float32."""
        if self.autocast_dtype is not None:
            with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
                return self._forward(x).float()
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        for stage in self.layers:
            x = self._run_stage(stage, x)
        return fold_time(self.norm(x))

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``stage`` on whole samples, ``chunk_tokens`` tokens at a time.

        Samples never interact inside the encoder, so chunking over the batch
        changes nothing but memory traffic.
        """
        b, d, h, w, _ = x.shape
        if not self.chunk_tokens or x.device.type != "cpu":
            return stage(x)
        per_chunk = max(1, self.chunk_tokens // (d * h * w))
        if per_chunk >= b:
            return stage(x)
        return torch.cat([stage(part) for part in x.split(per_chunk)], dim=0)

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """Upstream's output dict: ``encoder_features`` and the un-normalised ``features_list``
        (patch embed, then each merged stage output), time folded into channels."""
        x = self._embed(x)
        features = [fold_time(x)]
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i < len(self.layers) - 1:
                features.append(fold_time(x))
        return {"encoder_features": fold_time(self.norm(x)), "features_list": features}


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
    model: AgriFMEncoder, state_dict: Mapping[str, torch.Tensor], *, source: str
) -> None:
    """Strict load that reports every missing, unexpected and mis-shaped tensor at once."""
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
    model.load_state_dict(dict(state_dict), strict=True)
