"""Stage fingerprints and the lineage record.

Each stage of a tile-year depends on an exact set of settings. A stage's
*fingerprint* is a hash of those settings (and of the upstream stage's
fingerprint), so a partition is current exactly when its recorded fingerprint
equals the one the current settings give:

==============  ===============================================================
stage           depends on
==============  ===============================================================
acquisition     provider (and its source), collection, bands, scale_m,
                n_frames, cloudy_pct, composite, fill_value, cloud mask,
                tile geometry (chip_px × chips_per_side), stage code version
normalisation   acquisition + norm_mode, image_size, chip_px, code version
embedding       normalisation + checkpoint sha256, model config, precision
                class, min_chip_coverage, code version
==============  ===============================================================

A changed checkpoint therefore changes only the embedding fingerprint;
``norm_mode`` changes normalisation and embedding; ``n_frames`` changes all
three. The inputs are kept beside the hash so that a stale partition can say
which setting moved.

The scenes a tile-year was read from are not an input of the acquisition
fingerprint (the assets compute it once per run, for all its tile-years
alike): the provider records them per tile-year (``scene_index``, below) and
the stale sensor compares them beside the fingerprint, so a changed, added or
removed scene makes exactly the tile-years it touches stale.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agrifm_pipeline.stages import CODE_VERSIONS, STAGE_NAMES

# The stages and their code versions (bumped when a stage's code changes what it writes:
# the stage and everything below it then become stale) are the stage table's.
STAGES = STAGE_NAMES


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class StageFingerprint:
    stage: str
    inputs: dict[str, Any]
    value: str

    def as_record(self) -> dict[str, Any]:
        return {"stage": self.stage, "fingerprint": self.value, "inputs": self.inputs}


@dataclass(frozen=True)
class Fingerprints:
    """The three stage fingerprints for one set of settings and one checkpoint."""

    acquisition: StageFingerprint
    normalisation: StageFingerprint
    embedding: StageFingerprint

    def for_stage(self, stage: str) -> StageFingerprint:
        fp: StageFingerprint = getattr(self, stage)
        return fp

    def as_record(self) -> dict[str, Any]:
        return {s: self.for_stage(s).as_record() for s in STAGES}


def stage_fingerprints(
    *,
    acquisition: Mapping[str, Any],
    normalisation: Mapping[str, Any],
    embedding: Mapping[str, Any],
) -> Fingerprints:
    """Fingerprints from each stage's own settings (upstream ones chain in)."""
    acq_in = {**acquisition, "code_version": CODE_VERSIONS["acquisition"]}
    acq = StageFingerprint("acquisition", acq_in, _digest(acq_in))
    norm_in = {
        **normalisation,
        "code_version": CODE_VERSIONS["normalisation"],
        "upstream": acq.value,
    }
    norm = StageFingerprint("normalisation", norm_in, _digest(norm_in))
    emb_in = {**embedding, "code_version": CODE_VERSIONS["embedding"], "upstream": norm.value}
    emb = StageFingerprint("embedding", emb_in, _digest(emb_in))
    return Fingerprints(acq, norm, emb)


