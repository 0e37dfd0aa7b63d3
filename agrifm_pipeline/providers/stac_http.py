"""HTTP for the ``stac`` provider: retries, SAS signing, and COGs read block by block.

**Retries.** Every request (a search page, a token, a byte range of a COG) goes
through :func:`retrying`: an answer 429, 500, 502, 503 or 504, Earth Search's
throttling answer (HTTP 403 with the body ``{"message":"Forbidden"}``), a refused,
reset or dropped connection, a body cut short and a timeout (no byte within
``read_timeout_s``: a slow first byte) are tried again after a jittered exponential
wait (half fixed, half random, at most ``max_backoff_s``, longer when the answer says
``Retry-After``), at most ``max_attempts`` times and ``max_wait_s`` of waiting in all.
A 403 on a signed read drops the token and signs again. Anything else (404, a 403
that is no throttling, a 409 "public access not permitted") fails at once. What is
still failing after that is :class:`RequestFailed` with the last HTTP status, which the
provider turns into a :class:`~agrifm_pipeline.errors.SourceRequestError` naming the
item and asset. Each retry is counted by reason (:class:`Counters`).

GDAL retries neither a 404 nor a refused connection and, reading through ``/vsicurl/``,
reports a failed read without its status ("not recognized as being in a supported
file format"). So the provider lets GDAL decode but not fetch: :class:`RemoteFile` is a
read-only file over HTTP Range requests that rasterio opens through its ``opener``
(GDAL's Python file-system plugin). GDAL asks for the header (one request of
:data:`HEADER_BYTES`, which holds a COG's whole header and tile index) and then for
exactly the tiles its window needs, one request each; nothing else is fetched, no
sidecar is probed (``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``), and a server that
answers a Range request with the whole file is refused rather than downloaded.
A request that fails for good makes the file's reads come back short (an exception
raised inside GDAL's callback would abort the process); the provider then raises the
recorded failure, whatever GDAL made of the short read.

**Signing** (:class:`SasSigner`, Planetary Computer): a SAS token per storage account
and container from ``<sas_url>/token/<account>/<container>``, fetched with the same
retries, cached until ten minutes before its ``msft:expiry`` and appended to each
request's URL at the moment it is sent, so a token never outlives a slow tile-year
and item addresses are stored unsigned.

**Search** (:class:`RetryingStacIO`): pystac-client's ``StacApiIO`` with its own
urllib3 retries off and every request through :func:`retrying`.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlparse

import requests
from pystac_client.exceptions import APIError
from pystac_client.stac_api_io import StacApiIO

from agrifm_pipeline.errors import SettingsError

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: The body of Earth Search's throttling answer (API Gateway), sent with HTTP 403.
THROTTLED_MESSAGE = "Forbidden"
#: Bytes asked for first: a COG's header and tile index (GDAL's own ingest is 16 KiB; a
#: 10980 px Sentinel-2 band in 1024 px tiles with overviews keeps both within a few KiB).
HEADER_BYTES = 32 * 1024
#: The least a small read asks for, so GDAL's many small header reads share a request.
MIN_REQUEST = 16 * 1024
#: Answers kept for later reads of the same file at most this size (headers, not tiles).
CACHED_CHUNK = 256 * 1024
#: A token is fetched again this long before it expires.
TOKEN_MARGIN_S = 600.0
#: The Planetary Computer SDK's variable for an (optional) API subscription key.
PC_SUBSCRIPTION_KEY_ENV = "PC_SDK_SUBSCRIPTION_KEY"


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one request is tried (see the module docstring)."""

    max_attempts: int = 6
    backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    max_wait_s: float = 120.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise SettingsError(f"max_attempts={self.max_attempts!r}; use a whole number >= 1")
        for name in ("backoff_s", "max_backoff_s", "max_wait_s"):
            if not getattr(self, name) >= 0:
                raise SettingsError(f"{name}={getattr(self, name)!r}; use seconds >= 0")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise SettingsError(f"{name}={getattr(self, name)!r}; use seconds > 0")

    @property
    def timeout(self) -> tuple[float, float]:
        return self.connect_timeout_s, self.read_timeout_s

    def with_attempts(self, attempts: int | None) -> RetryPolicy:
        if attempts is None:
            return self
        return RetryPolicy(
            attempts,
            self.backoff_s,
            self.max_backoff_s,
            self.max_wait_s,
            self.connect_timeout_s,
            self.read_timeout_s,
        )


