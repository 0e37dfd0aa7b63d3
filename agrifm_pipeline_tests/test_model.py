"""Our AgriFM encoder against the official model's stored outputs.

Tiny reference checkpoints cover every geometry case (T from 1 to 48, padded
and odd sizes, batch 2, non-square, both patch sizes); the full-size cases
rebuild the recipe weights for the released model and compare at 224².
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model import AgriFMEncoder, EncoderConfig, checkpoint_filter_fn, load_encoder
from agrifm_pipeline.model.agrifm import effective_window, relative_position_index
from agrifm_pipeline.model.layout import infer_config, to_upstream_layout
from agrifm_pipeline.model.weights import untrained_state_dict, untrained_tensor
from agrifm_pipeline_tests.fixtures.reference import (
    ReferenceCase,
    full_case,
    full_input,
    tiny_case,
    tiny_cases,
)

ATOL = RTOL = 1e-4
F16_ATOL = 5e-3


def _compare(out: dict, ref: ReferenceCase) -> None:
    np.testing.assert_allclose(
        out["encoder_features"].numpy(), ref["encoder_features"], atol=ATOL, rtol=RTOL
    )
    if "encoder_features_f64" in ref:
        np.testing.assert_allclose(
            out["encoder_features"].numpy(), ref["encoder_features_f64"], atol=ATOL, rtol=RTOL
        )
    for k, feat in enumerate(out["features_list"]):
        got = feat.numpy()
        if f"features_list_{k}" in ref:
            np.testing.assert_allclose(got, ref[f"features_list_{k}"], atol=ATOL, rtol=RTOL)
        if f"features_list_{k}_f16" in ref:
            np.testing.assert_allclose(
                got, ref[f"features_list_{k}_f16"].astype(np.float32), atol=F16_ATOL
            )
        if f"features_list_{k}_slice" in ref:
            np.testing.assert_allclose(
                got[:, :8, :4, :4], ref[f"features_list_{k}_slice"], atol=ATOL, rtol=RTOL
            )


@pytest.mark.parametrize("variant", ["p444", "p422"])
def test_tiny_reference_cases(fixtures_dir: Path, variant: str) -> None:
    model = load_encoder(fixtures_dir / f"tiny_{variant}.pth")
    assert model.cfg.patch_size == ((4, 4, 4) if variant == "p444" else (4, 2, 2))
    assert model.cfg.embed_dim == 16 and model.cfg.depths == (2, 2, 2, 2)
    assert model.cfg.num_heads == (2, 2, 4, 8)
    cases = tiny_cases(variant)
    assert len(cases) >= 5
    for ref in cases:
        x = torch.from_numpy(ref.x)
        with torch.no_grad():
            out = model.forward_features(x)
            plain = model(x)
        _compare(out, ref)
        # forward() is exactly the first output of forward_features().
        assert torch.equal(plain, out["encoder_features"]), ref.name


def test_tiny_decoy_keys_are_ignored_and_listed(fixtures_dir: Path) -> None:
    model = load_encoder(fixtures_dir / "tiny_p444.pth")
    info = model.checkpoint_info
    assert info["layout"] == "released"
    assert {"encoder.HLSL30_patch_emd.weights", "encoder.Modis_patch_emd.bias"} <= set(
        info["ignored_keys"]
    )
    assert info["untrained"] is False
    assert len(info["sha256"]) == 64
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_position_bias_quirk_matters(fixtures_dir: Path) -> None:
    """The sliced full-window index (not a geometric one) is what reproduces upstream."""
    ref = tiny_case("p444", "t8_70x70")
    model = load_encoder(fixtures_dir / "tiny_p444.pth")
    x = torch.from_numpy(ref.x)
    with torch.no_grad():
        for layer in model.layers:
            for block in layer.blocks:
                block.attn.relative_position_bias_table.zero_()
        out = model(x).numpy()
    assert np.abs(out - ref["encoder_features"]).max() > 1e-2


def test_effective_window_rule() -> None:
    assert effective_window((8, 56, 56), (8, 7, 7), (4, 3, 3)) == ((8, 7, 7), (0, 3, 3))
    assert effective_window((2, 7, 9), (8, 7, 7), (4, 3, 3)) == ((2, 7, 7), (0, 0, 3))
    assert effective_window((12, 3, 3), (8, 7, 7), (4, 3, 3)) == ((8, 3, 3), (4, 0, 0))
    idx = relative_position_index((8, 7, 7))
    assert idx.shape == (392, 392) and int(idx.max()) == 15 * 13 * 13 - 1


# --- checkpoint layouts and strict loading ------------------------------------------------


def _mmengine_layout(released: dict[str, torch.Tensor], with_index: bool) -> dict:
    up = to_upstream_layout(released)
    state = {f"module.{k}": v for k, v in up.tensors.items()}
    if with_index:
        for key in [k for k in state if k.endswith("attn.qkv.weight")]:
            state[key.replace("qkv.weight", "relative_position_index")] = relative_position_index(
                (8, 7, 7)
            )
    state["module.neck.conv.weight"] = torch.zeros(2, 2)  # not encoder: ignored, listed
    return {"state_dict": state, "meta": {"epoch": 1}}


def test_mmengine_layout_loads_identically(fixtures_dir: Path) -> None:
    released = torch.load(fixtures_dir / "tiny_p422.pth", weights_only=True)
    ref = tiny_case("p422", "t8_64x64")
    x = torch.from_numpy(ref.x)
    for with_index in (False, True):
        model = load_encoder(_mmengine_layout(released, with_index))
        assert model.checkpoint_info["layout"] == "mmengine"
        assert "module.neck.conv.weight" in model.checkpoint_info["ignored_keys"]
        with torch.no_grad():
            np.testing.assert_allclose(
                model(x).numpy(), ref["encoder_features"], atol=ATOL, rtol=RTOL
            )


def test_strict_load_lists_every_problem(fixtures_dir: Path) -> None:
    state = dict(torch.load(fixtures_dir / "tiny_p444.pth", weights_only=True))
    del state["encoder.backbone.layers.1.blocks.0.mlp.fc1.bias"]
    state["encoder.backbone.layers.0.blocks.0.attn.extra_gate"] = torch.zeros(3)
    state["encoder.backbone.norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointError) as err:
        load_encoder(state)
    msg = str(err.value)
    assert "missing: layers.1.blocks.0.mlp.fc1.bias" in msg
    assert "unexpected: layers.0.blocks.0.attn.extra_gate" in msg
    assert "shape mismatch: norm.weight" in msg


def test_wrong_position_index_buffer_is_rejected(fixtures_dir: Path) -> None:
    state = dict(torch.load(fixtures_dir / "tiny_p444.pth", weights_only=True))
    state["encoder.backbone.layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(
        392, 392, dtype=torch.long
    )
    with pytest.raises(CheckpointError, match="different window"):
        load_encoder(state)


def test_not_an_agrifm_state_dict() -> None:
    with pytest.raises(CheckpointError, match="no AgriFM S2 encoder tensors"):
        load_encoder({"head.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="no tensors"):
        load_encoder({"epoch": 3, "note": "hello"})


# --- full-size model ----------------------------------------------------------------------


def _full_keys(fixtures_dir: Path) -> dict:
    return json.loads((fixtures_dir / "full_keys.json").read_text())


def _recipe_state(fixtures_dir: Path, variant: str) -> dict[str, torch.Tensor]:
    """Full-size weights built from full_keys.json with the fixtures' recipe."""
    entries = _full_keys(fixtures_dir)[variant]["keys"]
    return {
        e["key"]: untrained_tensor(e["key"], tuple(e["shape"]), seed=0)
        for e in entries
        if not e["buffer"]
    }


