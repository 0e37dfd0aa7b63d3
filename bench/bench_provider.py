#!/usr/bin/env python
"""Provider throughput and the share of a tile-year spent outside the encoder.

For the local provider on the bundled sample (``data/s2_sample``, 53 real
dates) it times a tile-year of acquisition (reading, SCL masking,
compositing) on two grids: the sample's own 64 x 64 px and a full default
tile (896 x 896 px, 8.96 km, of which the sample covers one corner). It then
times a whole tile-year end to end — acquire, normalise the 16 chips, embed
them with the full-size encoder (``untrained:0`` weights: same cost as the
released ones) — and reports the share outside the encoder.

    python bench/bench_provider.py [--repeats 3] [--frames 8] [--batch 8]

``--gee`` instead counts the Earth Engine requests of a tile-year: the
provider runs with the real client against the computing stand-in
(``agrifm_pipeline_tests/ee_standin.py``) over the bundled scenes, three
tile-years in one process, and the stand-in counts what arrives (discovery,
``value:compute``, ``computePixels``). ``--before <commit>`` runs the
provider as it was at that commit the same way. The pixel requests of a
full default tile (896 x 896 px) follow from the provider's request plan.

    python bench/bench_provider.py --gee [--before <commit>]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from odc.geo.geobox import GeoBox  # noqa: E402

from agrifm_pipeline.frames import frame_windows  # noqa: E402
from agrifm_pipeline.model import load_encoder  # noqa: E402
from agrifm_pipeline.preprocess import preprocess_chips  # noqa: E402
from agrifm_pipeline.providers.base import CloudMask  # noqa: E402
from agrifm_pipeline.providers.local import LocalProvider  # noqa: E402
from agrifm_pipeline.specs import SensorSpec  # noqa: E402
from agrifm_pipeline.tiles import Tile  # noqa: E402

SAMPLE = ROOT / "data" / "s2_sample"
SAMPLE_GRID = GeoBox.from_bbox(
    (574680.0, 5621800.0, 575320.0, 5622440.0), "EPSG:32631", resolution=10
)
TILE = Tile.from_id("32631_8960m_E0064_N0627")


def _median_time(fn: Any, repeats: int) -> tuple[float, Any]:
    out = fn()  # warm-up (file cache, imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _provider_at(commit: str | None) -> Any:
    """The Earth Engine provider class as of ``commit`` (None: the working tree)."""
    if commit is None:
        from agrifm_pipeline.providers.gee import EarthEngineProvider

        return EarthEngineProvider
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:agrifm_pipeline/providers/gee.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "gee_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("gee_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EarthEngineProvider


def gee_request_counts(before: str | None, frames: int, tile_years: int = 3) -> dict[str, Any]:
    """Requests per tile-year at the stand-in, and the pixel requests of a full tile."""
    import google.oauth2.credentials
    import numpy as np

    from agrifm_pipeline.frames import range_windows
    from agrifm_pipeline_tests.ee_standin import catalog_from_directory, ee_standin

    cls = _provider_at(before)
    # The sample's own year (every window has scenes, which the provider before needed).
    windows = range_windows("2018-11-01", "2019-10-31", frames)
    sensor, mask = SensorSpec(), CloudMask()
    catalog = catalog_from_directory(overlapping=("2019-04-16",), redelivered=("2019-05-11",))
    with ee_standin(catalog=catalog) as s:
        kw: dict[str, Any] = {"slots_dir": "/tmp/bench-gee-slots"} if before is None else {}
        stacks = []
        for _ in range(tile_years):
            provider = cls(project=s.project, endpoint=s.url, sleep=lambda _: None,
                           credentials=google.oauth2.credentials.Credentials(token="t"), **kw)  # fmt: skip
            stacks.append(provider.fetch(SAMPLE_GRID, windows, sensor, mask))
        kinds: dict[str, int] = {}
        for _method, path, _ in s.requests:
            kind = "discovery" if "$discovery" in path else path.split("?")[0].rsplit("/", 1)[-1]
            kinds[kind] = kinds.get(kind, 0) + 1
    local = LocalProvider(SAMPLE).fetch(SAMPLE_GRID, windows, sensor, mask).data.values
    diff = int(np.abs(stacks[-1].data.values.astype(int) - local.astype(int)).max())
    if before is None:
        from agrifm_pipeline.providers.gee import band_groups, blocks

        tags = [f"f{i}" for i in range(frames)]
        tile_px = sum(
            len(blocks(TILE.geobox().shape, len(g) * 21)) for g in band_groups(tags, 11, 1023)
        )
    else:
        tile_px = len(cls.blocks(TILE.geobox(), (frames + 1) * 11))
    return {
        "provider": f"gee at {before or 'working tree'}",
        "tile_years": tile_years,
        "requests_by_kind": kinds,
        "per_tile_year": {k: v / tile_years for k, v in kinds.items()},
        "pixel_requests_full_tile": tile_px,
        "max_dn_difference_to_local": diff,
        "n_scenes": [f.n_scenes for f in stacks[-1].frames],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--year", type=int, default=2019)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default="bench/results/bench_provider.json")
    ap.add_argument("--gee", action="store_true", help="count Earth Engine requests instead")
    ap.add_argument("--before", default=None, help="with --gee: also the provider at this commit")
    args = ap.parse_args(argv)

    if args.gee:
        print(
            f"# Earth Engine requests per tile-year (stand-in, T={args.frames}); {platform.processor() or platform.machine()}"
        )
        results = [
            gee_request_counts(c, args.frames)
            for c in ([args.before] if args.before else []) + [None]
        ]
        for r in results:
            print(json.dumps(r))
        out = Path(args.json).with_name("bench_provider_gee.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"# wrote {out}")
        return 0

    provider = LocalProvider(SAMPLE)
    windows = frame_windows(args.year, args.frames)
    sensor, mask = SensorSpec(), CloudMask()
    rows: list[dict[str, Any]] = []
    print(f"# local provider on {SAMPLE.name}, {args.year}, T={args.frames}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'grid':>22} | {'px':>9} | {'s/tile-year':>11} | {'tile-years/s':>12}")
    for label, grid in (("sample 64x64", SAMPLE_GRID), (f"tile {TILE.id}", TILE.geobox())):
        sec, _ = _median_time(lambda g=grid: provider.fetch(g, windows, sensor, mask), args.repeats)
        rows.append(
            {"grid": label, "pixels": int(grid.shape[0] * grid.shape[1]), "s_per_tile_year": sec}
        )
        print(f"{label:>22} | {grid.shape[0] * grid.shape[1]:>9} | {sec:>11.3f} | {1 / sec:>12.2f}")

    # End to end on a full tile: acquire -> chips -> normalise -> embed.
    encoder = load_encoder("untrained:0")
    chip = 224

    def acquire() -> Any:
        return provider.fetch(TILE.geobox(), windows, sensor, mask).data.values

    def normalise(stack: Any) -> torch.Tensor:
        t, c, h, w = stack.shape
        chips = stack.reshape(t, c, h // chip, chip, w // chip, chip).transpose(2, 4, 0, 1, 3, 5)
        chips = chips.reshape(-1, t, c, chip, chip)
        return preprocess_chips(chips, n_frames=t, image_size=224, norm_mode="agrifm_stats").tensor

    def embed(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([encoder(part) for part in x.split(args.batch)])

    t_acq, stack = _median_time(acquire, args.repeats)
    t_norm, tensors = _median_time(lambda: normalise(stack), args.repeats)
    t_embed, grid = _median_time(lambda: embed(tensors), max(1, args.repeats - 1))
    total = t_acq + t_norm + t_embed
    km2 = (TILE.size_m / 1000) ** 2
    e2e = {
        "tile": TILE.id,
        "chips": int(tensors.shape[0]),
        "acquire_s": t_acq,
        "normalise_s": t_norm,
        "embed_s": t_embed,
        "total_s": total,
        "share_outside_encoder": (t_acq + t_norm) / total,
        "tile_years_per_hour": 3600 / total,
        "km2_per_hour": 3600 / total * km2,
        "grid_shape": list(grid.shape),
    }
    print(
        f"# end to end, 1 tile-year ({e2e['chips']} chips of {chip}² x T={args.frames}): "
        f"acquire {t_acq:.2f} s, normalise {t_norm:.2f} s, embed {t_embed:.2f} s -> "
        f"{100 * e2e['share_outside_encoder']:.1f}% outside the encoder; "
        f"{e2e['tile_years_per_hour']:.0f} tile-years/h, {e2e['km2_per_hour']:.0f} km²/h"
    )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps({"env": env, "provider_rows": rows, "end_to_end": e2e}, indent=2))
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
