"""The per-year index of an asset: every partition's pointer (its history left out),
in shard documents per year, entered at each commit; and :class:`IndexedReader`, which
judges many partitions from it.

Every partition's pointer (its history left out), per asset and year, in N shard
documents: what the stale sensor, the audit and the mosaic sensor judge from, so a
tick reads a year's index in one batch instead of a pointer and a manifest per
partition, and a commit rewrites 1/N of its year's index. N is the year's own (every
shard says it: ``of``), a power of two from :data:`INDEX_SHARDS` (8) up, about
:data:`PER_SHARD` partitions a shard (:func:`shards_for`): chosen when the year's index
is made, from the partitions there are or are expected (the store's
``index_size_hint``, e.g. the registered tiles: a continent-year starts with 128), and
again by every rebuild. A writer that finds its shard of another N than it knew reads
N again and enters its partition there. A shard is ``complete`` once a rebuild from
the pointers went through it; a year's index is used only when all its shards are,
and agree on N.

The pointer stays the truth: the index is entered after it, so it can lag a commit
(a writer killed in between, or a lost update on a store without conditional writes),
never lead one. :meth:`PartitionStore.rebuild_index` (``agrifm-pipeline verify``)
rewrites it from the pointers, and readers that know a partition changed read its
pointer.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from agrifm_pipeline.storage.errors import IndexLagError, StorageError
from agrifm_pipeline.storage.fs import _SAFE, _loads, _why, check_name
from agrifm_pipeline.storage.versions import PartitionRef, Version, VersionedStore, _pointer_doc

INDEX = "_index"  # per asset and year: every partition's pointer, without its history
INDEX_SHARDS = 8  # the fewest documents of a year's index: a commit rewrites one, a reader all
MAX_INDEX_SHARDS = 1024
PER_SHARD = 1000  # partitions a shard holds, about: what one commit rewrites
# (store url, year) known to have an index -> its number of shards
_INDEXED_YEARS: dict[tuple[str, str], int] = {}


def shards_for(partitions: int) -> int:
    """Shards for a year of ``partitions``: the fewest powers of two from INDEX_SHARDS
    holding at most PER_SHARD each (at most MAX_INDEX_SHARDS)."""
    n = INDEX_SHARDS
    while n < MAX_INDEX_SHARDS and partitions > n * PER_SHARD:
        n *= 2
    return n


class _Resharded(Exception):
    """A shard of another number of shards than the writer knew: read N again."""


class LazyIndex(Mapping[str, Version]):
    """A year's index entries (tile -> entry), each made a :class:`Version` when first
    asked for: a continent-year holds 125,000 entries, and a tick looks at a window."""

    def __init__(self, store: PartitionStore, year: str, entries: dict[str, Any]) -> None:
        self.store, self.year, self.entries = store, year, entries
        self._made: dict[str, Version] = {}

    def __getitem__(self, tile: str) -> Version:
        got = self._made.get(tile)
        if got is None:
            got = self._made[tile] = self.store._version(self.year, tile, self.entries[tile])
        return got

    def __contains__(self, tile: object) -> bool:
        return tile in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def only(self, tiles: Collection[str]) -> LazyIndex:
        """The entries of ``tiles`` alone (what a listing still has)."""
        return LazyIndex(
            self.store, self.year, {t: e for t, e in self.entries.items() if t in tiles}
        )


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

    # Partitions a year is expected to hold (e.g. the registered tiles), asked only when a
    # year's index is first made; None: as many as it has.
    index_size_hint: Callable[[], int] | None = None

    def _index_enter(self, year: str | int, docs: dict[str, dict[str, Any]]) -> None:
        """Enter pointers (tile -> pointer document) in the year's index; an entry only
        replaces one committed earlier (two commits of a partition may enter it in any order).
        The first writer of a year without index (new, or written before indexes existed)
        indexes the year's other partitions first."""
        entries = {t: _index_entry(d) for t, d in docs.items()}
        for _ in range(3):
            shards = self._year_shards(year)
            try:
                self._merge_index(str(year), entries, shards=shards)
                return
            except _Resharded:
                _INDEXED_YEARS.pop((self.url, str(year)), None)
                if self._year_shards(year) == shards:  # N unchanged: a shard was removed
                    self.rebuild_index(year, replace=False)  # from the pointers: ours included
                    return
        raise StorageError(f"{self.asset} {year}: the index's shards kept changing; try again")

    def _year_shards(self, year: str | int) -> int:
        """The year's number of shards, read once per process (from shard 00, which every
        layout has); a year without a complete index is indexed from its pointers first."""
        key = (self.url, str(year))
        if key not in _INDEXED_YEARS:
            doc = self._shard_head(year)
            if doc is None:
                self.rebuild_index(year, replace=False)
            else:
                _INDEXED_YEARS[key] = int(doc["of"])
        return _INDEXED_YEARS[key]

    def _shard_head(self, year: str | int) -> dict[str, Any] | None:
        """Shard 00 of the year when it is complete and names a usable N, else None."""
        raw = self._read(self.index_path(year, 0))
        doc = _loads(raw, damaged=True) if raw is not None else None
        if not (doc and doc.get("complete") and doc.get("layout") == LAYOUT):
            return None
        if not _usable_shards(doc.get("of")):
            return None
        return doc

    def _merge_index(
        self,
        year: str,
        entries: dict[str, dict[str, Any]],
        *,
        shards: int,
        complete: bool = False,
        replace: bool = False,
    ) -> None:
        """Merge entries into the year's ``shards`` shards; ``complete``: every shard, marked
        complete, laid out anew for ``shards`` (what a rebuild does); ``replace``: the
        shards hold exactly ``entries`` afterwards. A writer (not ``complete``) whose shard
        names another N, or is gone, raises :class:`_Resharded`."""
        by_shard: dict[int, dict[str, dict[str, Any]]] = {}
        for tile, entry in entries.items():
            by_shard.setdefault(index_shard(tile, shards), {})[tile] = entry
        if complete:
            by_shard = {i: by_shard.get(i, {}) for i in range(shards)}
        for shard, part in sorted(by_shard.items()):

            def enter(
                doc: dict[str, Any] | None, part: dict[str, Any] = part, shard: int = shard
            ) -> dict[str, Any]:
                if not complete and (
                    doc is None or doc.get("of") != shards or doc.get("layout") != LAYOUT
                ):
                    raise _Resharded  # gone (a smaller N), or laid out for another N
                kept = {} if replace else dict((doc or {}).get("partitions", {}))
                if (
                    complete
                    and doc is not None
                    and (doc.get("of") != shards or doc.get("layout") != LAYOUT)
                ):
                    # laid out for another N: keep only what this shard holds under ours
                    kept = {t: e for t, e in kept.items() if index_shard(t, shards) == shard}
                parts = kept
                for tile, entry in part.items():
                    old = parts.get(tile)
                    if old is None or str(old.get("committed_at", "")) <= entry["committed_at"]:
                        parts[tile] = entry
                done = complete or bool((doc or {}).get("complete"))
                return self._shard_doc(year, shard, parts, done, shards)

            self.documents.update(self.index_path(year, shard), enter, damaged=True)
        if complete:
            self._drop_shards_past(year, shards)

    def _drop_shards_past(self, year: str, shards: int) -> None:
        """Shard documents of a larger N than the year's now: removed (readers stop at N)."""
        base = self.index_path(year)
        for name in self._ls(base):
            stem = name.removesuffix(".json")
            if stem.isdigit() and int(stem) >= shards:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(f"{base}/{name}")

    def _shard_doc(
        self, year: str, shard: int, parts: dict[str, Any], complete: bool, shards: int
    ) -> dict[str, Any]:
        return {
            "asset": self.asset,
            "year": year,
            "shard": shard,
            "of": shards,
            "layout": LAYOUT,
            "complete": complete,
            "partitions": parts,
        }

    def index(self, year: str | int) -> LazyIndex | None:
        """Every indexed partition of ``year`` (tile -> its current version, with the
        pointer's summary and integrity verdict), from shard 00 and then one batch of
        reads for the others; None when the year has no complete index (a shard missing,
        damaged, never completed by a rebuild, or of another N: :meth:`rebuild_index`
        makes one)."""
        head = self._shard_head(year)
        if head is None:
            return None
        got = self.index_shards(year, int(head["of"]), set(range(1, int(head["of"]))))
        if got is None or not isinstance(head.get("partitions"), dict):
            return None
        return LazyIndex(self, str(year), {**head["partitions"], **got})

    def index_shards(self, year: str | int, shards: int, which: set[int]) -> dict[str, Any] | None:
        """The entries of shards ``which`` of the year's ``shards`` (one batch of reads);
        None when one of them is missing, damaged, incomplete or of another N."""
        paths = [self.index_path(year, i) for i in sorted(which)]
        got = self._read_many(paths)
        out: dict[str, Any] = {}
        for path in paths:
            raw = got.get(path)
            doc = _loads(raw, damaged=True) if isinstance(raw, bytes | bytearray) else None
            if doc is None or not doc.get("complete") or doc.get("of") != shards:
                return None  # only a cache: rebuilt from the pointers
            if doc.get("layout") != LAYOUT:
                return None
            parts = doc.get("partitions", {})
            if not isinstance(parts, dict):
                return None
            out.update(parts)
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
            expected = self.index_size_hint() if self.index_size_hint is not None else 0
            shards = shards_for(max(len(entries), expected))
            self._merge_index(y, entries, shards=shards, complete=True, replace=replace)
            _INDEXED_YEARS[(self.url, y)] = shards
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
        self._indexes: dict[str, Mapping[str, Version] | None] = {}
        self._years: dict[str, _YearShards] = {}  # years read shard by shard
        # pointers: years read a block of tiles at a time (tile -> version, tiles asked)
        self._pointer_years: dict[str, tuple[dict[str, Version], set[str]]] = {}
        self._listings: dict[str, set[str]] = {}
        self._index_ids: dict[str, dict[str, str]] = {}  # year -> tile -> indexed version
        self._broken: set[tuple[str, str]] = set()
        self.reads = {"index": 0, "listing": 0, "pointer": 0, "repaired": 0, "shard": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def _listed(self, year: str) -> set[str]:
        self.reads["listing"] += 1
        return {n for n in self.store._ls(f"{self.store.store_path}/{year}") if _SAFE.match(n)}

    def index(self, year: str | int) -> Mapping[str, Version] | None:
        """The year's partitions (tile -> current version), found once: the index, less
        what the listing no longer has; or, with ``pointers``, the pointers themselves.
        A year written before indexes existed (or whose index is damaged) is indexed
        from its pointers first, once. None when the year has no partition at all."""
        y = str(year)
        if y in self._indexes:
            return self._indexes[y]
        part = self._years.get(y)
        listed = part.listed if part is not None else self._listed(y)
        idx: Mapping[str, Version] | None
        if not listed:
            idx = None  # the year has no partition: nothing to read
        elif self.pointers:
            idx = self._from_pointers(y, listed)
        else:
            self.reads["index"] += 1
            lazy = self.store.index(y)
            if lazy is None:
                self.store.rebuild_index(y, replace=False)  # merged: safe beside writers
                lazy = self.store.index(y)
            idx = lazy.only(listed) if lazy is not None else None
        self._indexes[y] = idx
        return idx

    def load(self, year: str | int, tiles: Collection[str]) -> None:
        """Read, in one batch, what :meth:`current` needs for ``tiles`` of ``year``: the
        index shards that hold them (a tick judging a window of a continent reads its
        window's shards, not the year's whole index); with ``pointers``, their pointers
        (the audit goes through a year a block of tiles at a time, :meth:`forget` between,
        holding one block's pointers, not the year's)."""
        y = str(year)
        if y in self._indexes:
            return
        if self.pointers:
            got = self._pointer_years.setdefault(y, ({}, set()))
            listed = self._listed_once(y)
            want = [t for t in tiles if t not in got[1]]
            got[0].update(self._from_pointers(y, [t for t in want if t in listed]))
            got[1].update(want)
            return
        part = self._year(y)
        if part is not None:
            self._load(y, part, {index_shard(t, part.shards) for t in tiles})

    def _listed_once(self, y: str) -> set[str]:
        if y not in self._listings:
            self._listings[y] = self._listed(y)
        return self._listings[y]

    def listed(self) -> list[PartitionRef]:
        """Every partition directory of every year (one listing each, kept): what there is
        to judge, without reading a pointer or an index."""
        return [
            PartitionRef(self.store.asset, y, t)
            for y in self.store.years()
            for t in sorted(self._listed_once(y))
        ]

    def release(self, year: str | int) -> None:
        """Drop the pointers and shards read for ``year`` (its listing is kept): between
        the blocks of tiles :meth:`load` reads one after another."""
        self._pointer_years.pop(str(year), None)
        self._years.pop(str(year), None)

    def _year(self, y: str) -> _YearShards | None:
        """The year read shard by shard (its listing and shard 00); None where the whole
        index is read instead (no partition, no usable index: :meth:`index` says)."""
        if y not in self._years:
            listed = self._listed(y)
            head = self.store._shard_head(y) if listed else None
            if head is None or not isinstance(head.get("partitions"), dict):
                self._years[y] = _YearShards(listed, 0)
                self.index(y)  # no partition, or rebuilt and read whole
                return None
            self.reads["shard"] += 1
            self._years[y] = _YearShards(listed, int(head["of"]), {0}, dict(head["partitions"]))
        part = self._years[y]
        return part if part.shards else None

    def _load(self, y: str, part: _YearShards, which: set[int]) -> bool:
        which = which - part.loaded
        if not which:
            return True
        got = self.store.index_shards(y, part.shards, which)
        if got is None:  # a shard missing, damaged or resized: the whole index, rebuilt
            self.index(y)
            return False
        self.reads["shard"] += len(which)
        part.loaded |= which
        part.entries.update(got)
        return True

    def _entry(self, year: str | int, tile: str) -> Version | None:
        """The index's version of one partition, reading only the shard that holds it."""
        y = str(year)
        if y not in self._indexes and (part := self._year(y)) is not None:
            if not self._load(y, part, {index_shard(tile, part.shards)}):
                idx = self._indexes.get(y)
                return idx.get(tile) if idx is not None else None
            if tile not in part.listed or tile not in part.entries:
                return None
            got = part.made.get(tile)
            if got is None:
                got = part.made[tile] = self.store._version(y, tile, part.entries[tile])
            return got
        idx = self.index(y)
        return idx.get(tile) if idx is not None else None

    def forget(self, year: str | int) -> None:
        """Drop what was read of ``year`` (read again if asked again): a reader going
        through the years one by one keeps one year's partitions at a time."""
        held_per_year = (
            self._indexes,
            self._years,
            self._pointer_years,
            self._listings,
            self._index_ids,
        )
        for held in held_per_year:
            held.pop(str(year), None)

    def _from_pointers(self, year: str, listed: Collection[str]) -> dict[str, Version]:
        docs, broken = self.store._read_pointers(year, list(listed))
        self.reads["pointer"] += len(listed)
        self._broken.update((year, t) for t in broken)  # reported by :meth:`current`
        indexed = self._indexed_versions(year, list(docs))
        out = {t: self.store._version(year, t, d) for t, d in docs.items()}
        behind = {t: d for t, d in docs.items() if indexed.get(t) != out[t].id}
        if behind:
            self.reads["repaired"] += len(behind)
            self.store._index_enter(year, behind)
            self._index_ids.setdefault(year, {}).update((t, out[t].id) for t in behind)
        return out

    def _indexed_versions(self, year: str, tiles: list[str]) -> dict[str, str]:
        """tile -> the version the index names; {} without a usable index (every pointer
        is then entered again). The year's index is read once and only its version ids
        kept (tens of bytes a partition), whatever block of tiles is asked next."""
        if year not in self._index_ids:
            idx = self.store.index(year)
            self._index_ids[year] = (
                {t: str(e.get("version")) for t, e in idx.entries.items()} if idx else {}
            )
        ids = self._index_ids[year]
        return {t: ids[t] for t in tiles if t in ids}

    def current(self, year: str | int, tile: str) -> Version | None:
        key = (str(year), str(tile))
        if self.pointers:
            if key[0] not in self._indexes and key[0] in self._pointer_years:
                self.load(year, [key[1]])  # a block's pointers: this one's alone if not among them
                idx: Mapping[str, Version] | None = self._pointer_years[key[0]][0]
            else:
                idx = self.index(year)
            if key in self._broken:
                return self.store.current(year, tile)  # raises what is wrong with its pointer
            return idx.get(str(tile)) if idx is not None else None
        entry = self._entry(year, str(tile))
        if entry is None and not self._has(str(year)):
            return None  # the year has no partition at all
        if key not in self.fresh:
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

    def _has(self, y: str) -> bool:
        """Whether the year has a partition at all (its listing is not empty)."""
        part = self._years.get(y)
        if part is not None:
            return bool(part.listed)
        return self.index(y) is not None

    def exists(self, year: str | int, tile: str) -> bool:
        return self.current(year, tile) is not None

    def partitions(self) -> list[PartitionRef]:
        """Every indexed partition (one listing of the years, one read per year)."""
        out: list[PartitionRef] = []
        for y in self.store.years():
            out += [PartitionRef(self.store.asset, y, t) for t in sorted(self.index(y) or {})]
        return out


# How shards are keyed (every shard says it): a tile by its 8 x 8 block of the grid, so
# that a block's tiles share a shard and a window of whole blocks reads few shards. An
# index of another layout (written before) is no index: rebuilt from the pointers.
LAYOUT = "block8"
_BLOCK8 = re.compile(r"^(\d+_\d+m)_E(\d+)_N(\d+)$")


def shard_key(tile: str) -> str:
    """What a partition's shard is chosen by: a tile id's 8 x 8 block; any other name
    (a region's) itself."""
    m = _BLOCK8.match(tile)
    return f"{m[1]}_8x8_E{int(m[2]) // 8:04d}_N{int(m[3]) // 8:04d}" if m else tile


def index_shard(tile: str, shards: int = INDEX_SHARDS) -> int:
    """Which of a year's ``shards`` index documents holds ``tile`` (N a power of two:
    a tile's shard under 2N is its shard under N or that plus N); every tile of an
    8 x 8 block in the same one."""
    return int(hashlib.sha256(shard_key(tile).encode()).hexdigest()[:8], 16) % shards


def _usable_shards(value: Any) -> bool:
    return (
        isinstance(value, int)
        and INDEX_SHARDS <= value <= MAX_INDEX_SHARDS
        and value & (value - 1) == 0
    )


_INDEX_FIELDS = ("version", "manifest_sha256", "committed_at", "run_id", "summary", "integrity")


def _index_entry(pointer: dict[str, Any]) -> dict[str, Any]:
    """A pointer as the index keeps it: everything but its history."""
    return {k: pointer[k] for k in _INDEX_FIELDS if k in pointer}


@dataclass
class _YearShards:
    """A year an :class:`IndexedReader` reads shard by shard: its listing, its number of
    shards (0: read whole instead), the shards read, their entries, the versions made."""

    listed: set[str]
    shards: int
    loaded: set[int] = field(default_factory=set)
    entries: dict[str, Any] = field(default_factory=dict)
    made: dict[str, Version] = field(default_factory=dict)
