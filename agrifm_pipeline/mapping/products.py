"""A map made and committed: a similarity map or a class map, as a versioned partition.

Each is a file partition of its asset (the stage table's :data:`~agrifm_pipeline.stages.SIMILARITY`
and :data:`~agrifm_pipeline.stages.CLASSES`) under the product's own name (the region, or
the tile) and year; a new query or new labels commit a new version. Its lineage names
the embedding version it was read from (and, for a mosaic, the grid versions it was
made from), the checkpoint(s), and the query or the labels file's sha256 and the
classifier, so that ``gc`` keeps what it was made from and the audit can tell it apart.

    make_similarity   embeddings + a query -> similarity.tif (COG, per zone), .png, query.geojson
    make_class_map    embeddings + labels  -> classes.tif, confidence.tif, classes.png,
                                              report.json (cross-validated), labels.geojson
                                              (the labels as used: label, field, polygon)
    replay_config     a map's lineage      -> the config that makes it again (the sensor's
                                              re-make once its product has a new version)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agrifm_pipeline import __version__, stages
from agrifm_pipeline.catalog import StacCatalog
from agrifm_pipeline.mapping.classify import Labels, classify_grids, cross_validate, sample
from agrifm_pipeline.mapping.embeddings import Embeddings
from agrifm_pipeline.mapping.rasters import (
    CLASS_NODATA,
    class_colour,
    class_png,
    cog_bytes,
    similarity_png,
)
from agrifm_pipeline.mapping.similar import Query, query_json, similarity
from agrifm_pipeline.storage import FileStore, Version


@dataclass
class MapProduct:
    """A committed map: its version, its files (name -> URL), what it found, how long."""

    version: Version
    files: dict[str, str]
    report: dict[str, Any]
    png: bytes
    lineage: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return self.files[name]


def _lineage(stage: stages.Stage, emb: Embeddings, run_id: str) -> dict[str, Any]:
    """What every map records: its asset, partition, code, and the embeddings it read."""
    return {
        "asset": stage.asset,
        "stage": stage.stage,
        "year": emb.year,
        "tile": emb.name,
        "tiles": emb.tiles(),
        "code_version": stage.code_version,
        "package_version": __version__,
        "run_id": run_id,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "embedding": {
            "asset": emb.asset,
            "version": emb.version.id,
            "checkpoint_sha256": emb.checkpoints(),
            "dim": emb.dim,
        },
        "checkpoint_sha256": emb.checkpoints(),
        "inputs": emb.inputs(),
    }


def _suffix(name: str) -> str:
    return f"_{name}" if name else ""


def _commit(
    out: FileStore,
    catalog: StacCatalog | None,
    emb: Embeddings,
    objects: dict[str, bytes],
    lineage: dict[str, Any],
) -> tuple[Version, dict[str, str]]:
    version = out.put_objects(emb.year, emb.name, objects, lineage)
    if catalog is not None:
        catalog.record(version, lineage)
    return version, {name: f"{version.url}/{name}" for name in objects}


def make_similarity(
    emb: Embeddings,
    query: Query,
    out: FileStore,
    *,
    metric: str = "standardised",
    catalog: StacCatalog | None = None,
    run_id: str = "",
) -> MapProduct:
    """The cosine similarity of every cell to ``query`` as a float32 COG per zone (NaN
    without a vector), a PNG of it with the query outlined, and the query as GeoJSON
    (``metric``: see :func:`~agrifm_pipeline.mapping.similar.similarity`)."""
    t0 = time.perf_counter()
    found = similarity(emb, query, metric)
    stats = found.stats()
    t1 = time.perf_counter()
    lo = float(stats["p02"]) if stats["p02"] is not None else -1.0
    objects: dict[str, bytes] = {}
    png = b""
    for grid, sim, cells in found.grids:
        tags = {
            "AGRIFM_MAP": f"cosine similarity to the query's mean unit vector ({metric})",
            "AGRIFM_QUERY": query.geometry.wkt,
            "AGRIFM_EMBEDDING": f"{emb.asset} {emb.year}/{emb.name} {emb.version.id}",
        }
        objects[f"similarity{_suffix(grid.name)}.tif"] = cog_bytes(
            sim, grid.crs, grid.transform, nodata=float("nan"), tags=tags,
            descriptions=["cosine_similarity"],
        )  # fmt: skip
        title = f"{emb.name} {emb.year} {grid.name}: {metric} cosine to {query.kind} {query.text}"
        picture = similarity_png(sim, cells, lo=lo, title=title[:90])
        objects[f"similarity{_suffix(grid.name)}.png"] = picture
        png = png or picture
    objects["query.geojson"] = query_json(query)
    lineage = _lineage(stages.SIMILARITY, emb, run_id)
    lineage["query"] = {**query.record(), "metric": metric}
    lineage["similarity"] = stats
    version, files = _commit(out, catalog, emb, objects, lineage)
    t2 = time.perf_counter()
    return MapProduct(
        version, files, stats, png, lineage, {"compute_s": t1 - t0, "write_s": t2 - t1}
    )


def replay_config(lineage: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The config that re-makes a map as its (whole) ``lineage`` recorded it: the query
    and metric of a similarity map, the labels, property, grouping and classifier of a
    class map, and the region product read; ``(None, why)`` when it cannot be replayed
    (a tile's map, a lineage written before the config was recorded, a labels file that
    is gone or whose sha256 changed)."""
    asset = lineage.get("asset")
    product = lineage.get("embedding", {}).get("asset")
    if product not in {s.asset for s in stages.REGION_PRODUCTS}:
        return None, f"made from {product!r}, not a region product"
    old = "does not record the config it was made with (written by an older release)"
    if asset == stages.SIMILARITY.asset:
        query = lineage.get("query") or {}
        if not query.get("metric") or query.get("kind") not in ("point", "polygon"):
            return None, old
        point = query["kind"] == "point"
        return {
            "at": str(query["given"]) if point else "",
            "polygon": "" if point else str(query["wkt"]),  # WKT in WGS84: no file needed
            "product": product,
            "metric": str(query["metric"]),
        }, ""
    if asset == stages.CLASSES.asset:
        labels, clf = lineage.get("labels") or {}, lineage.get("classifier") or {}
        if "group_by" not in labels or not clf.get("model") or not labels.get("sha256"):
            return None, old
        path = Path(str(labels["path"]))
        if not path.is_file():
            return None, f"its labels file {path} no longer exists"
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if sha != labels["sha256"]:
            return None, (
                f"its labels file {path} changed since (sha256 {sha[:12]}…, made with "
                f"{str(labels['sha256'])[:12]}…); make it again with the labels meant"
            )
        return {
            "labels": str(path),
            "label_property": str(labels["property"]),
            "group_by": str(labels["group_by"] or ""),
            "model": str(clf["model"]),
            "k": int(clf["k"]) if clf.get("k") is not None else 5,
            "folds": int(clf.get("folds", 5)),
            "product": product,
        }, ""
    return None, f"{asset!r} is not a map"


