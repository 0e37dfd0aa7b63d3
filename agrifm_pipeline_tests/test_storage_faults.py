"""Faults after a commit, damaged documents and read-only stores lose nothing.

Each case first reproduced a loss or a blocked store on the code before it:

* a failure after the pointer write (here: the year's index cannot be written)
  removed the version the pointer had just been moved to;
* the sweep that every writer runs removed a version that had left the pointer's
  32-entry history while a current downstream version still read it;
* one pointer that is not JSON stopped ``verify``, ``gc`` and the catalog for the
  whole store, and failed every repair run;
* ``verify``, ``gc`` and ``catalog`` crashed on a read-only store, ``verify`` with the
  exit code of "corruption found".

Every case runs on every kind of store (``store_kind``: local with POSIX locks, local
without locks as on a file system that has none, fsspec memory, S3 on moto) unless it
is about one kind.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from agrifm_pipeline import storage as storage_mod
from agrifm_pipeline.cli import main as cli_main
from agrifm_pipeline.storage import (
    HISTORY_LEN,
    MANIFEST,
    POINTER,
    DamagedPointerError,
    FileStore,
    IndexLagError,
    PartitionStore,
    StorageError,
    StorageWriteError,
    ZarrStore,
    collect_garbage,
    verify_stores,
)
from agrifm_pipeline_tests.object_store import REPO_ROOT, StoreKind

TILE = "32631_8960m_E0064_N0627"
OTHER = "32631_8960m_E0065_N0627"
DAMAGED = b'{"version": "v2026'  # a torn pointer write, as the probe left it


def _grid(value: float, n: int = 8) -> xr.Dataset:
    return xr.DataArray(
        np.full((4, n, n), value, dtype="float32"), dims=("band", "y", "x"), name="embedding"
    ).to_dataset()


def _value(store: ZarrStore, version: str | None = None) -> float:
    return float(store.open(2019, TILE, version=version, verify=True)["embedding"].values[0, 0, 0])


def _put_raw(store: PartitionStore, path: str, data: bytes) -> None:
    if store.local:
        Path(path).write_bytes(data)
    else:
        store.fs.pipe_file(path, data)


def _raw(store: PartitionStore, path: str) -> bytes | None:
    return store._read(path)


def _assert_pointer_names_a_whole_version(store: ZarrStore) -> None:
    v = store.current(2019, TILE)
    assert v is not None
    assert store._exists(f"{v.path}/{MANIFEST}"), f"the pointer names {v.id}, which is gone"
    assert store.verify(v) == []


# -- 1. a failure after the pointer write ----------------------------------------------------
def test_failure_after_the_pointer_write_keeps_both_versions(
    store_kind: StoreKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = store_kind.zarr()
    first = store.write(2019, TILE, _grid(1.0), {"n": 1})
    real = storage_mod.Documents.update

    def no_space_for_the_index(self, path, *a, **k):  # type: ignore[no-untyped-def]
        if f"/{storage_mod.INDEX}/" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(self, path, *a, **k)

    monkeypatch.setattr(storage_mod.Documents, "update", no_space_for_the_index)
    with pytest.raises(IndexLagError, match=r"is committed .*No space left on device") as err:
        store.write(2019, TILE, _grid(2.0), {"n": 2})
    monkeypatch.undo()
    # The new version is current and whole; the previous one is still readable.
    _assert_pointer_names_a_whole_version(store)
    assert store.current(2019, TILE).id == err.value.version != first.id
    assert _value(store) == 2.0 and _value(store, first.id) == 1.0
    assert store.exists(2019, TILE) and store.lineage(2019, TILE) == {"n": 2}
    # The index lagged one commit; verify rebuilds it from the pointers.
    assert store.index(2019)[TILE].id == first.id
    report = verify_stores([store])
    assert report.ok and report.indexed == 1
    assert store.index(2019)[TILE].id == err.value.version


def test_failure_before_the_pointer_write_still_cleans_up(
    store_kind: StoreKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the line: a write that fails before its commit leaves the
    previous version current and nothing of its own behind."""
    store = store_kind.zarr()
    first = store.write(2019, TILE, _grid(1.0), {"n": 1})

    def pointer_write_fails(self, path, doc, token):  # type: ignore[no-untyped-def]
        raise OSError(errno.EIO, "Input/output error", path)

    monkeypatch.setattr(PartitionStore, "_write_pointer", pointer_write_fails)
    with pytest.raises(StorageWriteError, match=rf"grid 2019/{TILE}: writing version"):
        store.write(2019, TILE, _grid(2.0), {"n": 2})
    monkeypatch.undo()
    assert store.current(2019, TILE).id == first.id
    assert store.versions(2019, TILE) == [first.id]


