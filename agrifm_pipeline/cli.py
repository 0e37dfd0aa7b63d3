"""``agrifm-pipeline``: AgriFM embeddings of Sentinel-2 time series, from one array to whole
regions (the demo), and the commands that look after what the pipeline stored."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agrifm_pipeline.errors import AgriFMError, InputContractError, SettingsError
from agrifm_pipeline.runtime import retain_freed_memory

DEMO_DATA = Path(__file__).resolve().parent.parent / "data" / "s2_sample"


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _read_input(path: Path) -> np.ndarray:
    """A (10, H, W) or (T, 10, H, W) array from .npy, .npz (key 'x' or the only array) or GeoTIFF."""
    suffix = path.suffix.lower()
    if not path.exists():
        raise InputContractError(f"input file {path} does not exist")
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.keys())
            key = "x" if "x" in keys else (keys[0] if len(keys) == 1 else None)
            if key is None:
                raise InputContractError(f"{path} holds {keys}; name the array 'x'")
            return z[key]
    if suffix in (".tif", ".tiff"):
        import rasterio

        with rasterio.open(path) as src:
            return src.read()
    raise InputContractError(f"input file {path}: use .npy, .npz or a GeoTIFF (.tif)")


def demo_stack(data_dir: Path = DEMO_DATA, n_frames: int = 8) -> tuple[np.ndarray, list[str]]:
    """The clearest acquisition of each of ``n_frames`` equal slices of the bundled sample.

    A stand-in for real compositing (which the providers do): enough to show a
    real multi-temporal embedding with nothing but the repository.
    """
    import rasterio

    manifest = json.loads((data_dir / "manifest.json").read_text())
    dates = sorted(p.stem for p in data_dir.glob("????-??-??.tif"))
    if not dates:
        raise InputContractError(f"no YYYY-MM-DD.tif scenes in {data_dir}")
    cloud = {str(s["date"]): float(s["cloud_fraction"]) for s in manifest.get("dates", [])}
    chosen: list[str] = []
    for part in np.array_split(np.array(dates), n_frames):
        if len(part):
            chosen.append(min(part, key=lambda d: (cloud.get(str(d), 1.0), str(d))))
    frames = []
    for d in chosen:
        with rasterio.open(data_dir / f"{d}.tif") as src:
            frames.append(src.read())
    return np.stack(frames), [str(d) for d in chosen]


def cmd_settings(args: argparse.Namespace) -> int:
    from agrifm_pipeline.settings import load_settings

    _print_json(load_settings().as_record())
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Resolve the checkpoint and check that the encoder can use it (a web page, a
    file of other tensors or one too small is a CheckpointError), then print it."""
    from agrifm_pipeline.checkpoint import resolve_checkpoint
    from agrifm_pipeline.model.checks import validate_checkpoint
    from agrifm_pipeline.settings import load_settings

    settings = load_settings()
    resolved = resolve_checkpoint(args.checkpoint, settings, progress=True)
    validate_checkpoint(resolved, settings)
    _print_json(resolved.as_record())
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from agrifm_pipeline.api import get_embedding
    from agrifm_pipeline.specs import OutputSpec

    x = _read_input(Path(args.input))
    output = (
        OutputSpec.grid()
        if args.output == "grid"
        else OutputSpec.pooled(args.output.split("_")[-1])
    )
    emb = get_embedding(
        "agrifm",
        input_chw=x,
        output=output,
        checkpoint=args.checkpoint,
        device=args.device,
        precision=args.precision,
        encoder=args.encoder,
    )
    data = emb.data.values if hasattr(emb.data, "values") else emb.data
    if args.out:
        np.savez(args.out, embedding=np.asarray(data), meta=json.dumps(emb.meta, default=str))
        print(f"wrote {args.out}")
    _print_json(
        {k: emb.meta[k] for k in ("feature_shape", "grid_hw", "checkpoint_sha256", "untrained")}
    )
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Ours against the official source tree, same weights, same input."""
    import torch

    from agrifm_pipeline.checkpoint import resolve_checkpoint
    from agrifm_pipeline.model import load_encoder
    from agrifm_pipeline.model.official import load_official_encoder
    from agrifm_pipeline.model.weights import checkpoint_tensors
    from agrifm_pipeline.preprocess import preprocess_input
    from agrifm_pipeline.settings import load_settings

    settings = load_settings()
    if args.repo:
        settings = settings.replace(repo_path=args.repo)
    resolved = resolve_checkpoint(args.checkpoint, settings)
    ours = load_encoder(resolved)
    official = load_official_encoder(checkpoint_tensors(resolved), settings=settings)
    if args.input:
        raw = _read_input(Path(args.input))
        x = preprocess_input(
            raw,
            n_frames=settings.n_frames,
            image_size=settings.image_size,
            norm_mode=settings.norm_mode,
        ).tensor[None]
    else:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(
            (1, settings.n_frames, 10, settings.image_size, settings.image_size), generator=gen
        )
    with torch.no_grad():
        t0 = time.perf_counter()
        a = ours(x)
        t1 = time.perf_counter()
        b = official(x)
        t2 = time.perf_counter()
    diff = (a - b).abs()
    cos = torch.nn.functional.cosine_similarity(a.mean((2, 3)), b.mean((2, 3))).min().item()
    report = {
        "checkpoint": resolved.as_record(),
        "input_shape": list(x.shape),
        "output_shape": list(a.shape),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "pooled_cosine": cos,
        "seconds_ours": t1 - t0,
        "seconds_official": t2 - t1,
        "agree_within_1e-4": bool(torch.allclose(a, b, atol=1e-4, rtol=1e-4)),
    }
    _print_json(report)
    return 0 if report["agree_within_1e-4"] else 1


def cmd_roi_demo(args: argparse.Namespace) -> int:
    """Embed the bundled Flanders sample: a real 8-frame S2 series, one ROI."""
    import xarray as xr

    from agrifm_pipeline.api import get_embedding
    from agrifm_pipeline.errors import CheckpointError
    from agrifm_pipeline.settings import load_settings
    from agrifm_pipeline.specs import OutputSpec, TemporalSpec

    settings = load_settings()
    # The checkpoint chain (setting, cache, download) as everywhere; untrained weights only
    # when asked for (--checkpoint untrained:0 or RS_EMBED_AGRIFM_CKPT), never a fallback.
    checkpoint = args.checkpoint or settings.checkpoint
    if str(checkpoint).startswith("untrained:"):
        print(
            f"NOTE: UNTRAINED weights, as asked ({checkpoint}): the vectors show the pipeline "
            "works, not what AgriFM sees; set RS_EMBED_AGRIFM_CKPT to AgriFM.pth (or pass "
            "--checkpoint) for real embeddings.",
            file=sys.stderr,
        )
    else:
        from agrifm_pipeline.checkpoint import resolve_checkpoint

        try:
            resolve_checkpoint(checkpoint, settings, progress=True)
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}\n  offline? ask for untrained weights explicitly: "
                "agrifm-pipeline roi-demo --checkpoint untrained:0"
            ) from exc
    stack, dates = demo_stack(Path(args.data), settings.n_frames)
    t0 = time.perf_counter()
    grid = get_embedding(
        "agrifm",
        input_chw=stack,
        temporal=TemporalSpec.range(dates[0], "2019-11-01"),
        output=OutputSpec.grid(),
        checkpoint=checkpoint,
        device=args.device,
        precision=args.precision,
    )
    data = grid.data
    assert isinstance(data, xr.DataArray)
    pooled = data.mean(dim=("y", "x")).values
    elapsed = time.perf_counter() - t0
    meta = grid.meta
    print(f"scenes (one per frame): {', '.join(dates)}")
    print(
        f"input {list(stack.shape)} uint16 -> resized to {meta['image_size']}² -> grid {meta['feature_shape']}"
    )
    print(
        f"checkpoint {meta['checkpoint']} sha256 {str(meta['checkpoint_sha256'])[:16]}… untrained={meta['untrained']}"
    )
    print(
        f"norm={meta['norm_mode']} frames={meta['n_frames']} device={meta['device']} precision={meta['precision']}"
    )
    print(
        f"pooled (spatial mean) vector: dim {pooled.shape[0]}, first 4 {np.round(pooled[:4], 4).tolist()}"
    )
    print(f"done in {elapsed:.2f} s (model load included)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        data.assign_attrs(meta=json.dumps(meta, default=str)).to_dataset().to_zarr(
            args.out, mode="w", zarr_format=2, consolidated=True
        )
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Register the demo region and materialise it through every asset, on local defaults."""
    from agrifm_pipeline.demo import run_demo
    from agrifm_pipeline.errors import CheckpointError

    if args.checkpoint and str(args.checkpoint).startswith("untrained:"):
        print(
            f"NOTE: explicitly UNTRAINED weights ({args.checkpoint}); every output says untrained.",
            file=sys.stderr,
        )
    try:
        out = run_demo(
            checkpoint=args.checkpoint,
            device=args.device,
            precision=args.precision,
            year=args.year,
            **({"region": args.region} if args.region else {}),
            home=args.home,
        )
    except CheckpointError as exc:
        raise CheckpointError(
            f"{exc}\n  offline? run the same job with explicitly untrained weights: "
            "make demo CHECKPOINT=untrained:0"
        ) from exc
    ck = out["checkpoint"]
    print(f"\n{out['region']} {out['year']}: {len(out['tiles'])} tile(s) in {out['seconds']:.1f} s")
    print(f"checkpoint: {ck['source']} sha256 {ck['sha256'][:16]}… untrained={ck['untrained']}")
    for tile, cov in zip(out["tiles"], out.get("coverage", []), strict=False):
        print(f"coverage {tile}: {cov}")
    print("checks: " + ", ".join(f"{k}={v}" for k, v in out["checks"].items()))
    print(f"\nSTAC catalog of every current version:\n  {out['catalog']}")
    print(
        "embedding grids (Zarr, the current version of each tile-year):\n  "
        + "\n  ".join(out["grid"])
    )
    print(f"region mosaic:\n  {out['mosaic']}")
    if out.get("mosaic_cogs"):
        print(
            "region mosaic as int8 Cloud-Optimized GeoTIFF (GDAL 3.6+, QGIS; "
            "gdal_translate -unscale -ot Float32 gives the floats):\n  "
            + "\n  ".join(out["mosaic_cogs"])
        )
    print("chip vectors (GeoParquet):\n  " + "\n  ".join(out["chips"]))
    print("previews (PNG):\n  " + "\n  ".join(out["previews"]))
    for line in open_commands(
        out["mosaic"], out["dagster_home"], out.get("home"), out.get("checkpoint_setting")
    ):
        print(line)
    return 0


