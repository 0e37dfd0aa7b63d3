"""The official AgriFM source tree as a second encoder backend.

Users who want to check our encoder against the authors' code point
``RS_EMBED_AGRIFM_REPO_PATH`` at a checkout, or let us shallow-clone
``RS_EMBED_AGRIFM_REPO_URL`` into ``RS_EMBED_AGRIFM_REPO_CACHE``. The official
``AgriFM/models/video_swin_transformer.py`` is imported as it is; only the
OpenMMLab names it imports (the model registries, ``BaseModel``,
``load_checkpoint``) are provided by small stand-ins for the duration of the
import, so mmcv/mmseg/mmengine need not be installed. The same weights are
then loaded strictly, exactly as for our encoder.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agrifm_pipeline.errors import CheckpointError, RepoError
from agrifm_pipeline.model.layout import infer_config, to_upstream_layout
from agrifm_pipeline.settings import AgriFMSettings, load_settings

MODEL_FILE = Path("AgriFM") / "models" / "video_swin_transformer.py"
_MODULE_NAME = "_agrifm_official_video_swin"


def _has_model_file(repo: Path) -> bool:
    return (repo / MODEL_FILE).is_file()


def resolve_repo(settings: AgriFMSettings | None = None) -> Path:
    """The official checkout: REPO_PATH, else the cache, else a shallow clone (if allowed)."""
    settings = settings or load_settings()
    if settings.repo_path is not None:
        repo = settings.repo_path
        if not _has_model_file(repo):
            raise RepoError(
                f"RS_EMBED_AGRIFM_REPO_PATH={str(repo)!r} is not an AgriFM checkout "
                f"(no {MODEL_FILE}); point it at a clone of {settings.repo_url}"
            )
        return repo
    cached = settings.repo_cache_path
    if _has_model_file(cached):
        return cached
    if not settings.auto_download_repo:
        raise RepoError(
            f"the AgriFM repo is missing at {cached} and auto-download is disabled "
            "(RS_EMBED_AGRIFM_AUTO_DOWNLOAD_REPO=0); set RS_EMBED_AGRIFM_REPO_PATH to a checkout"
        )
    return clone_repo(settings.repo_url, cached)


def clone_repo(url: str, dest: Path) -> Path:
    """Shallow ``git clone`` into a temporary directory beside ``dest``, then move it in."""
    git = shutil.which("git")
    if git is None:
        raise RepoError("git is not installed; install git or set RS_EMBED_AGRIFM_REPO_PATH")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.clone-", dir=dest.parent))
    try:
        proc = subprocess.run(
            [git, "clone", "--depth", "1", "--quiet", url, str(tmp / "repo")],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if proc.returncode != 0:
            raise RepoError(
                f"git clone {url} failed ({proc.returncode}): {proc.stderr.strip()[:500]}; "
                "check RS_EMBED_AGRIFM_REPO_URL or set RS_EMBED_AGRIFM_REPO_PATH"
            )
        if not _has_model_file(tmp / "repo"):
            raise RepoError(
                f"{url} was cloned but has no {MODEL_FILE}; it is not the AgriFM repository"
            )
        if dest.exists():
            shutil.rmtree(dest)
        (tmp / "repo").rename(dest)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Registry:
    """Enough of an OpenMMLab registry for ``@X.register_module()`` and ``X.build(cfg)``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.classes: dict[str, type] = {}

    def register_module(
        self, module: type | None = None, name: str | None = None, force: bool = False
    ) -> Any:
        def add(cls: type) -> type:
            self.classes[name or cls.__name__] = cls
            return cls

        return add(module) if module is not None else add

    def build(self, cfg: Mapping[str, Any]) -> Any:
        cfg = dict(cfg)
        kind = cfg.pop("type")
        cls = self.classes[kind] if isinstance(kind, str) else kind
        return cls(**cfg)


