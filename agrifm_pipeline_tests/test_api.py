"""Single-ROI API and batch inference: peer-shaped calls, outputs and metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from agrifm_pipeline import (
    BackendError,
    InputContractError,
    OutputSpec,
    PointBuffer,
    SettingsError,
    TemporalSpec,
    get_embedding,
    get_embeddings_batch,
)
from agrifm_pipeline.inference import (
    EmbeddingEngine,
    InferenceOptions,
    clear_engine_cache,
    get_engine,
)
from agrifm_pipeline.model import load_encoder
from agrifm_pipeline.preprocess import preprocess_input
from agrifm_pipeline.settings import load_settings

# Every key the peer (rs-embed 0.3.1) records, per the facts sheet.
PEER_KEYS = {
    "backend", "bands", "checkpoint", "device", "feature_list_shapes", "feature_shape", "grid_hw",
    "image_size", "input_frames", "input_hw", "input_mode", "input_original_frames",
    "input_repeated_to_t", "model", "model_source", "n_backfilled_frames", "n_distinct_frames",
    "n_frames", "n_frames_requested", "norm_mode", "param_absmax", "param_mean", "param_std",
    "sensor", "source", "temporal", "type", "weights_verified",
}  # fmt: skip


@pytest.fixture
def tiny(fixtures_dir: Path) -> str:
    return str(fixtures_dir / "tiny_p444.pth")


@pytest.fixture
def settings(tmp_path: Path):
    # Small image size keeps the tests fast; no download may ever be attempted.
    return load_settings({}, image_size=64, auto_download=False, cache_dir=tmp_path / "cache")


def _stack(t: int = 5, h: int = 40, w: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 6000, size=(t, 10, h, w)).astype(np.uint16)


def test_pooled_and_grid_agree_and_carry_peer_metadata(tiny: str, settings) -> None:
    x = _stack()
    grid = get_embedding(
        "agrifm",
        input_chw=x,
        output=OutputSpec.grid(),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
    )
    mean = get_embedding(
        "agrifm",
        input_chw=x,
        output=OutputSpec.pooled(),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
    )
    mx = get_embedding(
        "agrifm",
        input_chw=x,
        output=OutputSpec.pooled("max"),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
    )
    assert isinstance(grid.data, xr.DataArray) and grid.data.dims == ("band", "y", "x")
    assert grid.data.shape == (128, 2, 2)  # tiny E=16 -> 128 channels; 64 px / stride 32
    np.testing.assert_allclose(mean.data, grid.data.mean(("y", "x")).values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mx.data, grid.data.max(("y", "x")).values, rtol=0, atol=0)
    assert mean.meta["pooling"] == "spatial_mean" and mx.meta["pooling"] == "spatial_max"
    assert "pooling" not in grid.meta
    missing = PEER_KEYS - set(grid.meta)
    assert not missing, missing
    m = grid.meta
    assert (
        m["input_mode"].startswith("tchw")
        and m["input_original_frames"] == 5
        and m["input_frames"] == 8
    )
    assert m["n_distinct_frames"] == 5 and m["n_backfilled_frames"] == 0
    assert m["grid_hw"] == [2, 2] and m["feature_shape"] == [128, 2, 2]
    assert m["image_size"] == 64 and m["norm_mode"] == "agrifm_stats" and m["n_frames"] == 8
    assert len(m["checkpoint_sha256"]) == 64 and m["checkpoint_source"] == "path"
    assert m["weights_verified"] is True and m["untrained"] is False
    assert m["settings"]["RS_EMBED_AGRIFM_IMG"] == 64
    assert m["package_version"]
    assert m["nonfinite_pixels"] == 0


def test_result_equals_the_manual_pipeline(tiny: str, settings) -> None:
    x = _stack(t=8, h=48, w=40, seed=3)
    emb = get_embedding(
        "agrifm",
        input_chw=x,
        output=OutputSpec.grid(),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
    )
    prep = preprocess_input(x, n_frames=8, image_size=64, norm_mode="agrifm_stats")
    with torch.no_grad():
        ref = load_encoder(tiny)(prep.tensor[None])[0].numpy()
    np.testing.assert_allclose(emb.data.values, ref, rtol=1e-5, atol=1e-5)


def test_chw_is_repeated_and_recorded(tiny: str, settings) -> None:
    emb = get_embedding(
        "agrifm", input_chw=_stack(t=1)[0], checkpoint=tiny, settings=settings, device="cpu"
    )
    assert emb.meta["input_repeated_to_t"] is True and emb.meta["input_frames"] == 8
    assert emb.meta["n_distinct_frames"] == 1
    assert emb.data.shape == (128,) and emb.data.dtype == np.float32


def test_spatial_and_temporal_are_recorded(tiny: str, settings) -> None:
    emb = get_embedding(
        "agrifm",
        spatial=PointBuffer(lon=4.06, lat=50.75, buffer_m=320),
        temporal=TemporalSpec.year(2019),
        input_chw=_stack(),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
    )
    assert emb.meta["spatial"]["type"] == "PointBuffer" and emb.meta["spatial"]["buffer_m"] == 320
    assert emb.meta["temporal"] == {"type": "range", "start": "2019-01-01", "end": "2020-01-01"}


def test_batch_equals_single_calls_and_loads_once(tiny: str, settings) -> None:
    clear_engine_cache()
    inputs = [_stack(seed=s) for s in range(3)]
    batch = get_embeddings_batch(
        "agrifm", inputs=inputs, checkpoint=tiny, settings=settings, device="cpu", batch_size=2
    )
    engine = get_engine(
        tiny, settings=settings, options=InferenceOptions(device="cpu", batch_size=2)
    )
    assert (
        get_engine(tiny, settings=settings, options=InferenceOptions(device="cpu", batch_size=2))
        is engine
    )
    for x, got in zip(inputs, batch, strict=True):
        one = get_embedding("agrifm", input_chw=x, checkpoint=tiny, settings=settings, device="cpu")
        np.testing.assert_allclose(got.data, one.data, rtol=1e-5, atol=1e-5)
        assert got.meta["batch_size"] == 2


def test_engine_embeds_in_batches(tiny: str, settings) -> None:
    engine = EmbeddingEngine.create(
        tiny, settings=settings, options=InferenceOptions(device="cpu", batch_size=3)
    )
    chips = torch.randn(7, 8, 10, 32, 32)
    out = engine.embed(chips)
    with torch.no_grad():
        ref = engine.model(chips)
    assert out.shape == (7, 128, 1, 1)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    a, b = engine.embed_many([chips[:2], chips[2:]])
    assert a.shape[0] == 2 and b.shape[0] == 5
    rec = engine.record()
    assert rec["batch_size"] == 3 and rec["precision"] == "float32" and rec["device"] == "cpu"
    with pytest.raises(InputContractError, match=r"\(N, T, 10, S, S\)"):
        engine.embed(torch.randn(2, 8, 3, 32, 32))


def test_untrained_is_labelled(settings) -> None:
    emb = get_embedding(
        "agrifm",
        input_chw=_stack(t=2, h=16, w=16),
        checkpoint="untrained:7",
        settings=settings.replace(image_size=32),
        device="cpu",
    )
    assert emb.meta["untrained"] is True and emb.meta["weights_verified"] is False
    assert "UNTRAINED" in emb.meta["weights_check"]
    assert emb.meta["checkpoint_source"] == "untrained"
    assert emb.data.shape == (1024,)


def test_bfloat16_is_recorded(tiny: str, settings) -> None:
    emb = get_embedding(
        "agrifm",
        input_chw=_stack(),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
        precision="bf16",
    )
    assert emb.meta["precision"] == "bfloat16" and emb.data.dtype == np.float32


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"backend": "gee"}, BackendError, "needs spatial"),
        ({"backend": "local", "spatial": PointBuffer(4.0, 50.0, 100)}, BackendError, "temporal"),
        ({"backend": "tensor"}, BackendError, "provider-only"),
        ({"model": "prithvi", "input_chw": np.zeros((10, 8, 8))}, BackendError, "agrifm"),
        ({"input_chw": np.zeros((3, 8, 8))}, InputContractError, r"\(3, 8, 8\)"),
        (
            {
                "input_chw": np.zeros((10, 8, 8)),
                "device": "cuda:7" if not torch.cuda.is_available() else "tpu",
            },
            SettingsError,
            "device",
        ),
        ({"input_chw": np.zeros((10, 8, 8)), "precision": "fp8"}, SettingsError, "bfloat16"),
        ({"input_chw": np.zeros((10, 8, 8)), "n_frames": 0}, SettingsError, "n_frames"),
        ({"input_chw": np.zeros((10, 8, 8)), "encoder": "theirs"}, BackendError, "official"),
    ],
)
def test_bad_calls_raise_named_errors(
    tiny: str, settings, kwargs: dict, err: type, match: str
) -> None:
    kwargs = {"checkpoint": tiny, "settings": settings, **kwargs}
    model = kwargs.pop("model", "agrifm")
    with pytest.raises(err, match=match):
        get_embedding(model, **kwargs)


def test_local_backend_single_roi_and_batch(tiny: str, settings, sample_dir: Path) -> None:
    roi = PointBuffer(lon=4.063058, lat=50.746013, buffer_m=300)
    kwargs = {
        "temporal": TemporalSpec.year(2019),
        "backend": "local",
        "provider_options": {"root": str(sample_dir)},
        "checkpoint": tiny,
        "settings": settings,
        "device": "cpu",
    }
    grid = get_embedding("agrifm", spatial=roi, output=OutputSpec.grid(), **kwargs)
    m = grid.meta
    assert m["source"] == "provider:local" and m["provider"] == "local" and m["synthetic"] is False
    assert m["input_crs"] == "EPSG:32631" and m["input_mode"] == "tchw_exact"
    assert len(m["frames"]) == 8 and m["frames"][-1]["backfilled"] is True
    assert m["n_backfilled_frames"] >= 1 and m["n_distinct_frames"] == 8 - m["n_backfilled_frames"]
    assert m["cloud_mask"]["mode"] == "scl"
    # The grid is placed over the ROI in UTM metres.
    x0, y0, x1, y1 = m["input_bounds"]
    assert (
        x0 < float(grid.data.x[0]) < float(grid.data.x[-1]) < x1
        and y0 < float(grid.data.y[-1]) < float(grid.data.y[0]) < y1
        and grid.data.attrs["crs"] == "EPSG:32631"
    )
    other = PointBuffer(lon=4.0615, lat=50.7455, buffer_m=150)
    batch = get_embeddings_batch("agrifm", spatials=[roi, other], **kwargs)
    np.testing.assert_allclose(
        batch[0].data, grid.data.mean(("y", "x")).values, rtol=1e-5, atol=1e-5
    )
    single = get_embedding("agrifm", spatial=other, **kwargs)
    np.testing.assert_allclose(batch[1].data, single.data, rtol=1e-5, atol=1e-5)


def test_synthetic_provider_instance_is_labelled(tiny: str, settings) -> None:
    from agrifm_pipeline.providers.synthetic import SyntheticProvider

    emb = get_embedding(
        "agrifm",
        spatial=PointBuffer(lon=4.06, lat=50.75, buffer_m=200),
        temporal=TemporalSpec.range("2020-03-01", "2020-09-01"),
        provider=SyntheticProvider(seed=5),
        checkpoint=tiny,
        settings=settings,
        device="cpu",
    )
    assert emb.meta["synthetic"] is True and emb.meta["source"] == "provider:synthetic"
    assert emb.meta["backend"] == "provider:synthetic"


def test_prefetch_keeps_order_and_raises_producer_errors() -> None:
    from agrifm_pipeline.inference import prefetch

    assert list(prefetch(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("unreadable partition")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="unreadable partition"):
        next(it)
    # A consumer that stops early does not leave the producer stuck.
    gen = prefetch(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()


def test_embed_stream_matches_per_group_embedding() -> None:
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions

    engine = EmbeddingEngine.create(
        str(Path(__file__).resolve().parent / "fixtures/agrifm/tiny_p444.pth"),
        options=InferenceOptions(device="cpu", batch_size=3),
    )
    groups = [(i, torch.randn(n, 4, 10, 32, 32)) for i, n in enumerate([2, 5, 1, 4])]
    got = list(engine.embed_stream(iter(groups)))
    assert [k for k, _ in got] == [0, 1, 2, 3]
    for (_, chips), (_, feats) in zip(groups, got, strict=True):
        torch.testing.assert_close(feats, engine.embed(chips), atol=1e-5, rtol=1e-5)