def open_commands(
    mosaic: str, dagster_home: str, home: str | None = None, checkpoint: str | None = None
) -> list[str]:
    """How to open the demo's outputs and look after its home, as commands that work as
    printed, offline too: this interpreter's own paths (no virtual environment to
    activate first), the demo's home and Dagster home where they are not the defaults,
    and the checkpoint the demo ran with (also in ``<home>/demo.env``, which `make ui`
    and the audit read)."""
    import shlex

    python = sys.executable
    bindir = Path(python).parent
    rio = bindir / "rio"
    rio_cmd = str(rio) if rio.exists() else f"{python} -m rasterio.rio.main"
    cli = bindir / "agrifm-pipeline"
    cli_cmd = shlex.quote(str(cli)) if cli.exists() else f"{python} -m agrifm_pipeline.cli"
    gdal_path = f'ZARR:"{mosaic}":/embedding'
    repo = DEMO_DATA.parent.parent
    ui = "make ui" if Path.cwd().resolve() == repo else f"make -C {shlex.quote(str(repo))} ui"
    own_dagster_home = home is None or (
        Path(dagster_home).resolve() != (Path(home) / "dagster").resolve()
    )
    dh = f"DAGSTER_HOME={shlex.quote(str(dagster_home))} " if own_dagster_home else ""
    env = dh
    if home is not None and Path(home).resolve() != repo / ".agrifm":
        env = f"AGRIFM_PIPELINE_HOME={shlex.quote(str(home))} {dh}"
    if checkpoint:
        ui += f" CHECKPOINT={shlex.quote(checkpoint)}"
    audit = f"{dh}{cli_cmd} audit" + (f" --home {shlex.quote(str(home))}" if home else "")
    return [
        "\nopen them:",
        f'  {python} -c "import xarray as xr, rioxarray; '
        f"print(xr.open_zarr('{mosaic}', decode_coords='all'))\"",
        f"  {rio_cmd} info '{gdal_path}'   # rasterio's own GDAL (3.10)",
        f"  gdalinfo '{gdal_path}'   # a system GDAL >= 3.10 (Debian 12's 3.6 cannot)",
        f"  {env}{ui}   # the Dagster UI on this home ({dagster_home}), with the demo's "
        "settings (PORT=3001 for another port)",
        f"  {audit}   # every stored partition: current or stale, and why",
    ]


