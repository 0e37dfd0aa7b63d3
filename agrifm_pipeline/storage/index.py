"""The per-year index of an asset: every partition's pointer (its history left out),
in :data:`INDEX_SHARDS` documents per year, entered at each commit; and
:class:`IndexedReader`, which judges many partitions from it.

Every partition's pointer (its history left out), per asset and year, in
INDEX_SHARDS documents: what the stale sensor, the audit and the mosaic sensor judge
from, so a tick reads a year's index in one batch instead of a pointer and a manifest
per partition, and a commit rewrites 1/INDEX_SHARDS of its year's index. A shard is
``complete`` once a rebuild from the pointers went through it; a year's index is used
only when all its shards are.

The pointer stays the truth: the index is entered after it, so it can lag a commit
(a writer killed in between, or a lost update on a store without conditional writes),
never lead one. :meth:`PartitionStore.rebuild_index` (``agrifm-pipeline verify``)
rewrites it from the pointers, and readers that know a partition changed read its
pointer.
"""

from __future__ import annotations

import hashlib
from typing import Any

from agrifm_pipeline.storage.errors import IndexLagError, StorageError
from agrifm_pipeline.storage.fs import _SAFE, _loads, _why, check_name
from agrifm_pipeline.storage.versions import PartitionRef, Version, VersionedStore, _pointer_doc

INDEX = "_index"  # per asset and year: every partition's pointer, without its history
INDEX_SHARDS = 8  # documents per year's index: a commit rewrites one, a reader reads all
_INDEXED_YEARS: set[tuple[str, str]] = set()  # (store url, year) known to have an index


class PartitionStore(VersionedStore):
    """The versioned partitions of one asset under ``root``, each commit entered in the
    asset's per-year index; objects are opaque bytes."""

    def index_path(self, year: str | int, shard: int | None = None) -> str:
        """The year's index directory, or one shard of it (see :func:`index_shard`)."""
        y = check_name(year, "year")
        if not y.isdigit():
            raise StorageError(f"year {year!r} is not a year; use four digits such as 2019")
        base = f"{self.store_path}/{y}/{INDEX}"
        return base if shard is None else f"{base}/{shard:02d}.json"

    def _committed(self, year: str | int, tile: str, pointer: dict[str, Any]) -> None:
        try:
            self._index_enter(year, {str(tile): pointer})
        except Exception as exc:
            raise IndexLagError(
                f"{self.asset} {year}/{tile}: version {pointer['version']} is committed (the "
                f"pointer names it) but entering it in the year's index "
                f"{self._to_url(self.index_path(year))} failed: {_why(exc)}; the version is "
                "safe. Fix the cause, then run `agrifm-pipeline verify` to rebuild the index",
                str(pointer["version"]),
            ) from exc

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

    def forget(self, year: str | int) -> None:
        """Drop what was read of ``year`` (read again if asked again): a reader going
        through the years one by one keeps one year's partitions at a time."""
        self._indexes.pop(str(year), None)

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


def index_shard(tile: str) -> int:
    """Which of a year's :data:`INDEX_SHARDS` index documents holds ``tile``."""
    return int(hashlib.sha256(tile.encode()).hexdigest()[:8], 16) % INDEX_SHARDS


_INDEX_FIELDS = ("version", "manifest_sha256", "committed_at", "run_id", "summary", "integrity")


def _index_entry(pointer: dict[str, Any]) -> dict[str, Any]:
    """A pointer as the index keeps it: everything but its history."""
    return {k: pointer[k] for k in _INDEX_FIELDS if k in pointer}
