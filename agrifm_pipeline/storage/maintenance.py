"""Store-wide maintenance across assets: :func:`verify_stores` (``agrifm-pipeline
verify``) and :func:`collect_garbage` (``agrifm-pipeline gc``), the only code that
removes committed versions."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agrifm_pipeline.storage.errors import DamagedPointerError, ReadOnlyStoreError, StorageError
from agrifm_pipeline.storage.index import PartitionStore
from agrifm_pipeline.storage.versions import MANIFEST, POINTER, Problem, version_age_s


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
    writable = not stores or stores[0].writable()  # one root: one probe
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