def pipeline_resources(home: str | Path | None = None) -> dict[str, Any]:
    """The resources the deployed code location uses (what "current" means), with the
    settings the home records (``<home>/demo.env`` after the demo) and its store."""
    from agrifm_pipeline.definitions import default_resources
    from agrifm_pipeline.demo import load_home_env
    from agrifm_pipeline.settings import pipeline_storage

    load_home_env(home)
    res = default_resources()
    if home is not None:
        from agrifm_pipeline.defs.resources import ZarrStorage

        root, options = pipeline_storage(home=home)
        res["storage"] = ZarrStorage(
            root=root, storage_options=options, regions_dir=res["storage"].regions_dir
        )
    return res


def existing_dagster_home(home: str | Path | None) -> Path:
    """The Dagster home the other commands use (``DAGSTER_HOME``, else ``<home>/dagster``
    with the home from ``--home``, ``AGRIFM_PIPELINE_HOME`` or ``.agrifm`` here); an error
    naming where it looked when there is none (nothing is created)."""
    from agrifm_pipeline.errors import SettingsError
    from agrifm_pipeline.settings import pipeline_home

    given = os.environ.get("DAGSTER_HOME")
    path = Path(given) if given else pipeline_home(home) / "dagster"
    if not (path / "dagster.yaml").is_file() and not any(path.glob("**/*.db")):
        how = "DAGSTER_HOME" if given else "--home, AGRIFM_PIPELINE_HOME or ./.agrifm"
        raise SettingsError(
            f"no Dagster instance at {path.resolve()} (from {how}); run the audit from the "
            "project directory the demo or `make ui` ran in, or pass --home <that .agrifm>, "
            "or create one with `agrifm-pipeline home`"
        )
    os.environ["DAGSTER_HOME"] = str(path.resolve())
    return path


