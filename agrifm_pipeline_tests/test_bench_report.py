"""The encoder bench's summary: each encoder at its fastest batch."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_encoder.py"


def _bench() -> object:
    spec = importlib.util.spec_from_file_location("bench_encoder", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_encoder", module)
    spec.loader.exec_module(module)
    return module


def _row(batch: int, ours: float, official: float | None, prec: str = "float32") -> dict:
    row = {"patch": "p444", "frames": 8, "precision": prec, "batch": batch, "chips_per_s": ours}
    if official is not None:
        row["official_chips_per_s"] = official
    return row


def test_best_batch_of_each_encoder() -> None:
    best_vs_best = _bench().best_vs_best  # type: ignore[attr-defined]
    rows = [
        _row(1, 3.0, 2.7),
        _row(4, 3.8, 2.5),
        _row(8, 4.1, 2.4),
        _row(8, 7.0, 6.0, "bfloat16"),
        _row(16, 9.0, None),  # no official column (no source tree): not compared
    ]
    fp32, bf16 = best_vs_best(rows)
    assert (fp32["batch"], fp32["official_batch"]) == (8, 1)
    assert fp32["speedup"] == pytest.approx(4.1 / 2.7)
    assert bf16["precision"] == "bfloat16" and bf16["speedup"] == pytest.approx(7.0 / 6.0)
    assert best_vs_best([_row(1, 3.0, None)]) == []
