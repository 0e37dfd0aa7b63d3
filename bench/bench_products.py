#!/usr/bin/env python
"""int8 products against the float32 grid: size on disk, fidelity, and what a classifier loses.

Embeddings measured (all made by this package's encoder, float32, as the grid stores them):

* ``synthetic``: ``--tiles`` tile-years of the synthetic source at the default geometry
  (4 x 4 chips of 224 px, T = 8, 28 x 28 cells of 1,024 channels each), encoded with
  ``untrained:0`` weights (the released ones cannot be fetched offline), with the source's
  own crop type per cell (the majority of the cell's pixels, cells at least 60 % one
  crop) for the classifier;
* ``demo``: the demo's tile (the real Sentinel-2 sample in ``data/s2_sample``, the demo's
  one-chip geometry, ``untrained:0``), as ``make demo CHECKPOINT=untrained:0`` makes it;
* ``fixtures``: the official AgriFM code's outputs stored under
  ``agrifm_pipeline_tests/fixtures/agrifm`` (full-size model, random inputs).

For every scheme of :mod:`agrifm_pipeline.tileyear.quantise` (and the channel scheme at
other steps), each set is quantised and dequantised and compared with its float32
vectors:

* ``size_pct``: bytes on disk of the int8 product as the pipeline stores it (a Zarr
  version written by ``ZarrStore``, compressed) over the float32 grid's (the same), summed
  over the set's tile-years; for the channel scheme also the COG's and, for the synthetic
  tiles, the region mosaic's (float32 Zarr, int8 Zarr, COG);
* ``cos_median`` / ``cos_p1``: cosine similarity between each cell's dequantised and
  float32 vector, median and 1st percentile;
* ``centred_cos_*``: the same after subtracting the set's mean vector: how much of what
  tells cells apart survives (the vectors share a large constant part, so the plain
  cosine is near 1 even when the differences between cells are lost);
* ``knn_*``: leave-one-tile-out accuracy of scikit-learn's 5-nearest-neighbour
  classifier on the synthetic crop types, float32 and int8 (train and test both from
  the product), Euclidean and cosine; ``knn_delta_pts`` is int8 minus float32 in points.

The choice: among the schemes that meet the issue's goals (size <= 30 %, cosine median
>= 0.999 and 1st percentile >= 0.99, k-NN loss <= 0.5 point), the smallest whose
centred cosine 1st percentile is at least 0.995 (the differences between cells kept to
~10 % error at worst); at a tie, the one that keeps the vectors' norms. Size is judged at
the pipeline's geometry (the synthetic tile-years; the mosaic is reported beside): the
demo's tile has 49 cells, whose codes are outweighed by the 8 KB of scales and offsets.

    python bench/bench_products.py [--tiles 6] [--cache DIR] [--json bench/results/bench_products.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

YEAR = 2019
FIRST_TILE = (64, 627)  # the demo tile of bench_pipeline (32631_8960m_E0064_N0627) and east/north
CHECKPOINT = "untrained:0"
GOALS = {"size_pct": 30.0, "cos_median": 0.999, "cos_p1": 0.99, "knn_loss_pts": 0.5}
CENTRED_P1 = 0.995
# (label, scheme, options)
CANDIDATES: list[tuple[str, str, dict[str, Any]]] = [
    ("channel (step = std/8)", "channel", {"steps_per_std": 8}),
    ("channel (step = std/4)", "channel", {"steps_per_std": 4}),
    ("channel (step = std/16)", "channel", {"steps_per_std": 16}),
    ("channel (min-max, 255 levels)", "channel", {"steps_per_std": 1_000_000}),
    ("unit-normalised, channel (std/8)", "channel", {"steps_per_std": 8, "unit": True}),
    ("pixel (TESSERA)", "pixel", {}),
    ("alphaearth (fixed sqrt map)", "alphaearth", {}),
]


def synthetic_tile_ids(n: int) -> list[str]:
    cols = int(np.ceil(np.sqrt(n)))
    e0, n0 = FIRST_TILE
    return [f"32631_8960m_E{e0 + i % cols:04d}_N{n0 + i // cols:04d}" for i in range(n)]


def make_grids(tile_ids: list[str], cache: Path | None) -> list[dict[str, Any]]:
    """Each synthetic tile-year's float32 grid (as the pipeline makes it) and its crop
    types per pixel; read from ``cache`` when there."""
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions
    from agrifm_pipeline.providers.synthetic import SyntheticProvider
    from agrifm_pipeline.tiles import Tile
    from agrifm_pipeline.tileyear import TileYearSettings, acquire, embedding_grid, normalise_tile

    cfg = TileYearSettings()
    provider = SyntheticProvider(seed=0)
    engine = None
    out = []
    for tid in tile_ids:
        tile = Tile.from_id(tid)
        hit = cache / f"{tid}.npz" if cache else None
        if hit is not None and hit.exists():
            with np.load(hit) as z:
                grid_values, crop = z["grid"], z["crop"]
        else:
            if engine is None:
                engine = EmbeddingEngine.create(
                    CHECKPOINT, options=InferenceOptions(device="cpu", batch_size=4)
                )
            t0 = time.perf_counter()
            x, _ = normalise_tile(acquire(provider, tile, YEAR, cfg).data.values, cfg)
            feats = engine.embed(x)
            grid_values = embedding_grid(feats, tile, cfg).values
            crop = provider.truth(tile.geobox(cfg.scale_m)).crop
            print(f"# {tid}: encoded in {time.perf_counter() - t0:.0f} s", flush=True)
            if hit is not None:
                hit.parent.mkdir(parents=True, exist_ok=True)
                np.savez(hit, grid=grid_values, crop=crop)
        out.append({"tile": tid, "grid": grid_values, "crop": crop})
    return out


def demo_grid() -> dict[str, Any]:
    """The demo's tile-year, made as the demo makes it (local source, one chip of 64 px)."""
    from agrifm_pipeline.demo import DEMO_CHIP_PX, DEMO_CHIPS_PER_SIDE, DEMO_DATA, DEMO_REGIONS_DIR
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions
    from agrifm_pipeline.providers import make_provider
    from agrifm_pipeline.regions import tiles_for_region
    from agrifm_pipeline.tileyear import TileYearSettings, acquire, embedding_grid, normalise_tile

    cfg = TileYearSettings(chip_px=DEMO_CHIP_PX, chips_per_side=DEMO_CHIPS_PER_SIDE)
    (region,) = sorted(DEMO_REGIONS_DIR.glob("*.geojson"))
    tiles = tiles_for_region(region, chip_px=DEMO_CHIP_PX, chips_per_side=DEMO_CHIPS_PER_SIDE)
    provider = make_provider("local", root=str(DEMO_DATA / "s2_sample"))
    engine = EmbeddingEngine.create(CHECKPOINT, options=InferenceOptions(device="cpu"))
    grids = []
    for tile in tiles:
        x, _ = normalise_tile(acquire(provider, tile, YEAR, cfg).data.values, cfg)
        grids.append({"tile": tile.id, "grid": embedding_grid(engine.embed(x), tile, cfg).values})
    return {"tiles": grids}