def _short_sha(sha: str) -> str:
    """A sha256 as its first 16 hex digits; anything else (why it is unknown) whole."""
    is_hash = len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)
    return f"{sha[:16]}…" if is_hash else sha


def cmd_audit(args: argparse.Namespace) -> int:
    """Every partition: checkpoint, frames, normalisation, maker, current or stale and why."""

    import dagster as dg

    from agrifm_pipeline.audit import AuditRow, format_table, write_rows
    from agrifm_pipeline.defs.audit import iter_audit_rows
    from agrifm_pipeline.defs.resources import AgriFMModel, ZarrStorage
    from agrifm_pipeline.defs.staleness import current_fingerprints, source_scenes, stage_stores

    existing_dagster_home(args.home)
    res = pipeline_resources(args.home)
    storage = ZarrStorage(root=args.store) if args.store else res["storage"]
    model = AgriFMModel(checkpoint=args.checkpoint) if args.checkpoint else res["model"]
    current, unknown, sha = current_fingerprints(res["tile_year"], res["s2"], model)
    tiles = set(storage.registry().tiles_of(args.region)) if args.region else None
    with dg.DagsterInstance.get() as instance:
        judged = iter_audit_rows(
            instance,
            stage_stores(storage),
            current,
            tiles=tiles,
            year=args.year,
            unknown=unknown,
            scenes=source_scenes(res["s2"], res["tile_year"]).lister,  # changed source scenes
            not_judged=sha.removeprefix("unknown: ") if unknown else "",
        )

        def explained(rows: Iterable[AuditRow]) -> Iterator[AuditRow]:
            for r in rows:  # every row that is not current says why
                if r.status == "unknown" and not r.why:
                    r.why = f"not judged: {sha.removeprefix('unknown: ')}"
                elif r.status != "current" and not r.why:
                    r.why = r.disagreement or r.status
                yield r

        if args.format != "table":  # streamed: a continent's rows are never all in memory
            write_rows(explained(judged), args.format, sys.stdout)
            return 0
        rows = list(explained(judged))
    print(format_table(rows, args.format))
    if args.format == "table":
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        odd = sum(bool(r.disagreement) for r in rows)
        assets = sorted({r.asset for r in rows})
        print(
            f"\n{len(rows)} partition(s) of {len(assets)} asset(s) ({', '.join(assets) or 'none'}): "
            + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            + f"; {odd} where Dagster and the store disagree; current checkpoint {_short_sha(sha)}"
            + f"\nstore {storage.root}, DAGSTER_HOME {os.environ['DAGSTER_HOME']}",
            file=sys.stderr,
        )
    return 0


