"""AgriFM Sentinel-2 encoder: a modified Video Swin Transformer.

Our own implementation, written to load the official ``AgriFM.pth`` tensors and
reproduce the official outputs (the reference fixtures in the tests prove it).
Building and loading live in :mod:`agrifm_pipeline.model.factory`, the CPU
kernels in :mod:`agrifm_pipeline.model.cpu`.

Layout of the network (time first, as AgriFM feeds it)::

    x (N, T, 10, H, W)
      -> PatchEmbed3D        Conv3d, kernel = stride = patch (pt, ph, pw)  -> (N, D, H', W', E)
      -> SwinStage3D 0..2    windowed attention blocks, then PatchMerging3D (frames averaged
                             in pairs, 2x2 spatial phases concatenated, 4C -> 2C)
      -> SwinStage3D 3       windowed attention blocks, no merging
      -> LayerNorm(8E)                                                      -> (N, D', h, w, 8E)
      -> fold_time: channel = c * D' + d                                    -> (N, 8E * D', h, w)

Everything runs channels-last, ``(B, D, H, W, C)``, between the patch embed and
the final fold, so no layout permutes happen inside a stage.

Behaviours of the official code that the released weights were trained with and
that are reproduced on purpose (see the facts sheet):

* the relative-position index is built once for the full (8, 7, 7) window and
  sliced ``[:N, :N]`` when a feature map is smaller than the window;
* padded tokens (after ``norm1``) take part in attention unmasked;
* the shift mask uses -100, not -inf;
* PatchMerging averages an odd or single remaining frame with a zero frame.

Precision is the caller's: the modules follow ``torch.autocast`` like any
PyTorch module, and :class:`~agrifm_pipeline.inference.EmbeddingEngine` is what
runs them under it.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from agrifm_pipeline.model.cache import ShapeCache
from agrifm_pipeline.model.config import EncoderConfig
from agrifm_pipeline.model.cpu import (
    Linear,
    explicit_attention,
    recording_graph,
    use_explicit_attention,
)

Size3 = tuple[int, int, int]

SHIFT_MASK_VALUE = -100.0
#: On a CPU, stages run on at most this many tokens at a time (whole samples per
#: chunk), so the early, token-heavy stages stay cache-resident; 0 turns it off.
CHUNK_TOKENS = 8192


# --- window geometry --------------------------------------------------------------------


def effective_window(size: Size3, window: Size3, shift: Size3) -> tuple[Size3, Size3]:
    """Window and shift actually used on a feature map of ``size`` (D, H, W).

    An axis no longer than the window is covered whole and not shifted
    (``<=``: a temporal size of exactly 8 gets no temporal shift).
    """
    win = tuple(s if s <= w else w for s, w in zip(size, window, strict=True))
    sft = tuple(0 if s <= w else h for s, w, h in zip(size, window, shift, strict=True))
    return win, sft  # type: ignore[return-value]


def relative_position_index(window: Size3) -> torch.Tensor:
    """Pairwise index into the position-bias table for a full window: (N, N) int64, on
    the CPU whatever the default device (the model is built on ``meta``), made once per
    window size and process."""
    return _relative_position_index(tuple(window)).clone()


@functools.lru_cache(maxsize=16)
def _relative_position_index(window: Size3) -> torch.Tensor:
    wd, wh, ww = window
    cpu = torch.device("cpu")
    axes = (torch.arange(n, device=cpu) for n in (wd, wh, ww))
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, N)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 3)
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1], device=cpu)
    strides = torch.tensor([(2 * wh - 1) * (2 * ww - 1), 2 * ww - 1, 1], device=cpu)
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


def fold_time(x: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W, C) -> (B, C * D, H, W) with channel index c * D + d."""
    b, d, h, w, c = x.shape
    return x.permute(0, 4, 1, 2, 3).reshape(b, c * d, h, w)


# --- modules ----------------------------------------------------------------------------


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
        output comes out channels-last and the final permute is a view. On a
        CPU it runs one sample at a time: oneDNN first reorders its input into
        a blocked layout, and one sample's reorder can stay in cache where a
        batch's cannot (``bench_encoder.py --kernels``: ``patch_embed``).
        """
        if x.device.type == "cpu" and x.shape[0] > 1:
            return torch.cat([self.project(sample) for sample in x.split(1)])
        return self.project(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution on a whole (N, T, C, H, W) batch -> (N, D, H', W', E)."""
        t, h, w = x.shape[1], x.shape[3], x.shape[4]
        pt, ph, pw = self.patch
        x = x.transpose(1, 2)  # (N, C, T, H, W), a view
        pads = ((-w) % pw, (-h) % ph, (-t) % pt)
        if any(pads):
            x = F.pad(x, (0, pads[0], 0, pads[1], 0, pads[2]))
        weight = self.proj.weight.contiguous(memory_format=torch.channels_last_3d)
        y = F.conv3d(x, weight, self.proj.bias, stride=self.patch)  # (N, E, D, H', W')
        return y.permute(0, 2, 3, 4, 1).contiguous()  # a view when y is channels-last


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, *, cpu_matmul: str = "blas") -> None:
        super().__init__()
        self.fc1 = Linear(dim, hidden, cpu_matmul=cpu_matmul)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, dim, cpu_matmul=cpu_matmul)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if recording_graph():
            h = self.act(h)
        else:
            torch.ops.aten.gelu_(h)  # in place: fc1's output is ours, nothing else holds it
        return self.fc2(h)


