"""Few-shot mapping: labelled polygons -> a classifier on the embeddings -> a class map.

read_labels      a GeoJSON (or any vector file) of polygons with a class property
sample           the vectors of the cells under each polygon (a polygon is one field)
cross_validate   accuracy per class with whole fields held out (grouped k-fold)
classify_grids   the classifier fitted on every labelled cell, applied to every cell

A cell belongs to a polygon when its centre lies inside it. Every polygon is a field
(or the polygons sharing a ``group_by`` value are): cross-validation never trains on
a cell of a field it tests, so the accuracy is that of mapping fields not seen.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agrifm_pipeline.errors import InputContractError
from agrifm_pipeline.mapping.embeddings import Embeddings, Grid, cell_blocks
from agrifm_pipeline.mapping.rasters import CLASS_NODATA

MODELS = ("logistic", "knn")


@dataclass(frozen=True)
class Labels:
    """Labelled polygons: ``frame`` (GeoDataFrame) with ``label`` and ``group`` columns."""

    frame: Any
    path: str
    property: str
    classes: tuple[str, ...]
    sha256: str
    group_by: str | None = None  # the property naming a polygon's field (None: each is one)

    def record(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "property": self.property,
            "group_by": self.group_by,
            "classes": list(self.classes),
            "n_polygons": len(self.frame),
            "n_fields": int(self.frame["group"].nunique()),
        }


def read_labels(path: str | Path, prop: str, group_by: str | None = None) -> Labels:
    """Polygons of ``path`` labelled by property ``prop`` (features without it are left
    out); each polygon is a field, or those sharing ``group_by``'s value are."""
    import geopandas as gpd

    path = Path(path)
    if not path.is_file():
        raise InputContractError(f"labels file {path} does not exist")
    raw = path.read_bytes()
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:
        raise InputContractError(f"labels file {path} cannot be read: {exc}") from None
    for name in (prop, group_by):
        if name and name not in gdf.columns:
            props = ", ".join(c for c in gdf.columns if c != "geometry")
            raise InputContractError(
                f"labels file {path} has no property {name!r}; it has {props or 'none'}"
            )
    if gdf.crs is None:
        gdf = gdf.set_crs("EPSG:4326")  # GeoJSON's own CRS
    gdf = gdf[gdf[prop].notna() & gdf.geometry.notna()]
    gdf = gdf[gdf.geometry.geom_type.isin(["Polygon", "MultiPolygon"])]
    if gdf.empty:
        raise InputContractError(f"labels file {path}: no polygon has a {prop!r} value")
    out = gpd.GeoDataFrame(
        {
            "label": gdf[prop].astype(str).to_numpy(),
            "group": (gdf[group_by].astype(str) if group_by else gdf.index.astype(str)).to_numpy(),
        },
        geometry=gdf.geometry.to_numpy(),
        crs=gdf.crs,
    )
    classes = tuple(sorted(out["label"].unique()))
    if len(classes) < 2:
        raise InputContractError(
            f"labels file {path}: {prop!r} has one class ({classes[0]!r}); a classifier needs two"
        )
    if len(classes) >= CLASS_NODATA:
        raise InputContractError(f"labels file {path}: {len(classes)} classes; at most 254")
    return Labels(out, str(path), prop, classes, hashlib.sha256(raw).hexdigest(), group_by or None)


@dataclass
class Samples:
    """The labelled cells: vectors ``x`` (n, D), class index ``y``, field ``groups``."""

    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    classes: tuple[str, ...]
    fields_without_cells: list[str] = field(default_factory=list)

    def per_class(self) -> dict[str, dict[str, int]]:
        out = {}
        for i, name in enumerate(self.classes):
            sel = self.y == i
            out[name] = {"cells": int(sel.sum()), "fields": len(set(self.groups[sel]))}
        return out


def _polygon_ids(grid: Grid, labels: Labels) -> np.ndarray:
    """(H, W) int32: 1 + the row of the polygon holding each cell's centre, 0 for none."""
    from rasterio.features import rasterize

    h, w = grid.data.shape[-2:]
    shapes = labels.frame.to_crs(grid.crs).geometry
    pairs = [(g, i + 1) for i, g in enumerate(shapes) if g is not None and not g.is_empty]
    if not pairs:
        return np.zeros((h, w), dtype=np.int32)
    return np.asarray(
        rasterize(pairs, out_shape=(h, w), transform=grid.transform, fill=0, dtype="int32")
    )


