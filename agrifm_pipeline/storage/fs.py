"""The file-system layer: fsspec roots and their options, safe path components,
whole-file atomic writes, and small JSON documents replaced whole (:class:`Documents`:
pointers, index shards, catalogs) without losing a concurrent update.

The storage root and its options are read from the environment
(``AGRIFM_PIPELINE_STORAGE``, ``AGRIFM_PIPELINE_STORAGE_OPTIONS``) by
:func:`storage_from_env` alone, and a root's URL protocol is checked by
:func:`check_storage_url` alone, whichever way the root came (the environment, a
resource field, ``--store``): one message and one error type,
:class:`~agrifm_pipeline.storage.errors.StorageRootError`.

Nothing here knows about versions or partitions; every other storage module builds
on it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
import fsspec.asyn
import numpy as np

from agrifm_pipeline.storage.errors import StorageError, StorageRootError

_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
_MEMORY_LOCKS: dict[str, threading.Lock] = {}
_MEMORY_LOCKS_GUARD = threading.Lock()


def is_local(fs: Any) -> bool:
    """Whether an fsspec filesystem is the local one."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


STORAGE_ENV = "AGRIFM_PIPELINE_STORAGE"
STORAGE_OPTIONS_ENV = "AGRIFM_PIPELINE_STORAGE_OPTIONS"
# The package extra that installs a protocol's filesystem (pyproject's optional dependencies).
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageLocation(NamedTuple):
    """Where the outputs live: the root (a directory or fsspec URL) and its fsspec options."""

    root: str
    options: dict[str, Any]


def check_storage_url(url: str, *, name: str | None = None) -> str:
    """``url`` (stripped) if it is a directory path or a URL whose protocol fsspec can open.

    Raises :class:`StorageRootError` for an empty root, an unknown protocol, or one whose
    filesystem package is missing; the message names ``name`` (the variable or field the
    root came from) with the value, or says ``storage root`` when it came as an argument.
    """
    text = str(url).strip()
    if not text:
        raise StorageRootError(
            f"{name or 'the storage root'} is empty; unset it for the default, or give a "
            "directory or URL"
        )
    said = f"{name}={text!r}" if name else f"storage root {text!r}"
    protocol, _ = fsspec.core.split_protocol(text)
    if protocol is None:
        return text
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise StorageRootError(
            f"{said}: {protocol!r} is not a storage protocol fsspec knows; give a directory, "
            "or a URL such as file:///data/agrifm, s3://bucket/agrifm, gs://bucket/agrifm"
        ) from None
    except ImportError as exc:
        extra = _EXTRAS.get(protocol)
        how = f"install it with pip install 'agrifm-pipeline[{extra}]'" if extra else "install it"
        raise StorageRootError(
            f"{said}: the {protocol!r} filesystem needs a package that is not installed "
            f"({exc}); {how}, or give a local directory"
        ) from None
    return text


def _storage_options(env: Mapping[str, str]) -> dict[str, Any]:
    text = env.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StorageRootError(
            f"{STORAGE_OPTIONS_ENV} is not valid JSON ({exc}); set it to a JSON "
            'object such as {"endpoint_url": "https://s3.example.org", "anon": false}'
        ) from None
    if not isinstance(out, dict):
        raise StorageRootError(
            f"{STORAGE_OPTIONS_ENV} must be a JSON object of fsspec storage options"
        )
    return out


def storage_from_env(env: Mapping[str, str] | None = None, *, default_root: str) -> StorageLocation:
    """The storage root and its options from ``env`` (default: ``os.environ``), checked.

    The root is ``AGRIFM_PIPELINE_STORAGE`` (:func:`check_storage_url`), else
    ``default_root`` when it is unset or empty; the options are
    ``AGRIFM_PIPELINE_STORAGE_OPTIONS``, a JSON object passed to fsspec (endpoint,
    profile…), else none. Either one wrong is a :class:`StorageRootError` naming it.
    """
    env = os.environ if env is None else env
    raw = env.get(STORAGE_ENV, "")
    root = check_storage_url(raw, name=STORAGE_ENV) if raw.strip() else default_root
    return StorageLocation(root, _storage_options(env))


