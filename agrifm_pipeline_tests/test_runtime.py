"""Process allocator setting: applied once on glibc, never over the operator's choice."""

from __future__ import annotations

import platform

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
