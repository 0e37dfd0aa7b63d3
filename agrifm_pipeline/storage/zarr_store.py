"""Zarr partitions: each version is a complete Zarr group (format 2 by default, which
GDAL opens with its CRS and transform; format 3 on request), written in memory or
chunk by chunk, every object hashed on the way into the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Literal

import xarray as xr

from agrifm_pipeline.storage.errors import CorruptionError, StorageError
from agrifm_pipeline.storage.fs import _json_default, check_name
from agrifm_pipeline.storage.index import PartitionStore
from agrifm_pipeline.storage.versions import Version

LINEAGE_ATTR = "agrifm_lineage"  # JSON string: the full lineage record
# Blosc zstd level 3 with bit shuffle; bench/bench_storage.py compares the candidates.
DEFAULT_COMPRESSOR: dict[str, Any] = {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}
# Datasets up to this size are encoded into memory and written out in one pass (fewer
# trips through zarr's event loop); larger ones are written chunk by chunk so the
# compressed copy is never all in memory. bench/bench_storage.py measures both.
ENCODE_IN_MEMORY_BYTES = 256 << 20


def _compressor(zarr_format: int, shuffle: bool = True) -> dict[str, Any]:
    """Encoding entries for one variable in the given format (``shuffle`` False: the
    same zstd without the bit shuffle, which makes int8 codes larger, not smaller)."""
    import zarr.codecs
    from numcodecs import Blosc

    c: dict[str, Any] = DEFAULT_COMPRESSOR
    if zarr_format == 2:
        how = c["shuffle"] if shuffle else Blosc.NOSHUFFLE
        return {"compressors": [Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=how)]}
    return {
        "compressors": [
            zarr.codecs.BloscCodec(
                cname=c["cname"],
                clevel=c["clevel"],
                shuffle="bitshuffle" if shuffle else "noshuffle",
            )
        ]
    }


def lineage_from_attrs(attrs: Any) -> dict[str, Any]:
    """The lineage record kept in a group's attributes ({} when there is none)."""
    text = attrs.get(LINEAGE_ATTR)
    return json.loads(text) if text else {}


class _HashingStore:
    """Wraps a zarr store so that every object written is hashed on the way."""

    @staticmethod
    def wrap(store: Any, digests: dict[str, dict[str, Any]]) -> Any:
        from zarr.storage import WrapperStore

        class Hashing(WrapperStore[Any]):
            def _with_store(self, inner: Any) -> Any:
                return Hashing(inner)

            async def set(self, key: str, value: Any) -> None:
                raw = value.to_bytes()
                digests[key] = {"sha256": hashlib.sha256(raw).hexdigest(), "size": len(raw)}
                await self._store.set(key, value)

        return Hashing(store)