def storage_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The options half of :func:`storage_from_env`, for a root given some other way
    (an explicit root: the ``ZarrStorage`` resource's field default)."""
    return _storage_options(os.environ if env is None else env)


def filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """``(fs, path)`` for a storage URL; a root fsspec cannot open is the
    :class:`StorageRootError` of :func:`check_storage_url`, one it cannot reach a
    :class:`StorageError`."""
    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except (ValueError, ImportError) as exc:
        check_storage_url(url)  # an unknown protocol, or its package missing: said there
        raise StorageRootError(
            f"storage root {url!r} cannot be opened ({exc}); use a local path or a URL "
            "fsspec knows (s3://, gs://, memory://) with options it takes"
        ) from None
    except OSError as exc:  # a file system that connects when made (ftp://, sftp://…)
        raise StorageError(
            f"storage root {url!r} cannot be reached ({_why(exc)}); check the host name and "
            "the network, or use a local path or an object store (s3://, gs://)"
        ) from None


def gdal_path(url: str) -> str:
    """The path GDAL opens for a storage URL (``/vsis3/``, ``/vsigs/``, or a local path)."""
    for scheme, prefix in (("s3://", "/vsis3/"), ("gs://", "/vsigs/"), ("gcs://", "/vsigs/")):
        if url.startswith(scheme):
            return prefix + url[len(scheme) :]
    if url.startswith("file://"):
        return url[len("file://") :]
    return url


def check_name(value: str | int, what: str) -> str:
    """A path component built from user input: safe characters only, never ``.``/``..``."""
    text = str(value)
    if not _SAFE.match(text):
        raise StorageError(
            f"{what} {text!r} cannot be a storage path component; use letters, digits, "
            "'_' and '-' (starting with a letter or digit, at most 128 characters)"
        )
    return text


def write_file_atomic(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Whole-file write to any fsspec URL. Locally: a temporary file beside it with the
    process umask's permissions, then one rename; the temporary file never outlives a
    failed write. Elsewhere: one PUT."""
    fs, path = filesystem(url, storage_options)
    if is_local(fs):
        _write_local_atomic(Path(path), data)
    else:
        fs.pipe_file(path, data)


def _write_local_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def _json(doc: Any) -> bytes:
    return json.dumps(doc, default=_json_default, sort_keys=True, indent=1).encode()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "isoformat"):
        return obj.isoformat()
    return str(obj)


def _loads(raw: bytes, damaged: bool) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(raw)
    except ValueError:
        if damaged:
            return None
        raise
    return doc if isinstance(doc, dict) or not damaged else None


def _why(exc: BaseException) -> str:
    """An error in a few words: the system's text for an OSError, else its message."""
    if isinstance(exc, OSError) and exc.strerror:
        name = errno.errorcode.get(exc.errno or 0)
        return f"{exc.strerror} ({name})" if name else str(exc.strerror)
    return f"{type(exc).__name__}: {exc}"


class Documents:
    """Small JSON documents (pointers, catalogs) replaced whole, and updated by
    read-modify-write without losing a concurrent update where the store allows it:
    a POSIX lock beside the document on local and network file systems, an in-process
    lock for ``memory://``, and conditional PUTs (``If-Match``/``If-None-Match``) on S3.
    Other object stores replace the document unconditionally (the last writer wins)."""

    def __init__(self, fs: Any, *, lock: bool = True, owner: Any = None):
        self.fs = fs
        self.local = is_local(fs)
        self.lock_files = lock
        self.owner = owner  # told when the file system turns out to have no locks
        self.conditional = _protocol(fs) in ("s3", "s3a")
        self.complete = (self.local and lock) or self.conditional or _protocol(fs) == "memory"

    @contextlib.contextmanager
    def _lock(self, path: str) -> Iterator[None]:
        if not (self.local or _protocol(self.fs) == "memory"):
            yield  # object stores: conditional writes, or the last writer wins
            return
        # Threads of this process take the path's thread lock: POSIX locks belong to the
        # process (they keep other processes out, not other threads, and closing any
        # descriptor of the file drops them), and memory:// lives in this process alone.
        with _MEMORY_LOCKS_GUARD:
            threads = _MEMORY_LOCKS.setdefault(path, threading.Lock())
        with threads:
            if not (self.local and self.lock_files):
                yield
                return
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX)  # POSIX locks: NFS (lockd/v4) honours them
                except OSError as exc:
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    self.lock_files = self.complete = False  # a file system without locks
                    if self.owner is not None:
                        self.owner.commit_lock = False
                yield
            finally:
                with contextlib.suppress(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_UN)
                os.close(fd)

    def read(self, path: str, *, damaged: bool = False) -> tuple[dict[str, Any] | None, str]:
        """The document and a token (its ETag on S3) for a conditional replace; with
        ``damaged``, a document that is not JSON reads as None (with its token, so that
        it can be replaced) instead of raising."""
        raw, token = self.read_raw(path)
        return (None if raw is None else _loads(raw, damaged)), token

    def read_raw(self, path: str) -> tuple[bytes | None, str]:
        """The document's bytes (None when there is none) and its token."""
        if self.conditional:
            bucket, key, _ = self.fs.split_path(path)
            fs = self.fs

            async def get() -> tuple[bytes, str]:
                resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
                async with resp["Body"] as body:
                    data = await body.read()
                return data, str(resp.get("ETag", ""))

            try:
                return fsspec.asyn.sync(fs.loop, get)
            except FileNotFoundError:
                return None, ""
        try:
            return (Path(path).read_bytes() if self.local else self.fs.cat_file(path)), ""
        except FileNotFoundError:
            return None, ""

    def set_aside(self, path: str, raw: bytes) -> str:
        """Keep a damaged document's bytes beside it (``<name>.damaged-<time>``), for a
        person to look at; the path of the copy."""
        aside = f"{path}.damaged-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%S%f}Z"
        if self.local:
            _write_local_atomic(Path(aside), raw)
        else:
            self.fs.pipe_file(aside, raw)
        return aside

    def write(self, path: str, doc: dict[str, Any], token: str = "") -> bool:
        """Replace the document; False where a conditional write found a newer one."""
        data = _json(doc)
        if self.local:
            _write_local_atomic(Path(path), data)
            return True
        if self.conditional:
            kwargs: dict[str, Any] = {"IfMatch": token} if token else {"mode": "create"}
            try:
                self.fs.pipe_file(path, data, **kwargs)
            except Exception as exc:  # botocore's ClientError, surfaced by s3fs in several shapes
                text = f"{type(exc).__name__} {exc}"
                if isinstance(exc, FileExistsError) or any(
                    m in text for m in ("PreconditionFailed", "412", "pre-condition")
                ):
                    return False
                if "NotImplemented" in text or "501" in text:  # a store without them
                    self.conditional = self.complete = False
                    self.fs.pipe_file(path, data)
                    return True
                raise
            return True
        self.fs.pipe_file(path, data)
        return True

    def update(
        self,
        path: str,
        mutate: Any,
        write: Any = None,
        *,
        attempts: int = 64,
        damaged: bool = False,
        parse: Any = None,
    ) -> dict[str, Any]:
        """``mutate(old or None) -> new``, written without losing a concurrent update;
        with ``damaged`` a document that is not JSON is replaced as if absent. ``parse``
        (bytes -> document or None) reads the document instead: one it calls damaged
        (None) is kept beside it (:meth:`set_aside`), then replaced as if absent."""
        put = write or self.write
        for _ in range(attempts):
            with self._lock(path):
                raw, token = self.read_raw(path)
                if raw is None:
                    doc = None
                elif parse is not None:
                    doc = parse(raw)
                    if doc is None:
                        self.set_aside(path, raw)
                else:
                    doc = _loads(raw, damaged)
                new: dict[str, Any] = mutate(doc)
                if put(path, new, token):
                    return new
            time.sleep(0.01)
        raise StorageError(
            f"{path} kept changing over {attempts} attempts to update it; too many writers"
        )
