"""The current scenes of a remote source (Earth Engine, a STAC API), listed ahead in batches.

Listing a local directory is a read of cached headers; listing Earth Engine or a STAC
API is a request. :class:`BatchedListing` is a :data:`~agrifm_pipeline.audit.SceneLister`
that lists the tile-years it is told of *ahead* (:meth:`BatchedListing.prefetch`),
many per request (the provider's batches, requests in parallel), and answers from
what it listed:

- **the audit** lists every tile-year (no budget); a tile-year it was not told of
  is listed alone when asked;
- **the stale sensor** lists at most ``per_tick`` tile-years a tick
  (``AGRIFM_PIPELINE_GEE_LIST_PER_TICK``, default 500) and for at most
  :data:`TICK_LIST_S` seconds (batches not started by then wait for the next
  tick), going round the materialised tile-years from where the previous tick
  stopped (kept in the cursor): each is listed every ``ceil(N / per_tick)``
  ticks. A tile-year not listed this tick is not compared (the lister answers
  None), except one found changed on an earlier tick: its difference from the
  recorded scenes is kept in the cursor (at most :data:`MAX_REMEMBERED`) and
  answered until it is listed again or its frames are made again, so it does
  not flicker back to current between listings.

A request that fails (quota, network, a refusal) makes its tile-years failures
(reported, not compared: never judged current from a listing that did not
happen) and, in the sensor, ends this tick's listing; the next tick goes on
after them.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from agrifm_pipeline.frames import frame_windows
from agrifm_pipeline.lineage import scene_index_record
from agrifm_pipeline.providers.base import BatchSceneIndexed
from agrifm_pipeline.settings import GEE_LIST_PER_TICK_ENV
from agrifm_pipeline.tiles import Tile
from agrifm_pipeline.tileyear import TileYearSettings

#: The sensor cursor's key for the listing's state.
CURSOR_KEY = "gee_listing"
#: Seconds a sensor tick starts listing requests for (Dagster stops a tick after 60 s).
TICK_LIST_S = 15.0
#: Attempts per listing request in a sensor tick (the audit uses the provider's own).
TICK_ATTEMPTS = 2
#: Listing requests in flight at once (under the provider's own bounds).
LIST_WORKERS = 4
#: Tile-years found changed whose difference the cursor keeps between listings.
MAX_REMEMBERED = 1000
#: Scene changes kept per remembered tile-year (the reasons name the first six).
MAX_REMEMBERED_SCENES = 16

Key = tuple[str, int]


@dataclass
class RecordedIndex:
    """The scene index a tile-year's frame stack recorded: its digest (in the partition's
    record), and its scenes, read only where a listing differs."""

    digest: str
    load: Callable[[], Mapping[str, str]]
    _scenes: dict[str, str] | None = field(default=None, repr=False)

    def scenes(self) -> dict[str, str]:
        if self._scenes is None:
            self._scenes = dict(self.load())
        return self._scenes


# (tile, year) -> its recorded scene index, None when its frame stack recorded none
Recorded = Callable[[Key], RecordedIndex | None]


def digest(scenes: Mapping[str, str]) -> str:
    """The digest a frame stack records for ``scenes``."""
    return str(scene_index_record(scenes)["digest"])


def _text(key: Key) -> str:
    return f"{key[0]}|{key[1]}"


def _key(text: str) -> Key:
    tile, year = text.rsplit("|", 1)
    return tile, int(year)


def _difference(recorded: Mapping[str, str], listed: Mapping[str, str]) -> dict[str, Any]:
    """What changed from ``recorded`` to ``listed``, at most :data:`MAX_REMEMBERED_SCENES`."""
    changed = sorted((k, v) for k, v in listed.items() if recorded.get(k) != v)
    removed = sorted(recorded.keys() - listed.keys())
    keep = MAX_REMEMBERED_SCENES
    return {"set": dict(changed[:keep]), "removed": removed[: max(0, keep - len(changed))]}


def _apply(recorded: Mapping[str, str], diff: Mapping[str, Any]) -> dict[str, str]:
    out = {k: v for k, v in recorded.items() if k not in set(diff.get("removed", []))}
    out.update(diff.get("set", {}))
    return out


class BatchedListing:
    """A scene lister over batched listings of ``provider`` (see the module docstring).

    ``per_tick`` None: the audit (everything it is told of). Otherwise a sensor tick,
    ``state`` the cursor's :data:`CURSOR_KEY` entry of the previous tick.
    """

    def __init__(
        self,
        provider: BatchSceneIndexed,
        cfg: TileYearSettings,
        *,
        per_tick: int | None = None,
        state: Mapping[str, Any] | None = None,
        failures: list[str] | None = None,
        tick_s: float = TICK_LIST_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider, self.cfg, self.per_tick = provider, cfg, per_tick
        self.tick_s, self.clock = tick_s, clock
        state = state or {}
        self.next: str | None = state.get("next")
        self.remembered: dict[str, dict[str, Any]] = dict(state.get("changed", {}))
        self.failures = failures if failures is not None else []
        self.answers: dict[Key, Mapping[str, str]] = {}  # what the lister says, by tile-year
        self.tried: set[Key] = set()  # listed, failed or nothing to compare
        self.n_keys = 0  # tile-years the sensor was told of this tick
        self.n_listed = 0  # of them, listed this tick
        self.n_requests = 0
        self.n_waiting = 0  # left for the next tick (time up, or after a failure)
        self.n_kept = 0  # not listed, answered from the cursor (found changed earlier)

    # -- the lister -----------------------------------------------------------------------
    def __call__(self, tile: str, year: int) -> Mapping[str, str] | None:
        key = (tile, int(year))
        if key not in self.tried and self.per_tick is None:
            self._list([key])
        return self.answers.get(key)

    def _request(self, key: Key) -> tuple[Key, Any, Any]:
        tile = Tile.from_id(key[0])
        self.cfg.check_tile(tile)
        return key, tile.geobox(self.cfg.scale_m), frame_windows(int(key[1]), self.cfg.n_frames)

    def _fail(self, keys: Iterable[Key], exc: BaseException) -> None:
        for key in keys:
            self.tried.add(key)
            self.failures.append(f"{key[0]} {key[1]}: {exc}")

    def _list(self, keys: Sequence[Key], deadline: float | None = None) -> list[Key]:
        """List ``keys`` in the provider's batches; returns those left for later (the
        batches not started before ``deadline`` or after a failure, in a sensor tick)."""
        requests = []
        for key in keys:
            try:
                requests.append(self._request(key))
            except Exception as exc:  # a tile id or size these settings cannot make
                self._fail([key], exc)
        if not requests:
            return []
        sensor = self.cfg.sensor()
        try:
            batches = self.provider.listing_batches(requests, sensor)
        except Exception as exc:  # e.g. Earth Engine cannot be initialised: never a crash
            self._fail([r[0] for r in requests], exc)
            return []
        attempts = TICK_ATTEMPTS if deadline is not None else None
        stop: list[bool] = []  # set once: time is up, or a request failed (sensor only)

        def one(batch: list[Any]) -> tuple[list[Any], dict[Any, dict[str, str]] | None, Any]:
            first = batch is batches[0]
            if deadline is not None and not first and (stop or self.clock() > deadline):
                stop.append(True)
                return batch, None, None  # waits for the next tick
            try:
                return batch, self.provider.scene_indexes(batch, sensor, attempts=attempts), None
            except Exception as exc:  # quota, network, a refusal: reported, never a crash
                if deadline is not None:
                    stop.append(True)
                return batch, None, exc

        left: list[Key] = []
        with ThreadPoolExecutor(max_workers=max(1, min(LIST_WORKERS, len(batches)))) as pool:
            for batch, found, error in pool.map(one, batches):
                keys_in = [r[0] for r in batch]
                if error is not None:
                    self.n_requests += 1
                    self._fail(keys_in, error)
                elif found is None:
                    left += keys_in
                else:
                    self.n_requests += 1
                    for key in keys_in:
                        if key not in found:
                            self._fail([key], ValueError("missing from the listing's answer"))
                            continue
                        self.tried.add(key)
                        self.answers[key] = found[key]
                        self.n_listed += 1
        return left

    # -- ahead of the comparison ----------------------------------------------------------
    def prefetch(self, keys: Iterable[Key], recorded: Recorded | None = None) -> None:
        """List ``keys`` ahead: all of them (the audit), or this tick's share (the sensor).

        ``recorded(key)``: the tile-year's recorded scene index; in a sensor tick
        it decides what is remembered between listings, and tile-years without one are
        not listed (there is nothing to compare).
        """
        ordered = sorted({(t, int(y)) for t, y in keys})
        if self.per_tick is None:
            self._list([k for k in ordered if k not in self.tried])
            return
        self.n_keys = len(ordered)
        try:
            start = bisect.bisect_left(ordered, _key(self.next)) if self.next else 0
        except ValueError:  # a cursor this release did not write: start again
            start = 0
        order = ordered[start:] + ordered[:start]
        share = order[: self.per_tick]
        records: dict[Key, RecordedIndex | None] = {}
        wanted = []
        for key in share:
            records[key] = recorded(key) if recorded is not None else None
            if recorded is not None and records[key] is None:
                self.tried.add(key)  # nothing recorded to compare with
            else:
                wanted.append(key)
        left = self._list(wanted, deadline=self.clock() + self.tick_s)
        self.n_waiting = len(left)
        # The next tick starts at the first tile-year left waiting, else after this share.
        if left:
            self.next = _text(left[0])
        elif len(share) < len(order):
            self.next = _text(order[len(share)])
        else:
            self.next = _text(order[0]) if order else None
        self._remember(set(ordered), records, recorded)

    def _remember(
        self,
        keys: set[Key],
        records: dict[Key, RecordedIndex | None],
        recorded: Recorded | None,
    ) -> None:
        """Keep the difference of each tile-year listed as changed; answer it on the ticks
        it is not listed, while its recorded scenes are those it was found changed from."""
        if recorded is None:
            return
        for text in list(self.remembered):
            try:
                key = _key(text)
            except ValueError:
                key = ("", 0)  # not ours: dropped
            if key not in keys:
                del self.remembered[text]  # no longer materialised
            elif key in self.answers:  # listed again: judged afresh below
                del self.remembered[text]
        for key, listed in self.answers.items():
            rec = records.get(key)
            if rec is not None and rec.digest != digest(listed):
                self.remembered[_text(key)] = {
                    "recorded": rec.digest,
                    **_difference(rec.scenes(), listed),
                }
        for text, memo in list(self.remembered.items()):
            key = _key(text)
            if key in self.answers:
                continue
            rec = records[key] if key in records else recorded(key)
            if rec is None or rec.digest != memo.get("recorded"):
                del self.remembered[text]  # made again since (or gone): judged when listed
                continue
            self.answers[key] = _apply(rec.scenes(), memo)
            self.n_kept += 1
        if len(self.remembered) > MAX_REMEMBERED:
            self.remembered = dict(sorted(self.remembered.items())[:MAX_REMEMBERED])

    # -- what the sensor keeps and says ---------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The cursor's :data:`CURSOR_KEY` entry for the next tick."""
        return {"next": self.next, "changed": dict(sorted(self.remembered.items()))}

    def note(self) -> str:
        """The sensor's words on what was listed this tick ("" for the audit)."""
        if self.per_tick is None or not self.n_keys:
            return ""
        every = max(1, math.ceil(self.n_keys / self.per_tick))
        text = (
            f"; source scenes: {getattr(self.provider, 'source_title', 'the source')} "
            f"listed {self.n_listed} of {self.n_keys} "
            f"tile-year(s) this tick in {self.n_requests} request(s) (up to {self.per_tick} a "
            f"tick, {GEE_LIST_PER_TICK_ENV}: each is listed every {every} tick(s))"
        )
        if self.n_listed < self.n_keys:
            text += ", the others not compared this tick"
        if self.n_waiting:
            text += f"; {self.n_waiting} left for the next tick (time or a failed request)"
        if self.n_kept:
            text += f"; {self.n_kept} found changed earlier, still stale until listed again"
        return text


def recorded_in(store: Any) -> Recorded:
    """The scene indexes the frame stacks of ``store`` (``s2_frame_stack``) recorded: the
    digest from what judging reads anyway, the scenes from the manifest where needed."""
    from agrifm_pipeline.audit import _current_lineage
    from agrifm_pipeline.lineage import SCENE_INDEX_KEY

    def recorded(key: Key) -> RecordedIndex | None:
        tile, year = key
        lineage, corrupt, vid = _current_lineage(store, year, tile)
        rec = (lineage or {}).get("acquisition", {}).get(SCENE_INDEX_KEY)
        if corrupt or not isinstance(rec, Mapping) or not rec.get("digest"):
            return None  # made before scenes were recorded, or judged corrupt anyway
        if isinstance(rec.get("scenes"), Mapping):
            scenes = dict(rec["scenes"])
            return RecordedIndex(str(rec["digest"]), lambda: scenes)

        def load() -> Mapping[str, str]:
            full = store.lineage(year, tile, vid).get("acquisition", {})
            return dict(full.get(SCENE_INDEX_KEY, {}).get("scenes", {}))

        return RecordedIndex(str(rec["digest"]), load)

    return recorded
