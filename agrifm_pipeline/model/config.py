"""AgriFM S2 encoder configuration and pretrained metadata, as data.

Facts follow the official configuration (``configs/cropland_mapping.py`` of
github.com/flyakon/AgriFM): embed 128, depths 2-2-18-2, heads 4-8-16-32,
window (8, 7, 7) as (time, height, width), frame-mean temporal down-sampling.
The patch size is not fixed here: it is read off the checkpoint, because the
released weights are reported to use (4, 4, 4) while the config says (4, 2, 2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# Band order of the adapter contract. The official repository never states its
# band order; keep it a recorded setting rather than an assumption.
AGRIFM_S2_BANDS: tuple[str, ...] = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")

# Per-band statistics of AgriFM's S2 pre-training data, in DN (reflectance x 10000).
AGRIFM_S2_MEAN: tuple[float, ...] = (
    4179.192015478227,
    4065.9106675194444,
    3957.274910960156,
    5207.452475253116,
    4327.12234687,
    4873.16102239,
    5049.1637925,
    5111.07806856,
    3056.86349163,
    2490.9675032,
)
AGRIFM_S2_STD: tuple[float, ...] = (
    4041.5212325268735,
    3691.003119315892,
    3629.331318356375,
    2973.5178530908756,
    3569.73343885,
    3085.9151435,
    2937.56005119,
    2806.04462314,
    1808.30013156,
    1694.20220774,
)
STD_FLOOR = 1e-6
RAW_MAX = 10000.0


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of the AgriFM S2 encoder (a modified Video Swin Transformer)."""

    in_chans: int = 10
    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: tuple[int, int, int] = (8, 7, 7)  # (time, height, width)
    patch_size: tuple[int, int, int] = (4, 4, 4)  # (time, height, width)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-5
    mean_frame_down: bool = True

    @property
    def num_features(self) -> int:
        """Channels of the last stage."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    @property
    def spatial_stride(self) -> int:
        """Input pixels per output cell along y and x."""
        return self.patch_size[1] * 2 ** (len(self.depths) - 1)

    @property
    def patch_label(self) -> str:
        return "p" + "".join(str(p) for p in self.patch_size)

    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(len(self.depths))]

    def output_frames(self, n_frames: int) -> int:
        """Frames left after the patch embed and the three temporal halvings."""
        d = -(-n_frames // self.patch_size[0])
        for _ in range(len(self.depths) - 1):
            d = -(-d // 2)
        return d

    def output_channels(self, n_frames: int) -> int:
        """Channels of ``encoder_features``: time is folded into channels."""
        return self.num_features * self.output_frames(n_frames)

    def grid_hw(self, height: int, width: int) -> tuple[int, int]:
        """Output grid size for an input of ``height`` x ``width`` pixels."""
        h = -(-height // self.patch_size[1])
        w = -(-width // self.patch_size[2])
        for _ in range(len(self.depths) - 1):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    def as_record(self) -> dict[str, Any]:
        rec = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in rec.items()}


#: The two published variants. Everything but the patch size is shared.
AGRIFM_P444 = EncoderConfig(patch_size=(4, 4, 4))
AGRIFM_P422 = EncoderConfig(patch_size=(4, 2, 2))

#: Pretrained metadata kept beside the model (timm's ``default_cfgs`` habit).
DEFAULT_CFG: dict[str, Any] = {
    "url": "https://glass.hku.hk/casual/AgriFM/AgriFM.pth",
    "repo_url": "https://github.com/flyakon/AgriFM",
    "bands": AGRIFM_S2_BANDS,
    "mean": AGRIFM_S2_MEAN,
    "std": AGRIFM_S2_STD,
    "input_size": (8, 10, 224, 224),  # (T, C, H, W)
    "released_patch_size": (4, 4, 4),
}
