"""Zarr storage: one store per asset, one group per partition, committed whole.

Layout under a root (a local directory or any fsspec URL)::

    <root>/<asset>.zarr/                 the asset's store (a Zarr group)
    <root>/<asset>.zarr/<year>/          a group per year
    <root>/<asset>.zarr/<year>/<tile>/   one partition: arrays + coordinates + attrs
    <root>/.staging/<asset>/<uuid>/      partitions being written (never read)

A partition is written completely into a staging group beside the store and
then committed in one step:

* local directories: an atomic rename into place; when a previous version
  exists, an atomic exchange of the two directories (Linux ``renameat2`` with
  ``RENAME_EXCHANGE``), and the old version is deleted afterwards. Elsewhere
  the old version is first renamed aside and restored by the next reader or
  writer if the process dies between the two renames.
* object stores (``s3://``, ``gs://``, ``memory://``…): the staged objects are
  copied into place and the group's metadata document is written last, so a
  reader that opens the partition through Zarr sees either the old metadata or
  the new, complete one. (Object stores have no atomic rename; a
  transactional store such as icechunk is the stronger answer there.)

Readers never see half a partition, and a failed or killed writer leaves the
previous version intact (and at worst an orphaned staging directory, which
the next write of the same asset sweeps up).

The on-disk format is Zarr format 2 by default, written by zarr-python 3:
GDAL (and so QGIS and rasterio) reads format 2 with its CRS and transform,
but not format 3 (see the README). ``zarr_format=3`` is available for
xarray-only consumers.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import xarray as xr

from agrifm_pipeline.errors import AgriFMError


class StorageError(AgriFMError):
    """A store cannot be opened, written or committed."""


STAGING_DIR = ".staging"
_GROUPS_LOCK = threading.Lock()
ASIDE_SUFFIX = ".previous"
LINEAGE_ATTR = "agrifm_lineage"  # JSON string: the full lineage record

# Blosc zstd level 3 with bit shuffle: measured on a full synthetic tile-year
# (bench/bench_storage.py, 1 thread) it gave ratios of 1.91 (uint16 frames),
# 1.50 (normalised float32) and 1.41 (embedding grid) at 750-1000 MB/s encode
# and 2.2-2.6 GB/s decode — within 2 % of zstd level 5's ratio at 3-4x its
# speed, and 15-30 % smaller than lz4. On real texture (bench_storage's tile-sized
# mosaics of the bundled scenes: 2.59 against 1.93 for lz4) level 1 encodes 2.1x
# faster at a 2 % better ratio but decodes 10-20 % slower, and on the mostly empty
# demo tile it is slower overall; not adopted before it is measured on full-size
# real tiles.
DEFAULT_COMPRESSOR: dict[str, Any] = {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}

# Datasets up to this size are encoded into memory and then written out as files in
# one pass. Through zarr's LocalStore every metadata document and chunk is its own trip
# through zarr's event loop and a worker thread: a tile-year's 20 kB chunk statistics
# took 60-76 ms that way and 32-39 ms through memory, its 128 MB frame stack 138-170 ms
# and 126-142 ms (2-vCPU AMD EPYC Zen 3). Larger datasets (kept float32 tensors, 1 GB
# a tile-year) are written chunk by chunk, so the compressed copy is never all in memory.
ENCODE_IN_MEMORY_BYTES = 256 << 20


def _compressor(zarr_format: int) -> dict[str, Any]:
    """Encoding entries for one variable in the given format."""
    import zarr.codecs
    from numcodecs import Blosc

    c: dict[str, Any] = DEFAULT_COMPRESSOR
    if zarr_format == 2:
        return {"compressors": [Blosc(cname=c["cname"], clevel=c["clevel"], shuffle=c["shuffle"])]}
    return {
        "compressors": [
            zarr.codecs.BloscCodec(cname=c["cname"], clevel=c["clevel"], shuffle="bitshuffle")
        ]
    }


def is_local(fs: Any) -> bool:
    """Whether an fsspec filesystem is the local one (atomic renames available)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def write_file_atomic(url: str, data: bytes) -> None:
    """Whole-file write to any fsspec URL; locally a temporary name beside it, then one rename."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if is_local(fs):
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def lineage_from_attrs(attrs: Any) -> dict[str, Any]:
    """The lineage record kept in a group's attributes ({} when there is none)."""
    text = attrs.get(LINEAGE_ATTR)
    return json.loads(text) if text else {}