def test_a_full_disk_names_the_partition_and_the_path(
    store_kind: StoreKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, files = store_kind.zarr(), store_kind.files()
    first = store.write(2019, TILE, _grid(1.0), {"n": 1})
    files.put(2019, TILE, "chips.parquet", b"PAR1 one", {"n": 1})

    def full(self, objects):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PartitionStore, "_put_many", full)
    for write in (
        lambda: store.write(2019, TILE, _grid(2.0), {"n": 2}),
        lambda: files.put(2019, TILE, "chips.parquet", b"PAR1 two", {"n": 2}),
    ):
        with pytest.raises(StorageWriteError) as err:
            write()
        text = str(err.value)
        assert f"2019/{TILE}" in text and "No space left on device" in text, text
        assert "free space" in text and "previous version stays current" in text
        assert store.url.rsplit("/", 1)[0] in text  # the store's path
        assert err.value.errno == errno.ENOSPC and isinstance(err.value, OSError)
    monkeypatch.undo()
    assert store.current(2019, TILE).id == first.id and _value(store) == 1.0
    assert files.read(2019, TILE, "chips.parquet") == b"PAR1 one"


# -- 2. the sweep and versions a current downstream version reads ------------------------------
def test_sweep_keeps_an_old_version_a_current_downstream_version_reads(
    store_kind: StoreKind,
) -> None:
    # Grace 0: every version id is older than the grace period, as after a day.
    grids = store_kind.zarr("grid", orphan_grace_s=0)
    chips = store_kind.files("chips", orphan_grace_s=0)
    v0 = grids.write(2019, TILE, _grid(0.0), {"n": 0})
    lineage = {"year": 2019, "tile": TILE, "inputs": {"grid": {"version": v0.id}}}
    chips.put(2019, TILE, "chips.parquet", b"PAR1 from v0", lineage)
    for i in range(HISTORY_LEN + 2):  # v0 leaves the pointer's history
        grids.write(2019, TILE, _grid(float(i + 1)), {"n": i + 1})
    history = [h["version"] for h in grids.pointer(2019, TILE)["history"]]
    assert v0.id not in history and len(history) == HISTORY_LEN
    assert v0.id in grids.versions(2019, TILE), "a writer's sweep removed v0"
    assert verify_stores([grids, chips]).ok
    assert v0.id in grids.versions(2019, TILE), "verify's sweep removed v0"
    assert _value(grids, v0.id) == 0.0
    # gc keeps it for the chip table, and removes it once nothing reads it.
    report = collect_garbage([grids, chips], keep=0, min_age_s=0)
    assert v0.id in grids.versions(2019, TILE) and report.kept_referenced == 1
    chips.put(2019, TILE, "chips.parquet", b"PAR1 newer", {"inputs": {}})
    collect_garbage([grids, chips], keep=0, min_age_s=0)
    assert grids.versions(2019, TILE) == [grids.current(2019, TILE).id]


def test_sweep_still_removes_what_was_never_committed(tmp_path: Path) -> None:
    """Orphans inside the history's window (a writer that died before its commit, with
    or without its manifest) still go at the next write."""
    store = ZarrStore(tmp_path, "grid", orphan_grace_s=0)
    store.write(2019, TILE, _grid(1.0), {})
    dead = []
    for with_manifest in (False, True):
        vid, path = store.begin(2019, TILE)
        Path(path).mkdir(parents=True)
        (Path(path) / "partial").write_bytes(b"x")
        if with_manifest:
            (Path(path) / MANIFEST).write_bytes(b"{}")
        dead.append(vid)
    store.write(2019, TILE, _grid(2.0), {})
    store.write(2019, TILE, _grid(3.0), {})
    assert not set(dead) & set(store.versions(2019, TILE))


