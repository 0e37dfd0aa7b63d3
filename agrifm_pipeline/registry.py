"""Registered regions: which files, which tiles, which region owns which tile.

The registry is a small JSON document kept beside the stores
(``<root>/_registry/regions.json``) and replaced atomically. Regions are
registered from files (``data/regions/*.geojson`` / ``*.gpkg`` by default);
a region's id is its file name without extension, cleaned for Dagster keys.
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

import fsspec

from agrifm_pipeline.errors import RegionError
from agrifm_pipeline.regions import tiles_for_region
from agrifm_pipeline.storage import write_file_atomic

REGION_SUFFIXES = (".geojson", ".json", ".gpkg", ".shp", ".fgb", ".parquet")
_ID = re.compile(r"[^A-Za-z0-9_.-]+")


def region_id(path: str | Path) -> str:
    """A Dagster-safe id from a file name (no ``|``, ``,`` or spaces)."""
    rid = _ID.sub("_", Path(path).stem).strip("_")
    if not rid:
        raise RegionError(
            f"region file {path} has no usable name; rename it (letters, digits, _ . -)"
        )
    return rid


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

    def __init__(self, root: str | os.PathLike[str]):
        self.root = str(root).rstrip("/")
        self.url = f"{self.root}/_registry/regions.json"
        self.fs, self.path = fsspec.core.url_to_fs(self.url)

    def load(self) -> dict[str, Any]:
        if not self.fs.exists(self.path):
            return {"regions": {}}
        with self.fs.open(self.path, "r") as fh:
            doc: dict[str, Any] = json.load(fh)
        doc.setdefault("regions", {})
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        write_file_atomic(self.url, json.dumps(doc, indent=2, sort_keys=True).encode())

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
        for path in region_files(directory):
            rid = region_id(path)
            seen.add(rid)
            sha = file_sha256(path)
            entry = regions.get(rid)
            if (
                entry is not None
                and entry.get("sha256") == sha
                and entry.get("tile_geometry") == geometry
                and entry.get("status") != "removed"
            ):
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
        if changes:
            self.save(doc)
        return changes
