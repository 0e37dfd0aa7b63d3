"""Checkpoint resolution: explicit path -> cache -> download, with a content hash.

The order is the adapter contract's. A download is streamed into a temporary
file beside its final place and moved in only when it is complete, larger than
``RS_EMBED_AGRIFM_CKPT_MIN_BYTES`` and looks like a torch checkpoint; nothing
half-written is ever left where the cache expects weights. The sha256 of a
file is computed once and kept beside it (``<file>.sha256`` with the size and
modification time it belongs to), so lineage can name the weights cheaply.

``untrained:<seed>`` (optionally ``:p422``) names deterministic random weights
for offline runs and benchmarks; it is only ever used when asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model.layout import unwrap_checkpoint
from agrifm_pipeline.settings import AgriFMSettings, load_settings

_UNTRAINED = re.compile(r"^untrained:(?P<seed>-?\d+)(?::(?P<patch>p\d\d\d))?$")
_PATCHES = {"p444": (4, 4, 4), "p422": (4, 2, 2)}
_CHUNK = 1 << 20
# Legacy (pre-1.6) torch.save files start with a pickle protocol marker.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the weights come from, and their identity."""

    spec: str
    source: str  # "path" | "cache" | "download" | "untrained"
    path: Path | None
    sha256: str
    size_bytes: int
    url: str | None = None
    untrained_seed: int | None = None
    untrained_patch: tuple[int, int, int] | None = None

    @property
    def untrained(self) -> bool:
        return self.source == "untrained"

    def as_record(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "source": self.source,
            "path": None if self.path is None else str(self.path),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "url": self.url,
            "untrained": self.untrained,
            "untrained_seed": self.untrained_seed,
            "untrained_patch": None if self.untrained_patch is None else list(self.untrained_patch),
        }


def parse_untrained_spec(spec: str) -> tuple[int, tuple[int, int, int]] | None:
    """``untrained:<seed>[:p444|p422]`` -> (seed, patch); None for anything else."""
    text = str(spec).strip()
    if not text.startswith("untrained"):
        return None
    m = _UNTRAINED.match(text)
    if not m:
        raise CheckpointError(
            f"checkpoint spec {spec!r} is malformed; use untrained:<seed> or untrained:<seed>:p422"
        )
    seed = int(m["seed"])
    if not 0 <= seed < 2**32:
        raise CheckpointError(f"untrained seed {seed} is outside 0..4294967295")
    patch = m["patch"] or "p444"
    if patch not in _PATCHES:
        raise CheckpointError(f"checkpoint spec {spec!r}: the patch must be p444 or p422")
    return seed, _PATCHES[patch]


