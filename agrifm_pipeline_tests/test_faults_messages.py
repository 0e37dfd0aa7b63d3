"""Errors that name the input that was wrong and the fix (issue 17, item 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agrifm_pipeline import runtime
from agrifm_pipeline.definitions import default_resources
from agrifm_pipeline.defs.resources import ZarrStorage
from agrifm_pipeline.errors import NoCoverageError, ProviderError, SettingsError
from agrifm_pipeline.settings import (
    PIPELINE_STORAGE_ENV,
    check_storage_root,
    env_flag,
    pipeline_storage_root,
)

# --- AGRIFM_PIPELINE_STORAGE ---------------------------------------------------------------


def test_unknown_storage_protocol_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PIPELINE_STORAGE_ENV, "foo://bar")
    with pytest.raises(SettingsError) as err:
        ZarrStorage()
    msg = str(err.value)
    assert "AGRIFM_PIPELINE_STORAGE='foo://bar'" in msg and "'foo'" in msg
    assert "s3://" in msg  # what a valid value looks like
    # The code location's resources are built from the same default: the same error.
    with pytest.raises(SettingsError, match="AGRIFM_PIPELINE_STORAGE"):
        default_resources()


def test_storage_roots_that_work(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv(PIPELINE_STORAGE_ENV, raising=False)
    monkeypatch.setenv("AGRIFM_PIPELINE_HOME", str(tmp_path))
    assert ZarrStorage().root == str(tmp_path / "store")
    for root in (str(tmp_path / "s"), f"file://{tmp_path}/s", "memory://agrifm"):
        monkeypatch.setenv(PIPELINE_STORAGE_ENV, root)
        assert ZarrStorage().root == root == pipeline_storage_root()


def test_storage_protocol_without_its_package_says_so() -> None:
    # fsspec knows this protocol, but its implementation is a separate package that
    # is not a dependency of this project.
    pytest.importorskip("fsspec")
    try:
        import ocifs  # noqa: F401

        pytest.skip("ocifs is installed here")
    except ImportError:
        pass
    with pytest.raises(SettingsError, match=r"oci://b/x.*not installed"):
        check_storage_root("oci://b/x")


def test_empty_storage_root_is_the_default() -> None:
    assert pipeline_storage_root({PIPELINE_STORAGE_ENV: "  "}, home="/h") == "/h/store"


# --- AGRIFM_PIPELINE_SYSTEM_MALLOC ---------------------------------------------------------

YES = ["1", "true", "TRUE", "yes", "Yes", "on", "ON", " on "]
NO = ["0", "false", "False", "no", "NO", "off", "Off"]


@pytest.mark.parametrize("word", YES)
def test_yes_words(word: str) -> None:
    assert env_flag("X", {"X": word}) is True


@pytest.mark.parametrize("word", NO)
def test_no_words(word: str) -> None:
    assert env_flag("X", {"X": word}) is False


def test_unset_flag_is_none() -> None:
    assert env_flag("X", {}) is None and env_flag("X", {"X": ""}) is None


@pytest.fixture
def fresh_allocator(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setattr(runtime, "_applied", None)
    for name in (runtime.OPT_OUT, *runtime._GLIBC_ENV):
        monkeypatch.delenv(name, raising=False)
    # Never actually tune this test process's allocator.
    monkeypatch.setattr(runtime.platform, "system", lambda: "NotLinux")
    return monkeypatch


@pytest.mark.parametrize(
    ("word", "opted_out"),
    [(w, False) for w in ("false", "no", "off", "0", "FALSE")]
    + [(w, True) for w in ("true", "yes", "on", "1", "On")],
)
def test_system_malloc_words_both_ways(fresh_allocator, word: str, opted_out: bool) -> None:
    """``false``/``no``/``off`` used to be taken as an opt-out: only yes words opt out."""
    fresh_allocator.setenv(runtime.OPT_OUT, word)
    asked: list[str] = []
    # Past the opt-out check, the next question is the platform: reaching it means
    # the value was read as "do not opt out".
    fresh_allocator.setattr(runtime.platform, "system", lambda: asked.append(word) or "NotLinux")
    assert runtime.retain_freed_memory() is False
    assert asked == ([] if opted_out else [word])


@pytest.mark.parametrize("word", ["maybe", "2", "enable", "nein"])
def test_system_malloc_other_values_are_an_error(fresh_allocator, word: str) -> None:
    fresh_allocator.setenv(runtime.OPT_OUT, word)
    with pytest.raises(SettingsError) as err:
        runtime.retain_freed_memory()
    msg = str(err.value)
    assert f"AGRIFM_PIPELINE_SYSTEM_MALLOC={word!r}" in msg
    assert "'true'" in msg and "'false'" in msg  # the accepted words


def test_system_malloc_bad_value_is_one_line_from_the_cli(
    fresh_allocator, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to print a traceback from every command (the call was outside main's try)."""
    from agrifm_pipeline.cli import main

    fresh_allocator.setenv(runtime.OPT_OUT, "maybe")
    for argv in (["settings"], ["checkpoint", "--checkpoint", "untrained:0"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(
            "error: SettingsError: AGRIFM_PIPELINE_SYSTEM_MALLOC='maybe' is not a boolean"
        )
        assert "'yes'" in err and "'no'" in err and "unset" in err


def test_system_malloc_bad_value_from_the_command_line(tmp_path: Path) -> None:
    """The reproduction itself: the installed command, in a process of its own."""
    import os
    import subprocess
    import sys

    env = {**os.environ, runtime.OPT_OUT: "maybe", "AGRIFM_PIPELINE_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "agrifm_pipeline.cli", "settings"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "AGRIFM_PIPELINE_SYSTEM_MALLOC='maybe'" in proc.stderr


# --- a tile that no scene covers -----------------------------------------------------------


def test_no_coverage_error_names_the_source_its_extent_and_the_fix() -> None:
    extent = NoCoverageError.extent_label((3.1, 50.7, 3.3, 50.8), 51)
    err = NoCoverageError("tile 32631_1280m_E0100_N4392", "local root data/s2_sample", extent)
    assert isinstance(err, ProviderError)  # callers that catch provider errors still do
    msg = str(err)
    assert msg.startswith(
        "no scene of local root data/s2_sample covers tile 32631_1280m_E0100_N4392"
    )
    assert "lon 3.1000..3.3000, lat 50.7000..50.8000 (WGS84, 51 scene(s))" in msg
    assert "cloudy_pct" not in msg and "widen the range" not in msg
    assert "no scenes at all" in str(NoCoverageError("tile t", "catalog c.json", None))


def test_local_provider_says_no_scene_covers_a_tile_outside_the_sample() -> None:
    """Reproduces the fault: a tile 30 km east of the bundled sample fails with advice
    about clouds and dates instead of saying the sample does not reach it."""
    from odc.geo.geobox import GeoBox

    from agrifm_pipeline.frames import frame_windows
    from agrifm_pipeline.providers.base import CloudMask
    from agrifm_pipeline.providers.local import LocalProvider
    from agrifm_pipeline.specs import SensorSpec

    sample = Path(__file__).resolve().parents[1] / "data" / "s2_sample"
    away = GeoBox.from_bbox((604680.0, 5621800.0, 605320.0, 5622440.0), "EPSG:32631", resolution=10)
    with pytest.raises(ProviderError) as err:
        LocalProvider(sample).fetch(away, frame_windows(2019, 4), SensorSpec(), CloudMask())
    assert isinstance(err.value, NoCoverageError), str(err.value)
    assert "no scene of" in str(err.value) and "lon " in str(err.value)


def test_a_tile_no_scene_reaches_is_named_with_the_sources_extent(tmp_path: Path) -> None:
    """Through the tile-year step the message names the tile; a STAC catalog whose items
    lie elsewhere says the same; a tile inside the sample outside its dates still gets
    the date and cloud advice (the source does reach it)."""
    import datetime as dt

    import pystac
    from shapely.geometry import box, mapping

    from agrifm_pipeline.frames import range_windows
    from agrifm_pipeline.providers.base import CloudMask
    from agrifm_pipeline.providers.local import LocalProvider
    from agrifm_pipeline.specs import SensorSpec
    from agrifm_pipeline.tiles import Tile
    from agrifm_pipeline.tileyear import TileYearSettings, acquire

    sample = Path(__file__).resolve().parents[1] / "data" / "s2_sample"
    cfg = TileYearSettings(chip_px=64, chips_per_side=2, n_frames=4)
    away = Tile.from_id("32631_1280m_E0472_N4392")
    with pytest.raises(NoCoverageError) as err:
        acquire(LocalProvider(sample), away, 2019, cfg)
    msg = str(err.value)
    assert msg.startswith(f"no scene of local root {sample} covers tile {away.id}: "), msg
    assert "lon 4.0585..4.0677, lat 50.7431..50.7489 (WGS84, 53 scene(s))" in msg, msg
    assert "cloudy_pct" not in msg and "cloud_mask" not in msg
    # A STAC catalog with one item over the sample.
    catalog = pystac.Catalog(id="c", description="one item")
    bbox = [4.0584, 50.7431, 4.0676, 50.7489]
    item = pystac.Item(
        "S2A_2019-05-16", mapping(box(*bbox)), bbox, dt.datetime(2019, 5, 16, tzinfo=dt.UTC), {}
    )
    catalog.add_item(item)
    catalog.normalize_and_save(str(tmp_path / "stac"), pystac.CatalogType.SELF_CONTAINED)
    with pytest.raises(NoCoverageError, match=r"no scene of STAC catalog .*catalog.json covers"):
        acquire(LocalProvider(tmp_path / "stac"), away, 2019, cfg)
    # Inside the sample, before its first scene: the dates are what is wrong, and it says so.
    inside = Tile.from_id("32631_1280m_E0449_N4392")
    with pytest.raises(ProviderError, match="widen the range") as err:
        LocalProvider(sample).fetch(
            inside.geobox(10), range_windows("2018-01-01", "2018-06-01", 2), SensorSpec(),
            CloudMask(),
        )  # fmt: skip
    assert not isinstance(err.value, NoCoverageError)


def test_s2source_sets_the_earth_engine_deployment_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deployment-wide request limit and its lock directory are resource fields (so
    the launchpad shows them), reach the provider, and default to the environment."""
    from agrifm_pipeline.defs.resources import S2Source
    from agrifm_pipeline.providers.ee_slots import SLOTS_DIR_ENV

    pytest.importorskip("ee")
    s2 = S2Source(
        backend="gee", gee_project="p", gee_deployment_slots=5, gee_slots_dir=str(tmp_path / "s")
    )
    limiter = s2.provider().limiter  # type: ignore[attr-defined]
    assert (limiter.slots, limiter.directory) == (5, tmp_path / "s")
    monkeypatch.setenv(SLOTS_DIR_ENV, str(tmp_path / "shared"))
    limiter = S2Source(backend="gee").provider().limiter  # type: ignore[attr-defined]
    assert (limiter.slots, limiter.directory) == (32, tmp_path / "shared")
    with pytest.raises(SettingsError, match=r"deployment_slots=40; use 1\.\.39"):
        S2Source(backend="gee", gee_deployment_slots=40).provider()
