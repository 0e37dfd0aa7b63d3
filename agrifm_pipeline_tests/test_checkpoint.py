"""Checkpoint resolution against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from agrifm_pipeline.checkpoint import (
    parse_untrained_spec,
    read_checkpoint,
    resolve_checkpoint,
    sha256_file,
)
from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model import load_encoder
from agrifm_pipeline.settings import load_settings

from .conftest import Route


@pytest.fixture
def weights(fixtures_dir: Path) -> bytes:
    return (fixtures_dir / "tiny_p444.pth").read_bytes()


def _settings(tmp_path: Path, url: str, **kw):
    return load_settings({}, cache_dir=tmp_path / "cache", ckpt_url=url, ckpt_min_bytes=1000, **kw)


def test_download_then_cache_then_explicit(
    tmp_path: Path, http_server, weights: bytes, no_partial_files
) -> None:
    url = http_server.add("/AgriFM.pth", Route(body=weights))
    s = _settings(tmp_path, url)
    first = resolve_checkpoint(None, s)
    assert first.source == "download" and first.url == url
    assert first.path == tmp_path / "cache" / "AgriFM.pth"
    assert first.path.read_bytes() == weights
    assert first.sha256 == hashlib.sha256(weights).hexdigest() and first.size_bytes == len(weights)
    no_partial_files(tmp_path / "cache")
    # The second call finds the cache and does not download again.
    second = resolve_checkpoint(None, s)
    assert second.source == "cache" and second.sha256 == first.sha256
    assert http_server.hits.count("/AgriFM.pth") == 1
    # An explicit path (argument or RS_EMBED_AGRIFM_CKPT) beats the cache.
    other = tmp_path / "other.pth"
    torch.save({"x": torch.zeros(3)}, other)
    assert resolve_checkpoint(other, s).source == "path"
    env_settings = _settings(tmp_path, url, checkpoint=str(other))
    assert resolve_checkpoint(None, env_settings).path == other
    # The downloaded file loads and runs.
    model = load_encoder(first)
    assert model.checkpoint_info["source"] == "download"


def test_sha256_is_kept_beside_the_file_and_refreshed(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    assert sha256_file(path) == hashlib.sha256(b"one").hexdigest()
    assert (tmp_path / "w.pth.sha256").exists()
    # A stale sidecar for the same size/mtime would be trusted; a replaced file is not.
    path.write_bytes(b"two!")
    assert sha256_file(path) == hashlib.sha256(b"two!").hexdigest()


@pytest.mark.parametrize(
    ("route", "match"),
    [
        (Route(status=404, body=b"nope"), "HTTP 404"),
        (Route(status=500, body=b"boom"), "HTTP 500"),
        (
            Route(
                body=b"<!DOCTYPE html><html>login</html>" * 50,
                headers={"Content-Type": "text/html"},
            ),
            "web page",
        ),
        (Route(body=b"<html><body>" + b"x" * 5000), "HTML"),
        (Route(body=b"\x00" * 500), "fewer than"),
        (Route(body=os.urandom(5000)), "not return a torch checkpoint"),
    ],
)
def test_download_failures(
    tmp_path: Path, http_server, route: Route, match: str, no_partial_files
) -> None:
    url = http_server.add("/AgriFM.pth", route)
    with pytest.raises(CheckpointError, match=match):
        resolve_checkpoint(None, _settings(tmp_path, url))
    assert not (tmp_path / "cache" / "AgriFM.pth").exists()
    no_partial_files(tmp_path / "cache")


def test_truncated_body(tmp_path: Path, http_server, weights: bytes, no_partial_files) -> None:
    url = http_server.add("/AgriFM.pth", Route(body=weights, truncate=len(weights) // 2))
    with pytest.raises(CheckpointError, match=r"broke off|truncated"):
        resolve_checkpoint(None, _settings(tmp_path, url))
    assert not (tmp_path / "cache" / "AgriFM.pth").exists()
    no_partial_files(tmp_path / "cache")


def test_unreachable_server(tmp_path: Path) -> None:
    url = "http://127.0.0.1:9/AgriFM.pth"  # nothing listens on the discard port
    with pytest.raises(CheckpointError, match="failed"):
        resolve_checkpoint(None, _settings(tmp_path, url))


def test_failed_download_keeps_previous_cache(tmp_path: Path, http_server, weights: bytes) -> None:
    """A good cached file is never replaced by a bad download (there is none: the cache wins)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "AgriFM.pth").write_bytes(weights)
    url = http_server.add("/AgriFM.pth", Route(status=500))
    assert resolve_checkpoint(None, _settings(tmp_path, url)).source == "cache"
    assert (cache / "AgriFM.pth").read_bytes() == weights


