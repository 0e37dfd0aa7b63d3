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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import hashlib
import json
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import fsspec
import fsspec.asyn
import numpy as np
import xarray as xr

from agrifm_pipeline.errors import AgriFMError
from agrifm_pipeline.lineage import is_record, lineage_record


class StorageError(AgriFMError):
    """A store cannot be opened, written or committed, or holds data that fails its checksums."""


class CorruptionError(StorageError):
    """A stored object's bytes differ from its manifest's checksum."""


class DamagedPointerError(StorageError):
    """A partition's pointer document is not JSON (a torn or hand-edited file).

    Readers stop at it; the next commit of the partition, or ``agrifm-pipeline
    verify``, moves its bytes aside (``_current.json.damaged-<time>``) and the
    partition is then re-made like a missing one."""


class StorageWriteError(StorageError, OSError):
    """Writing to the store failed (full disk, read-only mount, lost permission): the
    message names the store path and the partition; ``errno`` is the system's."""


class IndexLagError(StorageError):
    """A version was committed but the year's index could not be told: the version is
    current and safe; the index lags until ``agrifm-pipeline verify`` rebuilds it."""

    def __init__(self, message: str, version: str = ""):
        super().__init__(message)
        self.version = version


class ReadOnlyStoreError(StorageError):
    """A command that must write was pointed at a store it cannot write."""


# errno values meaning "this store cannot be written here" rather than a transient fault
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


LINEAGE_ATTR = "agrifm_lineage"  # JSON string: the full lineage record
POINTER = "_current.json"
MANIFEST = "_manifest.json"
INDEX = "_index"  # per asset and year: every partition's pointer, without its history
INDEX_SHARDS = 8  # documents per year's index: a commit rewrites one, a reader reads all
HISTORY_LEN = 32  # committed versions remembered in the pointer
# An uncommitted version (no manifest, or never named by the pointer) younger than this
# may still be being written by a live writer, so sweeps leave it alone.
ORPHAN_GRACE_S = 6 * 3600
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_VERSION = re.compile(r"^v(\d{8}T\d{6}\d{6})Z-[0-9a-f]{8}$")

# Blosc zstd level 3 with bit shuffle; bench/bench_storage.py compares the candidates.
DEFAULT_COMPRESSOR: dict[str, Any] = {"id": "blosc", "cname": "zstd", "clevel": 3, "shuffle": 2}
# Datasets up to this size are encoded into memory and written out in one pass (fewer
# trips through zarr's event loop); larger ones are written chunk by chunk so the
# compressed copy is never all in memory. bench/bench_storage.py measures both.
ENCODE_IN_MEMORY_BYTES = 256 << 20

_MEMORY_LOCKS: dict[str, threading.Lock] = {}
_MEMORY_LOCKS_GUARD = threading.Lock()


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
    """Whether an fsspec filesystem is the local one."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def storage_options_from_env() -> dict[str, Any]:
    """``AGRIFM_PIPELINE_STORAGE_OPTIONS``: a JSON object passed to fsspec (endpoint, profile…)."""
    text = os.environ.get("AGRIFM_PIPELINE_STORAGE_OPTIONS", "").strip()
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageError(
            f"AGRIFM_PIPELINE_STORAGE_OPTIONS is not valid JSON ({exc}); set it to a JSON "
            'object such as {"endpoint_url": "https://s3.example.org", "anon": false}'
        ) from None
    if not isinstance(out, dict):
        raise StorageError(
            "AGRIFM_PIPELINE_STORAGE_OPTIONS must be a JSON object of fsspec storage options"
        )
    return out


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(fs, path)`` for a storage URL, with a clear error for an unknown protocol."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        scheme = url.split("://", 1)[0] if "://" in url else "file"
        extra = {"s3": "[s3]", "gs": "[gcs]", "gcs": "[gcs]"}.get(scheme)
        hint = (
            f"install it with pip install 'agrifm-pipeline{extra}'"
            if extra
            else "use a local path or a URL fsspec knows (s3://, gs://, memory://)"
        )
        raise StorageError(f"storage root {url!r} cannot be opened ({exc}); {hint}") from None
    except OSError as exc:  # a file system that connects when made (ftp://, sftp://…)
        raise StorageError(
            f"storage root {url!r} cannot be reached ({_why(exc)}); check the host name and "
            "the network, or use a local path or an object store (s3://, gs://)"
        ) from None


def gdal_path(url: str) -> str:
    """The path GDAL opens for a storage URL (``/vsis3/``, ``/vsigs/``, or a local path)."""
    for scheme, prefix in (("s3://", "/vsis3/"), ("gs://", "/vsigs/"), ("gcs://", "/vsigs/")):
        if url.startswith(scheme):
            return prefix + url[len(scheme) :]
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


def check_name(value: str | int, what: str) -> str:
    """A path component built from user input: safe characters only, never ``.``/``..``."""
    text = str(value)
    if not _SAFE.match(text):
        raise StorageError(
            f"{what} {text!r} cannot be a storage path component; use letters, digits, "
            "'_' and '-' (starting with a letter or digit, at most 128 characters)"
        )
    return text


def write_file_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Whole-file write to any fsspec URL. Locally: a temporary file beside it with the
    process umask's permissions, then one rename; the temporary file never outlives a
    failed write. Elsewhere: one PUT."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        _write_local_atomic(Path(path), data)
    else:
        fs.pipe_file(path, data)


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def lineage_from_attrs(attrs: Any) -> dict[str, Any]:
    """The lineage record kept in a group's attributes ({} when there is none)."""
    text = attrs.get(LINEAGE_ATTR)
    return json.loads(text) if text else {}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def new_version_id() -> str:
    """Sortable by creation time, unique: ``v20261201T143000123456Z-1a2b3c4d``."""
    return f"v{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:8]}"


def version_age_s(version: str, now: float | None = None) -> float:
    m = _VERSION.match(version)
    if not m:
        return float("inf")  # not ours: never younger than any grace
    made = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.UTC)
    return (now if now is not None else time.time()) - made.timestamp()


def _json(doc: Any) -> bytes:
    return json.dumps(doc, default=_json_default, sort_keys=True, indent=1).encode()


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


@dataclass(frozen=True)
class PartitionRef:
    asset: str
    year: str
    tile: str

    @property
    def key(self) -> str:
        return f"{self.year}/{self.tile}"


@dataclass(frozen=True)
class Version:
    """One committed version of a partition, as the pointer named it when it was read."""

    asset: str
    year: str
    tile: str
    id: str
    path: str  # the version's directory in the store's filesystem
    url: str  # the same as a URL (what xarray and fsspec open)
    manifest_sha256: str
    committed_at: str = ""
    run_id: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    integrity: dict[str, Any] | None = None  # verification's last verdict, if any

    @property
    def gdal_path(self) -> str:
        return gdal_path(self.url)

    def record(self) -> dict[str, Any]:
        """What a downstream lineage records about the version it read."""
        return {"asset": self.asset, "version": self.id, "url": self.url}