def sample(embeddings: Embeddings, labels: Labels) -> Samples:
    """The vectors of the cells under the labelled polygons (cells without vectors left
    out), with their class and field."""
    index = {c: i for i, c in enumerate(labels.classes)}
    xs, ys, gs = [], [], []
    for grid in embeddings.grids:
        ids = _polygon_ids(grid, labels)
        if not ids.any():
            continue
        vals = grid.values()
        sel = ids > 0
        x = vals[:, sel].T
        keep = np.isfinite(x).all(axis=1)
        rows = ids[sel][keep] - 1
        xs.append(x[keep])
        ys.append(np.array([index[v] for v in labels.frame["label"].to_numpy()[rows]], dtype=int))
        gs.append(labels.frame["group"].to_numpy()[rows].astype(str))
    if not xs or not sum(len(x) for x in xs):
        raise InputContractError(
            f"no labelled polygon of {labels.path} holds a cell centre with a vector in "
            f"{embeddings.asset} {embeddings.name} {embeddings.year}: the labels lie outside "
            "it (check the file's CRS), or are smaller than its cells"
        )
    groups = np.concatenate(gs)
    missing = sorted(set(labels.frame["group"].astype(str)) - set(groups))
    return Samples(np.concatenate(xs), np.concatenate(ys), groups, labels.classes, missing)


def make_model(model: str = "logistic", k: int = 5, n_train: int | None = None) -> Any:
    """A scikit-learn classifier: ``logistic`` (standardised, L2) or ``knn`` (cosine:
    k nearest unit vectors)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if model == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    if model == "knn":
        n = k if n_train is None else max(1, min(k, n_train))
        return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=n, weights="distance"))
    raise InputContractError(f"classifier {model!r}: use one of {', '.join(MODELS)}")


def cross_validate(
    samples: Samples, model: str = "logistic", *, folds: int = 5, k: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Accuracy per class from grouped k-fold cross-validation: each fold tests whole
    fields on a classifier trained without a cell of them. ``folds`` is lowered to the
    number of fields of the best-sampled class when there are fewer; a class with one
    field is tested once, on a model that never saw it (so it scores 0)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_fields = len(set(samples.groups))
    per_class_fields = [
        len(set(samples.groups[samples.y == i])) for i in range(len(samples.classes))
    ]
    n_splits = min(folds, max(per_class_fields), n_fields)
    if n_splits < 2:
        raise InputContractError(
            f"cross-validation needs at least 2 labelled fields of a class; the labels have "
            f"{dict(zip(samples.classes, per_class_fields, strict=True))} field(s) per class"
        )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    pred = np.full(samples.y.shape, -1)
    for train, test in cv.split(samples.x, samples.y, samples.groups):
        clf = make_model(model, k, len(train)).fit(samples.x[train], samples.y[train])
        pred[test] = clf.predict(samples.x[test])
    kk = len(samples.classes)
    confusion = np.zeros((kk, kk), dtype=int)
    np.add.at(confusion, (samples.y, pred), 1)
    per_class = {}
    for i, name in enumerate(samples.classes):
        n = int(confusion[i].sum())
        per_class[name] = {
            "fields": per_class_fields[i],
            "cells": n,
            "accuracy": float(confusion[i, i] / n) if n else None,  # recall
            "precision": float(confusion[i, i] / confusion[:, i].sum())
            if confusion[:, i].sum()
            else None,
        }
    recalls = [v["accuracy"] for v in per_class.values() if v["accuracy"] is not None]
    counts = np.bincount(samples.y, minlength=kk)
    return {
        "model": model,
        "k": k if model == "knn" else None,
        "folds": n_splits,
        "grouped_by": "field",
        "n_cells": int(samples.y.size),
        "n_fields": n_fields,
        "accuracy": float((pred == samples.y).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "chance_balanced_accuracy": 1.0 / kk,
        "majority_share": float(counts.max() / counts.sum()),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "fields_without_cells": samples.fields_without_cells,
    }


def classify_grids(
    embeddings: Embeddings, samples: Samples, model: str = "logistic", *, k: int = 5
) -> list[tuple[Grid, np.ndarray, np.ndarray]]:
    """The classifier fitted on every labelled cell and applied to every cell of every
    grid: (grid, classes uint8 (:data:`CLASS_NODATA` without a vector), confidence
    float32 (the winning class's probability, NaN without a vector))."""
    clf = make_model(model, k, len(samples.y)).fit(samples.x, samples.y)
    known = np.asarray(clf.classes_)
    out = []
    for grid in embeddings.grids:
        x = grid.values()
        h, w = x.shape[1:]
        classes = np.full(h * w, CLASS_NODATA, dtype=np.uint8)
        conf = np.full(h * w, np.nan, dtype=np.float32)
        start = 0
        for block in cell_blocks(x):  # (D, n), cells contiguous per channel
            n = block.shape[1]
            ok = np.isfinite(block.sum(axis=0))
            if ok.any():
                proba = clf.predict_proba(np.ascontiguousarray(block[:, ok].T))
                idx = start + np.flatnonzero(ok)
                classes[idx] = known[proba.argmax(axis=1)].astype(np.uint8)
                conf[idx] = proba.max(axis=1)
            start += n
        out.append((grid, classes.reshape(h, w), conf.reshape(h, w)))
    return out
