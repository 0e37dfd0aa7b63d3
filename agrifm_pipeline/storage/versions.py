"""Versions of one partition: ids, the pointer and its history, manifests, commits,
checksummed reads and verification, integrity verdicts and the sweep of orphans.

:class:`VersionedStore` is a store of opaque objects; the per-year index
(:mod:`agrifm_pipeline.storage.index`) is entered by its subclass through
:meth:`VersionedStore._committed`, and the Zarr and file stores build on that.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import os
import posixpath
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agrifm_pipeline.lineage import is_record, lineage_record
from agrifm_pipeline.storage.errors import (
    READ_ONLY_ERRNOS,
    CorruptionError,
    DamagedPointerError,
    IndexLagError,
    StorageError,
    StorageWriteError,
)
from agrifm_pipeline.storage.fs import (
    _SAFE,
    Documents,
    _json,
    _loads,
    _now,
    _why,
    check_name,
    filesystem,
    gdal_path,
    is_local,
)

POINTER = "_current.json"
MANIFEST = "_manifest.json"
HISTORY_LEN = 32  # committed versions remembered in the pointer
# An uncommitted version (no manifest, or never named by the pointer) younger than this
# may still be being written by a live writer, so sweeps leave it alone.
ORPHAN_GRACE_S = 6 * 3600
_VERSION = re.compile(r"^v(\d{8}T\d{6}\d{6})Z-[0-9a-f]{8}$")
# Manifests read lately (versions never change), least recently used dropped first: a
# sensor judging a continent's window each tick re-reads few, and the process stays small.
MANIFEST_CACHE_SIZE = 20_000
_MANIFEST_CACHE: OrderedDict[tuple[str, str, str, str], dict[str, Any]] = OrderedDict()
_MANIFEST_LOCK = threading.Lock()


def _cached(key: tuple[str, str, str, str]) -> dict[str, Any] | None:
    with _MANIFEST_LOCK:
        got = _MANIFEST_CACHE.get(key)
        if got is not None:
            _MANIFEST_CACHE.move_to_end(key)
        return got


def _remember(key: tuple[str, str, str, str], manifest: dict[str, Any]) -> None:
    with _MANIFEST_LOCK:
        _MANIFEST_CACHE[key] = manifest
        _MANIFEST_CACHE.move_to_end(key)
        while len(_MANIFEST_CACHE) > MANIFEST_CACHE_SIZE:
            _MANIFEST_CACHE.popitem(last=False)


def new_version_id() -> str:
    """Sortable by creation time, unique: ``v20261201T143000123456Z-1a2b3c4d``."""
    return f"v{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}Z-{uuid.uuid4().hex[:8]}"


def version_age_s(version: str, now: float | None = None) -> float:
    m = _VERSION.match(version)
    if not m:
        return float("inf")  # not ours: never younger than any grace
    made = dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.UTC)
    return (now if now is not None else time.time()) - made.timestamp()


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


class _Superseded(Exception):
    """The pointer moved on while a verdict was being recorded."""


def _pointer_doc(raw: bytes) -> dict[str, Any] | None:
    """A pointer document, or None when the bytes are not one (not JSON, or no version)."""
    doc = _loads(raw, damaged=True)
    if doc is None or not _VERSION.match(str(doc.get("version", ""))):
        return None
    return doc


class VersionedStore:
    """The versioned partitions of one asset under ``root``; objects are opaque bytes.
    Subclasses learn of each commit and verdict through :meth:`_committed`."""

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
        self._committed(year, tile, new)
        return self._version(year, tile, new)

    def _committed(self, year: str | int, tile: str, pointer: dict[str, Any]) -> None:
        """Told each pointer just written (a commit, or a verdict): nothing here; the
        indexed store enters it in the year's index. What it raises must be an
        :class:`IndexLagError`: the commit stands."""

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
            cached = _cached((self.url, str(year), str(tile), version))
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
        got = _cached(key)
        if got is None:
            got = self.manifest(v)
            _remember(key, got)  # versions are immutable: good while it is kept
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
            self._committed(v.year, v.tile, new)

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
