"""Registered regions: which files, which tiles, which region owns which tile.

The registry is a small JSON document kept beside the stores
(``<root>/_registry/regions.json``) and replaced atomically. Regions are
registered from files (``data/regions/*.geojson`` / ``*.gpkg`` by default).

A region's id is its name, made safe by one rule (:func:`region_id`). The name
is the GeoJSON's own when it gives one: a FeatureCollection's top-level
``"name"`` (GDAL and geopandas write the file's name there), a single Feature's
``"name"`` or else its ``properties.name``. Otherwise (no name, or another
format: GeoPackage, Shapefile, ...) it is the file name without its extension.
The rule: every run of characters other than ASCII letters, digits, ``_`` and
``-`` replaced by one ``_``, and leading or trailing ``_`` and ``-`` dropped;
``Flanders demo.geojson`` is ``Flanders_demo``, and so is a file of any name
whose GeoJSON says ``"name": "Flanders demo"``. Renaming a named GeoJSON file
does not rename its region. A name whose id would be empty (``..geojson``,
``"name": "é"``) or longer than 96 characters, or that is not text, and files
whose ids collide (``dup.geojson`` and ``dup.gpkg``; ``a b.geojson`` and
``a_b.geojson``; two files that say the same ``"name"``) are refused with one
error naming them: nothing is registered or changed for them until they are
renamed.
A tile shared by two regions appears once in the tile partitions and lists
both owners. Removing a region's file marks it ``removed`` and deletes
nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agrifm_pipeline.errors import RegionError
from agrifm_pipeline.regions import tiles_for_region
from agrifm_pipeline.storage import check_name, filesystem, write_file_atomic

REGION_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".parquet")
GEOJSON_SUFFIXES = (".geojson", ".json")
_ID = re.compile(r"[^A-Za-z0-9_-]+")
MAX_ID_LEN = 96


def safe_region_id(name: str, where: str, fix: str) -> str:
    """``name`` made a region id by the module's rule. ``where`` says whose name it is
    (a file, a file's GeoJSON name) and ``fix`` how to change it, in the error for a
    name that gives no usable id."""
    rid = _ID.sub("_", name).strip("_-")
    if not rid:
        raise RegionError(f"{where} gives an empty region id; {fix}")
    if len(rid) > MAX_ID_LEN:
        raise RegionError(
            f"{where} gives a region id of {len(rid)} characters, more than {MAX_ID_LEN}; {fix}"
        )
    check_name(rid, "region id")
    return rid


def declared_name(path: str | Path) -> str | None:
    """The name a GeoJSON region file gives itself (see the module), else None.

    None also for other formats, files that are not JSON and files that do not exist
    (reading them reports what is wrong); RegionError for a name that is not text.
    """
    path = Path(path)
    if path.suffix.lower() not in GEOJSON_SUFFIXES or not path.is_file():
        return None
    try:
        with path.open("rb") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    if doc.get("type") == "FeatureCollection":
        name, member = doc.get("name"), '"name"'
    elif doc.get("type") == "Feature":
        props = doc.get("properties")
        name, member = doc.get("name"), '"name"'
        if name is None and isinstance(props, dict):
            name, member = props.get("name"), '"properties": {"name"}'
    else:
        return None
    if name is None:
        return None
    if not isinstance(name, str):
        raise RegionError(
            f"region file {path} has the GeoJSON {member} {json.dumps(name)[:60]}, which is "
            f'not text; give it a name such as "my_region", or remove it to name the region '
            "after the file"
        )
    return name


def region_id(path: str | Path) -> str:
    """The region id of a file (see the module's rule): safe as a Dagster partition key
    and as a storage path component."""
    name = declared_name(path)
    if name is not None:
        return safe_region_id(
            name,
            f"region file {path}: its GeoJSON name {name!r} (the region's name)",
            "name it with ASCII letters, digits, _ or - (at most "
            f'{MAX_ID_LEN}), e.g. "name": "my_region", or remove the name to name the region '
            "after the file",
        )
    fname = Path(path).name
    stem = fname[: -len(Path(fname).suffix)] if Path(fname).suffix else fname
    return safe_region_id(
        stem,
        f"region file {path}",
        f"rename it so its name (without the extension) holds letters or digits (at most "
        f"{MAX_ID_LEN}), e.g. my_region.geojson",
    )


# (file, sha256) -> its region id: a sensor tick reads a GeoJSON's name once per content.
_IDS: dict[tuple[str, str], str] = {}


def _region_id_of(path: Path, sha: str) -> str:
    key = (str(path), sha)
    if key not in _IDS:
        if len(_IDS) > 4096:
            _IDS.clear()
        _IDS[key] = region_id(path)
    return _IDS[key]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def region_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.suffix.lower() in REGION_SUFFIXES and p.is_file())


@dataclass
class RegionChange:
    region: str
    status: str  # "added" | "changed" | "removed" | "error"
    tiles: list[str]
    message: str = ""


class RegionRegistry:
    """The registry document under a storage root (local path or fsspec URL)."""

    def __init__(self, root: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.root = str(root).rstrip("/")
        self.url = f"{self.root}/_registry/regions.json"
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = filesystem(self.url, self.storage_options)

    def load(self) -> dict[str, Any]:
        if not self.fs.exists(self.path):
            return {"regions": {}}
        with self.fs.open(self.path, "r") as fh:
            doc: dict[str, Any] = json.load(fh)
        doc.setdefault("regions", {})
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        write_file_atomic(
            self.url, json.dumps(doc, indent=2, sort_keys=True).encode(), self.storage_options
        )

    # queries
    def active_regions(self) -> dict[str, dict[str, Any]]:
        return {k: v for k, v in self.load()["regions"].items() if v.get("status") != "removed"}

    def tiles_of(self, region: str) -> list[str]:
        entry = self.load()["regions"].get(region)
        if entry is None:
            raise RegionError(
                f"region {region!r} is not registered; add its file to the regions directory"
            )
        return list(entry["tiles"])

    def owners(self) -> dict[str, list[str]]:
        """tile id -> the active regions that own it."""
        out: dict[str, list[str]] = {}
        for rid, entry in sorted(self.active_regions().items()):
            for t in entry["tiles"]:
                out.setdefault(t, []).append(rid)
        return out

    # updates
    def scan(
        self,
        directory: str | Path,
        *,
        chip_px: int,
        chips_per_side: int,
        scale_m: float,
    ) -> list[RegionChange]:
        """Bring the registry in line with the files in ``directory``; return what changed."""
        doc = self.load()
        regions: dict[str, Any] = doc["regions"]
        seen: set[str] = set()
        changes: list[RegionChange] = []
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        geometry = {"chip_px": chip_px, "chips_per_side": chips_per_side, "scale_m": scale_m}
        by_id: dict[str, list[Path]] = {}
        shas: dict[Path, str] = {}
        moved = False
        for path in region_files(directory):
            shas[path] = sha = file_sha256(path)
            try:
                by_id.setdefault(_region_id_of(path, sha), []).append(path)
            except RegionError as exc:
                changes.append(RegionChange(path.name, "error", [], str(exc)))
                # What this file registered before stays as it was (not marked removed).
                seen.update(r for r, e in regions.items() if e.get("file") == str(path))
        for rid, paths in sorted(by_id.items()):
            seen.add(rid)  # a refused file never marks its id's registration removed
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                changes.append(
                    RegionChange(
                        rid,
                        "error",
                        [],
                        f"region files {names} all give the region id {rid!r}; rename all "
                        'but one (a GeoJSON\'s "name" where it has one, else the file; '
                        "nothing is registered for them until then)",
                    )
                )
                continue
            path = paths[0]
            sha = shas[path]
            entry = regions.get(rid)
            if (
                entry is not None
                and entry.get("sha256") == sha
                and entry.get("tile_geometry") == geometry
                and entry.get("status") != "removed"
            ):
                if entry.get("file") != str(path):  # a named GeoJSON renamed: same region
                    entry["file"] = str(path)
                    moved = True
                continue
            try:
                tiles = [
                    t.id
                    for t in tiles_for_region(
                        path, chip_px=chip_px, chips_per_side=chips_per_side, scale_m=scale_m
                    )
                ]
            except RegionError as exc:
                changes.append(RegionChange(rid, "error", [], str(exc)))
                continue
            status = "added" if entry is None or entry.get("status") == "removed" else "changed"
            regions[rid] = {
                "file": str(path),
                "sha256": sha,
                "tiles": tiles,
                "tile_geometry": geometry,
                "status": "active",
                "registered_at": (entry or {}).get("registered_at", now),
                "updated_at": now,
            }
            changes.append(RegionChange(rid, status, tiles))
        for rid, entry in regions.items():
            if rid not in seen and entry.get("status") != "removed":
                entry["status"] = "removed"
                entry["updated_at"] = now
                changes.append(RegionChange(rid, "removed", list(entry["tiles"])))
        if moved or any(c.status != "error" for c in changes):
            self.save(doc)
        return changes
