"""Partitions are committed whole: killed or failing writers leave the previous version intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rioxarray  # noqa: F401  (registers .rio)
import xarray as xr

from agrifm_pipeline.storage import ZarrStore, exchange_dirs

TILE = "32631_8960m_E0064_N0627"


def _grid(value: float, n: int = 8) -> xr.Dataset:
    da = xr.DataArray(
        np.full((4, n, n), value, dtype="float32"),
        dims=("band", "y", "x"),
        coords={"band": np.arange(4), "y": 100.0 - np.arange(n), "x": np.arange(n) + 0.5},
        name="embedding",
    )
    return da.rio.write_crs("EPSG:32631").to_dataset()


def _writer_script(root: Path, body: str) -> str:
    return textwrap.dedent(
        f"""
        import sys, os, numpy as np, xarray as xr, rioxarray
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        from agrifm_pipeline import storage
        store = storage.ZarrStore({str(root)!r}, "grid")
        """
    ) + textwrap.dedent(body)


def test_write_read_and_replace(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    store.write(2019, TILE, _grid(2.0), {"version": 2})
    assert store.lineage(2019, TILE) == {"version": 2}
    assert float(store.open(2019, TILE)["embedding"].max()) == 2.0
    assert [p.key for p in store.partitions()] == [f"2019/{TILE}"]
    # Nothing is left beside the store.
    assert os.listdir(tmp_path / ".staging" / "grid") == []


def _kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_writer_killed_while_writing_chunks(tmp_path: Path) -> None:
    """SIGKILL while the new version's chunks are being written: old version, whole."""
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    script = _writer_script(
        tmp_path,
        f"""
        big = xr.DataArray(np.random.rand(96, 1024, 1024).astype("float32"), dims=("band", "y", "x"),
                           name="embedding").to_dataset()
        store.write(2019, {TILE!r}, big, {{"version": 2}})
        """,
    )
    proc = subprocess.Popen([sys.executable, "-c", script], text=True)
    staging = tmp_path / ".staging" / "grid"
    _kill_when(proc, lambda: any(staging.glob("*/embedding")))
    assert proc.returncode == -signal.SIGKILL
    # All or nothing: the complete old version (the write had no time to finish).
    assert store.lineage(2019, TILE) == {"version": 1}
    np.testing.assert_array_equal(store.open(2019, TILE)["embedding"].values, 1.0)
    # The next write commits normally.
    store.write(2019, TILE, _grid(3.0), {"version": 3})
    assert store.lineage(2019, TILE) == {"version": 3}


def test_writer_killed_after_staging_before_commit(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    script = _writer_script(
        tmp_path,
        f"""
        import time
        def stalled_commit(staging, final):
            print("staged", flush=True)
            time.sleep(600)
        storage.commit_dir = stalled_commit
        store.write(2019, {TILE!r}, xr.DataArray(np.zeros((4, 8, 8), "float32"), dims=("band", "y", "x"),
                    name="embedding").to_dataset(), {{"version": 2}})
        """,
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "staged"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert store.lineage(2019, TILE) == {"version": 1}
    np.testing.assert_array_equal(store.open(2019, TILE)["embedding"].values, 1.0)
    # The orphaned staging directory is swept by a later write once it is old.
    orphans = list((tmp_path / ".staging" / "grid").iterdir())
    assert len(orphans) == 1
    os.utime(orphans[0], (time.time() - 7 * 3600,) * 2)
    store.write(2019, TILE, _grid(5.0), {"version": 5})
    assert list((tmp_path / ".staging" / "grid").iterdir()) == []


def test_death_between_the_two_renames_is_recovered(tmp_path: Path) -> None:
    """Where directories cannot be exchanged atomically, the aside copy is restored."""
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    script = _writer_script(
        tmp_path,
        f"""
        storage.exchange_dirs = lambda a, b: False
        real_rename = os.rename
        calls = []
        def dying_rename(a, b):
            calls.append((a, b))
            real_rename(a, b)
            if str(b).endswith(storage.ASIDE_SUFFIX):
                os._exit(9)   # killed right after moving the old version aside
        storage.os.rename = dying_rename
        store.write(2019, {TILE!r}, xr.DataArray(np.zeros((4, 8, 8), "float32"), dims=("band", "y", "x"),
                    name="embedding").to_dataset(), {{"version": 2}})
        """,
    )
    rc = subprocess.run([sys.executable, "-c", script]).returncode
    assert rc == 9
    assert not (tmp_path / "grid.zarr" / "2019" / TILE).exists()
    # Any reader (or writer) puts the previous version back.
    assert store.exists(2019, TILE)
    assert store.lineage(2019, TILE) == {"version": 1}


def test_failing_write_keeps_previous_and_cleans_up(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid")
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    bad = _grid(2.0)
    bad["embedding"].attrs["unserialisable"] = object()
    with pytest.raises(Exception):  # noqa: B017 - whatever xarray raises
        store.write(2019, TILE, bad, {"version": 2})
    assert store.lineage(2019, TILE) == {"version": 1}
    assert os.listdir(tmp_path / ".staging" / "grid") == []


def test_atomic_exchange_available_on_linux(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not exchange_dirs(a, b):
        pytest.skip(
            "this filesystem cannot exchange directories; the two-rename path is tested above"
        )
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_object_store_url(tmp_path: Path) -> None:
    """Any fsspec URL works; memory:// stands in for s3:// and gs:// (same code path)."""
    store = ZarrStore("memory://agrifm-test", "grid")
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    store.write(2019, TILE, _grid(4.0), {"version": 2})
    assert store.lineage(2019, TILE) == {"version": 2}
    assert float(store.open(2019, TILE)["embedding"].min()) == 4.0
    assert [p.tile for p in store.partitions()] == [TILE]


def test_zarr_format_3_on_request(tmp_path: Path) -> None:
    store = ZarrStore(tmp_path, "grid", zarr_format=3)
    store.write(2019, TILE, _grid(1.0), {"version": 1})
    assert (tmp_path / "grid.zarr" / "2019" / TILE / "zarr.json").is_file()
    assert store.lineage(2019, TILE) == {"version": 1}
    assert str(store.open(2019, TILE).rio.crs) == "EPSG:32631"
