#!/usr/bin/env python
"""End to end: tile-years per hour on the local provider, and where the time goes.

Two measurements of one default tile-year (the demo tile
32631_8960m_E0064_N0627, 2019, T=8, 16 chips of 224², full-size encoder with
``untrained:0`` weights — the same cost as the released ones):

1. **Stages**, timed around the same library calls the assets make, each
   asset reading its input back from the store as it does in a run:
   acquire (read, mask, composite) -> write frames -> normalise (frames read
   back) -> write normalized_tensors (per-chip statistics) -> encode (the same
   tensor: one step makes both assets) -> write grid -> chip table + preview.
   The model input that the embedding makes from the store when it is
   selected alone is timed too, outside the total.
2. **The Dagster job** (``embed_tile_years``) in process on a temporary
   instance and store: wall time of the run, and each step's duration.

Reports the encoder's share of the tile-year (of all stages, and of the
partition's own stages without the two derived assets), tile-years/hour and km²/hour,
the minor page faults of each stage, and the bytes each store holds per
tile-year.

    python bench/bench_pipeline.py [--precision float32|bfloat16] [--repeats 2]
        [--provider local|synthetic] [--keep-tensors] [--system-malloc]

Like the pipeline's own processes, the bench keeps freed buffers for reuse
(``agrifm_pipeline.runtime.retain_freed_memory``); ``--system-malloc`` measures
with the C library's default allocator instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TILE_ID = "32631_8960m_E0064_N0627"
YEAR = 2019


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stages(
    provider: Any, precision: str, batch: int, root: Path, keep_tensors: bool
) -> dict[str, float]:
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions
    from agrifm_pipeline.runtime import freeze_long_lived
    from agrifm_pipeline.storage import ZarrStore, lineage_from_attrs
    from agrifm_pipeline.tiles import Tile
    from agrifm_pipeline.tileyear import (
        TileYearSettings,
        acquire,
        band_frames,
        chip_table,
        embedding_grid,
        frame_stack_dataset,
        model_input,
        normalise_tile,
        normalized_dataset,
        preview_png,
    )

    cfg = TileYearSettings()
    tile = Tile.from_id(TILE_ID)
    engine = EmbeddingEngine.create(
        "untrained:0", options=InferenceOptions(device="cpu", precision=precision, batch_size=batch)
    )
    freeze_long_lived(engine)  # as the model resource does in a step's process
    t: dict[str, float] = {}

    def clock(name: str, fn: Any) -> Any:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        out = fn()
        t[name] = time.perf_counter() - t0
        t[f"faults_{name}"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        return out

    frames_store = ZarrStore(root, "s2_frame_stack")
    tensors_store = ZarrStore(root, "normalized_tensors")
    grid_store = ZarrStore(root, "agrifm_embedding_grid")
    # s2_frame_stack
    stack = clock("acquire", lambda: acquire(provider, tile, YEAR, cfg))
    lineage = {"run_id": "bench"}
    written = clock(
        "write_frames",
        lambda: frames_store.write(YEAR, tile.id, frame_stack_dataset(stack), lineage),
    )
    # normalized_tensors: reads the frames it normalises from the store, as the asset does
    tensor, _ = clock(
        "normalise",
        lambda: normalise_tile(frames_store.open(YEAR, tile.id)["frames"].values, cfg),
    )
    # It names the frames version it read, as the asset's lineage does.
    norm_lineage = {
        "settings": cfg.as_record(),
        "inputs": {"s2_frame_stack": {**lineage, "version": written.id}},
    }
    clock(
        "write_normalized",
        lambda: tensors_store.write(
            YEAR, tile.id, normalized_dataset(tensor, cfg, keep_tensors=keep_tensors), norm_lineage
        ),
    )
    # agrifm_embedding_grid, in the same step (normalise_and_embed): the tensor just made.
    feats = clock("encode", lambda: engine.embed(tensor))
    grid = embedding_grid(feats, tile, cfg)
    clock("write_grid", lambda: grid_store.write(YEAR, tile.id, grid.to_dataset(), {}))
    # chip_embeddings and embedding_preview (the preview reads the RGB frames back)
    clock(
        "chips_and_preview",
        lambda: (
            chip_table(grid, tile, YEAR, cfg),
            preview_png(
                band_frames(frames_store.open(YEAR, tile.id)["frames"], ["B4", "B3", "B2"]),
                grid.values,
                ["B4", "B3", "B2"],
            ),
        ),
    )
    # Selected alone, the embedding makes its input again from the store: timed too,
    # outside the tile-year's total (the "x_" prefix).

    def again() -> Any:
        nt = tensors_store.open(YEAR, tile.id)
        return model_input(
            nt,
            lambda: frames_store.open(YEAR, tile.id),
            lineage_from_attrs(nt.attrs),
            TILE_ID,
        )

    clock("x_model_input_alone", again)
    t["bytes_frames"] = du(root / "s2_frame_stack.zarr" / str(YEAR) / tile.id)
    t["bytes_tensors"] = du(root / "normalized_tensors.zarr" / str(YEAR) / tile.id)
    t["bytes_grid"] = du(root / "agrifm_embedding_grid.zarr" / str(YEAR) / tile.id)
    return t


def dagster_run(
    provider_name: str,
    precision: str,
    batch: int,
    root: Path,
    keep_tensors: bool,
    min_chip_coverage: float = 0.0,
) -> dict[str, Any]:
    """The job on the tile in process; by default every chip is encoded, fill included:
    the full encoder load of a tile-year (the demo tile is mostly fill;
    bench_coverage.py measures leaving it out)."""
    import dagster as dg

    from agrifm_pipeline.definitions import build_defs
    from agrifm_pipeline.defs.partitions import tile_year_key
    from agrifm_pipeline.defs.requests import RANGE_END, RANGE_START
    from agrifm_pipeline.defs.resources import AgriFMModel, S2Source, TileYearConfig, ZarrStorage

    defs = build_defs(
        {
            "tile_year": TileYearConfig(min_chip_coverage=min_chip_coverage),
            "s2": S2Source(backend=provider_name, local_root=str(ROOT / "data" / "s2_sample")),
            "model": AgriFMModel(
                checkpoint="untrained:0", device="cpu", precision=precision, batch_size=batch
            ),
            "storage": ZarrStorage(
                root=str(root), regions_dir=str(root / "regions"), keep_tensors=keep_tensors
            ),
        }
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("tiles", [TILE_ID])
        key = str(tile_year_key(TILE_ID, YEAR))
        t0 = time.perf_counter()
        result = defs.resolve_job_def("embed_tile_years").execute_in_process(
            instance=instance,
            tags={RANGE_START: key, RANGE_END: key},
            run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
        )
        wall = time.perf_counter() - t0
        assert result.success
        steps = {
            s.step_key: (s.end_time or 0) - (s.start_time or 0)
            for s in instance.get_run_step_stats(result.run_id)
        }
    return {"run_wall_s": wall, "steps_s": steps}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--provider", default="local", choices=["local", "synthetic"])
    ap.add_argument(
        "--keep-tensors",
        action="store_true",
        help="store the float32 model input too (storage.keep_tensors)",
    )
    ap.add_argument(
        "--system-malloc",
        action="store_true",
        help="leave the allocator at its default (the pipeline retains freed buffers)",
    )
    ap.add_argument("--json", default="bench/results/bench_pipeline.json")
    args = ap.parse_args(argv)

    from agrifm_pipeline.runtime import OPT_OUT, allocator_status, retain_freed_memory

    if args.system_malloc:
        os.environ[OPT_OUT] = "1"  # the Dagster run's build_defs would apply it otherwise
    retain_freed_memory()

    from agrifm_pipeline.providers import make_provider

    provider = (
        make_provider("local", root=str(ROOT / "data" / "s2_sample"))
        if args.provider == "local"
        else make_provider("synthetic", seed=0)
    )
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        common = (args.precision, args.batch)
        # One store for the warm-up and every repeat, as in a backfill: the stores and
        # their year groups exist after the first tile-year, so each write is one
        # partition (replacing the previous repeat's). Warm-up: caches, allocator.
        store = Path(tmp) / "store"
        stages(provider, *common, store, args.keep_tensors)
        for _ in range(args.repeats):
            runs.append(stages(provider, *common, store, args.keep_tensors))
        job = dagster_run(args.provider, *common, Path(tmp) / "dagster", args.keep_tensors)
    keys = [k for k in runs[0] if not k.startswith(("bytes_", "x_", "faults_"))]
    med = {k: statistics.median(r[k] for r in runs) for k in keys}
    total = sum(med.values())
    share = med["encode"] / total
    # The partition's own stages (acquire, normalise, encode and the three writes),
    # without the two assets derived from it (chip table and preview).
    core = total - med["chips_and_preview"]
    core_share = med["encode"] / core
    km2 = 8.96**2
    print(f"# one tile-year ({TILE_ID}, {YEAR}, T=8, 16 chips of 224², full-size encoder, "
          f"{args.precision}, batch {args.batch}); provider {args.provider}; "
          f"keep_tensors={args.keep_tensors}; allocator: {allocator_status()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    for k in keys:
        faults = statistics.median(r[f"faults_{k}"] for r in runs)
        print(f"{k:>18}: {med[k]:7.2f} s  {100 * med[k] / total:5.1f} %  {faults:9.0f} page faults")
    print(f"{'total':>18}: {total:7.2f} s   encoder share {100 * share:.1f} %")
    print(
        f"{'without derived':>18}: {core:7.2f} s   encoder share {100 * core_share:.1f} % "
        "(acquire, normalise, encode, writes; no chip table or preview)"
    )
    alone = statistics.median(r["x_model_input_alone"] for r in runs)
    print(f"(embedding selected alone: its model input from the store takes {alone:.2f} s more)")
    print(f"tile-years/hour {3600 / total:.0f}   km²/hour {3600 / total * km2:.0f}")
    print(f"dagster run wall {job['run_wall_s']:.2f} s -> {3600 / job['run_wall_s']:.0f} tile-years/hour; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in job["steps_s"].items()))  # fmt: skip
    sizes = {k: runs[-1][k] for k in runs[-1] if k.startswith("bytes_")}
    print(
        "bytes per tile-year: " + ", ".join(f"{k[6:]} {v / 1e6:.1f} MB" for k, v in sizes.items())
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "env": {
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(),
                    "allocator": allocator_status(),
                },
                "args": vars(args),
                "stages_median_s": med,
                "model_input_when_embedding_alone_s": alone,
                "encoder_share": share,
                "encoder_share_without_derived": core_share,
                "tile_years_per_hour": 3600 / total,
                "km2_per_hour": 3600 / total * km2,
                "dagster": job,
                "bytes_per_tile_year": sizes,
            },
            indent=2,
        )
    )
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
