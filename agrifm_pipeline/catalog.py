"""A static STAC catalog of every current partition, for tools outside Dagster.

Layout under the storage root::

    <root>/catalog.json                               the root catalog: one child per asset
    <root>/stac/<asset>/collection.json               one collection per asset
    <root>/stac/<asset>/<year>/catalog.json           a year's items
    <root>/stac/<asset>/<year>/<tile>.json            one item per partition

Each commit writes its partition's item (one write) and adds the item's link to
its year's catalog (and the year to the collection, the asset to the root) by a
read-modify-write that loses no concurrent update where the store allows it
(:class:`agrifm_pipeline.storage.Documents`); ``agrifm-pipeline catalog``
rewrites the whole catalog from the stores' current versions. The item names the current
version: its asset ``href`` opens in xarray and fsspec (a local path, ``s3://``…),
and ``agrifm:gdal_path`` in GDAL (``ZARR:"/vsis3/…":/embedding`` and the like).
Catalog links are relative, so a copied store keeps a working catalog.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import pystac

from agrifm_pipeline import stages
from agrifm_pipeline.storage import (
    MANIFEST,
    DamagedPointerError,
    Documents,
    Version,
    check_name,
    filesystem,
    gdal_path,
)

STAC_DIR = "stac"
JSON = "application/json"
GEOJSON = "application/geo+json"
MEDIA = {
    ".zarr": "application/vnd+zarr",
    ".parquet": "application/vnd.apache.parquet",
    ".png": "image/png",
    ".tif": "image/tiff; application=geotiff; profile=cloud-optimized",
}
DESCRIPTIONS = {s.asset: s.title for s in stages.TABLE}


class StacCatalog:
    """The catalog under a storage root (any fsspec URL with its storage options)."""

    def __init__(self, root: str, storage_options: dict[str, Any] | None = None):
        self.root = str(root).rstrip("/")
        self.fs, self.root_path = filesystem(self.root, storage_options)
        self.docs = Documents(self.fs)

    # -- I/O -----------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root_path, *parts)

    # -- records ------------------------------------------------------------------------
    def record(self, version: Version, lineage: dict[str, Any]) -> None:
        """Point the partition's item at ``version`` (called after every commit)."""
        asset, year, tile = version.asset, check_name(version.year, "year"), version.tile
        item = self.item(version, lineage)
        if stages.stage(asset).store == "files":
            self._checksums(version, item)
        if asset in EMBEDDING_PRODUCTS:
            self._ensure_model(lineage, version.committed_at)
        item_path = self._path(STAC_DIR, asset, year, f"{check_name(tile, 'tile')}.json")
        self.docs.write(item_path, item)
        self._year_catalog(asset, year, tile)
        self._ensure_collection(asset, year, lineage)

    def item(self, version: Version, lineage: dict[str, Any]) -> dict[str, Any]:
        geometry, bbox, epsg = _footprint(version.tile, lineage)
        year = int(version.year)
        emb = lineage.get("embedding", {})
        ckpt = emb.get("checkpoint", {}) if isinstance(emb, dict) else {}
        settings = lineage.get("settings", {})
        shas = lineage.get("checkpoint_sha256")
        props: dict[str, Any] = {
            "start_datetime": f"{year}-01-01T00:00:00Z",
            "end_datetime": f"{year}-12-31T23:59:59Z",
            "agrifm:asset": version.asset,
            "agrifm:year": year,
            "agrifm:tile": version.tile,
            "agrifm:version": version.id,
            "agrifm:manifest_sha256": version.manifest_sha256,
            "agrifm:committed_at": version.committed_at,
            "agrifm:run_id": version.run_id,
            "agrifm:checkpoint_sha256": ckpt.get("sha256")
            or (shas[0] if isinstance(shas, list) and len(shas) == 1 else shas),
            "agrifm:untrained": bool(ckpt.get("untrained", False)) if ckpt else None,
            "agrifm:n_frames": settings.get("n_frames"),
            "agrifm:norm_mode": settings.get("norm_mode")
            if version.asset != stages.FRAMES.asset
            else None,
        }
        if epsg:
            props["proj:code"] = f"EPSG:{epsg}"
        product = version.asset in EMBEDDING_PRODUCTS
        if product:
            props.update(embedding_properties(version, lineage))
        item = pystac.Item(
            id=f"{version.tile}_{year}",
            geometry=geometry,
            bbox=bbox,
            datetime=None,
            properties=props,
            collection=version.asset,
            stac_extensions=list(PRODUCT_EXTENSIONS) if product else None,
        )
        for key, asset in self._assets(version, lineage).items():
            item.add_asset(key, asset)
        doc = item.to_dict(include_self_link=False, transform_hrefs=False)
        doc["links"] = [
            {"rel": "root", "href": "../../../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "./catalog.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
        ]
        if product:
            doc["links"] += product_links(lineage, "../../")
        return doc

    def _assets(self, version: Version, lineage: dict[str, Any]) -> dict[str, pystac.Asset]:
        out = self._data_assets(version, lineage)
        zones = lineage.get("zones") or []
        if version.asset in EMBEDDING_PRODUCTS and len(zones) > 1:
            # the version itself: a Zarr group of zone groups, or a folder of zone COGs
            zarr = stages.stage(version.asset).store == "zarr"
            out["embeddings"] = pystac.Asset(
                href=version.url,
                media_type=MEDIA[".zarr"] if zarr else None,
                roles=["data"],
                title=f"{version.asset} {version.year} {version.tile}: one asset per UTM zone",
            )
        elif version.asset in EMBEDDING_PRODUCTS:  # the embeddings extension's key
            out["embeddings"] = next(iter(out.values())).clone()
        out["manifest"] = pystac.Asset(
            href=f"{version.url}/{MANIFEST}",
            media_type=JSON,
            roles=["metadata"],
            title="sha256 and size of every object of this version, and its lineage",
            extra_fields={"file:checksum": multihash_sha256(version.manifest_sha256)},
        )
        return out

    def _data_assets(self, version: Version, lineage: dict[str, Any]) -> dict[str, pystac.Asset]:
        row = stages.stage(version.asset)
        if row.store == "files" and "{epsg}" in str(row.file):
            zones = lineage.get("zones") or []
            return {
                ("data" if len(zones) == 1 else f"utm_{z}"): pystac.Asset(
                    href=f"{version.url}/{str(row.file).format(epsg=z)}",
                    media_type=MEDIA[".tif"],
                    roles=["data"],
                    title=f"{version.asset} {version.year} {version.tile} EPSG:{z}",
                    extra_fields={
                        "agrifm:gdal_path": gdal_path(
                            f"{version.url}/{str(row.file).format(epsg=z)}"
                        ),
                        "proj:code": f"EPSG:{z}",
                    },
                )
                for z in zones
            }
        if f"/{version.asset}.zarr/" in version.url:
            var = stages.stage(version.asset).variable
            zones = lineage.get("zones") or []
            groups = [""] if len(zones) <= 1 else [f"utm_{z}" for z in zones]
            out = {}
            for group in groups:
                href = f"{version.url}/{group}" if group else version.url
                out[group or "data"] = pystac.Asset(
                    href=href,
                    media_type=MEDIA[".zarr"],
                    roles=["data"],
                    title=f"{version.asset} {version.year} {version.tile} {group}".strip(),
                    extra_fields={"agrifm:gdal_path": f'ZARR:"{gdal_path(href)}":/{var}'},
                )
            return out
        name = str(stages.stage(version.asset).file)
        href = f"{version.url}/{name}"
        return {
            "data": pystac.Asset(
                href=href,
                media_type=MEDIA[posixpath.splitext(name)[1]],
                roles=["data"] if name.endswith(".parquet") else ["overview"],
                extra_fields={"agrifm:gdal_path": gdal_path(href)},
            )
        }

    def _checksums(self, version: Version, item: dict[str, Any]) -> None:
        """``file:checksum`` (a sha2-256 multihash) and ``file:size`` of each file asset,
        from the version's manifest (checked against its own sha256)."""
        try:
            raw = self.fs.cat_file(posixpath.join(version.path, MANIFEST))
        except OSError:  # not under this catalog's root: the item goes without checksums
            return
        if version.manifest_sha256 and hashlib.sha256(raw).hexdigest() != version.manifest_sha256:
            return  # altered since the commit: verify names it; no checksum worth stating
        objects = json.loads(raw).get("objects", {})
        for asset in item["assets"].values():
            name = str(asset["href"]).removeprefix(f"{version.url}/")
            if name in objects:
                asset["file:checksum"] = multihash_sha256(objects[name]["sha256"])
                asset["file:size"] = int(objects[name]["size"])
        if FILE_SCHEMA not in item.setdefault("stac_extensions", []):
            item["stac_extensions"].append(FILE_SCHEMA)

    def _ensure_model(self, lineage: dict[str, Any], when: str) -> None:
        """The model item (STAC MLM) of the checkpoint that made ``lineage``'s embeddings,
        written once per checkpoint sha256; products link it as ``emb:model``."""
        sha = checkpoint_sha(lineage)
        if not sha:
            return
        path = self._path(STAC_DIR, MODEL_DIR, f"{sha}.json")
        if self.docs.read(path)[0] is not None:
            return
        self.docs.write(path, model_item(lineage, sha, when))

    def _year_catalog(self, asset: str, year: str, tile: str) -> None:
        def add(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                cat = pystac.Catalog(id=f"{asset}-{year}", description=f"{asset}, {year}")
                doc = cat.to_dict(include_self_link=False, transform_hrefs=False)
                doc["links"] = [
                    {"rel": "root", "href": "../../../catalog.json", "type": JSON},
                    {"rel": "parent", "href": "../collection.json", "type": JSON},
                ]
            link = {"rel": "item", "href": f"./{tile}.json", "type": "application/geo+json"}
            if link not in doc["links"]:
                doc["links"].append(link)
            return doc

        self.docs.update(self._path(STAC_DIR, asset, year, "catalog.json"), add)

    def _ensure_collection(
        self, asset: str, year: str, lineage: dict[str, Any] | None = None
    ) -> None:
        def add(doc: dict[str, Any] | None) -> dict[str, Any]:
            years = {year} | {
                link["href"].split("/")[1]
                for link in (doc or {}).get("links", [])
                if link.get("rel") == "child"
            }
            first, last = min(years), max(years)
            col = pystac.Collection(
                id=asset,
                description=DESCRIPTIONS.get(asset, asset),
                extent=pystac.Extent(
                    pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                    pystac.TemporalExtent([[_dt(f"{first}-01-01"), _dt(f"{last}-12-31")]]),
                ),
                license="other",
            )
            out = col.to_dict(include_self_link=False, transform_hrefs=False)
            out["links"] = [
                {"rel": "root", "href": "../../catalog.json", "type": JSON},
                {"rel": "parent", "href": "../../catalog.json", "type": JSON},
                *(
                    {"rel": "child", "href": f"./{y}/catalog.json", "type": JSON}
                    for y in sorted(years)
                ),
            ]
            if asset in EMBEDDING_PRODUCTS:
                known = {k: v for k, v in (doc or {}).items() if k.startswith("emb:")}
                out.update(collection_fields(asset, lineage or {}, known))
                out["stac_extensions"] = list(PRODUCT_EXTENSIONS)
                model = [
                    link for link in (doc or {}).get("links", []) if link["rel"] == "emb:model"
                ]
                out["links"] += model or product_links(lineage or {}, "../")[:1]
                out["links"] += product_links(lineage or {}, "../")[1:]
            return out

        path = self._path(STAC_DIR, asset, "collection.json")
        known = self.docs.read(path)[0]
        href = f"./{year}/catalog.json"
        if known is None or not any(link.get("href") == href for link in known["links"]):
            self.docs.update(path, add)
        self._ensure_root(asset)

    def _ensure_root(self, asset: str) -> None:
        path = self._path("catalog.json")
        href = f"./{STAC_DIR}/{asset}/collection.json"
        known = self.docs.read(path)[0]
        if known is not None and any(link.get("href") == href for link in known["links"]):
            return

        def add(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None:
                cat = pystac.Catalog(
                    id="agrifm-pipeline",
                    description="AgriFM embeddings and their inputs, one item per current partition.",
                )
                doc = cat.to_dict(include_self_link=False, transform_hrefs=False)
                doc["links"] = [{"rel": "root", "href": "./catalog.json", "type": JSON}]
            link = {"rel": "child", "href": href, "type": JSON}
            if link not in doc["links"]:
                doc["links"].append(link)
            return doc

        self.docs.update(path, add)

    def rebuild(self, stores: list[Any]) -> int:
        """Rewrite every item from the stores' current versions; returns the item count."""
        n = 0
        for store in stores:
            for ref in store.partitions():
                try:
                    v = store.current(ref.year, ref.tile)
                except DamagedPointerError:
                    continue  # no current version to describe until verify or a run repairs it
                if v is not None:
                    self.record(v, store.lineage(ref.year, ref.tile, v.id))
                    n += 1
        return n


# -- what describes an embedding product (the STAC embeddings and MLM extensions) -------------

EMB_SCHEMA = "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
PROJ_SCHEMA = "https://stac-extensions.github.io/projection/v2.0.0/schema.json"
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
PRODUCT_EXTENSIONS = (EMB_SCHEMA, FILE_SCHEMA, PROJ_SCHEMA)
MODEL_DIR = "model"  # stac/model/<checkpoint sha256>.json: one MLM item per checkpoint
# The assets whose items describe embeddings: the grid, its int8 form, the region products.
EMBEDDING_PRODUCTS = frozenset(
    s.asset for s in (stages.GRID, stages.GRID_INT8, *stages.REGION_PRODUCTS)
)


def multihash_sha256(hex_digest: str) -> str:
    """A sha256 hex digest as a multihash (``file:checksum``): sha2-256 (0x12), 32 bytes."""
    return f"1220{hex_digest}"


def checkpoint_sha(lineage: dict[str, Any]) -> str:
    emb = lineage.get("embedding") or {}
    sha = (emb.get("checkpoint") or {}).get("sha256") if isinstance(emb, dict) else None
    shas = lineage.get("checkpoint_sha256")
    if not sha and isinstance(shas, list) and len(shas) == 1:
        sha = shas[0]
    return str(sha or "")


def _dimensions(lineage: dict[str, Any]) -> int | None:
    shape = (lineage.get("output") or {}).get("shape")
    if shape:
        return int(shape[0])
    dims = lineage.get("dimensions")
    return int(dims) if dims else None


def _cell_size(lineage: dict[str, Any]) -> float | None:
    if lineage.get("cell_size_m"):
        return float(lineage["cell_size_m"])
    settings, hw = lineage.get("settings") or {}, (lineage.get("output") or {}).get("grid_hw")
    if hw and settings.get("chip_px") and settings.get("scale_m"):
        return float(settings["chip_px"]) * float(settings["scale_m"]) / float(hw[0])
    return None


def embedding_properties(version: Version, lineage: dict[str, Any]) -> dict[str, Any]:
    """An embedding product item's properties: what a consumer needs without our docs."""
    from agrifm_pipeline import __version__
    from agrifm_pipeline.frames import frame_windows

    settings = lineage.get("settings") or {}
    emb = lineage.get("embedding") or {}
    quant = lineage.get("quantisation") or {}
    n_frames = settings.get("n_frames")
    year = int(version.year)
    dtype = str(quant.get("dtype") or ("int8" if quant else "float32"))
    props: dict[str, Any] = {
        "agrifm:checkpoint_sha256": checkpoint_sha(lineage) or None,
        "agrifm:model": "AgriFM S2 encoder (Video Swin Transformer), final stage",
        "agrifm:dimensions": _dimensions(lineage),
        "agrifm:years": [year],
        "agrifm:frames": [
            [w.start.isoformat(), w.end.isoformat()] for w in frame_windows(year, int(n_frames))
        ]
        if n_frames
        else None,
        "agrifm:package_version": lineage.get("package_version") or __version__,
        "data_type": dtype,
        "agrifm:nodata": quant.get("nodata", "nan"),
        "agrifm:nodata_meaning": quant.get(
            "nodata_meaning", "NaN in every band: the cell's chip was not encoded"
        ),
        "emb:runtime_parameters": {
            k: v
            for k, v in {
                "checkpoint_sha256": checkpoint_sha(lineage) or None,
                "n_frames": n_frames,
                "image_size": settings.get("image_size"),
                "norm_mode": settings.get("norm_mode"),
                "chip_px": settings.get("chip_px"),
                "chips_per_side": settings.get("chips_per_side"),
                "scale_m": settings.get("scale_m"),
                "min_chip_coverage": settings.get("min_chip_coverage"),
                "precision": emb.get("precision") if isinstance(emb, dict) else None,
                "encoder": emb.get("encoder_backend") if isinstance(emb, dict) else None,
            }.items()
            if v is not None
        },
    }
    if _cell_size(lineage):
        props["gsd"] = _cell_size(lineage)
    if quant:
        props["emb:quantization"] = {
            "method": f"{quant.get('quantisation', 'channel')} (agrifm-pipeline)",
            "original_dtype": str(quant.get("source_dtype", "float32")),
            "quantized_dtype": dtype,
        }
        props["agrifm:dequantisation"] = quant.get("dequantisation")
        props["agrifm:quantisation"] = {k: v for k, v in quant.items() if k != "dequantisation"}
    else:
        props["agrifm:dequantisation"] = "none: float32 as the encoder made it"
    return {k: v for k, v in props.items() if v is not None}


def collection_fields(asset: str, lineage: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """The embeddings extension's collection fields (kept as first recorded)."""
    quant = lineage.get("quantisation") or {}
    out: dict[str, Any] = {
        "emb:type": "pixel",
        "emb:dimensions": _dimensions(lineage) or 1024,
        "data_type": str(quant.get("dtype") or ("int8" if quant else "float32")),
        "emb:temporal_resolution": "P1Y",
        "emb:fit_for_use": ["classification", "retrieval", "change_detection"],
    }
    if _cell_size(lineage):
        out["gsd"] = _cell_size(lineage)
    return {**out, **known}


def product_links(lineage: dict[str, Any], up: str) -> list[dict[str, Any]]:
    """``emb:model`` (the checkpoint's MLM item) and ``emb:source-data`` (the frame stacks),
    relative to a document ``up`` below ``stac/``."""
    sha = checkpoint_sha(lineage)
    out = []
    if sha:
        out.append({"rel": "emb:model", "href": f"{up}{MODEL_DIR}/{sha}.json", "type": GEOJSON})
    out.append(
        {
            "rel": "emb:source-data",
            "href": f"{up}{stages.FRAMES.asset}/collection.json",
            "type": JSON,
            "title": "the Sentinel-2 L2A frame stacks the embeddings were made from",
        }
    )
    return out


def model_item(lineage: dict[str, Any], sha: str, when: str) -> dict[str, Any]:
    """The MLM item of one checkpoint: the encoder, its input and output, the weights."""
    from pystac.extensions.mlm import (
        DataType,
        InputStructure,
        MLMExtension,
        ModelInput,
        ModelOutput,
        ResultStructure,
        TaskType,
    )

    from agrifm_pipeline.model.config import AGRIFM_S2_BANDS

    settings = lineage.get("settings") or {}
    emb = lineage.get("embedding") or {}
    ckpt = (emb.get("checkpoint") or {}) if isinstance(emb, dict) else {}
    t, size = int(settings.get("n_frames") or 8), int(settings.get("image_size") or 224)
    dims = _dimensions(lineage) or 1024
    item = pystac.Item(
        id=f"agrifm-s2-encoder-{sha[:12]}",
        geometry=None,
        bbox=None,
        datetime=_dt(when[:19]) if when else None,
        properties={
            "agrifm:checkpoint_sha256": sha,
            "agrifm:untrained": bool(ckpt.get("untrained", False)),
        },
    )
    if item.datetime is None:
        item.datetime = _dt("1970-01-01")
    mlm = MLMExtension.ext(item, add_if_missing=True)
    mlm.apply(
        name="AgriFM S2 encoder",
        architecture="Video Swin Transformer (AgriFM)",
        tasks=[TaskType.SIMILARITY_SEARCH],
        framework="pytorch",
        pretrained=not bool(ckpt.get("untrained", False)),
        input=[
            ModelInput.create(
                name="Sentinel-2 L2A frames",
                bands=list(AGRIFM_S2_BANDS),
                input=InputStructure.create(
                    shape=[-1, t, len(AGRIFM_S2_BANDS), size, size],
                    dim_order=["batch", "time", "bands", "height", "width"],
                    data_type=DataType.FLOAT32,
                ),
                description=f"{t} frames a year, normalised ({settings.get('norm_mode')})",
            )
        ],
        output=[
            ModelOutput.create(
                name="embedding",
                tasks=[TaskType.SIMILARITY_SEARCH],
                result=ResultStructure.create(
                    shape=[-1, dims, -1, -1],
                    dim_order=["batch", "channel", "height", "width"],
                    data_type=DataType.FLOAT32,
                ),
                description="the final stage's feature map: one vector per grid cell",
            )
        ],
    )
    source = str(ckpt.get("source") or ckpt.get("path") or f"untrained:{sha}")
    item.add_asset(
        "weights",
        pystac.Asset(
            href=source,
            roles=["mlm:model", "mlm:weights"],
            title="the checkpoint (its sha256 is the weights' identity)",
            extra_fields={
                "mlm:artifact_type": "torch.save",
                "file:checksum": multihash_sha256(sha),
            },
        ),
    )
    doc = item.to_dict(include_self_link=False, transform_hrefs=False)
    doc["stac_extensions"] = sorted({*doc.get("stac_extensions", []), FILE_SCHEMA})
    doc["links"] = [{"rel": "root", "href": "../../catalog.json", "type": JSON}]
    return doc


def _dt(text: str) -> Any:
    import datetime as dt

    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def _footprint(
    tile: str, lineage: dict[str, Any]
) -> tuple[dict[str, Any], list[float], int | None]:
    """GeoJSON geometry (EPSG:4326), bbox and EPSG of a tile or of a region's tiles."""
    import shapely
    from pyproj import Transformer
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    from agrifm_pipeline.tiles import Tile

    ids = lineage.get("tiles") or [tile]
    shapes = []
    epsgs = set()
    for tid in ids:
        t = Tile.from_id(tid)
        epsgs.add(t.epsg)
        to_ll = Transformer.from_crs(t.crs, "EPSG:4326", always_xy=True).transform
        outline = box(*t.bounds).segmentize(t.size_m / 8)
        shapes.append(shapely.transform(outline, to_ll, interleaved=False))
    geom = unary_union(shapes)
    return mapping(geom), list(geom.bounds), (epsgs.pop() if len(epsgs) == 1 else None)