def _storage(args: argparse.Namespace) -> Any:
    from agrifm_pipeline.defs.resources import ZarrStorage
    from agrifm_pipeline.demo import prepare_home

    if args.store:
        return ZarrStorage(root=args.store)
    prepare_home(args.home)
    return pipeline_resources(args.home)["storage"]


def cmd_verify(args: argparse.Namespace) -> int:
    """Re-hash stored versions against their manifests. Exit 0: all verified; 1: a
    problem was found (mismatch, missing object, damaged pointer); 2: verification
    could not run (bad arguments, unreachable store)."""
    from agrifm_pipeline.storage import verify_stores

    storage = _storage(args)
    stores = _selected_stores(storage, args.asset)
    report = verify_stores(
        stores,
        year=args.year,
        tile=args.tile,
        all_versions=args.all_versions,
        sweep=args.sweep,
        on_problem=lambda p: print(f"{'DAMAGED' if p.what == 'damaged' else 'CORRUPT'} {p}"),
    )
    print(str(report), file=sys.stderr)
    if (args.year is not None or args.tile) and not report.matched:
        raise SettingsError(
            f"no partition matches --year {args.year} --tile {args.tile} in "
            f"{', '.join(s.asset for s in stores)} under {storage.root}; "
            "`agrifm-pipeline audit` lists the partitions there are"
        )
    return 0 if report.ok else 1


def _selected_stores(storage: Any, asset: str | None) -> list[Any]:
    """Every stored asset's store, or the one ``--asset`` names (an error naming the
    assets there are when it names none of them)."""
    stores = storage.all_stores()
    if asset is None:
        return stores
    chosen = [s for s in stores if s.asset == asset]
    if not chosen:
        raise SettingsError(
            f"--asset {asset!r} is not a stored asset; use one of "
            + ", ".join(s.asset for s in stores)
        )
    return chosen


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove superseded versions no current downstream version names."""
    from agrifm_pipeline.storage import collect_garbage

    storage = _storage(args)
    report = collect_garbage(
        storage.all_stores(),
        keep=args.keep,
        min_age_s=args.min_age_hours * 3600,
        dry_run=args.dry_run,
    )
    for asset, year, tile, vid in report.removed:
        print(f"{'would remove' if args.dry_run else 'removed'} {asset} {year}/{tile} {vid}")
    print(str(report), file=sys.stderr)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    """Rewrite the STAC catalog from the current versions (it is also kept at each commit)."""
    from agrifm_pipeline.storage import ReadOnlyStoreError

    storage = _storage(args)
    if not storage.all_stores()[0].writable():
        raise ReadOnlyStoreError(
            f"the store {storage.root} cannot be written here (read-only mount, permissions "
            "or credentials), so its catalog cannot be rewritten; the catalog already there "
            "is kept at each commit: read it as it is, or run this where the store is writable"
        )
    n = storage.catalog().rebuild(storage.all_stores())
    print(f"{n} item(s) written; catalog at {storage.root.rstrip('/')}/catalog.json")
    return 0


def cmd_cog(args: argparse.Namespace) -> int:
    """Write a stored grid or mosaic (its current version) as Cloud-Optimized GeoTIFF(s):
    the int8 product's codes with each band's scale and offset, one file per UTM zone."""
    from agrifm_pipeline import stages
    from agrifm_pipeline.tileyear import cog_bytes, quantised_dataset

    storage = _storage(args)
    row = stages.stage(args.asset)
    if row.store != "zarr" or row.variable != "embedding":
        raise SettingsError(
            f"--asset {args.asset!r} holds no embedding grid; use one of "
            + ", ".join(s.asset for s in stages.TABLE if s.variable == "embedding")
        )
    store = storage.store(row.asset)
    version = store.resolve(args.year, args.tile)
    lineage = store.lineage(args.year, args.tile, version.id)
    zones = lineage.get("zones") or []
    groups = [""] if len(zones) <= 1 else [f"utm_{z}" for z in zones]
    out = Path(args.output)
    tags = {
        "asset": row.asset,
        "partition": f"{args.tile}|{args.year}",
        "version": version.id,
        "checkpoint_sha256": lineage.get("embedding", {}).get("checkpoint", {}).get("sha256")
        or ",".join(lineage.get("checkpoint_sha256", [])),
    }
    for group in groups:
        ds = (
            store.open_version(version, verify=True)
            if not group
            else store.open_group(args.year, args.tile, group, verify=True)
        )
        if ds["embedding"].dtype != np.int8:
            ds = quantised_dataset(ds)
        path = out if not group else out.with_name(f"{out.stem}_{group}{out.suffix or '.tif'}")
        path.write_bytes(cog_bytes(ds, tags))
        print(f"{path}  ({path.stat().st_size:,} bytes; {row.asset} {args.tile} {args.year})")
    return 0


def _map_products() -> list[Any]:
    """The stored products a map can read: every embedding grid, mosaic or COG."""
    from agrifm_pipeline import stages

    return [
        s
        for s in stages.TABLE
        if s not in stages.MAPS and (s.variable == "embedding" or str(s.file).endswith(".tif"))
    ]


def _map_input(args: argparse.Namespace) -> tuple[Any, Any, Any, float]:
    """The storage, the embeddings a map command reads (``--region`` or ``--tile``, and
    ``--product``), and the seconds the read took."""
    from agrifm_pipeline import stages
    from agrifm_pipeline.mapping import load_embeddings

    if bool(args.region) == bool(args.tile):
        raise SettingsError("name exactly one of --region R (its mosaic) or --tile T (its grid)")
    partitions = "region-year" if args.region else "tile-year"
    products = [s for s in _map_products() if s.partitions == partitions]
    default = stages.MOSAIC if args.region else stages.GRID
    row = stages.stage(args.product) if args.product else default
    if row not in products:
        raise SettingsError(
            f"--product {args.product!r} is not a {partitions} embedding product; use one of "
            + ", ".join(s.asset for s in products)
        )
    storage = _storage(args)
    t0 = time.perf_counter()
    emb = load_embeddings(storage.stage_store(row.asset), args.year, args.region or args.tile)
    return storage, emb, row, time.perf_counter() - t0


def _copy_out(storage: Any, asset: str, made: Any, out: str | None) -> list[str]:
    """The map's files copied from its version to ``out`` (a directory), if given."""
    if not out:
        return []
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    objects = storage.files(asset).read_objects(made.version, verify=True)
    written = []
    for name, data in sorted(objects.items()):
        (folder / name).write_bytes(data)
        written.append(str(folder / name))
    return written