class WindowAttention3D(nn.Module):
    """Multi-head self-attention inside 3-D windows with a relative-position bias."""

    def __init__(
        self, dim: int, num_heads: int, window: Size3, qkv_bias: bool, *, cpu_matmul: str
    ) -> None:
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
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias, cpu_matmul=cpu_matmul)
        self.proj = Linear(dim, dim, cpu_matmul=cpu_matmul)
        self.bias_cache = ShapeCache()

    def position_bias(self, n: int) -> torch.Tensor:
        """(nH, n, n) bias for an effective window of ``n`` tokens.

        The index is the full window's, sliced ``[:n, :n]`` as upstream does.
        """
        index = self.relative_position_index[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[index].view(n, n, self.num_heads)
        return bias.permute(2, 0, 1)  # (nH, n, n)

    def attention_bias(
        self, n: int, mask: torch.Tensor | None, mask_key: Hashable, dtype: torch.dtype
    ) -> torch.Tensor:
        """Additive attention bias: (1, nH, n, n), or (1, nW * nH, n, n) with a shift mask.

        With a mask (nW, n, n) the position bias is added per window and windows
        and heads share one axis, matching the query layout in :meth:`forward`.
        ``mask_key`` names the mask (padded size, window, shift, device).
        """

        def build() -> torch.Tensor:
            bias = self.position_bias(n).unsqueeze(0)  # (1, nH, n, n)
            if mask is not None:
                bias = (bias + mask.unsqueeze(1)).reshape(1, -1, n, n)  # (1, nW * nH, n, n)
            return bias.to(dtype).contiguous()

        table = self.relative_position_bias_table
        return self.bias_cache.get((n, mask_key, dtype, table.device), build, depends_on=table)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_key: Hashable = None
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
        if use_explicit_attention(q):
            out = explicit_attention(q, k, v, bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.view(b, nw, nh, n, hd).transpose(2, 3).reshape(b, nw, n, c)  # (B, nW, N, C)
        return self.proj(out)


class SwinBlock3D(nn.Module):
    """Pre-norm block: (shifted) window attention, then MLP, each with a residual."""

    def __init__(
        self, dim: int, num_heads: int, shifted: bool, cfg: EncoderConfig, *, cpu_matmul: str
    ) -> None:
        super().__init__()
        self.shifted = shifted
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = WindowAttention3D(
            dim, num_heads, cfg.window_size, cfg.qkv_bias, cpu_matmul=cpu_matmul
        )
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cpu_matmul=cpu_matmul)

    def forward(
        self,
        x: torch.Tensor,
        window: Size3,
        shift: Size3,
        mask: torch.Tensor | None,
        mask_key: Hashable,
    ) -> torch.Tensor:
        """x: (B, D, H, W, C) -> same shape. ``window``/``shift`` are the effective ones
        (shift all zero for an unshifted block), ``mask`` the shift mask or None."""
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
        windows = window_partition(y, window)  # (B, nW, N, C)
        windows = self.attn(windows, mask, mask_key) if shifted else self.attn(windows)
        y = window_reverse(windows, window, padded)  # (B, Dp, Hp, Wp, C)
        if shifted:
            y = torch.roll(y, shifts=shift, dims=(1, 2, 3))
        if any(pads):
            y = y[:, :d, :h, :w, :]
        if recording_graph():
            x = x + y
            return x + self.mlp(self.norm2(x))
        # Inference: the residual sums go into buffers this block made (``y``, then the
        # MLP output), never into ``x``, which the caller may still hold.
        x = y.add_(x)
        return self.mlp(self.norm2(x)).add_(x)


class PatchMerging3D(nn.Module):
    """Halve time (frame mean) and space (2x2 phases concatenated), then 4C -> 2C."""

    def __init__(self, dim: int, cfg: EncoderConfig, *, cpu_matmul: str) -> None:
        super().__init__()
        self.mean_frame_down = cfg.mean_frame_down
        self.norm = nn.LayerNorm(4 * dim, eps=cfg.layer_norm_eps)
        self.reduction = Linear(4 * dim, 2 * dim, bias=False, cpu_matmul=cpu_matmul)

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
        self,
        dim: int,
        depth: int,
        num_heads: int,
        cfg: EncoderConfig,
        downsample: bool,
        *,
        cpu_matmul: str,
    ) -> None:
        super().__init__()
        self.window: Size3 = cfg.window_size
        self.shift: Size3 = tuple(s // 2 for s in cfg.window_size)  # type: ignore[assignment]
        self.blocks = nn.ModuleList(
            SwinBlock3D(dim, num_heads, i % 2 == 1, cfg, cpu_matmul=cpu_matmul)
            for i in range(depth)
        )
        self.downsample = PatchMerging3D(dim, cfg, cpu_matmul=cpu_matmul) if downsample else None
        self.mask_cache = ShapeCache()

    def shift_mask(
        self, size: Size3, device: torch.device
    ) -> tuple[Size3, Size3, torch.Tensor | None, Hashable]:
        """Effective window and shift for ``size``, the shift mask and a key naming it."""
        window, shift = effective_window(size, self.window, self.shift)
        if not any(shift):
            return window, shift, None, None
        padded: Size3 = tuple(-(-s // w) * w for s, w in zip(size, window, strict=True))  # type: ignore[assignment]
        key = (padded, window, shift, device)
        mask = self.mask_cache.get(key, lambda: shift_window_mask(padded, window, shift, device))
        return window, shift, mask, key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W, C) -> blocks -> merged (B, D', H', W', C') or unchanged shape."""
        _, d, h, w, _ = x.shape
        window, shift, mask, mask_key = self.shift_mask((d, h, w), x.device)
        for block in self.blocks:
            if block.shifted:
                x = block(x, window, shift, mask, mask_key)
            else:
                x = block(x, window, (0, 0, 0), None, None)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class AgriFMEncoder(nn.Module):
    """The AgriFM S2 encoder.

    Args:
        cfg: the architecture (default: AgriFM's, patch (4, 4, 4)).
        cpu_matmul: ``"blas"`` or ``"onednn"``, the library for fp32 linear
            layers on a CPU (:func:`~agrifm_pipeline.model.cpu.cpu_matmul_library`);
            copied into every linear layer here.
        chunk_tokens: on a CPU, each stage runs on at most this many tokens at a
            time (whole samples per chunk); 0 runs the batch whole. Samples never
            interact, so chunking changes nothing but memory traffic.
    """

    def __init__(
        self,
        cfg: EncoderConfig | None = None,
        *,
        cpu_matmul: str = "blas",
        chunk_tokens: int = CHUNK_TOKENS,
    ) -> None:
        super().__init__()
        self.cfg = cfg = cfg or EncoderConfig()
        self.cpu_matmul = cpu_matmul
        self.chunk_tokens = chunk_tokens
        dims = cfg.stage_dims()
        self.patch_embed = PatchEmbed3D(cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.layers = nn.ModuleList(
            SwinStage3D(
                dims[i],
                cfg.depths[i],
                cfg.num_heads[i],
                cfg,
                downsample=i < len(dims) - 1,
                cpu_matmul=cpu_matmul,
            )
            for i in range(len(dims))
        )
        self.norm = nn.LayerNorm(cfg.num_features, eps=cfg.layer_norm_eps)
        #: Where the weights came from (sha256, source, layout ...), for lineage;
        #: filled by :func:`~agrifm_pipeline.model.factory.load_encoder`.
        self.checkpoint_info: dict[str, Any] = {}

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, C, H, W), or (N, C, H, W) as one frame -> (N, D, H', W', E)."""
        if x.ndim == 4:
            x = x.unsqueeze(1)
        if x.ndim != 5 or x.shape[2] != self.cfg.in_chans:
            raise ValueError(
                f"encoder input must be (N, T, {self.cfg.in_chans}, H, W) or "
                f"(N, {self.cfg.in_chans}, H, W); got {tuple(x.shape)}"
            )
        return self.patch_embed(x)

    def _run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Run ``stage`` on whole samples, at most ``chunk_tokens`` tokens at a time (CPU)."""
        b, d, h, w, _ = x.shape
        if not self.chunk_tokens or x.device.type != "cpu":
            return stage(x)
        per_chunk = max(1, self.chunk_tokens // (d * h * w))
        if per_chunk >= b:
            return stage(x)
        return torch.cat([stage(part) for part in x.split(per_chunk)], dim=0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, 10, H, W) -> the last stage after the final norm, (N, D', h, w, 8E)."""
        x = self._embed(x)
        for stage in self.layers:
            x = self._run_stage(stage, x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, 10, H, W) normalised -> ``encoder_features`` (N, 8E * D', h, w)."""
        return fold_time(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Upstream's two outputs: ``(encoder_features, features_list)``, time folded.

        ``features_list`` holds the patch embed's output and each merged stage
        output (stages 0-2), not normalised; ``encoder_features`` is what
        :meth:`forward` returns.
        """
        x = self._embed(x)
        features = [fold_time(x)]
        for i, stage in enumerate(self.layers):
            x = self._run_stage(stage, x)
            if i < len(self.layers) - 1:
                features.append(fold_time(x))
        return fold_time(self.norm(x)), features
