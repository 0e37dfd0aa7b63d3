#!/usr/bin/env python
"""Which compressor for the stores: ratio and speed on real tile-year arrays.

The arrays are the bundled real scenes and one full default tile-year
(896 x 896 px, T=8) from the synthetic provider (fully covered, plausible
fields and clouds; on the demo tile the real sample covers only 0.5 % of the
tile, which would flatter every codec):

* eight frames of a tile's size (10 x 896 x 896, uint16) laid out as mosaics
  of the bundled real Sentinel-2 scenes (``data/s2_sample``, 64 x 64 px): real
  texture at the store's chunk size, on which the codecs rank differently than
  on the synthetic tile;
* the synthetic raw frame stack, uint16 (8, 10, 896, 896);
* its normalised tensors, float32 (16, 8, 10, 224, 224);
* the embedding grid of the full-size encoder (untrained:0 weights), float32
  (1024, 28, 28).

For each Blosc/Zstd setting it reports the compression ratio and the encode
and decode speeds (MB/s of uncompressed data, best of 3), one thread.

    python bench/bench_storage.py [--json bench/results/bench_storage.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from numcodecs import LZ4, Blosc, Zstd  # noqa: E402

CODECS: dict[str, Any] = {
    "blosc-lz4-shuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE),
    "blosc-lz4-bitshuffle": Blosc(cname="lz4", clevel=5, shuffle=Blosc.BITSHUFFLE),
    "blosc-zstd1-bitshuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.BITSHUFFLE),
    "blosc-zstd1-shuffle": Blosc(cname="zstd", clevel=1, shuffle=Blosc.SHUFFLE),
    "blosc-zstd3-shuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE),
    "blosc-zstd3-bitshuffle": Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
    "blosc-zstd5-shuffle": Blosc(cname="zstd", clevel=5, shuffle=Blosc.SHUFFLE),
    "zstd3 (no shuffle)": Zstd(level=3),
    "lz4 (no shuffle)": LZ4(),
}


def _best(fn: Any, repeats: int = 3) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def arrays() -> dict[str, np.ndarray]:
    import torch

    from agrifm_pipeline.model import load_encoder
    from agrifm_pipeline.providers.synthetic import SyntheticProvider
    from agrifm_pipeline.tiles import Tile
    from agrifm_pipeline.tileyear import TileYearSettings, acquire, normalise_tile

    cfg = TileYearSettings()
    tile = Tile.from_id("32631_8960m_E0064_N0627")
    frames = acquire(SyntheticProvider(seed=0), tile, 2019, cfg).data.values
    tensors, _ = normalise_tile(frames, cfg)
    enc = load_encoder("untrained:0")
    with torch.inference_mode():
        feats = torch.cat([enc(part) for part in tensors.split(8)])
    grid = feats.reshape(4, 4, 1024, 7, 7).permute(2, 0, 3, 1, 4).reshape(1024, 28, 28)
    import rasterio

    # Real reflectance has the spatial texture that a synthetic tile lacks, and codecs
    # rank differently on it. The bundled scenes are 64 x 64 px, so eight frames of a
    # tile's size are laid out as mosaics of them (14 x 14 scenes a frame, all bands):
    # real texture at the store's chunk size, where Blosc picks its block size. A frame
    # holds each scene up to four times, each time turned by another quarter, so that
    # no compressor finds repeated bytes that a real tile would not have.
    bands = []
    for path in sorted((ROOT / "data" / "s2_sample").glob("*.tif")):
        with rasterio.open(path) as src:
            bands.append(src.read())
    scenes = np.stack(bands)  # (dates, 10, 64, 64)
    n, _, px, _ = scenes.shape
    per = 896 // px
    real = np.empty((8, scenes.shape[1], per * px, per * px), dtype=scenes.dtype)
    for f in range(8):
        for k in range(per * per):
            tile = np.rot90(scenes[(k + 7 * f) % n], k // n, axes=(1, 2))
            i, j = divmod(k, per)
            real[f, :, i * px : (i + 1) * px, j * px : (j + 1) * px] = tile
    return {
        "real scene mosaics uint16": real,
        "s2_frame_stack uint16": frames,
        "normalized_tensors float32": tensors.numpy(),
        "agrifm_embedding_grid float32": grid.numpy(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", default="bench/results/bench_storage.json")
    args = ap.parse_args(argv)
    Blosc.use_threads = False
    rows = []
    print(f"{'array':>30} | {'codec':>24} | {'ratio':>6} | {'enc MB/s':>8} | {'dec MB/s':>8}")
    for name, arr in arrays().items():
        raw = np.ascontiguousarray(arr)
        mb = raw.nbytes / 1e6
        for cname, codec in CODECS.items():
            t_enc, enc = _best(lambda c=codec, r=raw: c.encode(r))
            t_dec, dec = _best(lambda c=codec, e=enc: c.decode(e))
            assert np.frombuffer(dec, dtype=raw.dtype).size == raw.size
            row = {
                "array": name,
                "shape": list(raw.shape),
                "codec": cname,
                "ratio": raw.nbytes / len(enc),
                "encode_MBps": mb / t_enc,
                "decode_MBps": mb / t_dec,
            }
            rows.append(row)
            print(f"{name:>30} | {cname:>24} | {row['ratio']:>6.2f} | {row['encode_MBps']:>8.0f} | "
                  f"{row['decode_MBps']:>8.0f}")  # fmt: skip
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
