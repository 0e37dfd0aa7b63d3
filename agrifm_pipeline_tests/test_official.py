"""The official-source backend: finding or cloning the tree, importing it, loading strictly.

Cloning is exercised for real with git against a repository the test creates
(``file://`` URL). The tree it holds is a stand-in written for these tests:
it has upstream's file path, imports and class names, so the import
machinery is exercised as it would be on the real tree. When
``AGRIFM_OFFICIAL_REPO`` names a real checkout, the real code is also run
against the reference fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from agrifm_pipeline.errors import CheckpointError, RepoError
from agrifm_pipeline.model import load_encoder
from agrifm_pipeline.model.official import load_official_encoder, resolve_repo
from agrifm_pipeline.settings import load_settings
from agrifm_pipeline_tests.fixtures.reference import tiny_cases

STAND_IN = '''
"""A stand-in for upstream's video_swin_transformer.py, with upstream's imports and names."""
import torch
from torch import nn
from timm.models.layers import DropPath, trunc_normal_
from mmseg.models.builder import BACKBONES
from mmseg.registry.registry import MODELS, TRANSFORMS
from mmengine.model import BaseModule, BaseModel
from mmengine.runner import load_checkpoint

from agrifm_pipeline.model import AgriFMEncoder, EncoderConfig
from agrifm_pipeline.model.agrifm import PatchEmbed3D, fold_time


@MODELS.register_module()
class SwinPatchEmbed3D(nn.Module):
    def __init__(self, patch_size=(2, 4, 4), in_chans=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.in_chans = in_chans
        self.patch = tuple(patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return PatchEmbed3D.project(self, x).permute(0, 4, 1, 2, 3)  # upstream's (N, E, D, H, W)


@BACKBONES.register_module()
class SwinTransformer3D(nn.Module):
    def __init__(self, patch_size=(4, 4, 4), embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24),
                 window_size=(2, 7, 7), mlp_ratio=4.0, qkv_bias=True, mean_frame_down=False, **kwargs):
        super().__init__()
        enc = AgriFMEncoder(EncoderConfig(embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
                                          window_size=tuple(window_size), patch_size=tuple(patch_size),
                                          mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, mean_frame_down=mean_frame_down))
        self.layers = enc.layers
        self.norm = enc.norm

    def forward(self, x):
        x = x.permute(0, 2, 3, 4, 1)
        feats = [fold_time(x)]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                feats.append(fold_time(x))
        return {"encoder_features": fold_time(self.norm(x)), "features_list": feats}
'''


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def upstream_repo(tmp_path: Path) -> Path:
    """A git repository with upstream's layout, committed, to clone from."""
    repo = tmp_path / "upstream"
    (repo / "AgriFM" / "models").mkdir(parents=True)
    (repo / "AgriFM" / "models" / "video_swin_transformer.py").write_text(STAND_IN)
    _git("init", "-q", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git(
        "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "stand-in", cwd=repo
    )
    return repo


def _settings(tmp_path: Path, **kw):
    return load_settings({}, repo_cache=tmp_path / "cache", **kw)


def test_clone_then_reuse_then_repo_path_wins(tmp_path: Path, upstream_repo: Path) -> None:
    s = _settings(tmp_path, repo_url=upstream_repo.as_uri())
    cloned = resolve_repo(s)
    assert cloned == tmp_path / "cache" / "AgriFM"
    assert (cloned / ".git").is_dir() and (
        cloned / "AgriFM/models/video_swin_transformer.py"
    ).is_file()
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=cloned, capture_output=True, text=True
    )
    assert shallow.stdout.strip() == "true"
    # Second call reuses the clone, even with the source gone.
    shutil.rmtree(upstream_repo)
    assert resolve_repo(s) == cloned
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]
    other = tmp_path / "mine"
    shutil.copytree(cloned, other)
    assert resolve_repo(s.replace(repo_path=other)) == other


def test_missing_repo_with_auto_download_off(tmp_path: Path) -> None:
    with pytest.raises(RepoError, match=r"AUTO_DOWNLOAD_REPO=0\); set RS_EMBED_AGRIFM_REPO_PATH"):
        resolve_repo(_settings(tmp_path, auto_download_repo=False))


def test_bad_repo_path_and_bad_url(tmp_path: Path) -> None:
    with pytest.raises(RepoError, match="not an AgriFM checkout"):
        resolve_repo(_settings(tmp_path, repo_path=tmp_path / "nowhere"))
    with pytest.raises(RepoError, match="git clone"):
        resolve_repo(_settings(tmp_path, repo_url=(tmp_path / "no-such-repo").as_uri()))
    assert not (tmp_path / "cache" / "AgriFM").exists()


def test_stand_in_tree_loads_strictly_and_agrees(
    tmp_path: Path, upstream_repo: Path, fixtures_dir: Path
) -> None:
    s = _settings(tmp_path, repo_url=upstream_repo.as_uri())
    ckpt = fixtures_dir / "tiny_p444.pth"
    official = load_official_encoder(ckpt, settings=s)
    ours = load_encoder(ckpt)
    x = torch.randn(1, 8, 10, 64, 64)
    with torch.no_grad():
        assert torch.allclose(official(x), ours(x), atol=1e-5)
    # The OpenMMLab stand-ins were only present during the import.
    import sys

    assert not {"mmseg", "mmseg.registry.registry", "mmengine", "mmengine.runner"} & set(
        sys.modules
    )


def test_strict_loading_errors(tmp_path: Path, upstream_repo: Path, fixtures_dir: Path) -> None:
    s = _settings(tmp_path, repo_url=upstream_repo.as_uri())
    base = torch.load(fixtures_dir / "tiny_p444.pth", weights_only=True)
    for change in ("missing", "extra", "shape"):
        state = dict(base)
        if change == "missing":
            del state["encoder.backbone.layers.0.blocks.1.mlp.fc2.weight"]
        elif change == "extra":
            state["encoder.backbone.layers.0.blocks.1.gamma"] = torch.ones(16)
        else:
            state["encoder.backbone.norm.bias"] = torch.zeros(7)
        with pytest.raises(CheckpointError, match="does not fit the official encoder"):
            load_official_encoder(state, settings=s)


@pytest.mark.skipif(
    not os.environ.get("AGRIFM_OFFICIAL_REPO"),
    reason="set AGRIFM_OFFICIAL_REPO to a checkout of github.com/flyakon/AgriFM to run the real code",
)
def test_real_official_code_matches_fixtures(fixtures_dir: Path) -> None:
    repo = Path(os.environ["AGRIFM_OFFICIAL_REPO"])
    for variant in ("p444", "p422"):
        model = load_official_encoder(fixtures_dir / f"tiny_{variant}.pth", repo=repo)
        for ref in tiny_cases(variant):
            with torch.no_grad():
                final, features = model.forward_intermediates(torch.from_numpy(ref.x))
            np.testing.assert_allclose(final.numpy(), ref["encoder_features"], atol=1e-4, rtol=1e-4)
            for k, feat in enumerate(features):
                np.testing.assert_allclose(
                    feat.numpy(), ref[f"features_list_{k}"], atol=1e-4, rtol=1e-4
                )