def explain_difference(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable reasons two fingerprint input sets differ, upstream link left out."""
    reasons = []
    for key in sorted(set(recorded) | set(current)):
        if key == "upstream":
            continue
        a, b = recorded.get(key, "<absent>"), current.get(key, "<absent>")
        if a != b:
            if key == "checkpoint_sha256":
                reasons.append(f"checkpoint changed ({str(a)[:12]}… -> {str(b)[:12]}…)")
            else:
                reasons.append(f"{key} changed ({a!r} -> {b!r})")
    return reasons


# -- the scenes a tile-year was made from ----------------------------------------------------
# The settings fingerprint above says *how* a tile-year was acquired; which scenes of the
# source it was made from is recorded beside it, per tile-year, by the provider (its
# ``scene_index``: scene id -> a stamp that changes whenever the scene does: size and
# modification time of a file, a STAC item's ``updated``, a granule's generation time).
# The stale sensor lists the current scenes of each tile-year from the source's headers
# (no pixels read, nothing re-acquired) and compares the two.
SCENE_INDEX_KEY = "scene_index"


def scene_index_record(scenes: Mapping[str, str]) -> dict[str, Any]:
    """What a frame stack's record keeps about its scenes: their stamps and one digest."""
    ordered = dict(sorted((str(k), str(v)) for k, v in scenes.items()))
    return {"digest": _digest(ordered), "n_scenes": len(ordered), "scenes": ordered}


def explain_scene_changes(
    recorded: Mapping[str, str], current: Mapping[str, str], limit: int = 6
) -> list[str]:
    """``scene <id> changed|added|removed`` for every scene that differs (the first ``limit``)."""
    changed = sorted(k for k in recorded.keys() & current.keys() if recorded[k] != current[k])
    reasons = [f"scene {k} changed" for k in changed]
    reasons += [f"scene {k} added" for k in sorted(current.keys() - recorded.keys())]
    reasons += [f"scene {k} removed" for k in sorted(recorded.keys() - current.keys())]
    if len(reasons) > limit:
        reasons = [*reasons[:limit], f"and {len(reasons) - limit} more scene change(s)"]
    return reasons


# -- the record kept beside a partition's pointer --------------------------------------------
# Judging a partition (the stale sensor, the audit, the mosaic sensor) needs a small part of
# its lineage: the fingerprints, the versions it read, a few settings, the run, the
# checkpoint and the scene index's digest. The store keeps that part in the partition's
# pointer and in its asset's per-year index (:mod:`agrifm_pipeline.storage`), so judging
# thousands of partitions reads one index object per asset and year, not a manifest each.
RECORD_KEYS = ("stage", "run_id", "created_at", "code_version", "checkpoint_sha256")
RECORD_SETTINGS = ("n_frames", "norm_mode", "image_size")
RECORD_MARK = "record"  # present (value 1) in a record made by :func:`lineage_record`


def lineage_record(lineage: Mapping[str, Any] | None) -> dict[str, Any]:
    """The part of ``lineage`` that judging reads, a few hundred bytes: each stage's
    fingerprint (not its inputs: read from the manifest when a fingerprint differs),
    the versions read, three settings, the run, the checkpoint's sha256 and the scene
    index's digest and count (its scenes too are read only when the digest differs)."""
    lineage = lineage or {}
    out: dict[str, Any] = {RECORD_MARK: 1}
    out.update({k: lineage[k] for k in RECORD_KEYS if k in lineage})
    fps = lineage.get("fingerprints")
    if isinstance(fps, Mapping):
        out["fingerprints"] = {
            stage: {"fingerprint": fp.get("fingerprint")}
            for stage, fp in fps.items()
            if isinstance(fp, Mapping)
        }
    inputs = lineage.get("inputs")
    if isinstance(inputs, Mapping):
        out["inputs"] = {
            asset: {k: rec[k] for k in ("version", "versions", "sha256") if k in rec}
            for asset, rec in inputs.items()
            if isinstance(rec, Mapping)
        }
    settings = lineage.get("settings")
    if isinstance(settings, Mapping):
        out["settings"] = {k: settings[k] for k in RECORD_SETTINGS if k in settings}
    emb = lineage.get("embedding")
    if isinstance(emb, Mapping):
        ckpt = emb.get("checkpoint")
        sha = ckpt.get("sha256") if isinstance(ckpt, Mapping) else None
        if sha:
            out["embedding"] = {"checkpoint": {"sha256": sha}}
    acq = lineage.get("acquisition")
    scenes = acq.get(SCENE_INDEX_KEY) if isinstance(acq, Mapping) else None
    if isinstance(scenes, Mapping):
        out["acquisition"] = {
            SCENE_INDEX_KEY: {k: scenes[k] for k in ("digest", "n_scenes") if k in scenes}
        }
    return out


def is_record(lineage: Mapping[str, Any]) -> bool:
    """Whether ``lineage`` is a :func:`lineage_record` (not the whole lineage)."""
    return lineage.get(RECORD_MARK) == 1


def scene_digest(scenes: Mapping[str, str]) -> str:
    """The digest :func:`scene_index_record` would record for ``scenes``."""
    return str(scene_index_record(scenes)["digest"])
