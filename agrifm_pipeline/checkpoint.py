"""Checkpoint resolution: explicit path -> cache -> download, with a content hash.

The order is the adapter contract's. A download is streamed into a temporary
file beside its final place and moved in only when it is complete, larger than
``RS_EMBED_AGRIFM_CKPT_MIN_BYTES`` and looks like a torch checkpoint; nothing
half-written is ever left where the cache expects weights. The sha256 of a
file is computed once and kept beside it (``<file>.sha256`` with the size and
modification time it belongs to), so lineage can name the weights cheaply.

``untrained:<seed>`` (optionally ``:p422``) names deterministic random weights
for offline runs and benchmarks; it is only ever used when asked for.

The checkpoint may also be a URL (``https://``, ``s3://``, ``gs://``), optionally
pinned as ``<url>#sha256=<hex>``. Each node keeps one copy in a per-URL cache
directory under ``RS_EMBED_AGRIFM_CACHE_DIR``; a file lock around it makes N
processes on the node download once (the others wait and read the copy). The
cached file is mode 0644, so every user on the node can read it. A pinned URL is
identified by its pin alone: sensors and the audit judge staleness from it
without the weights, and a download whose sha256 differs is refused.

This module only says where the weights come from and reads them; it imports
nothing from the encoder package above it (``model/``), whose ``checks`` module
says whether the weights fit the encoder and whose ``weights`` module makes the
untrained ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.settings import AgriFMSettings, load_settings

_URL = re.compile(r"^(?P<scheme>https?|s3|gs)://", re.IGNORECASE)
_PIN = re.compile(r"^(?P<url>.+)#sha256=(?P<sha>[0-9a-fA-F]{64})$")
# How long a process waits for another one on the node to finish the same download.
LOCK_TIMEOUT_S = 3600.0
CACHED_MODE = 0o644
_UNTRAINED = re.compile(r"^untrained:(?P<seed>-?\d+)(?::(?P<patch>p\d\d\d))?$")
_PATCHES = {"p444": (4, 4, 4), "p422": (4, 2, 2)}
_CHUNK = 1 << 20
# Legacy (pre-1.6) torch.save files start with a pickle protocol marker.
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_WRAPPERS = ("state_dict", "model", "module")


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """Where the weights come from, and their identity."""

    spec: str
    # "path" | "cache" | "download" | "untrained" | "pinned" (a URL known by its pin alone)
    source: str
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


REFETCH_ADVICE = (
    "download the weights again (RS_EMBED_AGRIFM_CKPT_URL) or point RS_EMBED_AGRIFM_CKPT "
    "at the real AgriFM.pth"
)


def describe_non_checkpoint(path: Path) -> str | None:
    """What the file plainly is when its first bytes show it is no torch checkpoint
    (a web page, a Git LFS pointer, JSON or other text, nothing); None otherwise."""
    with Path(path).open("rb") as fh:
        head = fh.read(1024)
    if not head:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK") or head[:2] in _PICKLE_MAGIC:
        return None
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    begins = head[:40].decode("utf-8", "replace").strip()
    if text.startswith((b"<!doctype html", b"<html")) or b"<html" in text or b"<body" in text:
        return f"an HTML page (it begins {begins!r}): a web page saved where the weights should be"
    if text.startswith(b"<"):
        return f"an XML/HTML document (it begins {begins!r}), not weights"
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights; fetch them with `git lfs pull`"
    if text[:1] in (b"{", b"["):
        return f"a JSON or text file (it begins {begins!r})"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return f"a text file (it begins {begins!r})"


def not_a_checkpoint(path: Path) -> str | None:
    """What the file is when its first bytes show it is no torch checkpoint: what
    :func:`describe_non_checkpoint` names, or a zip archive of other files, a
    gzip file, other binary data. None when it may be one: torch's zip layout or a
    pickle stream (a damaged zip is left to the loader, which calls it damaged)."""
    what = describe_non_checkpoint(path)
    if what is not None or looks_like_torch_checkpoint(path):
        return what
    with Path(path).open("rb") as fh:
        head = fh.read(16)
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return None
        shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
        return (
            f"a zip archive of other files ({len(names)}: {shown or 'none'}), not torch's "
            "layout (no data.pkl)"
        )
    if head.startswith(b"\x1f\x8b"):
        return "a gzip-compressed file; unpack it (gunzip) if the weights are inside"
    return (
        "a binary file that is neither a zip archive in torch's layout nor a pickle stream "
        f"(it begins {head[:8]!r})"
    )


def _unpickler_reason(exc: BaseException) -> str:
    """The reason inside torch's weights-only refusal, without its advice on unsafe loading."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = " ".join(text.split())
    for cut in (" was not an allowed global", " Check the documentation", " Please "):
        text = text.split(cut, 1)[0]
    return text.strip().rstrip(".")[:200]


