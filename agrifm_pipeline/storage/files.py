"""Partitions made of whole files (chip tables, previews): the same versions, pointer,
manifest and checks as Zarr partitions."""

from __future__ import annotations

from typing import Any

from agrifm_pipeline.storage.errors import StorageError
from agrifm_pipeline.storage.index import PartitionStore
from agrifm_pipeline.storage.versions import Version


class FileStore(PartitionStore):
    """Versioned partitions made of whole files (chip tables, previews)."""

    def put(
        self, year: str | int, tile: str, name: str, data: bytes, lineage: dict[str, Any] | None
    ) -> Version:
        return self.put_objects(year, tile, {name: data}, lineage)

    def read(self, year: str | int, tile: str, name: str, *, verify: bool = True) -> bytes:
        v = self.resolve(year, tile)
        objects = self.read_objects(v, verify=verify)
        if name not in objects:
            raise StorageError(f"{self.asset} {year}/{tile} version {v.id} has no object {name}")
        return objects[name]