@pytest.mark.parametrize("variant", ["p444", "p422"])
def test_untrained_zero_is_the_fixture_recipe(fixtures_dir: Path, variant: str) -> None:
    entries = _full_keys(fixtures_dir)[variant]["keys"]
    patch = (4, 4, 4) if variant == "p444" else (4, 2, 2)
    ours = untrained_state_dict(0, EncoderConfig(patch_size=patch))
    params = [e for e in entries if not e["buffer"]]
    assert set(ours) == {e["key"] for e in params}
    for e in params:
        t = ours[e["key"]]
        assert list(t.shape) == e["shape"]
        assert t.double().sum().item() == pytest.approx(
            e["recipe_sum"], abs=1e-6 * max(1, e["recipe_abs_sum"])
        )
        np.testing.assert_allclose(t.flatten()[:4].numpy(), e["recipe_first4"], rtol=0, atol=1e-7)
    n_params = sum(t.numel() for t in ours.values())
    assert n_params == _full_keys(fixtures_dir)[variant]["n_params_excluding_buffers"]


@pytest.mark.parametrize("variant", ["p444", "p422"])
@pytest.mark.parametrize("layout", ["released", "mmengine"])
def test_full_size_checkpoint_loads_strictly(fixtures_dir: Path, variant: str, layout: str) -> None:
    state = _recipe_state(fixtures_dir, variant)
    if layout == "mmengine":
        state = _mmengine_layout(state, with_index=True)
    else:
        # The released file may carry the index buffers too.
        for e in _full_keys(fixtures_dir)[variant]["keys"]:
            if e["buffer"]:
                state[e["key"]] = relative_position_index((8, 7, 7))
    model = load_encoder(state)
    assert model.cfg.depths == (2, 2, 18, 2) and model.cfg.num_heads == (4, 8, 16, 32)
    assert model.cfg.patch_size == ((4, 4, 4) if variant == "p444" else (4, 2, 2))
    assert (
        sum(p.numel() for p in model.parameters())
        == _full_keys(fixtures_dir)[variant]["n_params_excluding_buffers"]
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "spec"),
    [
        ("full_p444_t8_224x224.npz", "untrained:0"),
        ("full_p422_t8_224x224.npz", "untrained:0:p422"),
        ("full_p444_t32_48x48.npz", "untrained:0"),
    ],
)
def test_full_size_reference_outputs(case: str, spec: str) -> None:
    model = load_encoder(spec)
    assert model.checkpoint_info["untrained"] is True
    ref = full_case(case)
    x = torch.from_numpy(ref.x)
    with torch.no_grad():
        out = model.forward_features(x)
    _compare(out, ref)