def unwrap_checkpoint(obj: Any, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The flat ``{name: tensor}`` dict inside a loaded checkpoint object."""
    seen = 0
    while isinstance(obj, Mapping) and seen < 3:
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj, seen = inner, seen + 1
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{source} holds no state dict (got {type(obj).__name__}); "
            "expected a dict of tensors, optionally under 'state_dict' or 'model'"
        )
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors; it is not an AgriFM checkpoint")
    return tensors


def read_checkpoint(path: Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors with ``weights_only=True`` and unwrap it to a flat dict.

    ``mmap=True`` maps the tensors of a zip-format file instead of reading them
    (enough to check names and shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    what = describe_non_checkpoint(path)
    if what is not None:
        raise CheckpointError(f"{path} is {what}, not a torch checkpoint; {REFETCH_ADVICE}")
    with path.open("rb") as fh:
        zipped = fh.read(2) == b"PK"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError as exc:
        if looks_like_torch_checkpoint(path):
            raise CheckpointError(
                f"{path} is a torch file that holds more than tensors "
                f"({_unpickler_reason(exc)}); checkpoints are only ever loaded with "
                "weights_only=True, so re-save its state dict alone "
                "(torch.save(model.state_dict(), path))"
            ) from None
        raise CheckpointError(
            f"{path} is not a torch checkpoint (neither torch's zip layout nor a pickle "
            f"stream: {_unpickler_reason(exc)}); {REFETCH_ADVICE}"
        ) from None
    except Exception as exc:  # torch raises many types for damaged files
        first = " ".join(str(exc).split())[:200]
        if looks_like_torch_checkpoint(path) or zipped:
            raise CheckpointError(
                f"{path} looks like a torch checkpoint but cannot be read, probably "
                f"truncated or damaged ({type(exc).__name__}: {first}); {REFETCH_ADVICE}"
            ) from None
        raise CheckpointError(
            f"{path} is not a torch checkpoint ({type(exc).__name__}: {first}); {REFETCH_ADVICE}"
        ) from None
    return unwrap_checkpoint(obj, source=str(path))


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
        os.chmod(tmp, CACHED_MODE)  # mkstemp made it 0600: readable by every user of the node
        os.replace(tmp, dest)
        return dest
    finally:
        if tmp.exists():
            tmp.unlink()


def parse_url_spec(spec: str) -> tuple[str, str | None] | None:
    """``https|s3|gs://…[#sha256=<hex>]`` -> (url, pinned sha256 or None); None if no URL."""
    text = str(spec).strip()
    if not _URL.match(text):
        return None
    m = _PIN.match(text)
    if m:
        return m["url"], m["sha"].lower()
    if "#" in text:
        raise CheckpointError(
            f"checkpoint URL {text!r}: the only fragment understood is #sha256=<64 hex digits>"
        )
    return text, None


def url_cache_dir(url: str, settings: AgriFMSettings) -> Path:
    """This node's cache directory for one URL (one per URL, so two URLs never collide)."""
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return settings.cache_dir / "urls" / key


def _cached_name(url: str) -> str:
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return name if re.fullmatch(r"[A-Za-z0-9._-]{1,200}", name or "") else "checkpoint.pth"


def _fetch_object(url: str, dest: Path, *, min_bytes: int) -> Path:
    """Copy an s3:// or gs:// object into ``dest`` atomically, with download_checkpoint's checks."""
    import fsspec

    scheme = url.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        extra = {"gs": "gcsfs", "s3": "s3fs"}.get(scheme, scheme)
        raise CheckpointError(
            f"checkpoint {url}: cannot read {scheme}:// URLs here ({exc}); pip install {extra}"
        ) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.part-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        done = 0
        try:
            with fs.open(path, "rb") as src, os.fdopen(fd, "wb") as out:
                while block := src.read(_CHUNK):
                    out.write(block)
                    done += len(block)
                out.flush()
                os.fsync(out.fileno())
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {url}: no such object; check the URL") from None
        except OSError as exc:
            raise CheckpointError(
                f"reading checkpoint {url} failed after {done} bytes: {exc}"
            ) from None
        if done < min_bytes:
            raise CheckpointError(
                f"{url} has {done} bytes, fewer than RS_EMBED_AGRIFM_CKPT_MIN_BYTES={min_bytes}; "
                "this is not the full AgriFM checkpoint"
            )
        if not looks_like_torch_checkpoint(tmp):
            what = describe_non_checkpoint(tmp) or "no torch zip or pickle header"
            raise CheckpointError(f"{url} is not a torch checkpoint ({what})")
        os.chmod(tmp, CACHED_MODE)
        os.replace(tmp, dest)
        return dest
    finally:
        if tmp.exists():
            tmp.unlink()


def node_lock(path: Path) -> Any:
    """A file lock beside ``path``: one download per node, the other processes wait for it."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S, mode=0o666)


def resolve_url_checkpoint(
    spec: str, url: str, pin: str | None, settings: AgriFMSettings, *, progress: bool = False
) -> ResolvedCheckpoint:
    """A URL checkpoint: this node's cached copy, else one download under the node's lock.

    With downloads off (sensors, the audit) and no copy on the node, a pinned URL is
    still identified by its pin; an unpinned one is a CheckpointError saying so.
    """
    dest = url_cache_dir(url, settings) / _cached_name(url)

    def found(source: str) -> ResolvedCheckpoint:
        sha = sha256_file(dest)
        if pin is not None and sha != pin:
            raise CheckpointError(
                f"{url} gave sha256 {sha[:12]}…, not the pinned {pin[:12]}…; the object "
                f"changed or the pin is wrong (cached copy: {dest}; delete it to fetch again)"
            )
        return ResolvedCheckpoint(
            spec=spec, source=source, path=dest, sha256=sha, size_bytes=dest.stat().st_size, url=url
        )

    if dest.is_file():
        return found("cache")
    if not settings.auto_download:
        if pin is not None:
            return ResolvedCheckpoint(
                spec=spec, source="pinned", path=None, sha256=pin, size_bytes=0, url=url
            )
        raise CheckpointError(
            f"checkpoint {url} is not on this node ({dest}) and downloads are off here; "
            f"pin it as {url}#sha256=<hex> so it is known without the weights, or fetch it "
            "with `agrifm-pipeline checkpoint`"
        )
    with node_lock(dest):
        if dest.is_file():  # another process on the node fetched it while we waited
            return found("cache")
        if url.lower().startswith(("http://", "https://")):
            download_checkpoint(url, dest, min_bytes=settings.ckpt_min_bytes, progress=progress)
        else:
            _fetch_object(url, dest, min_bytes=settings.ckpt_min_bytes)
        try:
            return found("download")
        except CheckpointError:
            dest.unlink(missing_ok=True)
            raise


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
        remote = parse_url_spec(text)
        if remote is not None:
            return resolve_url_checkpoint(text, *remote, settings, progress=progress)
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
    with node_lock(cached):
        if not cached.is_file():  # else another process on the node fetched it meanwhile
            download_checkpoint(
                settings.ckpt_url, cached, min_bytes=settings.ckpt_min_bytes, progress=progress
            )
    path = cached
    return ResolvedCheckpoint(
        spec="default", source="download", path=path, sha256=sha256_file(path),
        size_bytes=path.stat().st_size, url=settings.ckpt_url,
    )  # fmt: skip
