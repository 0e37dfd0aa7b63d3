"""Process allocator setting: applied once on glibc, never over the operator's choice."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import platform
import threading
import weakref
from pathlib import Path

import pytest

from agrifm_pipeline import runtime


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_applied", None)
    for name in (runtime.OPT_OUT, *runtime._GLIBC_ENV):
        monkeypatch.delenv(name, raising=False)


def test_opt_out_and_operator_settings_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runtime.OPT_OUT, "1")
    assert runtime.retain_freed_memory() is False
    assert runtime.allocator_status() == "system default"
    monkeypatch.setattr(runtime, "_applied", None)
    monkeypatch.delenv(runtime.OPT_OUT)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert runtime.retain_freed_memory() is False


def test_applied_on_glibc_once(monkeypatch: pytest.MonkeyPatch) -> None:
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.retain_freed_memory() is glibc
    # The answer is kept: a second call neither re-applies nor changes it.
    monkeypatch.setenv(runtime.OPT_OUT, "1")
    assert runtime.retain_freed_memory() is glibc
    if glibc:
        assert "retained" in runtime.allocator_status()


def _arenas(libc: ctypes.CDLL, tmp: Path) -> int:
    """How many malloc arenas the process has (glibc's malloc_info report)."""
    path = str(tmp / "malloc_info.xml").encode()
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    fh = libc.fopen(path, b"w")
    assert libc.malloc_info(0, fh) == 0
    libc.fclose(fh)
    return (tmp / "malloc_info.xml").read_text().count("<heap nr=")


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc arenas"
)
def test_threads_started_afterwards_add_no_arena(tmp_path: Path) -> None:
    """zarr's worker threads must share the retained heap, not each make an arena."""
    libc = ctypes.CDLL("libc.so.6")
    assert runtime.retain_freed_memory() is True
    before = _arenas(libc, tmp_path)
    held: list[bytearray] = []
    ready = threading.Barrier(6)

    def work() -> None:
        held.append(bytearray(1 << 20))  # allocated on this thread
        ready.wait()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(held) == 6
    assert _arenas(libc, tmp_path) == before


class _Cycle:
    """An object in a reference cycle with itself: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def _dropped_cycle_survives(ref: weakref.ref[_Cycle]) -> bool:
    """After the last outside reference is gone: does a full collection leave it alive?"""
    gc.collect()
    return ref() is not None


def test_long_lived_objects_frozen_once_per_owner() -> None:
    """Observed on objects of this test only (the process-wide freeze count moves
    whenever any frozen object anywhere is freed): what is alive at the first call
    for an owner is out of the collector's reach; a repeated call for the same owner
    freezes nothing; a new owner freezes what has appeared since."""

    @dataclasses.dataclass
    class Engine:  # unhashable, like the real one
        name: str

    first, second = Engine("a"), Engine("b")
    refs: list[weakref.ref[_Cycle]] = []
    try:
        before = _Cycle()
        refs.append(weakref.ref(before))
        assert runtime.freeze_long_lived(first) is True
        del before
        assert _dropped_cycle_survives(refs[-1])  # frozen: never collected

        between = _Cycle()
        refs.append(weakref.ref(between))
        assert runtime.freeze_long_lived(first) is False  # already done for this one
        del between
        assert not _dropped_cycle_survives(refs[-1])  # so this was not frozen

        later = _Cycle()
        refs.append(weakref.ref(later))
        assert runtime.freeze_long_lived(second) is True  # a new engine: its objects too
        del later
        assert _dropped_cycle_survives(refs[-1])

        after = _Cycle()
        refs.append(weakref.ref(after))
        del after
        assert not _dropped_cycle_survives(refs[-1])  # made after every freeze: collected
    finally:
        gc.unfreeze()
    assert not any(_dropped_cycle_survives(r) for r in refs)  # unfrozen, they go too


def test_loading_the_code_location_leaves_the_allocator_alone() -> None:
    """The webserver, the daemon and code servers import the definitions; only a step's
    process tunes malloc (when its tile-year work starts)."""
    import subprocess
    import sys

    code = (
        "import agrifm_pipeline.definitions\n"
        "from agrifm_pipeline import runtime\n"
        "assert runtime._applied is None, runtime._applied\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