class _BaseModel(nn.Module):
    def __init__(
        self, data_preprocessor: Any = None, init_cfg: Any = None, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__()


def _refuse_load_checkpoint(*args: Any, **kwargs: Any) -> None:
    raise RepoError(
        "the official loader is not used here: weights are loaded strictly by agrifm_pipeline"
    )


def _stand_in_modules() -> dict[str, types.ModuleType]:
    models_registry = _Registry("MODELS")

    def module(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.util.spec_from_loader(name, loader=None, is_package=package)
        if package:
            mod.__path__ = []
        for key, value in attrs.items():
            setattr(mod, key, value)
        return mod

    registry = module(
        "mmseg.registry.registry", MODELS=models_registry, TRANSFORMS=_Registry("TRANSFORMS")
    )
    builder = module("mmseg.models.builder", BACKBONES=models_registry)
    return {
        "mmseg": module("mmseg", package=True),
        "mmseg.registry": module("mmseg.registry", package=True, registry=registry),
        "mmseg.registry.registry": registry,
        "mmseg.models": module("mmseg.models", package=True, builder=builder),
        "mmseg.models.builder": builder,
        "mmengine": module("mmengine", package=True),
        "mmengine.model": module("mmengine.model", BaseModule=_BaseModel, BaseModel=_BaseModel),
        "mmengine.runner": module("mmengine.runner", load_checkpoint=_refuse_load_checkpoint),
    }


@contextmanager
def _stand_ins() -> Iterator[None]:
    saved = {name: sys.modules.get(name) for name in _stand_in_modules()}
    sys.modules.update(_stand_in_modules())
    try:
        yield
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def load_official_module(repo: Path) -> types.ModuleType:
    """Import the official model file from ``repo`` with OpenMMLab stand-ins."""
    path = Path(repo) / MODEL_FILE
    if not path.is_file():
        raise RepoError(f"{repo} has no {MODEL_FILE}; it is not an AgriFM checkout")
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    with _stand_ins():
        try:
            spec.loader.exec_module(mod)
        except ModuleNotFoundError as exc:
            raise RepoError(
                f"importing {path} needs {exc.name!r}, which is not installed; "
                "the official code needs torch, timm and einops"
            ) from exc
    for name in ("SwinPatchEmbed3D", "SwinTransformer3D"):
        if not hasattr(mod, name):
            raise RepoError(f"{path} defines no {name}; this AgriFM version is not supported")
    return mod


class OfficialEncoder(nn.Module):
    """Upstream patch embed + backbone, composed like upstream's pre-training encoder."""

    def __init__(self, patch_emd: nn.Module, backbone: nn.Module) -> None:
        super().__init__()
        self.patch_emd = patch_emd
        self.backbone = backbone

    def forward_intermediates(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(encoder_features, features_list)`` from upstream's output dict, as ours gives them."""
        if x.ndim == 4:
            x = x.unsqueeze(1)
        out = self.backbone(self.patch_emd(x))
        return out["encoder_features"], list(out["features_list"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[0]


def load_official_encoder(
    state: str | Path | Mapping[str, Any],
    *,
    settings: AgriFMSettings | None = None,
    repo: Path | None = None,
    device: str = "cpu",
) -> OfficialEncoder:
    """The official encoder with ``state``'s weights (a path or a state dict), loaded strictly."""
    from agrifm_pipeline.checkpoint import read_checkpoint

    source = str(state) if isinstance(state, str | Path) else "state dict"
    raw = read_checkpoint(Path(state)) if isinstance(state, str | Path) else state
    upstream = to_upstream_layout(raw, source=source)
    cfg = infer_config(upstream.tensors)
    mod = load_official_module(repo or resolve_repo(settings))
    patch = mod.SwinPatchEmbed3D(
        patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim
    )
    backbone = mod.SwinTransformer3D(
        pretrained=None,
        pretrained2d=False,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depths=list(cfg.depths),
        num_heads=list(cfg.num_heads),
        window_size=cfg.window_size,
        out_indices=(0, 1, 2, 3),
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias,
        qk_scale=None,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.2,
        patch_norm=False,
        frozen_stages=-1,
        use_checkpoint=False,
        downsample_steps=((2, 2, 2),) * 4,
        feature_fusion="cat",
        mean_frame_down=cfg.mean_frame_down,
    )
    model = OfficialEncoder(patch, backbone)
    own = model.state_dict()
    tensors = dict(upstream.tensors)
    for key, value in own.items():  # fixed index buffers the file left out
        if key.endswith("relative_position_index") and key not in tensors:
            tensors[key] = value
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    mismatched = sorted(
        f"{k}: {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}"
        for k in set(own) & set(tensors)
        if tensors[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not fit the official encoder: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatch {mismatched[:10]}"
        )
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval().requires_grad_(False)