# -- atomic directory exchange ------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2() -> Any:
    if not hasattr(_renameat2, "fn"):
        fn = None
        name = ctypes.util.find_library("c")
        if name and os.uname().sysname == "Linux":
            libc = ctypes.CDLL(name, use_errno=True)
            fn = getattr(libc, "renameat2", None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
                fn.argtypes += [ctypes.c_uint]
                fn.restype = ctypes.c_int
        _renameat2.fn = fn  # type: ignore[attr-defined]
    return _renameat2.fn  # type: ignore[attr-defined]


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two existing directories; False where the OS cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: filesystem cannot exchange
            return False
        raise OSError(err, os.strerror(err), f"{a} <-> {b}")
    return True


def commit_dir(staging: Path, final: Path) -> None:
    """Move a complete ``staging`` directory to ``final``, replacing any previous version."""
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    if not final.exists():
        os.rename(staging, final)
        return
    if exchange_dirs(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous version
        return
    aside = final.with_name(final.name + ASIDE_SUFFIX)
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(final, aside)
    os.rename(staging, final)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(final: Path) -> None:
    """Undo a commit that died between its two renames (non-exchange path)."""
    aside = final.with_name(final.name + ASIDE_SUFFIX)
    if aside.exists():
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(aside, final)


# -- the store ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PartitionRef:
    asset: str
    year: str
    tile: str

    @property
    def key(self) -> str:
        return f"{self.year}/{self.tile}"


class ZarrStore:
    """The partitions of one asset under ``root``."""

    def __init__(self, root: str | os.PathLike[str], asset: str, *, zarr_format: int = 2):
        if zarr_format not in (2, 3):
            raise StorageError(f"zarr_format={zarr_format!r}; use 2 (GDAL-readable) or 3")
        self.root = str(root).rstrip("/")
        self.asset = asset
        self.zarr_format = zarr_format
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)
        self.local = is_local(self.fs)

    # paths
    @property
    def _fmt(self) -> Literal[2, 3]:
        return 2 if self.zarr_format == 2 else 3

    @property
    def store_path(self) -> str:
        return f"{self._root_path}/{self.asset}.zarr"

    @property
    def url(self) -> str:
        return f"{self.root}/{self.asset}.zarr"

    def partition_path(self, year: str | int, tile: str) -> str:
        return f"{self.store_path}/{year}/{tile}"

    def partition_url(self, year: str | int, tile: str) -> str:
        return f"{self.url}/{year}/{tile}"

    def _staging_root(self) -> str:
        return f"{self._root_path}/{STAGING_DIR}/{self.asset}"

    # structure
    def _ensure_groups(self, year: str | int) -> None:
        """The store and year levels are plain Zarr groups, so the whole store opens."""
        import zarr
        from zarr.errors import ContainsGroupError

        with _GROUPS_LOCK:  # writers of one process share a year group
            for path in (self.store_path, f"{self.store_path}/{year}"):
                if not self._is_group(path):
                    with contextlib.suppress(ContainsGroupError):  # another process won
                        zarr.open_group(self._mapper(path), mode="a", zarr_format=self._fmt)

    def _is_group(self, path: str) -> bool:
        name = ".zgroup" if self.zarr_format == 2 else "zarr.json"
        return bool(self.fs.exists(f"{path}/{name}"))

    def _mapper(self, path: str) -> Any:
        if self.local:
            return path
        return self.fs.get_mapper(path)

    def exists(self, year: str | int, tile: str) -> bool:
        path = self.partition_path(year, tile)
        if self.local:
            recover_dir(Path(path))
        return self._is_group(path)

    def partitions(self) -> list[PartitionRef]:
        """Every committed partition in the store."""
        out: list[PartitionRef] = []
        if not self.fs.exists(self.store_path):
            return out
        for ydir in sorted(self.fs.ls(self.store_path, detail=False)):
            year = Path(ydir).name
            if not year.isdigit():
                continue
            for tdir in sorted(self.fs.ls(ydir, detail=False)):
                tile = Path(tdir).name
                if tile.endswith(ASIDE_SUFFIX) or tile.startswith("."):
                    continue
                if self._is_group(f"{ydir}/{tile}"):
                    out.append(PartitionRef(self.asset, year, tile))
        return out

    # write
    def write(
        self, year: str | int, tile: str, ds: xr.Dataset, lineage: dict[str, Any] | None = None
    ) -> str:
        """Write ``ds`` as the partition (year, tile), all or nothing; returns its URL."""
        return self.write_groups(year, tile, {"": ds}, lineage)

    def write_groups(
        self,
        year: str | int,
        tile: str,
        groups: dict[str, xr.Dataset],
        lineage: dict[str, Any] | None = None,
    ) -> str:
        """Write several datasets as one partition (``""`` = the partition group itself,
        other names = subgroups), committed together."""
        self._ensure_groups(year)
        self.sweep_staging()
        staging = f"{self._staging_root()}/{uuid.uuid4().hex}"
        text = None
        if lineage is not None:
            text = json.dumps(lineage, default=_json_default, sort_keys=True)
        try:
            if "" not in groups:
                import zarr

                root = zarr.open_group(self._mapper(staging), mode="w", zarr_format=self._fmt)
                if text is not None:
                    root.attrs[LINEAGE_ATTR] = text
            for name, ds in sorted(groups.items()):
                ds = ds.copy()
                if text is not None:
                    ds.attrs[LINEAGE_ATTR] = text
                self._write_dataset(f"{staging}/{name}" if name else staging, ds)
            self._commit(staging, self.partition_path(year, tile))
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm(staging, recursive=True)
            raise
        return self.partition_url(year, tile)

    def _write_dataset(self, path: str, ds: xr.Dataset) -> None:
        import zarr.storage

        encoding = {
            name: {
                **_compressor(self.zarr_format),
                # One chunk per variable unless the dataset asks otherwise (encoding["chunks"]).
                "chunks": tuple(var.encoding.get("chunks") or var.shape),
                # rioxarray keeps the CRS link in the encoding; passing ours must not drop it.
                **{k: v for k, v in var.encoding.items() if k == "grid_mapping"},
            }
            for name, var in ds.data_vars.items()
            if var.ndim > 0 and var.dtype.kind in "uif"
        }
        objects: dict[str, Any] | None = {} if ds.nbytes <= ENCODE_IN_MEMORY_BYTES else None
        ds.to_zarr(
            self._mapper(path) if objects is None else zarr.storage.MemoryStore(objects),
            mode="w",
            zarr_format=self.zarr_format,
            consolidated=self.zarr_format == 2,
            encoding=encoding,
            # A partition's chunks are whole variables, so zarr's default scan for chunks
            # that are all fill value (to skip writing them) costs a full extra pass over
            # the data and almost never skips anything; readers get the same values either way.
            write_empty_chunks=True,
        )
        if objects is not None:
            self._put_objects(path, objects)

    def _put_objects(self, path: str, objects: dict[str, Any]) -> None:
        """Write a group's encoded objects (zarr buffers by key) as files under ``path``."""
        if not self.local:
            self.fs.pipe({f"{path}/{key}": buf.to_bytes() for key, buf in objects.items()})
            return
        made: set[Path] = set()
        for key, buf in objects.items():
            dest = Path(path, key)
            if dest.parent not in made:
                dest.parent.mkdir(parents=True, exist_ok=True)
                made.add(dest.parent)
            dest.write_bytes(buf.as_numpy_array())

    def _commit(self, staging: str, final: str) -> None:
        if self.local:
            commit_dir(Path(staging), Path(final))
            return
        meta = ".zmetadata" if self.zarr_format == 2 else "zarr.json"
        staged = [p for p in self.fs.find(staging) if not p.endswith(meta)]
        if self.fs.exists(final):
            self.fs.rm(final, recursive=True)
        for src in staged:
            self.fs.copy(src, final + src[len(staging) :])
        for src in self.fs.find(staging):
            if src.endswith(meta):
                self.fs.copy(src, final + src[len(staging) :])
        self.fs.rm(staging, recursive=True)

    def sweep_staging(self, older_than_s: float = 6 * 3600) -> None:
        """Remove staging directories left by writers that died long ago."""
        root = self._staging_root()
        if not self.local or not os.path.isdir(root):
            return
        now = time.time()
        for entry in os.scandir(root):
            with contextlib.suppress(OSError):
                if now - entry.stat().st_mtime > older_than_s:
                    shutil.rmtree(entry.path, ignore_errors=True)

    # read
    def open(self, year: str | int, tile: str) -> xr.Dataset:
        """Open a committed partition (lazy), CRS decoded."""
        if not self.exists(year, tile):
            raise StorageError(
                f"{self.asset} has no partition {year}/{tile} under {self.root}; "
                "materialise it first"
            )
        return xr.open_zarr(
            self._mapper(self.partition_path(year, tile)),
            zarr_format=self.zarr_format,
            consolidated=self.zarr_format == 2,
            decode_coords="all",
            chunks=None,  # lazy numpy-backed arrays: a partition is read whole, dask adds copies
        )

    def attrs(self, year: str | int, tile: str) -> dict[str, Any]:
        """The partition group's attributes, read from its metadata document alone."""
        if not self.exists(year, tile):
            raise StorageError(
                f"{self.asset} has no partition {year}/{tile} under {self.root}; "
                "materialise it first"
            )
        path = self.partition_path(year, tile)
        if self.zarr_format == 2:
            with self.fs.open(f"{path}/.zattrs", "r") as fh:
                out: dict[str, Any] = json.load(fh)
            return out
        with self.fs.open(f"{path}/zarr.json", "r") as fh:
            return dict(json.load(fh).get("attributes", {}))

    def lineage(self, year: str | int, tile: str) -> dict[str, Any]:
        return lineage_from_attrs(self.attrs(year, tile))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)
