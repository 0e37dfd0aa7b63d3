"""Partitions stay whole on every store: immutable versions, one-write commits, checksums.

Each guarantee runs on every kind of store (``store_kind``): a local directory with
commits serialised by a POSIX lock, the same with the lock forced off, fsspec
memory, and S3 through s3fs against a moto server on 127.0.0.1. Kill tests run
the writer in its own process and SIGKILL it at a phase (memory stores live in one
process, so they are not killed).
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

from agrifm_pipeline.storage import (
    MANIFEST,
    CorruptionError,
    StorageError,
    ZarrStore,
    check_name,
    collect_garbage,
    gdal_path,
    write_file_atomic,
)
from agrifm_pipeline_tests.object_store import StoreKind, child_script, run_until

TILE = "32631_8960m_E0064_N0627"


def _grid(value: float, n: int = 8) -> xr.Dataset:
    da = xr.DataArray(
        np.full((4, n, n), value, dtype="float32"),
        dims=("band", "y", "x"),
        coords={"band": np.arange(4), "y": 100.0 - np.arange(n), "x": np.arange(n) + 0.5},
        name="embedding",
    )
    return da.rio.write_crs("EPSG:32631").to_dataset()


def _snapshot(store: ZarrStore) -> tuple[str, dict[str, bytes]]:
    v = store.resolve(2019, TILE)
    return v.id, store.read_objects(v)


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


# -- versions and commits ---------------------------------------------------------------------
def test_versions_are_immutable_and_readers_keep_theirs(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    v1 = store.write(2019, TILE, _grid(1.0), {"version": 1})
    lazy = store.open(2019, TILE)  # opened before the next commit, read after it
    v2 = store.write(2019, TILE, _grid(2.0), {"version": 2})
    assert v1.id != v2.id and store.current(2019, TILE) == v2
    assert store.lineage(2019, TILE) == {"version": 2}
    assert store.lineage(2019, TILE, v1.id) == {"version": 1}
    np.testing.assert_array_equal(lazy["embedding"].values, 1.0)  # still its own version
    np.testing.assert_array_equal(store.open(2019, TILE)["embedding"].values, 2.0)
    ds = store.open(2019, TILE, version=v1.id, verify=True)
    assert str(ds.rio.crs) == "EPSG:32631" and ds.encoding["agrifm_version"] == v1.id
    assert [p.key for p in store.partitions()] == [f"2019/{TILE}"]
    assert store.versions(2019, TILE) == [v1.id, v2.id]
    # The pointer remembers what was committed.
    assert [h["version"] for h in store.pointer(2019, TILE)["history"]] == [v1.id]
    assert store.verify(v2) == [] and store.verify(v1) == []


def test_manifest_hashes_every_object(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    v = store.write(2019, TILE, _grid(1.0), {"version": 1})
    manifest = store.manifest(v)
    names = set(manifest["objects"])
    assert {".zattrs", ".zgroup", ".zmetadata", "embedding/.zarray", "embedding/0.0.0"} <= names
    assert manifest["lineage"] == {"version": 1}
    # Exactly the objects of the version, each with its size.
    stored = {n for n in store._ls(v.path) if n != MANIFEST}
    assert {n.split("/")[0] for n in names} == stored
    objects = store.read_objects(v)
    assert all(len(objects[n]) == manifest["objects"][n]["size"] for n in names)


def test_large_dataset_hashed_while_streaming(store_kind: StoreKind, monkeypatch) -> None:
    from agrifm_pipeline import storage

    monkeypatch.setattr(storage, "ENCODE_IN_MEMORY_BYTES", 1024)  # force the chunked path
    store = store_kind.zarr()
    ds = _grid(3.0, n=64)
    ds["embedding"].encoding["chunks"] = (4, 16, 16)
    v = store.write(2019, TILE, ds, {"version": 1})
    assert len([n for n in store.manifest(v)["objects"] if n.startswith("embedding/")]) == 16 + 2
    assert store.verify(v) == []
    np.testing.assert_array_equal(store.open(2019, TILE, verify=True)["embedding"].values, 3.0)


def test_failing_write_keeps_previous_and_leaves_nothing(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    bad = _grid(2.0)
    bad["embedding"].attrs["unserialisable"] = object()
    with pytest.raises(Exception):  # noqa: B017 - whatever xarray raises
        store.write(2019, TILE, bad, {"version": 2})
    assert store.lineage(2019, TILE) == {"version": 1}
    assert len(store.versions(2019, TILE)) == 1


# -- kill -9 at every phase -----------------------------------------------------------------
WRITE_V2 = """
import numpy as np, xarray as xr
store = zarr()
{patch}
store.write(2019, {tile!r}, xr.DataArray(np.full((4, 8, 8), 2.0, "float32"),
            dims=("band", "y", "x"), name="embedding").to_dataset(), {{"version": 2}})