class ZarrStore(PartitionStore):
    """Versioned Zarr partitions of one asset: each version is a complete Zarr group."""

    suffix = ".zarr"

    def __init__(
        self,
        root: str | os.PathLike[str],
        asset: str,
        *,
        zarr_format: int = 2,
        **options: Any,
    ):
        if zarr_format not in (2, 3):
            raise StorageError(f"zarr_format={zarr_format!r}; use 2 (GDAL-readable) or 3")
        super().__init__(root, asset, **options)
        self.zarr_format = zarr_format

    @property
    def _fmt(self) -> Literal[2, 3]:
        return 2 if self.zarr_format == 2 else 3

    def _zarr_store(self, path: str) -> Any:
        import zarr.storage

        if self.local:
            return zarr.storage.LocalStore(path)
        return zarr.storage.FsspecStore.from_mapper(self.fs.get_mapper(path))

    # write
    def write(
        self, year: str | int, tile: str, ds: xr.Dataset, lineage: dict[str, Any] | None = None
    ) -> Version:
        """Write ``ds`` as a new version of (year, tile) and commit it; returns the version."""
        return self.write_groups(year, tile, {"": ds}, lineage)

    def write_groups(
        self,
        year: str | int,
        tile: str,
        groups: dict[str, xr.Dataset],
        lineage: dict[str, Any] | None = None,
    ) -> Version:
        """Several datasets as one version (``""`` = the version's group itself, other
        names = subgroups), committed together."""
        for name in groups:
            if name:
                check_name(name, "subgroup name")
        vid, path = self.begin(year, tile)
        text = json.dumps(lineage, default=_json_default, sort_keys=True) if lineage else None
        digests: dict[str, dict[str, Any]] = {}
        with self._writing(year, tile, vid):
            if "" not in groups:
                digests.update(self._root_group(path, text))
            for name, ds in sorted(groups.items()):
                ds = ds.copy()
                if text is not None:
                    ds.attrs[LINEAGE_ATTR] = text
                sub = self._write_dataset(f"{path}/{name}" if name else path, ds)
                digests.update({f"{name}/{k}" if name else k: d for k, d in sub.items()})
            committed = self.commit(year, tile, vid, digests, lineage)
        return committed

    def _root_group(self, path: str, text: str | None) -> dict[str, dict[str, Any]]:
        import zarr

        objects: dict[str, Any] = {}
        root = zarr.open_group(zarr.storage.MemoryStore(objects), mode="w", zarr_format=self._fmt)
        if text is not None:
            root.attrs[LINEAGE_ATTR] = text
        return self._flush(path, objects)

    def _flush(self, path: str, objects: dict[str, Any]) -> dict[str, dict[str, Any]]:
        raw = {key: buf.to_bytes() for key, buf in objects.items()}
        self._put_many({f"{path}/{key}": data for key, data in raw.items()})
        return {
            key: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for key, data in raw.items()
        }

    def _write_dataset(self, path: str, ds: xr.Dataset) -> dict[str, dict[str, Any]]:
        import zarr.storage

        encoding = {
            name: {
                # int8 codes (the quantised products) without the bit shuffle: about 30 %
                # smaller (bench/bench_products.py); every other dtype as before.
                **_compressor(self.zarr_format, shuffle=var.dtype != "int8"),
                # One chunk per variable unless the dataset asks otherwise (encoding["chunks"]).
                "chunks": tuple(var.encoding.get("chunks") or var.shape),
                # rioxarray keeps the CRS link in the encoding; passing ours must not drop it.
                **{k: v for k, v in var.encoding.items() if k == "grid_mapping"},
            }
            for name, var in ds.data_vars.items()
            if var.ndim > 0 and var.dtype.kind in "uif"
        }
        digests: dict[str, dict[str, Any]] = {}
        if ds.nbytes <= ENCODE_IN_MEMORY_BYTES:
            objects: dict[str, Any] = {}
            target: Any = zarr.storage.MemoryStore(objects)
        else:
            target = _HashingStore.wrap(self._zarr_store(path), digests)
        ds.to_zarr(
            target,
            mode="w",
            zarr_format=self.zarr_format,
            consolidated=self.zarr_format == 2,
            encoding=encoding,
            # A partition's chunks are whole variables: the scan for all-fill chunks would
            # cost a pass over the data and skip almost nothing.
            write_empty_chunks=True,
        )
        if ds.nbytes <= ENCODE_IN_MEMORY_BYTES:
            return self._flush(path, objects)
        return digests

    # read
    def open(
        self,
        year: str | int,
        tile: str,
        *,
        version: str | None = None,
        verify: bool = False,
    ) -> xr.Dataset:
        """Open one version (the current one by default), CRS decoded.

        With ``verify`` every object is read once, checked against the manifest, and
        the dataset is decoded from those bytes and loaded; a corrupt object or an
        undecodable variable is an error naming the partition, version and object.
        Without it the arrays are lazy and read from the version on first use: a
        version never changes, so a later commit cannot mix into what was opened.
        """
        return self.open_version(self.resolve(year, tile, version), verify=verify)

    def open_version(self, v: Version, *, verify: bool = False) -> xr.Dataset:
        import zarr.storage

        if verify:
            try:
                objects = self.read_objects(v, verify=True)
            except CorruptionError:
                with contextlib.suppress(Exception):
                    self.mark_integrity(v, self.verify(v))
                raise
            mem = {k: _buffer(b) for k, b in objects.items()}
            source: Any = zarr.storage.MemoryStore(mem)
        else:
            source = self._zarr_store(v.path) if self.local else self.fs.get_mapper(v.path)
        ds = xr.open_zarr(
            source,
            zarr_format=self.zarr_format,
            consolidated=self.zarr_format == 2,
            decode_coords="all",
            chunks=None,  # lazy numpy-backed arrays: a partition is read whole
        )
        ds.encoding["agrifm_version"] = v.id
        if verify:
            for name, var in ds.variables.items():
                try:
                    var.load()
                except Exception as exc:
                    raise CorruptionError(
                        f"{v.asset} {v.year}/{v.tile} version {v.id}: variable {name} "
                        f"(objects {name}/*) cannot be decoded: {exc}"
                    ) from exc
        return ds

    def open_group(
        self, year: str | int, tile: str, group: str, *, verify: bool = False
    ) -> xr.Dataset:
        """A subgroup of the current version (region mosaics spanning several UTM zones)."""
        v = self.resolve(year, tile)
        sub = Version(
            v.asset,
            v.year,
            v.tile,
            v.id,
            f"{v.path}/{check_name(group, 'subgroup')}",
            f"{v.url}/{group}",
            v.manifest_sha256,
        )
        return xr.open_zarr(
            self._zarr_store(sub.path) if self.local else self.fs.get_mapper(sub.path),
            zarr_format=self.zarr_format,
            consolidated=self.zarr_format == 2,
            decode_coords="all",
            chunks=None,
        )

    def attrs(self, year: str | int, tile: str) -> dict[str, Any]:
        """The current version's group attributes, read from its metadata document alone."""
        v = self.resolve(year, tile)
        name = ".zattrs" if self.zarr_format == 2 else "zarr.json"
        raw = self._read(f"{v.path}/{name}")
        if raw is None:
            return {}
        doc: dict[str, Any] = json.loads(raw)
        return doc if self.zarr_format == 2 else dict(doc.get("attributes", {}))


def _buffer(data: bytes) -> Any:
    from zarr.core.buffer import default_buffer_prototype

    return default_buffer_prototype().buffer.from_bytes(data)
