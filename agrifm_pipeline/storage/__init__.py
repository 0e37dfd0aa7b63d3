"""Partition storage: immutable versions, one-write commits, checksummed objects.

Layout under a root (a local directory or any fsspec URL, with its storage options)::

    <root>/<asset>.zarr/<year>/<tile>/                  one partition (Zarr assets)
    <root>/<asset>.zarr/<year>/<tile>/<version>/        one version: a complete Zarr group
    <root>/<asset>.zarr/<year>/<tile>/<version>/_manifest.json
    <root>/<asset>.zarr/<year>/<tile>/_current.json     the pointer: which version is current
    <root>/<asset>/<year>/<tile>/<version>/<name>       file assets (Parquet, PNG), same scheme

A write never touches an existing version. It creates a new version directory,
writes every object into it (hashing each one as it goes), writes the
version's manifest (sha256 and size of every object, and the lineage), and
only then commits with **one small write**: the pointer document. The pointer
is replaced whole (locally: a temporary file and one ``rename``; on object
stores: one PUT, which S3 and GCS apply atomically) and, where the store can,
conditionally (S3 ``If-Match``/``If-None-Match``; local and in-memory stores
serialise commits of one partition with a lock), so that the pointer's
history of committed versions loses no entry when writers race.

What this gives, on every store alike:

* a reader resolves the pointer once and then reads one version, which no
  writer ever modifies: it never sees half a version or a mix of two;
* a writer killed at any point leaves the previous version current and whole;
  what it leaves behind is an uncommitted version directory, which the next
  writer of that partition (or ``agrifm-pipeline verify``) sweeps once it is
  older than ``ORPHAN_GRACE_S``;
* readers never rename, move or delete anything;
* old versions go only through :func:`collect_garbage`, which keeps every
  version that the current version of a downstream partition names.

Every object's checksum is in the manifest; :meth:`PartitionStore.verify`
re-hashes a version and names each object that differs, and reads made with
``verify=True`` (what the pipeline's own stages do) refuse corrupt data with
the partition and object named.

The on-disk format is Zarr format 2 by default, written by zarr-python 3: GDAL
(and so QGIS and rasterio) reads format 2 with its CRS and transform, but not
format 3. ``zarr_format=3`` is available for xarray-only consumers.

The package, by layer (each imports only the ones above it):

* :mod:`~agrifm_pipeline.storage.errors` — the errors.
* :mod:`~agrifm_pipeline.storage.fs` — fsspec roots and options (read from the
  environment and checked there alone), safe names, atomic whole-file writes, JSON
  documents replaced whole (:class:`Documents`).
* :mod:`~agrifm_pipeline.storage.versions` — version ids, the pointer, manifests,
  commits, checksummed reads, verification, the sweep (:class:`VersionedStore`).
* :mod:`~agrifm_pipeline.storage.index` — the per-year index entered at each commit
  (:class:`PartitionStore`) and :class:`IndexedReader`.
* :mod:`~agrifm_pipeline.storage.zarr_store` and :mod:`~agrifm_pipeline.storage.files`
  — Zarr partitions and whole-file partitions.
* :mod:`~agrifm_pipeline.storage.maintenance` — ``verify`` and ``gc`` across assets.
"""

from agrifm_pipeline.storage.errors import (
    READ_ONLY_ERRNOS,
    CorruptionError,
    DamagedPointerError,
    IndexLagError,
    ReadOnlyStoreError,
    StorageError,
    StorageRootError,
    StorageWriteError,
)
from agrifm_pipeline.storage.files import FileStore
from agrifm_pipeline.storage.fs import (
    STORAGE_ENV,
    STORAGE_OPTIONS_ENV,
    Documents,
    StorageLocation,
    check_name,
    check_storage_url,
    filesystem,
    gdal_path,
    is_local,
    storage_from_env,
    storage_options_from_env,
    write_file_atomic,
)
from agrifm_pipeline.storage.index import (
    _INDEXED_YEARS,
    INDEX,
    INDEX_SHARDS,
    MAX_INDEX_SHARDS,
    PER_SHARD,
    IndexedReader,
    PartitionStore,
    index_shard,
    shard_key,
    shards_for,
)
from agrifm_pipeline.storage.maintenance import (
    GCReport,
    VerifyReport,
    collect_garbage,
    referenced_versions,
    verify_stores,
)
from agrifm_pipeline.storage.versions import (
    _MANIFEST_CACHE,
    HISTORY_LEN,
    MANIFEST,
    ORPHAN_GRACE_S,
    POINTER,
    PartitionRef,
    Problem,
    Version,
    VersionedStore,
    new_version_id,
    version_age_s,
)
from agrifm_pipeline.storage.zarr_store import (
    DEFAULT_COMPRESSOR,
    ENCODE_IN_MEMORY_BYTES,
    LINEAGE_ATTR,
    ZarrStore,
    lineage_from_attrs,
)

__all__ = [
    "DEFAULT_COMPRESSOR",
    "ENCODE_IN_MEMORY_BYTES",
    "HISTORY_LEN",
    "INDEX",
    "INDEX_SHARDS",
    "LINEAGE_ATTR",
    "MANIFEST",
    "MAX_INDEX_SHARDS",
    "ORPHAN_GRACE_S",
    "PER_SHARD",
    "POINTER",
    "READ_ONLY_ERRNOS",
    "STORAGE_ENV",
    "STORAGE_OPTIONS_ENV",
    "_INDEXED_YEARS",
    "_MANIFEST_CACHE",
    "CorruptionError",
    "DamagedPointerError",
    "Documents",
    "FileStore",
    "GCReport",
    "IndexLagError",
    "IndexedReader",
    "PartitionRef",
    "PartitionStore",
    "Problem",
    "ReadOnlyStoreError",
    "StorageError",
    "StorageLocation",
    "StorageRootError",
    "StorageWriteError",
    "VerifyReport",
    "Version",
    "VersionedStore",
    "ZarrStore",
    "check_name",
    "check_storage_url",
    "collect_garbage",
    "filesystem",
    "gdal_path",
    "index_shard",
    "is_local",
    "lineage_from_attrs",
    "new_version_id",
    "referenced_versions",
    "shard_key",
    "shards_for",
    "storage_from_env",
    "storage_options_from_env",
    "verify_stores",
    "version_age_s",
    "write_file_atomic",
]