# -- 3. a damaged pointer ----------------------------------------------------------------------
def _damage(store: PartitionStore, year: int, tile: str) -> None:
    _put_raw(store, store.pointer_path(year, tile), DAMAGED)


def test_a_damaged_pointer_blocks_only_its_own_partition(store_kind: StoreKind) -> None:
    store, files = store_kind.zarr(), store_kind.files()
    first = store.write(2019, TILE, _grid(1.0), {"n": 1})
    store.write(2019, OTHER, _grid(5.0), {"n": 5})
    files.put(2019, TILE, "chips.parquet", b"PAR1", {"inputs": {"grid": {"version": first.id}}})
    _damage(store, 2019, TILE)
    with pytest.raises(DamagedPointerError, match=r"not a pointer document .*verify"):
        store.current(2019, TILE)
    # gc leaves the partition whole and goes on with the others.
    report = collect_garbage([store, files], keep=0, min_age_s=0)
    assert report.damaged == [f"grid 2019/{TILE}"] and "damaged pointer" in str(report)
    assert first.id in store.versions(2019, TILE)
    # verify: one problem for that partition, the others verified; the pointer set aside.
    seen: list[str] = []
    report = verify_stores([store, files], on_problem=lambda p: seen.append(str(p)))
    assert [(p.tile, p.object, p.what) for p in report.problems] == [(TILE, POINTER, "damaged")]
    assert report.checked == 2 and len(seen) == 1
    (aside,) = report.set_aside
    assert aside.rsplit("/", 1)[-1].startswith(f"{POINTER}.damaged-")
    assert _raw(store, aside.split("://", 1)[-1] if not store.local else aside) == DAMAGED
    # The partition now reads as never committed; its versions are all still there.
    assert store.current(2019, TILE) is None and first.id in store.versions(2019, TILE)
    assert store.index(2019) is not None and TILE not in store.index(2019)
    # A second verify finds nothing left to do; a write makes the partition again.
    assert verify_stores([store, files]).ok
    v = store.write(2019, TILE, _grid(2.0), {"n": 2})
    assert store.current(2019, TILE).id == v.id and _value(store) == 2.0
    assert first.id in store.versions(2019, TILE)  # older than the new history: gc's to judge


def test_a_write_over_a_damaged_pointer_keeps_its_bytes(store_kind: StoreKind) -> None:
    """The repair run the stale sensor requests needs no `verify` first."""
    store = store_kind.zarr(orphan_grace_s=0)
    first = store.write(2019, TILE, _grid(1.0), {"n": 1})
    _damage(store, 2019, TILE)
    v = store.write(2019, TILE, _grid(2.0), {"n": 2})
    assert store.current(2019, TILE).id == v.id and _value(store) == 2.0
    kept = [n for n in store._ls(store.partition_path(2019, TILE)) if ".damaged-" in n]
    assert len(kept) == 1
    assert _raw(store, f"{store.partition_path(2019, TILE)}/{kept[0]}") == DAMAGED
    assert _value(store, first.id) == 1.0  # not swept: the pointer that knew it is lost


@pytest.mark.parametrize("doc", [b"", b"[]", b"{}", b'{"version": "../../x"}', b"\xff\xfe"])
def test_every_kind_of_damaged_pointer_is_named(tmp_path: Path, doc: bytes) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILE, _grid(1.0), {})
    _put_raw(store, store.pointer_path(2019, TILE), doc)
    with pytest.raises(DamagedPointerError, match=rf"grid 2019/{TILE}"):
        store.current(2019, TILE)
    assert [p.what for p in verify_stores([store]).problems] == ["damaged"]


def test_verify_command_on_a_damaged_pointer(tmp_path: Path, capsys) -> None:
    from agrifm_pipeline.defs.resources import ZarrStorage

    storage = ZarrStorage(root=str(tmp_path / "store"))
    grids = storage.store("agrifm_embedding_grid")
    grids.write(2019, TILE, _grid(1.0), {})
    grids.write(2019, OTHER, _grid(1.0), {})
    _damage(grids, 2019, TILE)
    assert cli_main(["verify", "--store", storage.root]) == 1
    out, err = capsys.readouterr()
    assert f"DAMAGED agrifm_embedding_grid 2019/{TILE}" in out and "set aside to" in out
    assert "1 version(s) verified, 1 problem(s)" in err
    assert cli_main(["verify", "--store", storage.root]) == 0
    assert cli_main(["gc", "--store", storage.root, "--min-age-hours", "0"]) == 0
    assert cli_main(["catalog", "--store", storage.root]) == 0