def test_bfloat16_keeps_pooled_direction() -> None:
    """bf16 autocast is measured, not assumed: pooled vectors keep cosine >= 0.999."""
    x = torch.from_numpy(full_input("full_input_t32_48x48.npz"))
    fp32 = load_encoder("untrained:0")
    bf16 = load_encoder("untrained:0", precision="bfloat16")
    with torch.no_grad():
        a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32 and a.shape == b.shape
    cos = torch.nn.functional.cosine_similarity(a.mean((2, 3)), b.mean((2, 3))).min().item()
    assert cos >= 0.999, cos
    # The grid itself: relative error 0.010 measured (AMD EPYC, torch 2.14.1).
    rel = ((a - b).norm() / a.norm()).item()
    assert rel < 0.03, rel


def test_any_size_and_frame_count() -> None:
    cfg = EncoderConfig(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    model = AgriFMEncoder(cfg).eval()
    for t, h, w in [(1, 17, 5), (3, 33, 64), (9, 8, 8), (40, 30, 31)]:
        with torch.no_grad():
            y = model(torch.randn(2, t, 10, h, w))
        assert y.shape == (2, cfg.output_channels(t), *cfg.grid_hw(h, w)), (t, h, w)
    with pytest.raises(ValueError, match=r"\(N, T, 10, H, W\)"):
        model(torch.randn(1, 4, 3, 32, 32))


def test_filter_fn_maps_onto_our_names(fixtures_dir: Path) -> None:
    raw = torch.load(fixtures_dir / "tiny_p444.pth", weights_only=True)
    model = AgriFMEncoder(infer_config(to_upstream_layout(raw).tensors))
    state, info = checkpoint_filter_fn(raw, model)
    assert set(state) == set(model.state_dict())
    assert state["patch_embed.proj.weight"] is raw["encoder.S2_patch_emd.weights"]
    assert info["layout"] == "released"


def test_cpu_linear_path_matches_nn_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oneDNN fp32 path is taken only without autograd or autocast, and agrees."""
    from agrifm_pipeline.model import agrifm

    torch.manual_seed(0)
    layer = agrifm.Linear(96, 288)
    x = torch.randn(3, 5, 49, 96)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        fast = layer(x)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    assert layer(x).requires_grad  # a graph is being recorded: the standard path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast still casts
    if not agrifm._onednn_linear_available():
        return
    monkeypatch.setattr(agrifm, "ONEDNN_LINEAR", True)  # whatever this host's auto choice is
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
    calls = []
    original = torch.ops.mkldnn._linear_pointwise

    def spy(*args: object) -> torch.Tensor:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1


@pytest.mark.parametrize("threads", [2, 4])
def test_few_row_linears_by_column_blocks(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Few rows on the BLAS: one matmul per thread over its output columns, same values."""
    from agrifm_pipeline.model import agrifm

    monkeypatch.setattr(agrifm, "ONEDNN_LINEAR", False)
    monkeypatch.setattr(agrifm.torch, "get_num_threads", lambda: threads)
    calls: list[int] = []
    original = agrifm._linear_by_column_blocks

    def spy(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, parts: int) -> torch.Tensor:
        calls.append(parts)
        return original(x, w, b, parts)

    monkeypatch.setattr(agrifm, "_linear_by_column_blocks", spy)
    torch.manual_seed(0)
    wide, narrow = agrifm.Linear(64, 1024), agrifm.Linear(64, 256)
    few = torch.randn(2, 49, 64)  # 98 rows
    many = torch.randn(2, 200, 64)  # 400 rows: more than SPLIT_ROWS_MAX
    with torch.inference_mode():
        for layer, x in ((wide, few), (wide, many), (narrow, few)):
            ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
            got = layer(x)
            assert got.shape == ref.shape and got.is_contiguous()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Only the wide layer on few rows qualifies (the narrow one has < 256 columns a thread).
    assert calls == [threads]
    with torch.enable_grad():
        assert wide(few).requires_grad  # recording a graph: nn.Linear
    assert calls == [threads]


@pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile needs a C compiler"
)
def test_linear_compiles() -> None:
    """Under torch.compile the layer is plain nn.Linear (oneDNN's op needs constant weights)."""
    from agrifm_pipeline.model.agrifm import Linear

    layer = Linear(16, 32)
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = torch.compile(layer)(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_cpu_matmul_library_choice(monkeypatch: pytest.MonkeyPatch, fixtures_dir: Path) -> None:
    """auto picks oneDNN on AVX-512 and the BLAS on AVX2; the setting overrides; bad values
    are named with the fix; the choice is recorded with the embeddings."""
    from agrifm_pipeline.errors import SettingsError
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions
    from agrifm_pipeline.model import agrifm

    onednn = agrifm._onednn_linear_available()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert agrifm.cpu_matmul_library("auto") == ("onednn" if onednn else "blas")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert agrifm.cpu_matmul_library("auto") == "blas"
    assert agrifm.cpu_matmul_library("") == "blas"
    assert agrifm.cpu_matmul_library(" BLAS ") == "blas"
    if onednn:
        assert agrifm.cpu_matmul_library("onednn") == "onednn"
    with pytest.raises(
        SettingsError, match=r"AGRIFM_PIPELINE_CPU_MATMUL='mkl-ish'.*auto, blas, onednn"
    ):
        agrifm.cpu_matmul_library("mkl-ish")

    monkeypatch.setenv(agrifm.CPU_MATMUL_ENV, "fastest")
    with pytest.raises(SettingsError, match="AGRIFM_PIPELINE_CPU_MATMUL"):
        load_encoder(fixtures_dir / "tiny_p444.pth")
    monkeypatch.setenv(agrifm.CPU_MATMUL_ENV, "blas")
    monkeypatch.setattr(agrifm, "ONEDNN_LINEAR", agrifm.ONEDNN_LINEAR)  # restored afterwards
    engine = EmbeddingEngine.create(
        fixtures_dir / "tiny_p444.pth", options=InferenceOptions(device="cpu")
    )
    assert engine.record()["cpu_matmul"] == "blas" and agrifm.ONEDNN_LINEAR is False


def test_bf16_on_cpu_without_bf16_instructions_warns(
    monkeypatch: pytest.MonkeyPatch, fixtures_dir: Path
) -> None:
    """bf16 where the CPU multiplies it in software is slow: said at load, with the fix."""
    import warnings

    import agrifm_pipeline.model as model_pkg
    from agrifm_pipeline.errors import PerformanceWarning

    tiny = fixtures_dir / "tiny_p444.pth"
    monkeypatch.setattr(model_pkg, "native_bf16_cpu", lambda: False)
    with pytest.warns(PerformanceWarning, match="precision='float32'"):
        load_encoder(tiny, precision="bfloat16")
    monkeypatch.setattr(model_pkg, "native_bf16_cpu", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerformanceWarning)
        load_encoder(tiny, precision="bfloat16")
        load_encoder(tiny, precision="float32")