def sha256_file(path: Path) -> str:
    """The file's sha256, cached beside it in ``<name>.sha256`` keyed by size and mtime."""
    path = Path(path)
    st = path.stat()
    sidecar = path.with_name(path.name + ".sha256")
    try:
        cached = json.loads(sidecar.read_text())
        if cached.get("size") == st.st_size and cached.get("mtime_ns") == st.st_mtime_ns:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    value = digest.hexdigest()
    try:
        tmp = sidecar.with_name(sidecar.name + f".tmp{os.getpid()}")
        tmp.write_text(
            json.dumps({"sha256": value, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        )
        os.replace(tmp, sidecar)
    except OSError:
        pass  # a read-only location still gets the hash, just not cached
    return value


def looks_like_torch_checkpoint(path: Path) -> bool:
    """A zip in torch's layout (``<root>/data.pkl``) or a legacy pickle stream."""
    with Path(path).open("rb") as fh:
        head = fh.read(4)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                return any(n.endswith("data.pkl") for n in zf.namelist())
        except zipfile.BadZipFile:
            return False
    return head[:2] in _PICKLE_MAGIC


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors with ``weights_only=True`` and unwrap it to a flat dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types here; all mean "not loadable"
        raise CheckpointError(
            f"{path} is not a torch checkpoint, or one that needs unsafe pickle loading "
            f"(we only load weights_only=True): {type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    return unwrap_checkpoint(obj, source=str(path))


def checkpoint_tensors(resolved: ResolvedCheckpoint) -> dict[str, torch.Tensor]:
    """The tensors a resolved checkpoint names: read from its file, or built for ``untrained``."""
    if resolved.untrained:
        from agrifm_pipeline.model.config import EncoderConfig
        from agrifm_pipeline.model.weights import untrained_state_dict

        patch = resolved.untrained_patch or (4, 4, 4)
        return untrained_state_dict(resolved.untrained_seed or 0, EncoderConfig(patch_size=patch))
    assert resolved.path is not None
    return read_checkpoint(resolved.path)


def _progress(done: int, total: int | None) -> None:
    if total:
        sys.stderr.write(f"\rdownloading checkpoint: {done / 2**20:.0f} / {total / 2**20:.0f} MiB")
    else:
        sys.stderr.write(f"\rdownloading checkpoint: {done / 2**20:.0f} MiB")
    sys.stderr.flush()


def download_checkpoint(
    url: str, dest: Path, *, min_bytes: int, timeout: float = 60.0, progress: bool = False
) -> Path:
    """Stream ``url`` into ``dest`` atomically; raise CheckpointError on any defect."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        try:
            resp = urllib.request.urlopen(url, timeout=timeout)
        except urllib.error.HTTPError as exc:
            raise CheckpointError(
                f"downloading {url} failed: HTTP {exc.code} {exc.reason}; check RS_EMBED_AGRIFM_CKPT_URL "
                "or set RS_EMBED_AGRIFM_CKPT to a local file"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise CheckpointError(
                f"downloading {url} failed: {exc}; check the network or set RS_EMBED_AGRIFM_CKPT to a local file"
            ) from None
        with resp, os.fdopen(fd, "wb") as out:
            ctype = resp.headers.get("Content-Type", "")
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            if "text/html" in ctype.lower():
                raise CheckpointError(
                    f"{url} returned a web page (Content-Type {ctype!r}), not weights; "
                    "the URL is probably a landing or login page"
                )
            done = 0
            first = b""
            try:
                while block := resp.read(_CHUNK):
                    if not first:
                        first = block[:64]
                        if first.lstrip()[:1] == b"<":
                            raise CheckpointError(
                                f"{url} returned an HTML/XML document, not weights"
                            )
                    out.write(block)
                    done += len(block)
                    if progress:
                        _progress(done, expected)
            except (OSError, ValueError) as exc:  # includes http.client.IncompleteRead
                raise CheckpointError(
                    f"downloading {url} broke off after {done} bytes ({type(exc).__name__}); try again"
                ) from None
            out.flush()
            os.fsync(out.fileno())
        if progress:
            sys.stderr.write("\n")
        if expected is not None and done != expected:
            raise CheckpointError(
                f"downloading {url} got {done} of {expected} bytes (truncated); try again"
            )
        if done < min_bytes:
            raise CheckpointError(
                f"{url} gave {done} bytes, fewer than RS_EMBED_AGRIFM_CKPT_MIN_BYTES={min_bytes}; "
                "this is not the full AgriFM checkpoint"
            )
        if not looks_like_torch_checkpoint(tmp):
            raise CheckpointError(
                f"{url} did not return a torch checkpoint (no torch zip or pickle header)"
            )
        os.replace(tmp, dest)
        return dest
    finally:
        if tmp.exists():
            tmp.unlink()


def resolve_checkpoint(
    spec: str | Path | None = None,
    settings: AgriFMSettings | None = None,
    *,
    progress: bool = False,
) -> ResolvedCheckpoint:
    """Find the weights: explicit ``spec`` (else ``RS_EMBED_AGRIFM_CKPT``) -> cache -> download."""
    settings = settings or load_settings()
    explicit = spec if spec is not None else settings.checkpoint
    if explicit is not None and str(explicit).strip():
        text = str(explicit).strip()
        untrained = parse_untrained_spec(text)
        if untrained is not None:
            seed, patch = untrained
            label = f"untrained:{seed}:p{''.join(map(str, patch))}"
            return ResolvedCheckpoint(
                spec=text,
                source="untrained",
                path=None,
                sha256=hashlib.sha256(label.encode()).hexdigest(),
                size_bytes=0,
                untrained_seed=seed,
                untrained_patch=patch,
            )
        path = Path(os.path.expanduser(text))
        if not path.is_file():
            origin = "RS_EMBED_AGRIFM_CKPT" if spec is None else "checkpoint"
            raise CheckpointError(f"{origin}={text!r}: no such file; give the path of AgriFM.pth")
        return ResolvedCheckpoint(
            spec=text,
            source="path",
            path=path,
            sha256=sha256_file(path),
            size_bytes=path.stat().st_size,
        )

    cached = settings.checkpoint_cache_path
    if cached.is_file():
        size = cached.stat().st_size
        if size < settings.ckpt_min_bytes:
            raise CheckpointError(
                f"cached checkpoint {cached} has {size} bytes, fewer than "
                f"RS_EMBED_AGRIFM_CKPT_MIN_BYTES={settings.ckpt_min_bytes}; delete it to download again"
            )
        return ResolvedCheckpoint(
            spec="default", source="cache", path=cached, sha256=sha256_file(cached), size_bytes=size,
            url=settings.ckpt_url,
        )  # fmt: skip
    if not settings.auto_download:
        raise CheckpointError(
            f"auto-download is disabled (RS_EMBED_AGRIFM_AUTO_DOWNLOAD=0) and nothing is cached at "
            f"{cached}; set RS_EMBED_AGRIFM_CKPT to AgriFM.pth or enable the download"
        )
    path = download_checkpoint(
        settings.ckpt_url, cached, min_bytes=settings.ckpt_min_bytes, progress=progress
    )
    return ResolvedCheckpoint(
        spec="default", source="download", path=path, sha256=sha256_file(path),
        size_bytes=path.stat().st_size, url=settings.ckpt_url,
    )  # fmt: skip
