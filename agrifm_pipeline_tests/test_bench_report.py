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


@pytest.mark.skipif(
    not (BENCH.parent.parent / ".git").exists(), reason="--baseline reads the git history"
)
def test_baseline_is_the_encoder_at_a_revision_beside_todays() -> None:
    """--baseline REV imports the package at REV under its own name, next to today's."""
    import torch

    from agrifm_pipeline.model import load_encoder
    from agrifm_pipeline_tests.fixtures.reference import tiny_case, tiny_checkpoint

    module, sha = _bench().load_baseline("HEAD")  # type: ignore[attr-defined]
    assert module.__name__ == f"agrifm_pipeline_at_{sha}.model"
    old, new = module.load_encoder(tiny_checkpoint("p444")), load_encoder(tiny_checkpoint("p444"))
    assert type(old).__module__.startswith(f"agrifm_pipeline_at_{sha}.")
    x = torch.from_numpy(tiny_case("p444", "t8_64x64").x)
    with torch.inference_mode():
        torch.testing.assert_close(old(x), new(x), atol=1e-5, rtol=1e-5)


def test_interleaved_kernel_timing_reports_each_call() -> None:
    calls: list[str] = []
    medians = _bench()._time_each(  # type: ignore[attr-defined]
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4
    )
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())
    # one warm-up each, then A B, B A, A B, B A
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