@dataclass
class Problem:
    """One finding of :meth:`PartitionStore.verify`."""

    asset: str
    year: str
    tile: str
    version: str
    object: str
    what: str  # "mismatch" | "missing" | "unreadable" | "manifest"
    detail: str = ""

    def __str__(self) -> str:
        return (
            f"{self.asset} {self.year}/{self.tile} version {self.version}: {self.object}: "
            f"{self.what}{' (' + self.detail + ')' if self.detail else ''}"
        )


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


class _Superseded(Exception):
    """The pointer moved on while a verdict was being recorded."""


def _loads(raw: bytes, damaged: bool) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(raw)
    except ValueError:
        if damaged:
            return None
        raise
    return doc if isinstance(doc, dict) or not damaged else None


def _why(exc: BaseException) -> str:
    """An error in a few words: the system's text for an OSError, else its message."""
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0)
        return f"{exc.strerror} ({name})" if name else str(exc.strerror)
    return f"{type(exc).__name__}: {exc}"


def _pointer_doc(raw: bytes) -> dict[str, Any] | None:
    """A pointer document, or None when the bytes are not one (not JSON, or no version)."""
    doc = _loads(raw, damaged=True)
    if doc is None or not _VERSION.match(str(doc.get("version", ""))):
        return None
    return doc


class Documents:
    """Small JSON documents (pointers, catalogs) replaced whole, and updated by
    read-modify-write without losing a concurrent update where the store allows it:
    a POSIX lock beside the document on local and network file systems, an in-process
    lock for ``memory://``, and conditional PUTs (``If-Match``/``If-None-Match``) on S3.
    Other object stores replace the document unconditionally (the last writer wins)."""

    def __init__(self, fs: Any, *, lock: bool = True, owner: Any = None):
        self.fs = fs
        self.local = is_local(fs)
        self.lock_files = lock
        self.owner = owner  # told when the file system turns out to have no locks
        self.conditional = _protocol(fs) in ("s3", "s3a")
        self.complete = (self.local and lock) or self.conditional or _protocol(fs) == "memory"

    @contextlib.contextmanager
    def _lock(self, path: str) -> Iterator[None]:
        if not (self.local or _protocol(self.fs) == "memory"):
            yield  # object stores: conditional writes, or the last writer wins
            return
        # Threads of this process take the path's thread lock: POSIX locks belong to the
        # process (they keep other processes out, not other threads, and closing any
        # descriptor of the file drops them), and memory:// lives in this process alone.
        with _MEMORY_LOCKS_GUARD:
            threads = _MEMORY_LOCKS.setdefault(path, threading.Lock())
        with threads:
            if not (self.local and self.lock_files):
                yield
                return
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)  # POSIX locks: NFS (lockd/v4) honours them
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.lock_files = self.complete = False  # a file system without locks
                    if self.owner is not None:
                        self.owner.commit_lock = False
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                os.close(fd)

    def read(self, path: str, *, damaged: bool = False) -> tuple[dict[str, Any] | None, str]:
        """The document and a token (its ETag on S3) for a conditional replace; with
        ``damaged``, a document that is not JSON reads as None (with its token, so that
        it can be replaced) instead of raising."""
        raw, token = self.read_raw(path)
        return (None if raw is None else _loads(raw, damaged)), token

    def read_raw(self, path: str) -> tuple[bytes | None, str]:
        """The document's bytes (None when there is none) and its token."""
        if self.conditional:
            bucket, key, _ = self.fs.split_path(path)
            fs = self.fs

            async def get() -> tuple[bytes, str]:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    data = await body.read()
                return data, str(resp.get("ETag", ""))

            try:
                return fsspec.asyn.sync(fs.loop, get)
            except FileNotFoundError:
                return None, ""
        try:
            return (Path(path).read_bytes() if self.local else self.fs.cat_file(path)), ""
        except FileNotFoundError:
            return None, ""

    def set_aside(self, path: str, raw: bytes) -> str:
        """Keep a damaged document's bytes beside it (``<name>.damaged-<time>``), for a
        person to look at; the path of the copy."""
        aside = f"{path}.damaged-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}Z"
        if self.local:
            _write_local_atomic(Path(aside), raw)
        else:
            self.fs.pipe_file(aside, raw)
        return aside

    def write(self, path: str, doc: dict[str, Any], token: str = "") -> bool:
        """Replace the document; False where a conditional write found a newer one."""
        data = _json(doc)
        if self.local:
            _write_local_atomic(Path(path), data)
            return True
        if self.conditional:
            kwargs: dict[str, Any] = {"IfMatch": token} if token else {"mode": "create"}
            try:
                self.fs.pipe_file(path, data, **kwargs)
            except Exception as exc:  # botocore's ClientError, surfaced by s3fs in several shapes
                text = f"{type(exc).__name__} {exc}"
                if isinstance(exc, FileExistsError) or any(
                    m in text for m in ("PreconditionFailed", "412", "pre-condition")
                ):
                    return False
                if "NotImplemented" in text or "501" in text:  # a store without them
                    self.conditional = self.complete = False
                    self.fs.pipe_file(path, data)
                    return True
                raise
            return True
        self.fs.pipe_file(path, data)
        return True

    def update(
        self,
        path: str,
        mutate: Any,
        write: Any = None,
        *,
        attempts: int = 64,
        damaged: bool = False,
        parse: Any = None,
    ) -> dict[str, Any]:
        """``mutate(old or None) -> new``, written without losing a concurrent update;
        with ``damaged`` a document that is not JSON is replaced as if absent. ``parse``
        (bytes -> document or None) reads the document instead: one it calls damaged
        (None) is kept beside it (:meth:`set_aside`), then replaced as if absent."""
        put = write or self.write
        for _ in range(attempts):
            with self._lock(path):
                raw, token = self.read_raw(path)
                if raw is None:
                    doc = None
                elif parse is not None:
                    doc = parse(raw)
                    if doc is None:
                        self.set_aside(path, raw)
                else:
                    doc = _loads(raw, damaged)
                new: dict[str, Any] = mutate(doc)
                if put(path, new, token):
                    return new
            time.sleep(0.01)
        raise StorageError(
            f"{path} kept changing over {attempts} attempts to update it; too many writers"
        )


