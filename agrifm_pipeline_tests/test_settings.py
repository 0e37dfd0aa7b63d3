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