def make_class_map(
    emb: Embeddings,
    labels: Labels,
    out: FileStore,
    *,
    model: str = "logistic",
    k: int = 5,
    folds: int = 5,
    catalog: StacCatalog | None = None,
    run_id: str = "",
) -> MapProduct:
    """Cross-validate a classifier on the labelled cells (whole fields held out), fit it
    on all of them, and map every cell: classes (uint8 COG with a palette, 255 without a
    vector), the winning probability (float32 COG), a PNG with the legend, the report."""
    t0 = time.perf_counter()
    samples = sample(emb, labels)
    report = cross_validate(samples, model, folds=folds, k=k)
    t1 = time.perf_counter()
    mapped = classify_grids(emb, samples, model, k=k)
    t2 = time.perf_counter()
    names = list(labels.classes)
    palette = {i: class_colour(i) for i in range(len(names))}
    class_tags = {f"CLASS_{i}": n for i, n in enumerate(names)}
    objects: dict[str, bytes] = {}
    png = b""
    notes = [
        f"CV {v['accuracy']:.0%} ({v['fields']} fields)"
        if v["accuracy"] is not None
        else f"({v['fields']} fields)"
        for v in report["per_class"].values()
    ]
    area: dict[str, int] = {n: 0 for n in names}
    for grid, classes, conf in mapped:
        tags = {
            **class_tags,
            "AGRIFM_MAP": f"classes from {labels.path} property {labels.property} ({model})",
            "AGRIFM_EMBEDDING": f"{emb.asset} {emb.year}/{emb.name} {emb.version.id}",
            "AGRIFM_CV_ACCURACY": f"{report['accuracy']:.4f}",
        }
        sfx = _suffix(grid.name)
        objects[f"classes{sfx}.tif"] = cog_bytes(
            classes, grid.crs, grid.transform, nodata=CLASS_NODATA, tags=tags,
            descriptions=["class"], colormap=palette,
        )  # fmt: skip
        objects[f"confidence{sfx}.tif"] = cog_bytes(
            conf, grid.crs, grid.transform, nodata=float("nan"), tags=tags,
            descriptions=["probability_of_class"],
        )  # fmt: skip
        title = (
            f"{emb.name} {emb.year} {grid.name}: {model}, CV accuracy {report['accuracy']:.0%} "
            f"(balanced {report['balanced_accuracy']:.0%}, chance {report['chance_balanced_accuracy']:.0%})"
        )
        picture = class_png(classes, names, notes=notes, title=title[:100])
        objects[f"classes{sfx}.png"] = picture
        png = png or picture
        counts = np.bincount(classes[classes != CLASS_NODATA], minlength=len(names))
        for i, n in enumerate(names):
            area[n] += int(counts[i])
    report["cells_mapped"] = area
    objects["report.json"] = json.dumps(report, indent=1).encode()
    objects["labels.geojson"] = labels.frame.to_crs("EPSG:4326").to_json().encode()
    lineage = _lineage(stages.CLASSES, emb, run_id)
    lineage["labels"] = labels.record()
    lineage["classifier"] = {"model": model, "k": k if model == "knn" else None, "folds": folds}
    lineage["report"] = {
        key: report[key]
        for key in ("accuracy", "balanced_accuracy", "chance_balanced_accuracy", "folds")
    }
    version, files = _commit(out, catalog, emb, objects, lineage)
    t3 = time.perf_counter()
    seconds = {"cross_validate_s": t1 - t0, "classify_s": t2 - t1, "write_s": t3 - t2}
    return MapProduct(version, files, report, png, lineage, seconds)