# -- 5. read-only stores -----------------------------------------------------------------------
# Root writes whatever the modes say: as root, the command runs without the capabilities
# that override file permissions (as on a read-only mount, the write bits then decide).
_NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def _read_only_cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI over a store whose write bits are removed, run by a user they bind."""
    cmd = [sys.executable, "-m", "agrifm_pipeline.cli", *args, "--store", str(store)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env["DAGSTER_HOME"] = str(store.parent / "dagster-home")
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    if os.geteuid() == 0:
        cmd = [*_NO_OVERRIDE, *cmd]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(store)], check=True)


def test_verify_gc_and_catalog_on_a_read_only_store(tmp_path: Path) -> None:
    from agrifm_pipeline.defs.resources import ZarrStorage

    root = tmp_path / "store"
    (tmp_path / "dagster-home").mkdir()
    storage = ZarrStorage(root=str(root))
    grids = storage.store("agrifm_embedding_grid")
    grids.write(2019, TILE, _grid(1.0), {})
    v = grids.write(2019, OTHER, _grid(2.0), {})
    before = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))

    ok = _read_only_cli(root, "verify", "--no-sweep")
    assert ok.returncode == 0, ok.stderr
    assert "2 version(s) verified, 0 problem(s)" in ok.stderr and "read-only" in ok.stderr
    assert "Traceback" not in ok.stderr
    ok = _read_only_cli(root, "verify")  # sweeping is skipped, not attempted
    assert ok.returncode == 0, ok.stderr

    chunk = Path(v.path) / "embedding" / "0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:-4] + b"\0\0\0\0")
    bad = _read_only_cli(root, "verify")
    assert bad.returncode == 1, bad.stderr  # found something: not "could not run"
    assert f"CORRUPT agrifm_embedding_grid 2019/{OTHER}" in bad.stdout

    dry = _read_only_cli(root, "gc", "--dry-run", "--min-age-hours", "0")
    assert dry.returncode == 0, dry.stderr
    for cmd in (["gc", "--min-age-hours", "0"], ["catalog"]):
        out = _read_only_cli(root, *cmd)
        assert out.returncode == 2, out.stderr  # could not run, said in one line
        assert "cannot be written here" in out.stderr and "Traceback" not in out.stderr
    after = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert after == before  # nothing written, nothing removed


# -- 6. arguments and roots that name nothing -------------------------------------------------
def test_verify_names_an_asset_that_is_not_stored(tmp_path: Path, capsys) -> None:
    store = str(tmp_path / "store")
    assert cli_main(["verify", "--store", store, "--asset", "../x"]) == 2
    err = capsys.readouterr().err
    assert "--asset '../x' is not a stored asset; use one of s2_frame_stack" in err
    assert cli_main(["verify", "--store", store, "--tile", "nope"]) == 2
    assert "no partition matches" in capsys.readouterr().err


def test_an_unreachable_root_is_named_without_a_traceback(capsys) -> None:
    with pytest.raises(StorageError, match=r"storage root 'ftp://nohost\.invalid' cannot be"):
        ZarrStore("ftp://nohost.invalid", "grid")
    assert cli_main(["verify", "--store", "ftp://nohost.invalid"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: StorageError: storage root 'ftp://nohost.invalid'"), err


def test_file_partitions_keep_their_versions_after_a_late_failure(
    store_kind: StoreKind, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = store_kind.files()
    files.put(2019, TILE, "chips.parquet", b"PAR1 one", {})
    monkeypatch.setattr(
        PartitionStore,
        "_index_enter",
        lambda self, year, docs: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")),
    )
    with pytest.raises(IndexLagError):
        files.put(2019, TILE, "chips.parquet", b"PAR1 two", {})
    monkeypatch.undo()
    assert files.read(2019, TILE, "chips.parquet") == b"PAR1 two"
    assert isinstance(files, FileStore)