@dataclass
class Counters:
    """Requests of one fetch or listing, counted from several threads."""

    requests: int = 0
    bytes: int = 0
    retries: Counter[str] = field(default_factory=Counter)  # reason -> retries
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, requests: int = 0, nbytes: int = 0, retry: str | None = None) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes
            if retry is not None:
                self.retries[retry] += 1

    def record(self) -> dict[str, Any]:
        with self.lock:
            return {
                "requests": self.requests,
                "bytes": self.bytes,
                "retries": sum(self.retries.values()),
                "retries_by_reason": dict(sorted(self.retries.items())),
            }


class Transient(Exception):
    """A failure worth another attempt (``reason`` says which, for the count)."""

    def __init__(self, reason: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.status, self.retry_after = reason, status, retry_after


class Permanent(Exception):
    """A failure that another attempt would not change (a 404, a refusal)."""

    def __init__(self, reason: str, status: int | None = None):
        super().__init__(reason)
        self.reason, self.status = reason, status


class RequestFailed(Exception):
    """A request that failed for good: refused, or retried until the policy's bound."""

    def __init__(self, url: str, reason: str, status: int | None, attempts: int, permanent: bool):
        super().__init__(f"{url}: {reason} ({attempts} attempt(s))")
        self.url, self.reason, self.status = url, reason, status
        self.attempts, self.permanent = attempts, permanent

    def why(self) -> str:
        """The failure in words: status and reason, and how many attempts it took."""
        tries = (
            "refused at once" if self.permanent and self.attempts == 1 else
            f"{self.attempts} attempt(s)"
        )  # fmt: skip
        return f"{self.reason}, {tries}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _throttled(body: str) -> bool:
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("message") == THROTTLED_MESSAGE


def classify_status(status: int, body: str, retry_after: str | None = None) -> Exception:
    """The exception an answer ``status`` with ``body`` makes: :class:`Transient` for
    429/5xx and Earth Search's throttling 403, :class:`Permanent` otherwise."""
    excerpt = " ".join(body.split())[:160]
    if status in RETRY_STATUSES:
        return Transient(f"HTTP {status}", status, _retry_after(retry_after))
    if status == 403 and _throttled(body):
        return Transient("HTTP 403 Forbidden (throttled)", status, _retry_after(retry_after))
    return Permanent(f"HTTP {status} {excerpt}".strip(), status)


def classify_exception(exc: BaseException) -> Exception:
    """A transport failure: a timeout, a refused, reset or dropped connection, a body cut
    short are :class:`Transient`; anything else is :class:`Permanent`."""
    if isinstance(exc, requests.Timeout):
        return Transient("timed out")
    if isinstance(exc, requests.ConnectionError):
        return Transient("connection failed (refused, reset or dropped)")
    if isinstance(
        exc, requests.exceptions.ChunkedEncodingError | requests.exceptions.ContentDecodingError
    ):
        return Transient("body cut short")
    return Permanent(f"{type(exc).__name__}: {exc}")


def retrying(
    url: str,
    attempt: Callable[[], T],
    policy: RetryPolicy,
    counters: Counters,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: Callable[[], float] = random.random,
) -> T:
    """``attempt()`` until it returns, raises :class:`Permanent`, or the policy's bound
    (attempts or total wait) is reached: then :class:`RequestFailed`."""
    waited = 0.0
    for n in range(1, policy.max_attempts + 1):
        try:
            return attempt()
        except Permanent as exc:
            raise RequestFailed(url, exc.reason, exc.status, n, permanent=True) from exc
        except Transient as exc:
            if n == policy.max_attempts:
                raise RequestFailed(url, exc.reason, exc.status, n, permanent=False) from exc
            cap = min(policy.max_backoff_s, policy.backoff_s * 2 ** (n - 1))
            delay = cap / 2 + rng() * cap / 2
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, policy.max_backoff_s))
            if waited + delay > policy.max_wait_s:
                raise RequestFailed(
                    url, f"{exc.reason} (gave up: {policy.max_wait_s:g} s of waiting spent)",
                    exc.status, n, permanent=False,
                ) from exc  # fmt: skip
            counters.add(retry=exc.reason)
            waited += delay
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def make_session(pool: int = 32) -> requests.Session:
    """A session whose connections are reused by many threads; no retries of its own."""
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=8, pool_maxsize=pool, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


# -- search -------------------------------------------------------------------------------------


