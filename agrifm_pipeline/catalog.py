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

import posixpath
from typing import Any

import pystac

from agrifm_pipeline import stages
from agrifm_pipeline.storage import (
    DamagedPointerError,
    Documents,
    Version,
    check_name,
    filesystem,
    gdal_path,
)

STAC_DIR = "stac"
JSON = "application/json"
MEDIA = {
    ".zarr": "application/vnd+zarr",
    ".parquet": "application/vnd.apache.parquet",
    ".png": "image/png",
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
        item_path = self._path(STAC_DIR, asset, year, f"{check_name(tile, 'tile')}.json")
        self.docs.write(item_path, item)
        self._year_catalog(asset, year, tile)
        self._ensure_collection(asset, year)

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
        item = pystac.Item(
            id=f"{version.tile}_{year}",
            geometry=geometry,
            bbox=bbox,
            datetime=None,
            properties=props,
            collection=version.asset,
        )
        for key, asset in self._assets(version, lineage).items():
            item.add_asset(key, asset)
        doc = item.to_dict(include_self_link=False, transform_hrefs=False)
        doc["links"] = [
            {"rel": "root", "href": "../../../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "./catalog.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
        ]
        return doc

    def _assets(self, version: Version, lineage: dict[str, Any]) -> dict[str, pystac.Asset]:
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

    def _ensure_collection(self, asset: str, year: str) -> None:
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