def fixture_vectors() -> np.ndarray:
    """(N, 1024) official outputs of the full-size model (the reference fixtures)."""
    folder = ROOT / "agrifm_pipeline_tests" / "fixtures" / "agrifm"
    out = []
    for name, key in (
        ("full_p444_t8_224x224.npz", "encoder_features"),
        ("full_p422_t8_224x224.npz", "encoder_features"),
        ("full_p444_t32_48x48.npz", "encoder_features"),
    ):
        with np.load(folder / name) as z:
            f = z[key][0]
        out.append(f.reshape(f.shape[0], -1).T)
    return np.concatenate(out).astype(np.float32)


def cell_labels(crop: np.ndarray, cells: int, purity: float = 0.6) -> np.ndarray:
    """(cells, cells) majority crop of each cell's pixels, -1 where no crop has ``purity``."""
    side = crop.shape[0] // cells
    blocks = crop[: cells * side, : cells * side].reshape(cells, side, cells, side)
    blocks = blocks.transpose(0, 2, 1, 3).reshape(cells, cells, -1)
    kinds = int(crop.max()) + 1
    counts = np.stack([(blocks == k).sum(-1) for k in range(kinds)], -1)
    best = counts.argmax(-1)
    return np.where(counts.max(-1) >= purity * side * side, best, -1)


def vectors(grid: np.ndarray) -> np.ndarray:
    d = grid.shape[0]
    return grid.reshape(d, -1).T


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    num = (a.astype(np.float64) * b).sum(1)
    return num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def fidelity(ref: np.ndarray, got: np.ndarray, unit: bool = False) -> dict[str, float]:
    """``got`` against ``ref`` per cell; with ``unit`` (the scheme keeps directions only)
    against ``ref``'s unit vectors."""
    ok = np.isfinite(ref).all(1)
    ref, got = ref[ok].astype(np.float64), got[ok]
    if unit:
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    c = cosines(ref, got)
    mean = ref.mean(0)
    cc = cosines(ref - mean, got - mean)
    return {
        "cos_median": float(np.median(c)),
        "cos_p1": float(np.percentile(c, 1)),
        "cos_min": float(c.min()),
        "centred_cos_median": float(np.median(cc)),
        "centred_cos_p1": float(np.percentile(cc, 1)),
        "n_vectors": len(ref),
    }