def test_missing_path_and_disabled_download(tmp_path: Path) -> None:
    s = load_settings({}, cache_dir=tmp_path / "cache", auto_download=False)
    with pytest.raises(CheckpointError, match="no such file"):
        resolve_checkpoint(tmp_path / "missing.pth", s)
    with pytest.raises(CheckpointError, match="RS_EMBED_AGRIFM_CKPT"):
        resolve_checkpoint(None, s.replace(checkpoint=str(tmp_path / "missing.pth")))
    with pytest.raises(
        CheckpointError, match=r"auto-download is disabled \(RS_EMBED_AGRIFM_AUTO_DOWNLOAD=0\)"
    ):
        resolve_checkpoint(None, s)


def test_too_small_cached_file(tmp_path: Path) -> None:
    s = load_settings({}, cache_dir=tmp_path, ckpt_min_bytes=10_000)
    (tmp_path / "AgriFM.pth").write_bytes(b"tiny")
    with pytest.raises(CheckpointError, match="delete it"):
        resolve_checkpoint(None, s)


def test_not_a_torch_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not a torch checkpoint"):
        load_encoder(bad)


class _NotATensor:
    """An arbitrary class: loading it would need unsafe unpickling."""


def test_pickle_that_needs_unsafe_loading_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"obj": _NotATensor(), "w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        read_checkpoint(path)


def test_checkpoint_whose_keys_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "other_model.pth"
    torch.save({"backbone.layers.0.blocks.0.norm1.weight": torch.ones(4)}, path)
    with pytest.raises(CheckpointError):
        load_encoder(path)


def test_untrained_specs() -> None:
    assert parse_untrained_spec("untrained:0") == (0, (4, 4, 4))
    assert parse_untrained_spec("untrained:42:p422") == (42, (4, 2, 2))
    assert parse_untrained_spec("/x/AgriFM.pth") is None
    for bad in ("untrained:", "untrained:x", "untrained:1:p333", "untrained:-1"):
        with pytest.raises(CheckpointError):
            parse_untrained_spec(bad)
    r = resolve_checkpoint("untrained:3", load_settings({}))
    assert (
        r.untrained
        and r.path is None
        and r.untrained_seed == 3
        and r.as_record()["untrained"] is True
    )
    assert r.sha256 != resolve_checkpoint("untrained:4", load_settings({})).sha256


def test_untrained_is_never_a_fallback(tmp_path: Path) -> None:
    s = load_settings({}, cache_dir=tmp_path, auto_download=False)
    with pytest.raises(CheckpointError):
        load_encoder(None, settings=s)


# --- `agrifm-pipeline checkpoint` on a file that is not weights -------------------------------


@pytest.fixture
def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(os.environ):
        if name.startswith("RS_EMBED_AGRIFM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RS_EMBED_AGRIFM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RS_EMBED_AGRIFM_AUTO_DOWNLOAD", "0")
    monkeypatch.setenv("RS_EMBED_AGRIFM_CKPT_MIN_BYTES", "1000")
    return tmp_path


def _zip_of_other_files(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weights/README.txt", "the weights are elsewhere" * 100)


def _gzip(path: Path, weights: bytes) -> None:
    import gzip

    path.write_bytes(gzip.compress(weights))


@pytest.mark.parametrize(
    ("name", "write", "said"),
    [
        (
            "page.html",
            lambda p, w: p.write_bytes(
                b"<!DOCTYPE html>\n<html><head><title>Wi-Fi login</title></head></html>\n" * 40
            ),
            "is an HTML page (it begins '<!DOCTYPE html>",
        ),
        ("AgriFM.zip", lambda p, w: _zip_of_other_files(p), "is a zip archive of other files"),
        ("AgriFM.pth.gz", lambda p, w: _gzip(p, w), "is a gzip-compressed file"),
        (
            "noise.pth",
            lambda p, w: p.write_bytes(bytes(range(128, 256)) * 20),
            "is a binary file that is neither a zip archive in torch's layout nor a pickle",
        ),
    ],
)
def test_checkpoint_command_refuses_a_file_that_is_not_weights(
    offline_env: Path, weights: bytes, capsys: pytest.CaptureFixture[str], name, write, said: str
) -> None:
    """It used to print the file's sha256 and exit 0, as if the weights were there."""
    from agrifm_pipeline.cli import main

    path = offline_env / name
    write(path, weights)
    assert main(["checkpoint", "--checkpoint", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith(f"error: CheckpointError: {path} {said}"), err
    assert "not a torch checkpoint" in err and "RS_EMBED_AGRIFM_CKPT" in err


def test_checkpoint_command_accepts_real_weights(
    offline_env: Path, fixtures_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from agrifm_pipeline.cli import main

    tiny = fixtures_dir / "tiny_p444.pth"
    assert main(["checkpoint", "--checkpoint", str(tiny)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["path"] == str(tiny) and record["sha256"] == sha256_file(tiny)
    assert main(["checkpoint", "--checkpoint", "untrained:0"]) == 0