class RetryingStacIO(StacApiIO):
    """pystac-client's API IO with :func:`retrying` around every request (and no urllib3
    retries of its own, which would hide attempts from the count)."""

    def __init__(
        self,
        session: requests.Session,
        policy: RetryPolicy,
        counters: Counters,
        *,
        sleep: Callable[[float], None] = time.sleep,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(headers=headers, timeout=policy.timeout, max_retries=None)
        self.session = session
        if headers:
            self.session.headers.update(headers)
        self.policy, self.counters, self._sleep = policy, counters, sleep

    def request(
        self,
        href: str,
        method: str | None = None,
        headers: dict[str, str] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> str:
        def attempt() -> str:
            self.counters.add(requests=1)
            try:
                text = StacApiIO.request(self, href, method, headers, parameters)
            except APIError as exc:
                status = getattr(exc, "status_code", None)
                if status is None:  # the transport failed: the requests error is its context
                    cause = exc.__context__ or exc
                    raise classify_exception(cause) from exc
                raise classify_status(int(status), str(exc)) from exc
            self.counters.add(nbytes=len(text))
            return text

        return retrying(
            f"{(method or 'GET').upper()} {href}", attempt, self.policy, self.counters,
            sleep=self._sleep,
        )  # fmt: skip


# -- signing ------------------------------------------------------------------------------------


def blob_container(url: str) -> tuple[str, str]:
    """(storage account, container) of an Azure blob address: virtual-host style
    (``https://<account>.blob.core.windows.net/<container>/…``) or path style, as the
    Azurite emulator serves them (``http://host:port/<account>/<container>/…``)."""
    parsed = urlparse(url)
    host = parsed.hostname or ""
    parts = [p for p in parsed.path.split("/") if p]
    if host.endswith(".blob.core.windows.net"):
        if parts:
            return host.split(".", 1)[0], parts[0]
    elif len(parts) >= 3:
        return parts[0], parts[1]
    raise SettingsError(
        f"{url} is not an Azure blob address (https://<account>.blob.core.windows.net/"
        "<container>/<blob>); the planetary-computer profile signs only those"
    )


@dataclass
class _Token:
    token: str
    expires: dt.datetime


class SasSigner:
    """SAS tokens per (account, container), fetched with retries and appended at send
    time (see the module docstring)."""

    def __init__(
        self,
        sas_url: str,
        session: requests.Session,
        policy: RetryPolicy,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        margin_s: float = TOKEN_MARGIN_S,
    ) -> None:
        self.sas_url = sas_url.rstrip("/")
        self.session, self.policy, self._sleep, self._clock = session, policy, sleep, clock
        self.margin = dt.timedelta(seconds=margin_s)
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._lock = threading.Lock()
        self.fetched = 0  # tokens fetched by this process

    def _fetch(self, account: str, container: str, counters: Counters) -> _Token:
        url = f"{self.sas_url}/token/{account}/{container}"
        headers = {}
        key = os.environ.get(PC_SUBSCRIPTION_KEY_ENV, "").strip()
        if key:
            headers["Ocp-Apim-Subscription-Key"] = key

        def attempt() -> _Token:
            counters.add(requests=1)
            try:
                resp = self.session.get(url, headers=headers, timeout=self.policy.timeout)
            except requests.RequestException as exc:
                raise classify_exception(exc) from exc
            if resp.status_code != 200:
                raise classify_status(resp.status_code, resp.text, resp.headers.get("Retry-After"))
            try:
                doc = resp.json()
                token = str(doc["token"]).lstrip("?")
                expires = dt.datetime.fromisoformat(str(doc["msft:expiry"]).replace("Z", "+00:00"))
            except (ValueError, KeyError, TypeError) as exc:
                raise Permanent(f"token service answered {resp.text[:120]!r}") from exc
            if expires.tzinfo is None:
                expires = expires.replace(tzinfo=dt.UTC)
            return _Token(token, expires)

        found = retrying(url, attempt, self.policy, counters, sleep=self._sleep)
        self.fetched += 1
        return found

    def token(self, url: str, counters: Counters) -> str:
        key = blob_container(url)
        with self._lock:  # one fetch per container at a time; the others wait for it
            held = self._tokens.get(key)
            if held is None or held.expires - self.margin <= self._clock():
                held = self._tokens[key] = self._fetch(*key, counters)
            return held.token

    def sign(self, url: str, counters: Counters) -> str:
        token = self.token(url, counters)
        return f"{url}{'&' if urlparse(url).query else '?'}{token}"

    def refused(self, url: str, token_in_use: str) -> None:
        """The storage refused a request signed with ``token_in_use``: fetch anew next time
        (unless another thread already has)."""
        key = blob_container(url)
        with self._lock:
            held = self._tokens.get(key)
            if held is not None and held.token == token_in_use:
                del self._tokens[key]


# -- COGs over Range requests ------------------------------------------------------------------


class RangeGetter:
    """Byte ranges of files over HTTP, retried, signed when a signer is given, counted."""

    def __init__(
        self,
        session: requests.Session,
        policy: RetryPolicy,
        *,
        signer: SasSigner | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.session, self.policy, self.signer, self._sleep = session, policy, signer, sleep

    def get(self, url: str, start: int, end: int, counters: Counters) -> tuple[bytes, int]:
        """Bytes ``start..end`` (inclusive) of ``url`` and the file's size."""

        def attempt() -> tuple[bytes, int]:
            token = ""
            target = url
            if self.signer is not None:
                token = self.signer.token(url, counters)
                target = f"{url}{'&' if urlparse(url).query else '?'}{token}"
            counters.add(requests=1)
            try:
                with self.session.get(
                    target,
                    headers={"Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"},
                    timeout=self.policy.timeout,
                    stream=True,
                ) as resp:
                    status = resp.status_code
                    if status == 206:
                        body = resp.content
                    elif status == 200:
                        raise Permanent(
                            "HTTP 200 to a Range request: the server does not serve byte "
                            "ranges, and reading the file would download all of it",
                            status,
                        )
                    else:
                        text = resp.text if status != 416 else ""
                        if status == 403 and self.signer is not None and not _throttled(text):
                            self.signer.refused(url, token)
                            raise Transient("HTTP 403 (token refused: signed again)", status)
                        raise classify_status(status, text, resp.headers.get("Retry-After"))
                    total = _total(resp.headers.get("Content-Range"))
            except requests.RequestException as exc:
                raise classify_exception(exc) from exc
            want = (min(end, total - 1) if total is not None else end) - start + 1
            if total is None or len(body) != want:
                raise Transient("body cut short", status)
            counters.add(nbytes=len(body))
            return body, total

        return retrying(url, attempt, self.policy, counters, sleep=self._sleep)


def _total(content_range: str | None) -> int | None:
    """The size in ``Content-Range: bytes a-b/size``."""
    if not content_range or "/" not in content_range:
        return None
    size = content_range.rsplit("/", 1)[1].strip()
    return int(size) if size.isdigit() else None


class RemoteFile:
    """One file read over HTTP Range requests, for GDAL through rasterio's ``opener``.

    ``path`` is the name to give ``rasterio.open`` (unique per read: rasterio registers
    one opener per path at a time) and :meth:`opener` the opener. GDAL opens the file
    twice (once to learn its size, once to read); both views share what was fetched.
    ``failure`` holds the request that failed for good, if any: the reads after it
    come back empty, and the caller raises it.
    """

    def __init__(self, url: str, getter: RangeGetter, counters: Counters) -> None:
        self.url, self.getter, self.counters = url, getter, counters
        name = urlparse(url).path.rsplit("/", 1)[-1] or "file.tif"
        self.path = f"/{uuid.uuid4().hex}/{name}"
        self.size: int | None = None
        self.failure: RequestFailed | None = None
        self._chunks: list[tuple[int, bytes]] = []

    def opener(self, path: str, mode: str = "rb", **_: Any) -> _View:
        if path != self.path or "w" in mode:
            raise FileNotFoundError(path)  # GDAL's probes of other names: nothing there
        return _View(self)

    def _fetch(self, start: int, end: int) -> bytes:
        data, total = self.getter.get(self.url, start, end, self.counters)
        self.size = total
        if len(data) <= CACHED_CHUNK:
            self._chunks.append((start, data))
        return data

    def _ensure_size(self) -> int | None:
        if self.size is None and self.failure is None:
            try:
                self._fetch(0, HEADER_BYTES - 1)
            except RequestFailed as exc:
                self.failure = exc
        return self.size

    def pread(self, pos: int, n: int) -> bytes:
        size = self._ensure_size()
        if size is None or self.failure is not None or pos >= size or n <= 0:
            return b""
        n = min(n, size - pos)
        for start, data in self._chunks:
            if start <= pos and pos + n <= start + len(data):
                return data[pos - start : pos - start + n]
        try:
            data = self._fetch(pos, min(pos + max(n, MIN_REQUEST), size) - 1)
        except RequestFailed as exc:
            self.failure = exc
            return b""
        return data[:n]


class _View(io.RawIOBase):
    """A seekable, read-only view of a :class:`RemoteFile` (what GDAL's plugin reads)."""

    def __init__(self, remote: RemoteFile) -> None:
        super().__init__()
        self.remote, self.pos = remote, 0
        self.name = remote.path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            self.pos = offset
        elif whence == io.SEEK_CUR:
            self.pos += offset
        else:
            self.pos = (self.remote._ensure_size() or 0) + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, (self.remote._ensure_size() or 0) - self.pos)
        data = self.remote.pread(self.pos, size)
        self.pos += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)