print("done", flush=True)
"""

PAUSE_WRITING = """
real = storage.PartitionStore._put_many
def half(self, objects):
    if any(k.endswith("embedding/0.0.0") for k in objects):
        items = sorted(objects.items())
        real(self, dict(items[: len(items) // 2]))
        print("paused", flush=True); time.sleep(600)
    real(self, objects)
storage.PartitionStore._put_many = half
"""
PAUSE_BEFORE_POINTER = """
def stalled(self, *a, **k):
    print("paused", flush=True); time.sleep(600)
storage.PartitionStore._write_pointer = stalled  # after the version, before its pointer
"""
PAUSE_IN_POINTER_LOCAL = """
real_replace = storage.fs.os.replace
def stalled(src, dst):
    if str(dst).endswith(storage.POINTER):
        print("paused", flush=True); time.sleep(600)
    real_replace(src, dst)
storage.fs.os.replace = stalled
"""
PAUSE_IN_POINTER_REMOTE = """
fs = store.fs  # fsspec mirrors its sync methods onto each instance
real_pipe = fs.pipe_file
def stalled(path, data, *a, **k):
    if str(path).endswith(storage.POINTER):
        print("paused", flush=True); time.sleep(600)
    return real_pipe(path, data, *a, **k)
fs.pipe_file = stalled
"""


@pytest.mark.parametrize("phase", ["writing", "before-pointer", "in-pointer"])
def test_kill_at_every_commit_phase(process_store_kind: StoreKind, phase: str) -> None:
    store = process_store_kind.zarr(orphan_grace_s=0)
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    before = _snapshot(store)
    patch = {
        "writing": PAUSE_WRITING,
        "before-pointer": PAUSE_BEFORE_POINTER,
        "in-pointer": PAUSE_IN_POINTER_LOCAL if store.local else PAUSE_IN_POINTER_REMOTE,
    }[phase]
    cmd = child_script(process_store_kind, WRITE_V2.format(patch=patch, tile=TILE))
    _kill(run_until(cmd, "paused"))
    # The previous version is current and whole, byte for byte.
    assert _snapshot(store) == before
    assert store.lineage(2019, TILE) == {"version": 1}
    np.testing.assert_array_equal(store.open(2019, TILE)["embedding"].values, 1.0)
    assert len(store.versions(2019, TILE)) == 2  # the dead writer's version, never current
    # The next writer sweeps what the dead one left (grace 0 here) and commits.
    v3 = store.write(2019, TILE, _grid(3.0), {"version": 3})
    left = set(store.versions(2019, TILE)) - {before[0], v3.id}
    if phase != "writing" and store.local and not store.commit_lock:
        # Without commit locks the history may miss versions, so a complete uncommitted
        # version waits for garbage collection.
        assert len(left) == 1
        collect_garbage([store], keep=1, min_age_s=0)
        left = set(store.versions(2019, TILE)) - {before[0], v3.id}
    assert left == set()
    leftovers = [n for n in store._ls(store.partition_path(2019, TILE)) if n.startswith(".tmp-")]
    assert leftovers == []
    assert store.verify(v3) == []


def test_memory_store_writer_dying_mid_version(monkeypatch) -> None:
    """A memory store lives in one process: its writer dies (no cleanup runs) at each phase."""
    from agrifm_pipeline import storage

    store = ZarrStore(f"memory://agrifm-{os.getpid()}-dying", "grid", orphan_grace_s=0)
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    before = _snapshot(store)

    class Died(BaseException):
        pass

    monkeypatch.setattr(storage.PartitionStore, "_rm_tree", lambda self, path: None)
    for target in ("_put_many", "_write_pointer"):
        with monkeypatch.context() as m:

            def die(*a, **k):
                raise Died

            m.setattr(storage.PartitionStore, target, die)
            with pytest.raises(Died):
                store.write(2019, TILE, _grid(2.0), {"version": 2})
        assert _snapshot(store) == before
    monkeypatch.undo()
    v3 = store.write(2019, TILE, _grid(3.0), {"version": 3})
    assert set(store.versions(2019, TILE)) == {before[0], v3.id}


def test_kill_during_garbage_collection(process_store_kind: StoreKind) -> None:
    store = process_store_kind.zarr()
    old = store.write(2019, TILE, _grid(1.0), {"version": 1})
    store.write(2019, TILE, _grid(2.0), {"version": 2})
    before = _snapshot(store)
    body = """
store = zarr()
real = storage.PartitionStore._rm_tree
def stalled(self, path):
    print("paused", flush=True); time.sleep(600)
storage.PartitionStore._rm_tree = stalled
storage.collect_garbage([store], keep=0, min_age_s=0)
"""
    _kill(run_until(child_script(process_store_kind, body), "paused"))
    assert _snapshot(store) == before  # the current version is untouched
    assert old.id in store.versions(2019, TILE)  # half-deleted: its manifest went first
    with pytest.raises(StorageError):
        store.version(2019, TILE, old.id)
    report = collect_garbage([store], keep=0, min_age_s=0)
    assert old.id not in store.versions(2019, TILE) and len(report.removed) == 1
    assert _snapshot(store) == before


# -- concurrent writers and readers -----------------------------------------------------------
CHAIN_WRITER = """
import numpy as np, xarray as xr
frames, grids = zarr("frames"), zarr("grid")
setting = int(sys.argv[1])
for i in range({n}):
    fv = frames.write(2019, {tile!r}, xr.DataArray(np.full((2, 4, 4), setting, "uint16"),
                      dims=("t", "y", "x"), name="frames").to_dataset(), {{"setting": setting}})
    up = frames.open(2019, {tile!r}, version=fv.id, verify=True)
    value = float(up["frames"].values.mean())
    grids.write(2019, {tile!r}, xr.DataArray(np.full((4, 4, 4), value, "float32"),
                dims=("band", "y", "x"), name="embedding").to_dataset(),
                {{"setting": setting, "year": 2019, "tile": {tile!r},
                  "inputs": {{"frames": {{"version": fv.id}}}}}})
print("done", flush=True)
"""

READER = """
grids, frames = zarr("grid"), zarr("frames")
bad = reads = 0
seen = set()
while not os.path.exists({stop!r}):  # the test says when the writers are done
    v = grids.current(2019, {tile!r})
    if v is None:
        continue
    seen.add(v.id)
    try:
        ds = grids.open(2019, {tile!r}, version=v.id)
        lin = grids.lineage(2019, {tile!r}, v.id)
        values = set(ds["embedding"].values.ravel().tolist())
        if values != {{float(lin["setting"])}}:
            bad += 1
        up = frames.open(2019, {tile!r}, version=lin["inputs"]["frames"]["version"])
        if set(up["frames"].values.ravel().tolist()) != {{lin["setting"]}}:
            bad += 1
        reads += 1
    except Exception as exc:
        print("error", type(exc).__name__, exc, flush=True)
        bad += 1
print("result", reads, bad, len(seen), flush=True)
"""


def test_concurrent_writers_and_readers(process_store_kind: StoreKind, tmp_path: Path) -> None:
    n = 4 if process_store_kind.name == "s3" else 6
    stop = tmp_path / "writers-done"
    writers = [
        subprocess.Popen(
            [*child_script(process_store_kind, CHAIN_WRITER.format(n=n, tile=TILE)), str(setting)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for setting in (1, 2, 3)
    ]
    readers = [
        subprocess.Popen(
            child_script(process_store_kind, READER.format(stop=str(stop), tile=TILE)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for w in writers:
        out, _ = w.communicate(timeout=300)
        assert w.returncode == 0 and "done" in out
    stop.touch()
    total_reads = versions_seen = 0
    for r in readers:
        out, _ = r.communicate(timeout=300)
        result = [line for line in out.splitlines() if line.startswith("result")]
        assert result, out
        reads, bad, seen = map(int, result[0].split()[1:])
        assert bad == 0, out
        total_reads += reads
        versions_seen = max(versions_seen, seen)
    assert total_reads > 0 and versions_seen > 1  # they read while commits went on
    # The current grid, its lineage and the upstream version it names agree, and that
    # upstream version exists — also after garbage collection.
    frames, grids = process_store_kind.zarr("frames"), process_store_kind.zarr("grid")
    for _ in range(2):
        lin = grids.lineage(2019, TILE)
        np.testing.assert_array_equal(grids.open(2019, TILE)["embedding"].values, lin["setting"])
        up = frames.open(2019, TILE, version=lin["inputs"]["frames"]["version"], verify=True)
        np.testing.assert_array_equal(up["frames"].values, lin["setting"])
        collect_garbage([frames, grids], keep=0, min_age_s=0)
    # Every commit is in the pointer's history where commits are serialised or conditional.
    history = grids.pointer(2019, TILE)["history"]
    if process_store_kind.name != "local-nolock":
        assert len(history) == 3 * n - 1


def test_gc_keeps_what_current_downstream_names(store_kind: StoreKind) -> None:
    frames, grids = store_kind.zarr("frames"), store_kind.zarr("grid")
    named = frames.write(2019, TILE, _grid(1.0), {"n": 1})
    grids.write(2019, TILE, _grid(5.0), {"year": 2019, "tile": TILE,
                                        "inputs": {"frames": {"version": named.id}}})  # fmt: skip
    frames.write(2019, TILE, _grid(2.0), {"n": 2})
    middle = frames.current(2019, TILE)
    newest = frames.write(2019, TILE, _grid(3.0), {"n": 3})
    dry = collect_garbage([frames, grids], keep=0, min_age_s=0, dry_run=True)
    assert [r[3] for r in dry.removed] == [middle.id]
    assert len(frames.versions(2019, TILE)) == 3
    report = collect_garbage([frames, grids], keep=0, min_age_s=0)
    assert frames.versions(2019, TILE) == [named.id, newest.id]
    assert report.kept_referenced == 1
    # Retention: recent versions stay.
    frames.write(2019, TILE, _grid(4.0), {"n": 4})
    assert collect_garbage([frames, grids], keep=0, min_age_s=3600).removed == []


# -- checksums --------------------------------------------------------------------------------
def _flip(store: ZarrStore, v, name: str, how: str) -> None:
    path = f"{v.path}/{name}"
    data = bytearray(store._read(path) or b"")
    if how == "flip":
        for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
            data[i] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    if store.local:
        Path(path).write_bytes(bytes(data))
    else:
        store.fs.pipe_file(path, bytes(data))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_corruption_is_found_and_named(store_kind: StoreKind, how: str) -> None:
    store = store_kind.zarr()
    rng = np.random.default_rng(0)
    ds = _grid(0.0, n=64)
    ds["embedding"].values[:] = rng.normal(size=(4, 64, 64)).astype("float32")
    v = store.write(2019, TILE, ds, {"version": 1})
    _flip(store, v, "embedding/0.0.0", how)
    problems = store.verify(v)
    assert [(p.object, p.what) for p in problems] == [("embedding/0.0.0", "mismatch")]
    assert TILE in str(problems[0]) and v.id in str(problems[0])
    with pytest.raises(CorruptionError, match=rf"grid 2019/{TILE} version {v.id}: embedding/0.0.0"):
        store.open(2019, TILE, verify=True)
    # The failed read left its verdict for the audit and the stale sensor.
    mark = store.integrity(2019, TILE)
    assert mark is not None and mark["version"] == v.id and not mark["ok"]


def test_missing_object_is_named(store_kind: StoreKind) -> None:
    store = store_kind.zarr()
    v = store.write(2019, TILE, _grid(1.0), {"version": 1})
    if store.local:
        os.unlink(f"{v.path}/embedding/.zarray")
    else:
        store.fs.rm_file(f"{v.path}/embedding/.zarray")
    assert [(p.object, p.what) for p in store.verify(v)] == [("embedding/.zarray", "missing")]


# -- names, permissions, GDAL ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a b", "-x", "x" * 129, "é"])
def test_unsafe_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(StorageError, match="cannot be a storage path component"):
        check_name(name, "region id")
    store = ZarrStore(tmp_path, "grid")
    with pytest.raises(StorageError):
        store.write(2019, name, _grid(1.0), {})
    assert not (tmp_path / "grid.zarr").exists() or not any(
        (tmp_path / "grid.zarr").rglob("*.json")
    )


def test_files_follow_the_umask_and_failed_writes_leave_nothing(
    tmp_path: Path, monkeypatch
) -> None:
    old = os.umask(0o022)
    try:
        store = ZarrStore(tmp_path / "s", "grid")
        store.write(2019, TILE, _grid(1.0), {"version": 1})
        write_file_atomic(str(tmp_path / "s" / "_registry" / "regions.json"), b"{}")
        from agrifm_pipeline.storage import FileStore

        FileStore(tmp_path / "s", "chips").put(2019, TILE, "chips.parquet", b"x", {})
        modes = {
            p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
            for p in (tmp_path / "s").rglob("*")
            if p.is_file()
        }
        assert modes and set(modes.values()) == {0o644}, modes
        # A full disk: the write fails, no temporary file is left, the old file stays.
        target = tmp_path / "s" / "_registry" / "regions.json"

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("agrifm_pipeline.storage.fs.os.replace", full)
        with pytest.raises(OSError, match="No space"):
            write_file_atomic(str(target), b'{"new": 1}')
        assert target.read_bytes() == b"{}"
        assert [p.name for p in target.parent.iterdir()] == ["regions.json"]
    finally:
        os.umask(old)


def test_gdal_opens_the_current_version(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    v = store.write(2019, TILE, _grid(7.0), {"version": 1})
    with rasterio.open(f'ZARR:"{v.gdal_path}":/embedding') as src:
        assert src.crs.to_epsg() == 32631 and src.count == 4
        assert float(src.read(1).max()) == 7.0
    assert gdal_path("s3://bucket/a/b.zarr") == "/vsis3/bucket/a/b.zarr"
    assert gdal_path("gs://bucket/a") == "/vsigs/bucket/a"


def test_zarr_format_3_on_request(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid", zarr_format=3)
    v = store.write(2019, TILE, _grid(1.0), {"version": 1})
    assert Path(v.path, "zarr.json").is_file()
    assert store.lineage(2019, TILE) == {"version": 1}
    assert str(store.open(2019, TILE, verify=True).rio.crs) == "EPSG:32631"


def test_unknown_protocol_is_named() -> None:
    with pytest.raises(StorageError, match="storage root 'foo://bar'"):
        ZarrStore("foo://bar", "grid")


def test_orphans_younger_than_the_grace_are_left_to_their_writer(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")  # default grace: hours
    store.write(2019, TILE, _grid(1.0), {})
    vid, path = store.begin(2019, TILE)
    Path(path).mkdir(parents=True)
    (Path(path) / "partial").write_bytes(b"x")
    store.write(2019, TILE, _grid(2.0), {})
    assert vid in store.versions(2019, TILE)
    assert store.sweep(2019, TILE, grace_s=0) == [vid]


def test_file_partitions_are_versioned_and_checked(store_kind: StoreKind) -> None:
    """Chip tables and previews (whole files) follow the same rules as Zarr partitions."""
    files = store_kind.files()
    v1 = files.put(2019, TILE, "chips.parquet", b"PAR1 first", {"n": 1})
    v2 = files.put(2019, TILE, "chips.parquet", b"PAR1 second", {"n": 2})
    assert files.read(2019, TILE, "chips.parquet") == b"PAR1 second"
    assert files.read_objects(v1) == {"chips.parquet": b"PAR1 first"}
    assert files.lineage(2019, TILE) == {"n": 2} and files.verify(v2) == []
    path = f"{v2.path}/chips.parquet"
    if files.local:
        Path(path).write_bytes(b"PAR1 change")
    else:
        files.fs.pipe_file(path, b"PAR1 change")
    assert [(p.object, p.what) for p in files.verify(v2)] == [("chips.parquet", "mismatch")]
    with pytest.raises(CorruptionError, match=r"chips\.parquet: mismatch"):
        files.read(2019, TILE, "chips.parquet")