def _map_report(storage: Any, asset: str, made: Any, emb: Any, read_s: float, args: Any) -> dict:
    seconds = {"read_s": read_s, **made.seconds}
    seconds["total_s"] = sum(seconds.values())
    return {
        "asset": asset,
        "partition": f"{emb.name}|{emb.year}",
        "version": made.version.id,
        "read": f"{emb.asset} {emb.version.id}",
        "files": made.files,
        "copied": _copy_out(storage, asset, made, args.out),
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "report": made.report,
    }


def cmd_similar(args: argparse.Namespace) -> int:
    """A similarity map: every cell's cosine similarity to a point's or polygon's vector."""
    from agrifm_pipeline import stages
    from agrifm_pipeline.mapping import make_similarity, parse_query

    query = parse_query(args.at, args.polygon)
    storage, emb, _, read_s = _map_input(args)
    out = storage.files(stages.SIMILARITY.asset)
    made = make_similarity(emb, query, out, metric=args.metric, catalog=storage.catalog())
    rep = _map_report(storage, stages.SIMILARITY.asset, made, emb, read_s, args)
    if args.json:
        _print_json(rep)
        return 0
    st, sec = made.report, rep["seconds"]
    print(
        f"{emb.name} {emb.year}: {args.metric} cosine similarity to the {query.kind} "
        f"{query.text} ({st['n_query_cells']} cell(s)) over {st['n_cells']:,} cells of "
        f"{emb.asset} {emb.version.id}"
    )
    print(
        f"similarity: median {st['median']:.3f}, 2nd percentile {st['p02']:.3f}, max {st['max']:.3f}"
    )
    print("files:\n  " + "\n  ".join(made.files.values()))
    for path in rep["copied"]:
        print(f"copied: {path}")
    print(
        f"{sec['total_s']:.2f} s (read {sec['read_s']:.2f}, compute {sec['compute_s']:.2f}, "
        f"write {sec['write_s']:.2f})"
    )
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """A class map from labelled polygons, its accuracy cross-validated by field."""
    from agrifm_pipeline import stages
    from agrifm_pipeline.mapping import make_class_map, read_labels

    labels = read_labels(args.labels, args.property, args.group_by)
    storage, emb, _, read_s = _map_input(args)
    out = storage.files(stages.CLASSES.asset)
    made = make_class_map(
        emb, labels, out, model=args.model, k=args.k, folds=args.folds, catalog=storage.catalog()
    )
    rep = _map_report(storage, stages.CLASSES.asset, made, emb, read_s, args)
    if args.json:
        _print_json(rep)
        return 0
    r, sec = made.report, rep["seconds"]
    print(
        f"{emb.name} {emb.year}: {args.model} on {r['n_cells']:,} labelled cells of "
        f"{r['n_fields']} fields ({emb.asset} {emb.version.id}); {r['folds']}-fold "
        "cross-validation, whole fields held out"
    )
    print(f"{'class':<24} {'fields':>6} {'cells':>7} {'accuracy':>9} {'precision':>10}")
    for name, v in r["per_class"].items():
        acc = f"{v['accuracy']:.1%}" if v["accuracy"] is not None else "-"
        prec = f"{v['precision']:.1%}" if v["precision"] is not None else "-"
        print(f"{name:<24} {v['fields']:>6} {v['cells']:>7} {acc:>9} {prec:>10}")
    print(
        f"accuracy {r['accuracy']:.1%}, balanced {r['balanced_accuracy']:.1%} (chance "
        f"{r['chance_balanced_accuracy']:.1%}; the largest class is {r['majority_share']:.1%} of "
        "the cells)"
    )
    if r["fields_without_cells"]:
        print(f"{len(r['fields_without_cells'])} field(s) hold no cell centre: not sampled")
    print("files:\n  " + "\n  ".join(made.files.values()))
    for path in rep["copied"]:
        print(f"copied: {path}")
    print(
        f"{sec['total_s']:.2f} s (read {sec['read_s']:.2f}, cross-validate "
        f"{sec['cross_validate_s']:.2f}, classify {sec['classify_s']:.2f}, write "
        f"{sec['write_s']:.2f})"
    )
    return 0


