"""Settings: the contract's defaults, environment parsing and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from agrifm_pipeline.errors import SettingsError
from agrifm_pipeline.settings import (
    DEFAULT_CKPT_MIN_BYTES,
    AgriFMSettings,
    canonical_norm_mode,
    load_settings,
)


def test_defaults_match_the_contract() -> None:
    s = load_settings({})
    assert s.n_frames == 8
    assert s.image_size == 224
    assert s.norm_mode == "agrifm_stats"
    assert s.fetch_workers == 8
    assert s.checkpoint is None
    assert s.auto_download is True
    assert s.cache_dir == Path("~/.cache/rs_embed/agrifm").expanduser()
    assert s.ckpt_file == "AgriFM.pth"
    assert s.ckpt_url == "https://glass.hku.hk/casual/AgriFM/AgriFM.pth"
    assert s.ckpt_min_bytes == DEFAULT_CKPT_MIN_BYTES == 104_857_600
    assert s.repo_path is None
    assert s.repo_url == "https://github.com/flyakon/AgriFM"
    assert s.repo_cache == Path("~/.cache/rs_embed").expanduser()
    assert s.repo_cache_path == s.repo_cache / "AgriFM"
    assert s.auto_download_repo is True
    assert s.checkpoint_cache_path == s.cache_dir / "AgriFM.pth"
    assert s == AgriFMSettings()


def test_every_variable_is_read(tmp_path: Path) -> None:
    env = {
        "RS_EMBED_AGRIFM_FRAMES": "12",
        "RS_EMBED_AGRIFM_IMG": "64",
        "RS_EMBED_AGRIFM_NORM": "Unit",
        "RS_EMBED_AGRIFM_FETCH_WORKERS": "3",
        "RS_EMBED_AGRIFM_CKPT": str(tmp_path / "w.pth"),
        "RS_EMBED_AGRIFM_AUTO_DOWNLOAD": "no",
        "RS_EMBED_AGRIFM_CACHE_DIR": str(tmp_path / "cache"),
        "RS_EMBED_AGRIFM_CKPT_FILE": "mine.pth",
        "RS_EMBED_AGRIFM_CKPT_URL": "http://127.0.0.1:9/w.pth",
        "RS_EMBED_AGRIFM_CKPT_MIN_BYTES": "10",
        "RS_EMBED_AGRIFM_REPO_PATH": str(tmp_path / "repo"),
        "RS_EMBED_AGRIFM_REPO_URL": "file:///srv/AgriFM",
        "RS_EMBED_AGRIFM_REPO_CACHE": str(tmp_path / "rc"),
        "RS_EMBED_AGRIFM_AUTO_DOWNLOAD_REPO": "0",
    }
    s = load_settings(env)
    assert (s.n_frames, s.image_size, s.norm_mode, s.fetch_workers) == (12, 64, "unit_scale", 3)
    assert s.checkpoint == str(tmp_path / "w.pth")
    assert s.auto_download is False and s.auto_download_repo is False
    assert s.cache_dir == tmp_path / "cache" and s.ckpt_file == "mine.pth"
    assert s.ckpt_url == "http://127.0.0.1:9/w.pth" and s.ckpt_min_bytes == 10
    assert s.repo_path == tmp_path / "repo" and s.repo_url == "file:///srv/AgriFM"
    assert s.repo_cache == tmp_path / "rc"
    assert set(s.as_record()) == set(env)


def test_overrides_in_code_win_over_environment() -> None:
    s = load_settings({"RS_EMBED_AGRIFM_FRAMES": "12"}, n_frames=4, norm_mode="raw")
    assert s.n_frames == 4 and s.norm_mode == "none"
    assert s.replace(image_size=32).image_size == 32
    with pytest.raises(SettingsError, match="unknown setting"):
        load_settings({}, frames=3)


def test_empty_variables_take_the_default() -> None:
    assert load_settings({"RS_EMBED_AGRIFM_FRAMES": "  ", "RS_EMBED_AGRIFM_CKPT": ""}).n_frames == 8


@pytest.mark.parametrize(
    ("var", "value", "accepted"),
    [
        ("RS_EMBED_AGRIFM_FRAMES", "0", ">= 1"),
        ("RS_EMBED_AGRIFM_FRAMES", "abc", ">= 1"),
        ("RS_EMBED_AGRIFM_FRAMES", "2.5", ">= 1"),
        ("RS_EMBED_AGRIFM_IMG", "15", ">= 16"),
        ("RS_EMBED_AGRIFM_NORM", "zscorez", "agrifm_stats"),
        ("RS_EMBED_AGRIFM_AUTO_DOWNLOAD", "maybe", "'true'"),
        ("RS_EMBED_AGRIFM_AUTO_DOWNLOAD_REPO", "2", "'false'"),
        ("RS_EMBED_AGRIFM_FETCH_WORKERS", "-1", ">= 1"),
        ("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "lots", ">= 0"),
        # Upper bounds (they used to be accepted and fail far away, out of memory).
        ("RS_EMBED_AGRIFM_FRAMES", "1000", "<= 366: the frames split one year"),
        ("RS_EMBED_AGRIFM_IMG", "100000", "<= 1024: every chip frame is resized to it"),
        ("RS_EMBED_AGRIFM_FETCH_WORKERS", "100000", "<= 128: each is a thread"),
    ],
)
def test_bad_values_name_variable_value_and_what_is_accepted(
    var: str, value: str, accepted: str
) -> None:
    with pytest.raises(SettingsError) as err:
        load_settings({var: value})
    msg = str(err.value)
    assert var in msg and repr(value) in msg and accepted in msg


def test_bad_values_in_code_are_caught_too() -> None:
    with pytest.raises(SettingsError, match="n_frames"):
        load_settings({}, n_frames=0)
    with pytest.raises(SettingsError, match="IMG"):
        AgriFMSettings(image_size=8)
    with pytest.raises(SettingsError, match="unit_scale"):
        AgriFMSettings().replace(norm_mode="minmax")


@pytest.mark.parametrize(
    ("alias", "mode"),
    [
        ("agrifm_stats", "agrifm_stats"),
        ("zscore", "agrifm_stats"),
        ("STATS", "agrifm_stats"),
        ("unit_scale", "unit_scale"),
        ("reflectance", "unit_scale"),
        ("none", "none"),
        ("raw", "none"),
        ("Off", "none"),
    ],
)
def test_norm_aliases(alias: str, mode: str) -> None:
    assert canonical_norm_mode(alias) == mode


def test_the_largest_values_are_accepted() -> None:
    s = load_settings(
        {"RS_EMBED_AGRIFM_FRAMES": "366", "RS_EMBED_AGRIFM_IMG": "1024"}, fetch_workers=128
    )
    assert (s.n_frames, s.image_size, s.fetch_workers) == (366, 1024, 128)


# --- the tile geometry: AGRIFM_PIPELINE_CHIP_PX / _CHIPS_PER_SIDE ------------------------------


@pytest.mark.parametrize(
    ("env", "said"),
    [
        (
            {"AGRIFM_PIPELINE_CHIPS_PER_SIDE": "100000"},
            "AGRIFM_PIPELINE_CHIPS_PER_SIDE='100000' is too large; use a whole number >= 1 and "
            "<= 16: a tile-year holds all its chips at once",
        ),
        (
            {"AGRIFM_PIPELINE_CHIP_PX": "100000"},
            "AGRIFM_PIPELINE_CHIP_PX='100000' is too large; use a whole number >= 16 and <= 1024",
        ),
        (
            {"AGRIFM_PIPELINE_CHIP_PX": "1024", "AGRIFM_PIPELINE_CHIPS_PER_SIDE": "8"},
            "AGRIFM_PIPELINE_CHIP_PX=1024 x AGRIFM_PIPELINE_CHIPS_PER_SIDE=8 makes tiles of "
            "8,192 px a side, more than 4,096",
        ),
        ({"AGRIFM_PIPELINE_CHIPS_PER_SIDE": "0"}, "'0' is too small"),
        ({"AGRIFM_PIPELINE_CHIP_PX": "2.5"}, "AGRIFM_PIPELINE_CHIP_PX='2.5' is not an integer"),
    ],
)
def test_tile_geometry_variables_are_bounded(env: dict[str, str], said: str) -> None:
    """``AGRIFM_PIPELINE_CHIPS_PER_SIDE=100000`` used to be accepted: the region sensor
    registered one tile 224,000 km a side, and its tile-year would allocate terabytes."""
    from agrifm_pipeline.definitions import default_resources

    with pytest.raises(SettingsError) as err:
        default_resources(env)
    assert said in str(err.value)


def test_tile_geometry_is_bounded_whichever_way_it_comes() -> None:
    from shapely.geometry import box

    from agrifm_pipeline.definitions import default_resources
    from agrifm_pipeline.defs.resources import TileYearConfig
    from agrifm_pipeline.regions import tiles_for_region
    from agrifm_pipeline.tileyear import TileYearSettings

    with pytest.raises(SettingsError, match=r"chips_per_side=100000 is too large.*<= 16"):
        TileYearConfig(chips_per_side=100000).resolve()
    with pytest.raises(SettingsError, match=r"chip_px=8 is too small"):
        TileYearSettings(chip_px=8)
    with pytest.raises(SettingsError, match=r"chips_per_side=100000 is too large"):
        tiles_for_region(box(4.05, 50.74, 4.20, 50.80), chips_per_side=100000)
    # The demo's and the design's geometries, and the largest tile, are fine.
    demo = {"AGRIFM_PIPELINE_CHIP_PX": "64", "AGRIFM_PIPELINE_CHIPS_PER_SIDE": "1"}
    assert default_resources(demo)["tile_year"].chips_per_side == 1
    assert default_resources({})["tile_year"].chips_per_side == 4
    assert TileYearSettings(chip_px=256, chips_per_side=16).tile_size_m == 40960