class PartitionStore:
    """The versioned partitions of one asset under ``root``; objects are opaque bytes."""

    suffix = ""

    def __init__(
        self,
        root: str | os.PathLike[str],
        asset: str,
        *,
        storage_options: dict[str, Any] | None = None,
        orphan_grace_s: float = ORPHAN_GRACE_S,
        commit_lock: bool = True,
    ):
        """``commit_lock``: serialise a partition's commits with a POSIX lock on local and
        network file systems (turned off by itself where the file system has no locks);
        without it concurrent commits still never corrupt anything, but the pointer's
        history may miss a version, which then waits for :func:`collect_garbage`."""
        self.root = str(root).rstrip("/") or "/"
        self.asset = check_name(asset, "asset name")
        self.storage_options = dict(storage_options or {})
        self.fs, root_path = filesystem(self.root, self.storage_options)
        self._root_path = root_path.rstrip("/") if root_path != "/" else root_path
        self.local = is_local(self.fs)
        self.orphan_grace_s = orphan_grace_s
        self.commit_lock = commit_lock

    # -- paths -------------------------------------------------------------------------
    @property
    def store_path(self) -> str:
        return f"{self._root_path}/{self.asset}{self.suffix}"

    @property
    def url(self) -> str:
        return self._to_url(self.store_path)

    def _to_url(self, path: str) -> str:
        if self.local:
            return path
        return self.fs.unstrip_protocol(path)

    def partition_path(self, year: str | int, tile: str) -> str:
        y = check_name(year, "year")
        if not y.isdigit():
            raise StorageError(f"year {year!r} is not a year; use four digits such as 2019")
        path = f"{self.store_path}/{y}/{check_name(tile, 'partition name')}"
        # Belt and braces: nothing built from user input leaves the store.
        if not posixpath.normpath(path).startswith(self.store_path + "/"):
            raise StorageError(f"partition {year}/{tile} would leave the store {self.url}")
        return path

    def pointer_path(self, year: str | int, tile: str) -> str:
        return f"{self.partition_path(year, tile)}/{POINTER}"

    def index_path(self, year: str | int, shard: int | None = None) -> str:
        """The year's index directory, or one shard of it (see :func:`index_shard`)."""
        y = check_name(year, "year")
        if not y.isdigit():
            raise StorageError(f"year {year!r} is not a year; use four digits such as 2019")
        base = f"{self.store_path}/{y}/{INDEX}"
        return base if shard is None else f"{base}/{shard:02d}.json"

    def version_path(self, year: str | int, tile: str, version: str) -> str:
        if not _VERSION.match(version):
            raise StorageError(f"{version!r} is not a version id of this store")
        return f"{self.partition_path(year, tile)}/{version}"

    # -- low-level I/O -------------------------------------------------------------------
    def _read(self, path: str) -> bytes | None:
        if self.local:
            try:
                return Path(path).read_bytes()
            except FileNotFoundError:
                return None
        try:
            data: bytes = self.fs.cat_file(path)
            return data
        except FileNotFoundError:
            return None

    def _read_many(self, paths: list[str]) -> dict[str, bytes | Exception]:
        if self.local:
            out: dict[str, bytes | Exception] = {}
            for p in paths:
                try:
                    out[p] = Path(p).read_bytes()
                except OSError as exc:
                    out[p] = exc
            return out
        got = self.fs.cat(paths, on_error="return")
        if len(paths) == 1 and not isinstance(got, dict):
            got = {paths[0]: got}
        return {self.fs._strip_protocol(k): v for k, v in got.items()}

    def _put(self, path: str, data: bytes) -> None:
        """One object of an uncommitted version (not atomic, need not be)."""
        if self.local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        else:
            self.fs.pipe_file(path, data)

    def _put_many(self, objects: dict[str, bytes]) -> None:
        if self.local:
            made: set[Path] = set()
            for path, data in objects.items():
                p = Path(path)
                if p.parent not in made:
                    p.parent.mkdir(parents=True, exist_ok=True)
                    made.add(p.parent)
                p.write_bytes(data)
        elif objects:
            self.fs.pipe(objects)

    def _rm_tree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                import shutil

                shutil.rmtree(path)
            else:
                self.fs.rm(path, recursive=True)

    def _ls(self, path: str) -> list[str]:
        """The names in ``path``, listed now: never fsspec's cached listing, which a
        long-lived process (the sensors') would otherwise keep from its first look."""
        try:
            if self.local:
                return sorted(e.name for e in os.scandir(path))
            try:
                names = self.fs.ls(path, detail=False, refresh=True)
            except TypeError:  # a filesystem whose ls takes no refresh
                names = self.fs.ls(path, detail=False)
            return sorted(posixpath.basename(p.rstrip("/")) for p in names)
        except (FileNotFoundError, NotADirectoryError):
            return []

    # -- the pointer ---------------------------------------------------------------------
    @property
    def documents(self) -> Documents:
        return Documents(self.fs, lock=self.commit_lock, owner=self)

    def _write_pointer(self, path: str, doc: dict[str, Any], token: str) -> bool:
        """Replace the pointer; False where a conditional write found another commit first."""
        return self.documents.write(path, doc, token)

    def pointer(self, year: str | int, tile: str) -> dict[str, Any] | None:
        """The partition's pointer document (one GET on S3); None when never committed;
        :class:`DamagedPointerError` when the file is not a pointer."""
        path = self.pointer_path(year, tile)
        raw, _ = self.documents.read_raw(path)
        if raw is None:
            return None
        doc = _pointer_doc(raw)
        if doc is None:
            raise DamagedPointerError(
                f"{self.asset} {year}/{tile}: the pointer {self._to_url(path)} is not a "
                f"pointer document ({len(raw)} bytes: {raw[:40]!r}); run `agrifm-pipeline "
                "verify` to set it aside (its bytes are kept beside it), then re-materialise "
                "the partition (the stale sensor requests it by itself)"
            )
        return doc

    def set_aside_pointer(self, year: str | int, tile: str) -> str | None:
        """Move a damaged pointer out of the way, its bytes kept beside it
        (``_current.json.damaged-<time>``): the partition then reads as never committed,
        and is made again like a missing one. The copy's path; None when the pointer is
        not damaged (a commit replaced it meanwhile) or absent."""
        path = self.pointer_path(year, tile)
        docs = self.documents
        with docs._lock(path):
            raw, _ = docs.read_raw(path)
            if raw is None or _pointer_doc(raw) is not None:
                return None
            aside = docs.set_aside(path, raw)
            if self.local:
                os.unlink(path)
            else:
                self.fs.rm_file(path)
        return self._to_url(aside)

    def current(self, year: str | int, tile: str) -> Version | None:
        """The current version, or None when the partition was never committed."""
        doc = self.pointer(year, tile)
        if doc is None:
            return None
        return self._version(year, tile, doc)

    def _version(self, year: str | int, tile: str, doc: dict[str, Any]) -> Version:
        vid = str(doc["version"])
        path = self.version_path(year, tile, vid)
        return Version(
            asset=self.asset,
            year=str(year),
            tile=str(tile),
            id=vid,
            path=path,
            url=self._to_url(path),
            manifest_sha256=str(doc.get("manifest_sha256", "")),
            committed_at=str(doc.get("committed_at", "")),
            run_id=str(doc.get("run_id", "")),
            summary=dict(doc.get("summary", {})),
            integrity=doc.get("integrity"),
        )

    def version(self, year: str | int, tile: str, version: str) -> Version:
        """A named version (current or kept), checked to exist with its manifest."""
        path = self.version_path(year, tile, version)
        raw = self._read(f"{path}/{MANIFEST}")
        if raw is None:
            raise StorageError(
                f"{self.asset} {year}/{tile} has no committed version {version} under "
                f"{self.url}; it was never committed or garbage-collected"
            )
        return Version(
            self.asset,
            str(year),
            str(tile),
            version,
            path,
            self._to_url(path),
            hashlib.sha256(raw).hexdigest(),
        )

    def resolve(self, year: str | int, tile: str, version: str | None = None) -> Version:
        if version:
            return self.version(year, tile, version)
        cur = self.current(year, tile)
        if cur is None:
            raise StorageError(
                f"{self.asset} has no partition {year}/{tile} under {self.url}; materialise it first"
            )
        return cur

    def exists(self, year: str | int, tile: str) -> bool:
        return self.current(year, tile) is not None

    def partitions(self) -> list[PartitionRef]:
        """Every committed partition of the asset."""
        out: list[PartitionRef] = []
        for year in self._ls(self.store_path):
            if not year.isdigit():
                continue
            for tile in self._ls(f"{self.store_path}/{year}"):
                if _SAFE.match(tile) and self._exists(f"{self.store_path}/{year}/{tile}/{POINTER}"):
                    out.append(PartitionRef(self.asset, year, tile))
        return out

    def _exists(self, path: str) -> bool:
        if self.local:
            return os.path.exists(path)
        return bool(self.fs.exists(path))

    def writable(self) -> bool:
        """Whether this process can write the store (one probe object, written and
        removed): False on a read-only mount, without write permission, or with
        read-only credentials."""
        probe = f"{self._root_path}/.agrifm-write-probe-{uuid.uuid4().hex}"
        try:
            if self.local:
                os.makedirs(self._root_path, exist_ok=True)
                os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                os.unlink(probe)
            else:
                self.fs.pipe_file(probe, b"")
                self.fs.rm_file(probe)
        except PermissionError:
            return False
        except OSError as exc:
            if exc.errno in READ_ONLY_ERRNOS:
                return False
            raise
        return True

    def versions(self, year: str | int, tile: str) -> list[str]:
        """Every version directory of the partition, committed or not, oldest first."""
        return [v for v in self._ls(self.partition_path(year, tile)) if _VERSION.match(v)]

    # -- writing -------------------------------------------------------------------------
    def begin(self, year: str | int, tile: str) -> tuple[str, str]:
        """A new, empty version: ``(id, path)``. Sweeps this partition's old orphans."""
        self.sweep(year, tile)
        vid = new_version_id()
        return vid, self.version_path(year, tile, vid)

    def commit(
        self,
        year: str | int,
        tile: str,
        version: str,
        objects: dict[str, dict[str, Any]],
        lineage: dict[str, Any] | None,
        *,
        summary: dict[str, Any] | None = None,
    ) -> Version:
        """Write the manifest of a complete version, then point the partition at it, then
        enter the pointer in the asset's index for the year (see :meth:`index`).

        ``summary``: what the pointer and the index keep of the lineage; by default
        :func:`~agrifm_pipeline.lineage.lineage_record`, all that judging reads."""
        path = self.version_path(year, tile, version)
        lineage = lineage or {}
        manifest = {
            "asset": self.asset,
            "year": str(year),
            "tile": str(tile),
            "version": version,
            "created_at": _now(),
            "objects": dict(sorted(objects.items())),
            "lineage": lineage,
        }
        raw = _json(manifest)
        self._put(f"{path}/{MANIFEST}", raw)
        entry = {
            "version": version,
            "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "committed_at": _now(),
            "run_id": str(lineage.get("run_id", "")),
        }

        def advance(doc: dict[str, Any] | None) -> dict[str, Any]:
            history = [h for h in (doc or {}).get("history", []) if h["version"] != version]
            if doc is not None:
                history.append({k: doc[k] for k in ("version", "committed_at") if k in doc})
            return {
                **entry,
                "asset": self.asset,
                "summary": lineage_record(lineage) if summary is None else summary,
                "history": history[-HISTORY_LEN:],
            }

        new = self.documents.update(
            self.pointer_path(year, tile), advance, self._write_pointer, parse=_pointer_doc
        )
        # Committed: from here on nothing may remove the version (see IndexLagError).
        try:
            self._index_enter(year, {str(tile): new})
        except Exception as exc:
            raise IndexLagError(
                f"{self.asset} {year}/{tile}: version {version} is committed (the pointer "
                f"names it) but entering it in the year's index {self._to_url(self.index_path(year))} "
                f"failed: {_why(exc)}; the version is safe. Fix the cause, then run "
                "`agrifm-pipeline verify` to rebuild the index",
                version,
            ) from exc
        return self._version(year, tile, new)

    @contextlib.contextmanager
    def _writing(self, year: str | int, tile: str, version: str) -> Iterator[None]:
        """Around the write of an uncommitted version: on failure the version is removed
        (unless its commit went through, see :meth:`_discard`) and an OSError becomes a
        :class:`StorageWriteError` naming the partition and the path; a failure after the
        commit (:class:`IndexLagError`) leaves the version in place."""
        try:
            yield
        except IndexLagError:
            raise  # committed: the version stays
        except BaseException as exc:
            self._discard(year, tile, version)
            err = self._failed_write(exc, year, tile, version)
            if err is exc:
                raise
            raise err from exc

    def _failed_write(
        self, exc: BaseException, year: str | int, tile: str, version: str
    ) -> BaseException:
        """What a failed write of an uncommitted version raises: an OSError becomes a
        :class:`StorageWriteError` naming the partition and the path."""
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            where = getattr(exc, "filename", None) or self.version_path(year, tile, version)
            err = StorageWriteError(
                exc.errno,
                f"{self.asset} {year}/{tile}: writing version {version} failed at "
                f"{self._to_url(str(where))}: {_why(exc)}; nothing was committed and the "
                "previous version stays current"
                + (
                    " (the store is read-only here: check the mount and permissions)"
                    if exc.errno in READ_ONLY_ERRNOS
                    else " (free space on the store, then run again)"
                    if exc.errno in (errno.ENOSPC, errno.EDQUOT)
                    else ""
                ),
            )
            return err
        return exc

    def _discard(self, year: str | int, tile: str, version: str) -> None:
        """Remove a version whose write failed, unless the pointer names it (a failure
        after the commit) or the pointer cannot be read to tell: then the version stays,
        for the sweep or :func:`collect_garbage` to judge."""
        try:
            raw, _ = self.documents.read_raw(self.pointer_path(year, tile))
        except Exception:
            return
        doc = _pointer_doc(raw) if raw is not None else None
        if doc is not None and (
            doc["version"] == version
            or any(h.get("version") == version for h in doc.get("history", []))
        ):
            return
        with contextlib.suppress(Exception):
            self._rm_tree(self.version_path(year, tile, version))

    # -- the per-year index ----------------------------------------------------------------
    # Every partition's pointer (its history left out), per asset and year, in
    # INDEX_SHARDS documents: what the stale sensor, the audit and the mosaic sensor judge
    # from, so a tick reads a year's index in one batch instead of a pointer and a manifest
    # per partition, and a commit rewrites 1/INDEX_SHARDS of its year's index. A shard is
    # ``complete`` once a rebuild from the pointers went through it; a year's index is used
    # only when all its shards are.
    # The pointer stays the truth: the index is entered after it, so it can lag a commit
    # (a writer killed in between, or a lost update on a store without conditional writes),
    # never lead one. :meth:`rebuild_index` (``agrifm-pipeline verify``) rewrites it from
    # the pointers, and readers that know a partition changed read its pointer.
    def _index_enter(self, year: str | int, docs: dict[str, dict[str, Any]]) -> None:
        """Enter pointers (tile -> pointer document) in the year's index; an entry only
        replaces one committed earlier (two commits of a partition may enter it in any order).
        The first writer of a year without index (new, or written before indexes existed)
        indexes the year's other partitions first."""
        key = (self.url, str(year))
        if key not in _INDEXED_YEARS:
            raw = self._read(self.index_path(year, index_shard(next(iter(docs)))))
            doc = _loads(raw, damaged=True) if raw is not None else None
            if not (doc and doc.get("complete")):
                self.rebuild_index(year, replace=False)
            _INDEXED_YEARS.add(key)
        self._merge_index(str(year), {t: _index_entry(d) for t, d in docs.items()})

    def _merge_index(
        self,
        year: str,
        entries: dict[str, dict[str, Any]],
        *,
        complete: bool = False,
        replace: bool = False,
    ) -> None:
        """Merge entries into the year's shards; ``complete``: every shard, marked complete;
        ``replace``: the shards hold exactly ``entries`` afterwards."""
        by_shard: dict[int, dict[str, dict[str, Any]]] = {}
        for tile, entry in entries.items():
            by_shard.setdefault(index_shard(tile), {})[tile] = entry
        if complete:
            by_shard = {i: by_shard.get(i, {}) for i in range(INDEX_SHARDS)}
        for shard, part in sorted(by_shard.items()):

            def enter(
                doc: dict[str, Any] | None, part: dict[str, Any] = part, shard: int = shard
            ) -> dict[str, Any]:
                parts = {} if replace else dict((doc or {}).get("partitions", {}))
                for tile, entry in part.items():
                    old = parts.get(tile)
                    if old is None or str(old.get("committed_at", "")) <= entry["committed_at"]:
                        parts[tile] = entry
                done = complete or bool((doc or {}).get("complete"))
                return self._shard_doc(year, shard, parts, done)

            self.documents.update(self.index_path(year, shard), enter, damaged=True)

    def _shard_doc(
        self, year: str, shard: int, parts: dict[str, Any], complete: bool
    ) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "year": year,
            "shard": shard,
            "of": INDEX_SHARDS,
            "complete": complete,
            "partitions": parts,
        }

    def index(self, year: str | int) -> dict[str, Version] | None:
        """Every indexed partition of ``year`` (tile -> its current version, with the
        pointer's summary and integrity verdict), from one batch of reads; None when the
        year has no complete index (a shard missing, damaged or never completed by a
        rebuild: :meth:`rebuild_index` makes one)."""
        paths = [self.index_path(year, i) for i in range(INDEX_SHARDS)]
        got = self._read_many(paths)
        out: dict[str, Version] = {}
        for path in paths:
            raw = got.get(path)
            if not isinstance(raw, bytes | bytearray):
                return None
            doc = _loads(raw, damaged=True)
            if doc is None or not doc.get("complete") or doc.get("of") != INDEX_SHARDS:
                return None  # only a cache: rebuilt from the pointers
            parts = doc.get("partitions", {})
            if not isinstance(parts, dict):
                return None
            out.update((t, self._version(year, t, e)) for t, e in parts.items())
        return out

    def years(self) -> list[str]:
        """The years that have partitions (one listing)."""
        return [y for y in self._ls(self.store_path) if y.isdigit()]

    def _read_pointers(
        self, year: str, tiles: list[str]
    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """The pointers of ``tiles`` read in one batch (concurrent requests on object
        stores): tile -> pointer document, and the tiles whose pointer is not JSON. A tile
        without a pointer (never committed, or deleted by hand) is in neither."""
        paths = {t: self.pointer_path(year, t) for t in sorted(tiles)}
        got = self._read_many(list(paths.values()))
        docs: dict[str, dict[str, Any]] = {}
        broken: list[str] = []
        for tile, path in paths.items():
            raw = got.get(path)
            if not isinstance(raw, bytes | bytearray):
                continue
            doc = _pointer_doc(raw)
            if doc is None:
                broken.append(tile)
            else:
                docs[tile] = doc
        return docs, broken

    def rebuild_index(self, year: str | int | None = None, *, replace: bool = True) -> int:
        """Index ``year`` (every year by default) from the pointers; the number of
        partitions indexed. ``replace``: entries whose pointer is gone are dropped (what
        ``verify`` does); otherwise the pointers are merged into what is there, which is
        safe beside concurrent writers."""
        n = 0
        years = self.years()
        for y in [y for y in years if y == str(year)] if year is not None else years:
            tiles = [t for t in self._ls(f"{self.store_path}/{y}") if _SAFE.match(t)]
            docs, _ = self._read_pointers(y, tiles)
            entries = {t: _index_entry(d) for t, d in docs.items()}
            self._merge_index(y, entries, complete=True, replace=replace)
            _INDEXED_YEARS.add((self.url, y))
            n += len(entries)
        return n

    def put_objects(
        self, year: str | int, tile: str, objects: dict[str, bytes], lineage: dict[str, Any] | None
    ) -> Version:
        """A version made of whole objects (Parquet, PNG…), committed."""
        vid, path = self.begin(year, tile)
        for name in objects:
            check_name(name.replace(".", "_"), "object name")
        with self._writing(year, tile, vid):
            self._put_many({f"{path}/{name}": data for name, data in objects.items()})
            digests = {
                name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                for name, data in objects.items()
            }
            committed = self.commit(year, tile, vid, digests, lineage)
        return committed

    # -- reading and verifying -----------------------------------------------------------
    def manifest(self, v: Version) -> dict[str, Any]:
        raw = self._read(f"{v.path}/{MANIFEST}")
        if raw is None:
            raise CorruptionError(
                f"{v.asset} {v.year}/{v.tile} version {v.id}: {MANIFEST} is missing; the "
                "version is incomplete — run `agrifm-pipeline verify` and re-materialise it"
            )
        if v.manifest_sha256 and hashlib.sha256(raw).hexdigest() != v.manifest_sha256:
            raise CorruptionError(
                f"{v.asset} {v.year}/{v.tile} version {v.id}: {MANIFEST} differs from the "
                "checksum the pointer recorded — run `agrifm-pipeline verify` and re-materialise"
            )
        doc: dict[str, Any] = json.loads(raw)
        return doc

    def lineage(self, year: str | int, tile: str, version: str | None = None) -> dict[str, Any]:
        """The lineage of a version (the current one by default), from its manifest;
        a version's manifest is read once per process (versions never change)."""
        if version:
            cached = _MANIFEST_CACHE.get((self.url, str(year), str(tile), version))
            if cached is not None:
                out: dict[str, Any] = cached.get("lineage", {})
                return out
        v = self.resolve(year, tile, version)
        out = self._cached_manifest(v).get("lineage", {})
        return out

    def judged_lineage(self, v: Version) -> dict[str, Any]:
        """What judging ``v`` reads of its lineage: the record its pointer (or the year's
        index) keeps (:func:`~agrifm_pipeline.lineage.lineage_record`), no manifest read;
        for a version committed before records were kept, the whole lineage."""
        return v.summary if is_record(v.summary) else self.lineage(v.year, v.tile, v.id)

    def _cached_manifest(self, v: Version) -> dict[str, Any]:
        key = (self.url, v.year, v.tile, v.id)
        got = _MANIFEST_CACHE.get(key)
        if got is None:
            got = self.manifest(v)
            if len(_MANIFEST_CACHE) > 200_000:
                _MANIFEST_CACHE.clear()
            _MANIFEST_CACHE[key] = got  # versions are immutable: cached for good
        return got

    def _check(self, v: Version, verify: bool) -> tuple[dict[str, bytes], list[Problem]]:
        """Every object of a version read once, and what is missing or differs."""
        objects = self.manifest(v)["objects"]
        got = self._read_many([f"{v.path}/{name}" for name in objects])
        out: dict[str, bytes] = {}
        problems: list[Problem] = []
        for name, meta in objects.items():
            data = got.get(f"{v.path}/{name}")
            if not isinstance(data, bytes | bytearray):
                problems.append(Problem(v.asset, v.year, v.tile, v.id, name, "missing", str(data)))
                continue
            if verify and hashlib.sha256(data).hexdigest() != meta["sha256"]:
                problems.append(
                    Problem(
                        v.asset,
                        v.year,
                        v.tile,
                        v.id,
                        name,
                        "mismatch",
                        f"sha256 differs; {len(data)} bytes, {meta['size']} in the manifest",
                    )
                )
                continue
            out[name] = bytes(data)
        return out, problems

    def read_objects(self, v: Version, *, verify: bool = True) -> dict[str, bytes]:
        """Every object of a version, checked against its manifest when ``verify``."""
        out, problems = self._check(v, verify)
        if problems:
            raise CorruptionError(
                "stored data fails its checksums: "
                + "; ".join(map(str, problems))
                + " — run `agrifm-pipeline verify` and re-materialise the partition"
            )
        return out

    def verify(self, v: Version) -> list[Problem]:
        """Re-hash one version; every object that is missing or differs is a problem."""
        try:
            return self._check(v, verify=True)[1]
        except CorruptionError as exc:  # the manifest itself is missing or altered
            return [Problem(v.asset, v.year, v.tile, v.id, MANIFEST, "manifest", str(exc))]

    # -- integrity verdicts (written by verify, read by the audit and the stale sensor) ----
    def mark_integrity(self, v: Version, problems: list[Problem]) -> None:
        """Record verification's verdict in the pointer, if ``v`` is still current (a
        conditional update: a commit in between wins, and its version is unjudged)."""
        verdict = {"ok": not problems, "checked_at": _now(), "problems": [str(p) for p in problems]}

        def note(doc: dict[str, Any] | None) -> dict[str, Any]:
            if doc is None or doc.get("version") != v.id:
                raise _Superseded
            return {**doc, "integrity": verdict}

        with contextlib.suppress(_Superseded):
            new = self.documents.update(self.pointer_path(v.year, v.tile), note)
            self._index_enter(v.year, {v.tile: new})

    def integrity(self, year: str | int, tile: str) -> dict[str, Any] | None:
        """The last verdict on the current version (None when never verified)."""
        doc = self.pointer(year, tile)
        return (
            dict(doc["integrity"], version=doc["version"]) if doc and "integrity" in doc else None
        )

    # -- sweeping and garbage ----------------------------------------------------------
    def sweep(self, year: str | int, tile: str, grace_s: float | None = None) -> list[str]:
        """Remove this partition's uncommitted versions older than the grace period.

        Uncommitted: no manifest (the writer died while writing: the manifest is written
        before the commit), or a manifest that the pointer never named (the writer died
        before its commit). The second kind is told apart only where the pointer's history
        is known to be complete: on stores whose commits keep it whole (locked or
        conditional), and only for versions newer than the oldest one the history still
        remembers. An older version with a manifest may have been committed and have left
        the history (it keeps :data:`HISTORY_LEN` entries), and a current downstream
        version may still read it: it waits for :func:`collect_garbage`, which keeps what
        a current downstream version names. Without a readable pointer (none yet, or a
        damaged one) only versions without a manifest go. Also removes temporary files a
        killed pointer write left.
        """
        grace = self.orphan_grace_s if grace_s is None else grace_s
        part = self.partition_path(year, tile)
        names = self._ls(part)
        if not any(_VERSION.match(n) for n in names) and not any(
            n.startswith(".tmp-") for n in names
        ):
            return []
        try:
            doc = self.pointer(year, tile)
        except DamagedPointerError:
            doc = None  # repaired by the next commit or by verify; nothing is judged by it
        committed: set[str] = set()
        if doc is not None:
            committed = {str(doc["version"])} | {
                str(h["version"]) for h in doc.get("history", []) if h.get("version")
            }
        # History is complete from its oldest entry on (and only on such stores).
        since = min(committed) if committed and self.documents.complete else None
        removed: list[str] = []
        now = time.time()
        for name in names:
            if name.startswith(".tmp-") and self.local:
                with contextlib.suppress(OSError):
                    if now - os.stat(f"{part}/{name}").st_mtime > grace:
                        os.unlink(f"{part}/{name}")
                continue
            if not _VERSION.match(name) or name in committed:
                continue
            if version_age_s(name, now) <= grace:
                continue
            has_manifest = self._exists(f"{part}/{name}/{MANIFEST}")
            if has_manifest and (since is None or name < since):
                continue
            self._rm_tree(f"{part}/{name}")
            removed.append(name)
        return removed

    def delete_version(self, year: str | int, tile: str, version: str) -> None:
        """Remove one version: the manifest first, so a killed delete leaves an orphan."""
        path = self.version_path(year, tile, version)
        with contextlib.suppress(FileNotFoundError):
            if self.local:
                os.unlink(f"{path}/{MANIFEST}")
            else:
                self.fs.rm_file(f"{path}/{MANIFEST}")
        self._rm_tree(path)


class IndexedReader:
    """A store read through its per-year indexes, for judging many partitions at once:
    :meth:`current` answers from one read of the year's index and one listing of the
    year (a partition deleted by hand is gone from the listing); other methods are the
    store's. ``fresh`` names partitions known to have changed lately (``(year, tile)`` ->
    the version their last change made, None when unknown, e.g. from Dagster's
    materialisations since the last look): one whose index entry names another version
    is read from its pointer, and its index entry entered again.

    With ``pointers`` every listed partition's pointer is read (in one batch of
    concurrent requests on object stores) instead of trusting the index: what the
    audit does, and the index is repaired where it was behind."""

    def __init__(
        self,
        store: PartitionStore,
        fresh: dict[tuple[str, str], str | None] | None = None,
        *,
        pointers: bool = False,
    ):
        self.store: PartitionStore = store.store if isinstance(store, IndexedReader) else store
        self.fresh = fresh or {}
        self.pointers = pointers
        self._indexes: dict[str, dict[str, Version] | None] = {}
        self._broken: set[tuple[str, str]] = set()
        self.reads = {"index": 0, "listing": 0, "pointer": 0, "repaired": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _listed(self, year: str) -> set[str]:
        self.reads["listing"] += 1
        return {n for n in self.store._ls(f"{self.store.store_path}/{year}") if _SAFE.match(n)}

    def index(self, year: str | int) -> dict[str, Version] | None:
        """The year's partitions (tile -> current version), found once: the index, less
        what the listing no longer has; or, with ``pointers``, the pointers themselves.
        A year written before indexes existed (or whose index is damaged) is indexed
        from its pointers first, once. None when the year has no partition at all."""
        y = str(year)
        if y in self._indexes:
            return self._indexes[y]
        listed = self._listed(y)
        if not listed:
            idx = None  # the year has no partition: nothing to read
        elif self.pointers:
            idx = self._from_pointers(y, listed)
        else:
            self.reads["index"] += 1
            idx = self.store.index(y)
            if idx is None:
                self.store.rebuild_index(y, replace=False)  # merged: safe beside writers
                idx = self.store.index(y)
            if idx is not None:
                idx = {t: v for t, v in idx.items() if t in listed}
        self._indexes[y] = idx
        return idx

    def _from_pointers(self, year: str, listed: set[str]) -> dict[str, Version]:
        docs, broken = self.store._read_pointers(year, list(listed))
        self.reads["pointer"] += len(listed)
        self._broken.update((year, t) for t in broken)  # reported by :meth:`current`
        indexed = self.store.index(year) or {}
        out = {t: self.store._version(year, t, d) for t, d in docs.items()}
        behind = {t: d for t, d in docs.items() if t not in indexed or indexed[t].id != out[t].id}
        if behind:
            self.reads["repaired"] += len(behind)
            self.store._index_enter(year, behind)
        return out

    def current(self, year: str | int, tile: str) -> Version | None:
        idx = self.index(year)
        key = (str(year), str(tile))
        if key in self._broken:
            return self.store.current(year, tile)  # raises what is wrong with its pointer
        if idx is None:
            return None  # the year has no partition at all
        entry = idx.get(str(tile))
        if self.pointers or key not in self.fresh:
            return entry
        want = self.fresh[key]
        if want is not None and entry is not None and entry.id == want:
            return entry
        self.reads["pointer"] += 1
        doc = self.store.pointer(year, tile)
        if doc is None:
            return None
        if entry is None or entry.id != doc.get("version"):
            self.reads["repaired"] += 1
            self.store._index_enter(year, {str(tile): doc})
        return self.store._version(year, tile, doc)

    def exists(self, year: str | int, tile: str) -> bool:
        return self.current(year, tile) is not None

    def partitions(self) -> list[PartitionRef]:
        """Every indexed partition (one listing of the years, one read per year)."""
        out: list[PartitionRef] = []
        for y in self.store.years():
            out += [PartitionRef(self.store.asset, y, t) for t in sorted(self.index(y) or {})]
        return out


_MANIFEST_CACHE: dict[tuple[str, str, str, str], dict[str, Any]] = {}
_INDEXED_YEARS: set[tuple[str, str]] = set()  # (store url, year) known to have an index


def index_shard(tile: str) -> int:
    """Which of a year's :data:`INDEX_SHARDS` index documents holds ``tile``."""
    return int(hashlib.sha256(tile.encode()).hexdigest()[:8], 16) % INDEX_SHARDS


_INDEX_FIELDS = ("version", "manifest_sha256", "committed_at", "run_id", "summary", "integrity")


def _index_entry(pointer: dict[str, Any]) -> dict[str, Any]:
    """A pointer as the index keeps it: everything but its history."""
    return {k: pointer[k] for k in _INDEX_FIELDS if k in pointer}


# -- Zarr partitions ----------------------------------------------------------------------
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
                **_compressor(self.zarr_format),
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


# -- garbage collection across assets ------------------------------------------------------
# -- verification across assets -------------------------------------------------------------
@dataclass
class VerifyReport:
    """What :func:`verify_stores` found and did."""

    checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    swept: int = 0
    indexed: int = 0
    matched: int = 0  # partitions the filters selected
    set_aside: list[str] = field(default_factory=list)  # damaged pointers moved aside
    read_only: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        text = (
            f"{self.checked} version(s) verified, {len(self.problems)} problem(s), "
            f"{self.swept} orphaned version(s) swept, {self.indexed} partition(s) indexed"
        )
        if self.set_aside:
            text += f", {len(self.set_aside)} damaged pointer(s) set aside"
        if self.read_only:
            text += (
                " (read-only store: nothing swept, no verdict recorded, indexes and "
                "damaged pointers left as they are)"
            )
        return text


def verify_stores(
    stores: list[PartitionStore],
    *,
    year: int | None = None,
    tile: str | None = None,
    all_versions: bool = False,
    sweep: bool = True,
    on_problem: Any = None,
) -> VerifyReport:
    """Re-hash the current version (or every version) of each partition in ``stores``.

    Where the store can be written, each verdict is recorded in the pointer (for the
    audit and the stale sensor), orphans of dead writers are swept (``sweep``), a
    damaged pointer is set aside with its bytes kept beside it (the partition then
    reads as missing and is re-made), and the years' indexes are rebuilt from the
    pointers. On a read-only store (mount, permissions or credentials) it only reads
    and reports. One damaged document never stops the others: it is a problem of its
    own partition. ``on_problem(problem)`` is told each problem as it is found."""
    report = VerifyReport()
    writable = all(s.writable() for s in stores[:1])
    report.read_only = not writable

    def found(p: Problem) -> None:
        report.problems.append(p)
        if on_problem is not None:
            on_problem(p)

    for store in stores:
        for ref in store.partitions():
            if (year is not None and int(ref.year) != year) or (tile and ref.tile != tile):
                continue
            report.matched += 1
            if sweep and writable:
                report.swept += len(store.sweep(ref.year, ref.tile))
            try:
                current = store.current(ref.year, ref.tile)
            except DamagedPointerError as exc:
                aside = store.set_aside_pointer(ref.year, ref.tile) if writable else None
                detail = str(exc) if aside is None else f"set aside to {aside}"
                if aside is not None:
                    report.set_aside.append(aside)
                found(Problem(store.asset, ref.year, ref.tile, "-", POINTER, "damaged", detail))
                continue
            if current is None:
                continue  # removed since the listing
            ids = store.versions(ref.year, ref.tile) if all_versions else [current.id]
            for vid in ids:
                try:
                    v = current if vid == current.id else store.version(ref.year, ref.tile, vid)
                except StorageError:
                    continue  # an uncommitted version: nothing to verify, swept when old
                problems = store.verify(v)
                report.checked += 1
                if v.id == current.id and writable:
                    store.mark_integrity(v, problems)
                for p in problems:
                    found(p)
        if writable and not tile:  # the per-year indexes, rewritten from the pointers
            report.indexed += store.rebuild_index(year)
    return report


# -- garbage collection across assets ------------------------------------------------------
@dataclass
class GCReport:
    removed: list[tuple[str, str, str, str]] = field(default_factory=list)
    kept_referenced: int = 0
    kept_recent: int = 0
    damaged: list[str] = field(default_factory=list)  # partitions left alone: pointer damaged

    def __str__(self) -> str:
        text = (
            f"removed {len(self.removed)} version(s); kept {self.kept_referenced} named by a "
            f"current downstream version and {self.kept_recent} within the retention"
        )
        if self.damaged:
            text += (
                f"; {len(self.damaged)} partition(s) with a damaged pointer left whole "
                f"({', '.join(self.damaged[:3])}{'…' if len(self.damaged) > 3 else ''}: run "
                "`agrifm-pipeline verify`)"
            )
        return text


def referenced_versions(lineage: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """(asset, year, tile, version) of every upstream version a lineage names."""
    out: set[tuple[str, str, str, str]] = set()
    year = str(lineage.get("year", ""))
    for asset, rec in (lineage.get("inputs") or {}).items():
        if not isinstance(rec, dict):
            continue
        if rec.get("version"):
            out.add(
                (
                    asset,
                    str(rec.get("year", year)),
                    str(rec.get("tile", lineage.get("tile"))),
                    rec["version"],
                )
            )
        for tile, vid in (rec.get("versions") or {}).items():
            out.add((asset, year, str(tile), str(vid)))
    return out


def collect_garbage(
    stores: list[PartitionStore],
    *,
    keep: int = 1,
    min_age_s: float = 3600.0,
    dry_run: bool = False,
) -> GCReport:
    """Remove superseded versions beyond ``keep`` per partition and older than ``min_age_s``.

    Never removes a current version, nor any version that the current version of any
    partition in ``stores`` names as its input. Uncommitted versions older than the grace
    period go too. ``min_age_s`` protects readers that opened a version shortly before it
    was superseded.
    """
    referenced: set[tuple[str, str, str, str]] = set()
    currents: dict[tuple[str, str, str], str] = {}
    report = GCReport()
    damaged: set[tuple[str, str, str]] = set()
    for store in stores:
        for ref in store.partitions():
            try:
                v = store.current(ref.year, ref.tile)
            except DamagedPointerError:
                # Which version it named is unknown: nothing of the partition is removed.
                damaged.add((store.asset, ref.year, ref.tile))
                report.damaged.append(f"{store.asset} {ref.year}/{ref.tile}")
                continue
            if v is None:
                continue
            currents[(store.asset, ref.year, ref.tile)] = v.id
            referenced |= referenced_versions(store.lineage(ref.year, ref.tile, v.id))
    if not dry_run and stores and not stores[0].writable():
        raise ReadOnlyStoreError(
            f"the store {stores[0].root} cannot be written here (read-only mount, "
            "permissions or credentials): nothing was removed; run gc where it is writable, "
            "or use --dry-run to see what it would remove"
        )
    now = time.time()
    for store in stores:
        for ref in store.partitions():
            if (store.asset, ref.year, ref.tile) in damaged:
                continue
            cur = currents.get((store.asset, ref.year, ref.tile))
            part = store.partition_path(ref.year, ref.tile)
            try:
                doc = store.pointer(ref.year, ref.tile) or {}
            except DamagedPointerError:
                continue  # damaged since the first pass
            history = {h["version"] for h in doc.get("history", [])}
            kept = 0
            for vid in reversed(store.versions(ref.year, ref.tile)):  # newest first
                key = (store.asset, ref.year, ref.tile, vid)
                if vid == cur:
                    continue
                if key in referenced:
                    report.kept_referenced += 1
                    continue
                # Committed once: in the pointer's history (a complete version the pointer
                # never named is a writer that died before its commit, not a kept version).
                committed = vid in history and store._exists(f"{part}/{vid}/{MANIFEST}")
                age = version_age_s(vid, now)
                if committed and (kept < keep or age < min_age_s):
                    kept += 1
                    report.kept_recent += 1
                    continue
                if not committed and age <= min(min_age_s, store.orphan_grace_s):
                    continue  # perhaps still being written
                if not dry_run:
                    store.delete_version(ref.year, ref.tile, vid)
                report.removed.append(key)
    return report