def cmd_home(args: argparse.Namespace) -> int:
    """Create the project-local Dagster home (config, pool limits) and print it."""
    from agrifm_pipeline.demo import POOL_LIMITS, init_home

    home = init_home(args.home)
    limits = ", ".join(f"{k}={v}" for k, v in POOL_LIMITS.items())
    print(f"DAGSTER_HOME={home}  (pool limits: {limits})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from agrifm_pipeline import stages

    parser = argparse.ArgumentParser(prog="agrifm-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("settings", help="print the effective RS_EMBED_AGRIFM_* settings").set_defaults(
        func=cmd_settings
    )

    p = sub.add_parser(
        "checkpoint", help="resolve (and if allowed download) the checkpoint; print its sha256"
    )
    p.add_argument("--checkpoint", default=None)
    p.set_defaults(func=cmd_checkpoint)

    def runtime(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", default=None, help="path or untrained:<seed>[:p422]")
        p.add_argument("--device", default="auto", help="cpu, cuda or auto")
        p.add_argument("--precision", default="float32", help="float32 or bfloat16")

    p = sub.add_parser("embed", help="embed one (10,H,W) or (T,10,H,W) array (.npy/.npz/.tif)")
    p.add_argument("input")
    runtime(p)
    p.add_argument("--output", default="pooled_mean", choices=["pooled_mean", "pooled_max", "grid"])
    p.add_argument("--encoder", default="ours", choices=["ours", "official"])
    p.add_argument("--out", default=None, help="write .npz with the embedding and its metadata")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "compare", help="compare our encoder with the official source tree on one input"
    )
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--repo", default=None, help="official AgriFM checkout (default: settings)")
    p.add_argument(
        "--input", default=None, help="raw input array; default: a seeded normalised tensor"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("roi-demo", help="embed the bundled Sentinel-2 sample as one ROI")
    runtime(p)
    p.add_argument("--data", default=str(DEMO_DATA))
    p.add_argument("--out", default=None, help="write the grid as a Zarr store (a directory)")
    p.set_defaults(func=cmd_roi_demo)

    p = sub.add_parser(
        "demo",
        help="the main job: materialise the bundled demo region for 2019 through every asset",
    )
    runtime(p)
    p.add_argument("--year", type=int, default=2019)
    p.add_argument("--region", default=None, help="default: the demo's own region")
    p.add_argument("--home", default=None, help="project-local home (default .agrifm)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("home", help="create the project-local Dagster home with pool limits")
    p.add_argument("--home", default=None, help="project-local home (default .agrifm)")
    p.set_defaults(func=cmd_home)

    p = sub.add_parser(
        "audit", help="list every partition with its lineage and whether it is current or stale"
    )
    p.add_argument("--region", default=None, help="only this registered region's tiles")
    p.add_argument("--year", type=int, default=None)
    p.add_argument("--format", default="table", choices=["table", "csv", "json"])
    p.add_argument(
        "--checkpoint", default=None, help="judge against this checkpoint (default: settings)"
    )
    p.add_argument("--home", default=None, help="project-local home (default .agrifm)")
    p.add_argument("--store", default=None, help="storage root (default <home>/store)")
    p.set_defaults(func=cmd_audit)

    def where(p: argparse.ArgumentParser) -> None:
        p.add_argument("--home", default=None, help="project-local home (default .agrifm)")
        p.add_argument("--store", default=None, help="storage root (default <home>/store)")

    p = sub.add_parser(
        "verify",
        help="re-hash stored versions against their manifests (exit 0: all verified, 1: a "
        "problem found, 2: could not run); works on a read-only store",
    )
    p.add_argument("--asset", default=None)
    p.add_argument("--year", type=int, default=None)
    p.add_argument("--tile", default=None, help="a tile id, or a region id for region_mosaic")
    p.add_argument("--all-versions", action="store_true", help="also the kept older versions")
    p.add_argument(
        "--no-sweep", dest="sweep", action="store_false",
        help="do not remove orphaned versions of dead writers",
    )  # fmt: skip
    where(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "gc", help="remove superseded versions that no current downstream version names"
    )
    p.add_argument("--keep", type=int, default=1, help="superseded versions kept per partition")
    p.add_argument(
        "--min-age-hours", type=float, default=1.0,
        help="never remove a version superseded less than this long ago (open readers)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true")
    where(p)
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("catalog", help="rewrite the STAC catalog at <store>/catalog.json")
    where(p)
    p.set_defaults(func=cmd_catalog)

    p = sub.add_parser(
        "cog",
        help="write a stored tile grid (or mosaic) as a Cloud-Optimized GeoTIFF: int8 codes "
        "with band scale and offset, one file per UTM zone",
    )
    p.add_argument("--tile", required=True, help="a tile id, or a region id for a mosaic")
    p.add_argument("--year", type=int, required=True)
    p.add_argument("--asset", default=stages.GRID.asset, help="the grid or mosaic asset")
    p.add_argument("-o", "--output", required=True, help="the .tif to write")
    where(p)
    p.set_defaults(func=cmd_cog)

    def map_input(p: argparse.ArgumentParser) -> None:
        p.add_argument("--region", default=None, help="a registered region (its mosaic)")
        p.add_argument("--tile", default=None, help="or a tile id (its grid)")
        p.add_argument("--year", type=int, required=True)
        p.add_argument(
            "--product", default=None,
            help="the product read (default region_mosaic, or agrifm_embedding_grid with "
            "--tile): " + ", ".join(s.asset for s in _map_products()),
        )  # fmt: skip
        p.add_argument("--out", default=None, help="also copy the map's files to this directory")
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        where(p)

    p = sub.add_parser(
        "similar",
        help="cosine-similarity map (COG + PNG) of a region's mosaic (or a tile's grid) to a "
        "point or polygon, stored as a version of similarity_map",
    )
    map_input(p)
    p.add_argument("--at", default=None, help="the query point: LON,LAT in degrees")
    p.add_argument("--polygon", default=None, help="or a polygon: a GeoJSON file or WKT (WGS84)")
    p.add_argument(
        "--metric", default="standardised", choices=["standardised", "cosine"],
        help="standardised: channels centred and scaled over the product first (default)",
    )  # fmt: skip
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser(
        "classify",
        help="few-shot class map from labelled polygons: accuracy per class cross-validated "
        "by field, a class map (COG + PNG legend), stored as a version of class_map",
    )
    map_input(p)
    p.add_argument("--labels", required=True, help="GeoJSON (or any vector file) of polygons")
    p.add_argument("--property", default="crop", help="the property naming the class")
    p.add_argument(
        "--group-by", default=None,
        help="the property naming a polygon's field (default: every polygon is one field)",
    )  # fmt: skip
    p.add_argument("--model", default="logistic", choices=["logistic", "knn"])
    p.add_argument("--k", type=int, default=5, help="knn: neighbours")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    p.set_defaults(func=cmd_classify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        retain_freed_memory()
        return int(args.func(args))
    except AgriFMError as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system's own words, without a traceback: could not run
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {type(exc).__name__}: {exc}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