def knn_accuracy(x: np.ndarray, y: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    from sklearn.neighbors import KNeighborsClassifier

    out = {}
    for metric in ("euclidean", "cosine"):
        correct = 0
        for g in np.unique(groups):
            test = groups == g
            model = KNeighborsClassifier(n_neighbors=5, metric=metric).fit(x[~test], y[~test])
            correct += int((model.predict(x[test]) == y[test]).sum())
        out[metric] = 100.0 * correct / len(y)
    return out


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stored_bytes(root: Path, asset: str, tile: str, ds: Any) -> int:
    """Bytes on disk of one version of ``ds`` written as the pipeline writes a partition."""
    from agrifm_pipeline.storage import ZarrStore

    v = ZarrStore(str(root), asset).write(YEAR, tile, ds, {"run_id": "bench"})
    return du(Path(v.path))


def grid_dataset(values: np.ndarray, tile_id: str, chips_per_side: int, chip_px: int) -> Any:
    """A float32 grid (band, y, x) as the embedding step stores it (georeferenced)."""
    from agrifm_pipeline.tiles import Tile
    from agrifm_pipeline.tileyear import TileYearSettings, embedding_grid

    cfg = TileYearSettings(chip_px=chip_px, chips_per_side=chips_per_side)
    d, hh, _ = values.shape
    per, h = chips_per_side, hh // chips_per_side
    feats = values.reshape(d, per, h, per, h).transpose(1, 3, 0, 2, 4).reshape(per * per, d, h, h)
    return embedding_grid(feats, Tile.from_id(tile_id), cfg).to_dataset()


def scheme_rows(
    sets: dict[str, list[Any]], labelled: dict[str, np.ndarray], root: Path
) -> list[dict[str, Any]]:
    from agrifm_pipeline.tileyear.cog import cog_bytes
    from agrifm_pipeline.tileyear.quantise import dequantised, quantised_dataset

    rows = []
    float_bytes = {
        name: sum(stored_bytes(root / "f32" / name, "grid", tid, ds) for tid, ds in items)
        for name, items in sets.items()
    }
    base_knn = knn_accuracy(labelled["x"], labelled["y"], labelled["groups"])
    for label, scheme, options in CANDIDATES:
        row: dict[str, Any] = {"scheme": label, "quantisation": scheme, **options}
        t0 = time.perf_counter()
        for name, items in sets.items():
            nbytes, cog, ref, got = 0, 0, [], []
            for tid, ds in items:
                q = quantised_dataset(ds, scheme, **options)
                nbytes += stored_bytes(root / label.replace(" ", "_") / name, "int8", tid, q)
                if scheme == "channel" and not options.get("unit") and name != "fixtures":
                    cog += len(cog_bytes(q))
                ref.append(vectors(ds["embedding"].values))
                got.append(vectors(dequantised(q).values))
            row[name] = {
                "size_pct": 100.0 * nbytes / float_bytes[name],
                **({"cog_size_pct": 100.0 * cog / float_bytes[name]} if cog else {}),
                **fidelity(
                    np.concatenate(ref),
                    np.concatenate(got),
                    unit=bool(options.get("unit")) or scheme == "alphaearth",
                ),
            }
        row["seconds"] = time.perf_counter() - t0
        # the classifier: every labelled synthetic cell, quantised within its own tile-year
        got = []
        for tid, ds in sets["synthetic"]:
            q = dequantised(quantised_dataset(ds, scheme, **options)).values
            got.append(vectors(q)[labelled["cells"][tid]])
        acc = knn_accuracy(np.concatenate(got), labelled["y"], labelled["groups"])
        row["knn_float32"] = base_knn
        row["knn_int8"] = acc
        row["knn_delta_pts"] = {m: acc[m] - base_knn[m] for m in acc}
        syn = row["synthetic"]
        # Size at the pipeline's geometry (tile-years of 28 x 28 cells, and the mosaic below);
        # the demo's one-chip tile (7 x 7 cells) and the fixtures are reported beside.
        row["meets_goals"] = bool(
            syn["size_pct"] <= GOALS["size_pct"]
            and min(row[n]["cos_median"] for n in sets) >= GOALS["cos_median"]
            and min(row[n]["cos_p1"] for n in sets) >= GOALS["cos_p1"]
            and min(row["knn_delta_pts"].values()) >= -GOALS["knn_loss_pts"]
        )
        row["keeps_cell_differences"] = min(row[n]["centred_cos_p1"] for n in sets) >= CENTRED_P1
        print(
            f"{label:34s} size {syn['size_pct']:5.1f} %  cos {syn['cos_median']:.6f}/"
            f"{syn['cos_p1']:.6f}  centred {syn['centred_cos_median']:.4f}/"
            f"{syn['centred_cos_p1']:.4f}  kNN {row['knn_delta_pts']['euclidean']:+.2f}/"
            f"{row['knn_delta_pts']['cosine']:+.2f} pts  goals {row['meets_goals']}",
            flush=True,
        )
        rows.append(row)
    return rows


def mosaic_sizes(items: list[tuple[str, Any]], root: Path) -> dict[str, Any]:
    """The synthetic tiles' region mosaic (one zone): float32 Zarr, int8 Zarr, COG."""
    from agrifm_pipeline.storage import ZarrStore
    from agrifm_pipeline.tileyear import mosaic
    from agrifm_pipeline.tileyear.cog import cog_bytes
    from agrifm_pipeline.tileyear.quantise import quantised_dataset

    merged = mosaic([ds["embedding"] for _, ds in items]).to_dataset()
    f32 = ZarrStore(str(root), "mosaic").write_groups(YEAR, "region", {"": merged}, {})
    q = quantised_dataset(merged)
    i8 = ZarrStore(str(root), "mosaic_int8").write_groups(YEAR, "region", {"": q}, {})
    cog = cog_bytes(q)
    (root / "mosaic.tif").write_bytes(cog)
    fb = du(Path(f32.path))
    return {
        "cells": list(merged["embedding"].shape[1:]),
        "tiles": len(items),
        "float32_bytes": fb,
        "int8_bytes": du(Path(i8.path)),
        "cog_bytes": len(cog),
        "int8_pct": 100.0 * du(Path(i8.path)) / fb,
        "cog_pct": 100.0 * len(cog) / fb,
    }


def tile_year_bytes(tile_id: str, grid_values: np.ndarray, root: Path) -> dict[str, int]:
    """Bytes on disk of every product of one default tile-year (the synthetic source), each
    written as the pipeline writes it (manifests and metadata included)."""
    from agrifm_pipeline.providers.synthetic import SyntheticProvider
    from agrifm_pipeline.storage import FileStore
    from agrifm_pipeline.tiles import Tile
    from agrifm_pipeline.tileyear import (
        TileYearSettings,
        acquire,
        band_frames,
        chip_table,
        frame_stack_dataset,
        normalise_tile,
        normalized_dataset,
        preview_png,
        valid_frames,
    )
    from agrifm_pipeline.tileyear.cog import cog_bytes
    from agrifm_pipeline.tileyear.quantise import quantised_dataset

    cfg = TileYearSettings()
    tile = Tile.from_id(tile_id)
    stack = acquire(SyntheticProvider(seed=0), tile, YEAR, cfg)
    frames = frame_stack_dataset(stack)
    tensor, _ = normalise_tile(stack.data.values, cfg)
    valid = valid_frames(stack.data.values, cfg.fill_value)
    grid = grid_dataset(grid_values, tile_id, 4, 224)
    q = quantised_dataset(grid)

    def zarr(asset: str, ds: Any) -> int:
        return stored_bytes(root, asset, tile_id, ds)

    def files(asset: str, name: str, data: bytes) -> int:
        v = FileStore(str(root), asset).put(YEAR, tile_id, name, data, {"run_id": "bench"})
        return du(Path(v.path))

    gdf = chip_table(grid["embedding"], tile, YEAR, cfg)
    buf = io.BytesIO()
    gdf.to_parquet(buf, index=False)
    rgb = ["B4", "B3", "B2"]
    png = preview_png(band_frames(frames["frames"], rgb), grid["embedding"].values, rgb)
    return {
        "s2_frame_stack": zarr("frames", frames),
        "normalized_tensors (statistics)": zarr(
            "tensors", normalized_dataset(tensor, cfg, keep_tensors=False, valid=valid)
        ),
        "normalized_tensors (keep_tensors)": zarr(
            "tensors_kept", normalized_dataset(tensor, cfg, keep_tensors=True, valid=valid)
        ),
        "agrifm_embedding_grid (float32)": zarr("grid", grid),
        "agrifm_embedding_int8": zarr("int8", q),
        "COG of the tile grid (agrifm-pipeline cog)": files("cog", "grid.tif", cog_bytes(q)),
        "chip_embeddings": files("chips", "chips.parquet", buf.getvalue()),
        "embedding_preview": files("preview", "preview.png", png),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiles", type=int, default=6, help="synthetic tile-years")
    parser.add_argument("--cache", type=Path, default=None, help="keep the encoded grids here")
    parser.add_argument("--no-demo", action="store_true", help="leave out the demo's tile")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--keep-cog", type=Path, default=None, help="copy the mosaic's COG here")
    args = parser.parse_args(argv)

    import torch
    from bench_encoder import cpu_flags, cpu_name, library_versions

    env = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device_name": cpu_name(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "libraries": library_versions(),
        "checkpoint": CHECKPOINT,
        "load_average_start": list(os.getloadavg()),
    }
    t0 = time.perf_counter()
    tiles = make_grids(synthetic_tile_ids(args.tiles), args.cache)
    sets: dict[str, list[Any]] = {
        "synthetic": [(t["tile"], grid_dataset(t["grid"], t["tile"], 4, 224)) for t in tiles]
    }
    if not args.no_demo:
        demo = demo_grid()["tiles"]
        sets["demo"] = [(t["tile"], grid_dataset(t["grid"], t["tile"], 1, 64)) for t in demo]
    fx = fixture_vectors()  # (N, D) as one grid row of N cells
    fx_grid = np.ascontiguousarray(fx.T[:, None, :])
    import xarray as xr

    sets["fixtures"] = [("fixtures", xr.Dataset({"embedding": (("band", "y", "x"), fx_grid)}))]
    encode_s = time.perf_counter() - t0

    cells, ys, groups = {}, [], []
    for i, t in enumerate(tiles):
        lab = cell_labels(t["crop"], t["grid"].shape[1]).ravel()
        cells[t["tile"]] = lab >= 0
        ys.append(lab[lab >= 0])
        groups.append(np.full(int((lab >= 0).sum()), i))
    y = np.concatenate(ys)
    x = np.concatenate([vectors(t["grid"])[cells[t["tile"]]] for t in tiles])
    labelled = {"x": x, "y": y, "groups": np.concatenate(groups), "cells": cells}
    print(f"# {len(y)} labelled cells, classes {np.bincount(y).tolist()}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        rows = scheme_rows(sets, labelled, Path(tmp))
        mosaic = mosaic_sizes(sets["synthetic"], Path(tmp) / "mosaic")
        per_tile_year = tile_year_bytes(tiles[0]["tile"], tiles[0]["grid"], Path(tmp) / "one")
        n = mosaic["tiles"]
        per_tile_year.update(
            {
                "region_mosaic (float32), per tile-year": mosaic["float32_bytes"] // n,
                "region_mosaic_int8, per tile-year": mosaic["int8_bytes"] // n,
                "region_mosaic_cog, per tile-year": mosaic["cog_bytes"] // n,
            }
        )
        print(f"# bytes per tile-year: {per_tile_year}", flush=True)
        if args.keep_cog:
            args.keep_cog.write_bytes((Path(tmp) / "mosaic" / "mosaic.tif").read_bytes())
    ok = [r for r in rows if r["meets_goals"] and r["keeps_cell_differences"]]
    # the smallest (to 0.1 point); at a tie, the one that keeps the vectors' norms
    chosen = (
        min(ok, key=lambda r: (round(r["synthetic"]["size_pct"], 1), bool(r.get("unit"))))
        if ok
        else None
    )
    result = {
        "env": env,
        "goals": {**GOALS, "centred_cos_p1_for_the_choice": CENTRED_P1},
        "sets": {
            "synthetic": {"tile_years": [t["tile"] for t in tiles], "year": YEAR},
            "demo": {"tile_years": [t for t, _ in sets.get("demo", [])], "year": YEAR},
            "fixtures": {"vectors": len(fx)},
        },
        "labelled_cells": len(y),
        "classes": np.bincount(y).tolist(),
        "encode_seconds": encode_s,
        "rows": rows,
        "mosaic": mosaic,
        "bytes_per_tile_year": per_tile_year,
        "chosen": chosen["scheme"] if chosen else None,
    }
    print(f"# mosaic {mosaic}")
    print(f"# chosen: {result['chosen']}")
    if args.json:
        result["env"]["load_average_end"] = list(os.getloadavg())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
