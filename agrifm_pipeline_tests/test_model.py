"""Our AgriFM encoder against the official model's stored outputs.

Tiny reference checkpoints cover every geometry case (T from 1 to 48, padded
and odd sizes, batch 2, non-square, both patch sizes); the full-size cases
rebuild the recipe weights for the released model and compare at 224². Every
entry point (``forward``, ``forward_features``, ``forward_intermediates``) is
compared, with and without an autograd graph, on each CPU matmul library.
"""

from __future__ import annotations

import functools
import json
import shutil
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch

from agrifm_pipeline.errors import CheckpointError
from agrifm_pipeline.model import (
    AgriFMEncoder,
    EncoderConfig,
    checkpoint_filter_fn,
    cpu,
    load_encoder,
)
from agrifm_pipeline.model.agrifm import (
    WindowAttention3D,
    effective_window,
    fold_time,
    relative_position_index,
)
from agrifm_pipeline.model.cache import ShapeCache
from agrifm_pipeline.model.layout import infer_config, to_upstream_layout
from agrifm_pipeline.model.weights import untrained_state_dict, untrained_tensor
from agrifm_pipeline_tests.fixtures.reference import (
    ReferenceCase,
    full_case,
    full_input,
    tiny_case,
    tiny_cases,
    tiny_checkpoint,
)

ATOL = RTOL = 1e-4
F16_ATOL = 5e-3
LIBRARIES = ["blas", "onednn"] if cpu.onednn_linear_available() else ["blas"]


def _compare(final: torch.Tensor, features: list[torch.Tensor], ref: ReferenceCase) -> None:
    got = final.detach().numpy()
    np.testing.assert_allclose(got, ref["encoder_features"], atol=ATOL, rtol=RTOL)
    if "encoder_features_f64" in ref:
        np.testing.assert_allclose(got, ref["encoder_features_f64"], atol=ATOL, rtol=RTOL)
    for k, feat in enumerate(features):
        stage = feat.detach().numpy()
        if f"features_list_{k}" in ref:
            np.testing.assert_allclose(stage, ref[f"features_list_{k}"], atol=ATOL, rtol=RTOL)
        if f"features_list_{k}_f16" in ref:
            np.testing.assert_allclose(
                stage, ref[f"features_list_{k}_f16"].astype(np.float32), atol=F16_ATOL
            )
        if f"features_list_{k}_slice" in ref:
            np.testing.assert_allclose(
                stage[:, :8, :4, :4], ref[f"features_list_{k}_slice"], atol=ATOL, rtol=RTOL
            )


def _mode(mode: str) -> AbstractContextManager[object]:
    modes: dict[str, AbstractContextManager[object]] = {
        "inference_mode": torch.inference_mode(),
        "no_grad": torch.no_grad(),
        "grad": nullcontext(),
    }
    return modes[mode]


@pytest.mark.parametrize("library", LIBRARIES)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
@pytest.mark.parametrize("variant", ["p444", "p422"])
def test_tiny_reference_cases(variant: str, mode: str, library: str) -> None:
    """Every entry point, on every path (in-place inference, no_grad, autograd recording a
    graph through the input), gives the official outputs."""
    model = load_encoder(tiny_checkpoint(variant), cpu_matmul=library)
    assert model.cfg.patch_size == ((4, 4, 4) if variant == "p444" else (4, 2, 2))
    assert model.cfg.embed_dim == 16 and model.cfg.depths == (2, 2, 2, 2)
    assert model.cfg.num_heads == (2, 2, 4, 8)
    cases = tiny_cases(variant)
    assert len(cases) >= 5
    for ref in cases:
        x = torch.from_numpy(ref.x).requires_grad_(mode == "grad")
        with _mode(mode):
            final, features = model.forward_intermediates(x)
            plain = model(x)
            normed = model.forward_features(x)
        assert final.requires_grad == (mode == "grad"), ref.name
        _compare(final, features, ref)
        # The three entry points are one computation.
        assert torch.equal(plain, final), ref.name
        assert torch.equal(fold_time(normed), final), ref.name


def test_grad_path_agrees_with_the_inference_path() -> None:
    """The autograd path (out-of-place residuals and GELU, nn.Linear) and the inference
    path (in place, the CPU kernels) are the same function to float32 rounding."""
    model = load_encoder(tiny_checkpoint("p444"))
    for ref in tiny_cases("p444"):
        x = torch.from_numpy(ref.x)
        with torch.inference_mode():
            fast, fast_features = model.forward_intermediates(x)
        slow, slow_features = model.forward_intermediates(x.clone().requires_grad_(True))
        torch.testing.assert_close(slow.detach(), fast, atol=1e-5, rtol=1e-5)
        for a, b in zip(slow_features, fast_features, strict=True):
            torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=1e-5)


def test_backward_matches_finite_differences() -> None:
    """Gradients of the tiny model (float64, input and every parameter, a shifted and
    padded geometry) against central differences along random directions."""
    model = load_encoder(tiny_checkpoint("p444")).double().requires_grad_(True)
    x = torch.from_numpy(tiny_case("p444", "t6_40x40").x).double().requires_grad_(True)
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    weights = torch.randn_like(model(x), generator=torch.Generator().manual_seed(0))

    def f(inp: torch.Tensor, *flat: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, dict(zip(names, flat, strict=True)), (inp,))
        return (out * weights).sum()

    tensors = [x.detach(), *params]
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    grads = torch.autograd.grad(f(*inputs), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().max() > 0 and all(g.abs().max() > 0 for g in grads[1:])
    gen = torch.Generator().manual_seed(1)
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):
            direction = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in tensors]
            plus = f(*[t + eps * d for t, d in zip(tensors, direction, strict=True)])
            minus = f(*[t - eps * d for t, d in zip(tensors, direction, strict=True)])
            numeric = (plus - minus) / (2 * eps)
            analytic = torch.stack(
                [(g * d).sum() for g, d in zip(grads, direction, strict=True)]
            ).sum()
            assert abs(numeric - analytic) <= 1e-6 * abs(analytic), (numeric, analytic)


def test_backward_in_float32_agrees_with_float64() -> None:
    """The float32 model's input gradient is the float64 one to float32 rounding."""
    ref = tiny_case("p444", "t8_70x70")
    grads = []
    for dtype in (torch.float32, torch.float64):
        model = load_encoder(tiny_checkpoint("p444")).to(dtype)
        x = torch.from_numpy(ref.x).to(dtype).requires_grad_(True)
        model(x).square().mean().backward()
        assert x.grad is not None
        grads.append(x.grad.double())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


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
    """The position bias matters, and an in-place edit of its table after a forward pass
    reaches the next one (the cached attention bias follows the table's values)."""
    ref = tiny_case("p444", "t8_70x70")
    model = load_encoder(fixtures_dir / "tiny_p444.pth")
    x = torch.from_numpy(ref.x)
    with torch.inference_mode():
        before = model(x)  # fills the bias caches
    np.testing.assert_allclose(before.numpy(), ref["encoder_features"], atol=ATOL, rtol=RTOL)
    with torch.no_grad():
        for attn in _attentions(model):
            assert len(attn.bias_cache) > 0
            attn.relative_position_bias_table.zero_()
    with torch.inference_mode():
        out = model(x).numpy()
    assert np.abs(out - ref["encoder_features"]).max() > 1e-2
    fresh = load_encoder(fixtures_dir / "tiny_p444.pth")
    with torch.no_grad():
        for attn in _attentions(fresh):
            attn.relative_position_bias_table.zero_()
        np.testing.assert_array_equal(fresh(x).numpy(), out)


def _attentions(model: AgriFMEncoder) -> list[WindowAttention3D]:
    return [m for m in model.modules() if isinstance(m, WindowAttention3D)]


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
    with torch.inference_mode():
        final, features = model.forward_intermediates(x)
    _compare(final, features, ref)


def _pooled_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.mean((2, 3)), b.mean((2, 3))).min().item()


def test_bfloat16_autocast_keeps_pooled_direction_on_every_path() -> None:
    """bf16 is the caller's autocast around the float32 model: forward, forward_features,
    forward_intermediates and the autograd path all keep pooled cosine >= 0.999."""
    x = torch.from_numpy(full_input("full_input_t32_48x48.npz"))
    model = load_encoder("untrained:0")
    with torch.inference_mode():
        reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.inference_mode():
            outs = {
                "forward": model(x),
                "forward_features": fold_time(model.forward_features(x)),
                "forward_intermediates": model.forward_intermediates(x)[0],
            }
        grad_path = model.forward_intermediates(x.clone().requires_grad_(True))[0]
    outs["grad"] = grad_path
    for name, out in outs.items():
        assert out.shape == reference.shape, name
        cos = _pooled_cosine(reference, out.detach().float())
        assert cos >= 0.999, (name, cos)
        rel = ((reference - out.detach().float()).norm() / reference.norm()).item()
        assert rel < 0.03, (name, rel)
    grad_path.float().square().mean().backward()  # the bf16 graph runs backwards


def test_engine_runs_bfloat16_under_its_autocast(fixtures_dir: Path) -> None:
    """The engine owns precision: its bf16 output keeps the pooled direction of fp32, and the
    model it loaded is the plain float32 module until the engine casts it."""
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions

    x = torch.from_numpy(full_input("full_input_t32_48x48.npz"))
    fp32 = EmbeddingEngine.create("untrained:0", options=InferenceOptions(device="cpu"))
    bf16 = EmbeddingEngine.create(
        "untrained:0", options=InferenceOptions(device="cpu", precision="bfloat16")
    )
    assert fp32.autocast_dtype is None and bf16.autocast_dtype == torch.bfloat16
    assert bf16.record()["precision"] == "bfloat16" and bf16.checkpoint["precision"] == "bfloat16"
    a, b = fp32.embed(x), bf16.embed(x)
    assert b.dtype == torch.float32 and a.shape == b.shape
    assert _pooled_cosine(a, b) >= 0.999
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}


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


# --- CPU kernels and the matmul library ---------------------------------------------------


class _Spy:
    """Counts the calls of a function it stands in for."""

    def __init__(self, fn: object) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self, *args: object) -> object:
        self.calls += 1
        return self.fn(*args)  # type: ignore[operator]


@pytest.mark.parametrize("library", LIBRARIES)
def test_cpu_linear_path_matches_nn_linear(monkeypatch: pytest.MonkeyPatch, library: str) -> None:
    """Each library's fp32 path agrees with nn.Linear; it is taken only without autograd or
    autocast, and oneDNN's op runs exactly when the layer was built for it."""
    torch.manual_seed(0)
    layer = cpu.Linear(96, 288, cpu_matmul=library)
    x = torch.randn(3, 5, 49, 96)
    reference = torch.nn.functional.linear(x, layer.weight, layer.bias)
    spy = _Spy(torch.ops.mkldnn._linear_pointwise)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer(x)
    assert spy.calls == (2 if library == "onednn" else 0)
    assert layer(x).requires_grad  # a graph is being recorded: the standard path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast still casts
    assert spy.calls == (2 if library == "onednn" else 0)
    with pytest.raises(ValueError, match="cpu_matmul='mkl'"):
        cpu.Linear(4, 4, cpu_matmul="mkl")


@pytest.mark.parametrize("threads", [2, 4])
def test_few_row_linears_by_column_blocks(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    """Few rows on the BLAS: one matmul per thread over its output columns, same values."""
    monkeypatch.setattr(cpu.torch, "get_num_threads", lambda: threads)
    spy = _Spy(cpu.linear_by_column_blocks)
    monkeypatch.setattr(cpu, "linear_by_column_blocks", spy)
    torch.manual_seed(0)
    wide, narrow = cpu.Linear(64, 1024), cpu.Linear(64, 256)
    few = torch.randn(2, 49, 64)  # 98 rows
    many = torch.randn(2, 200, 64)  # 400 rows: more than SPLIT_ROWS_MAX
    with torch.inference_mode():
        for layer, x in ((wide, few), (wide, many), (narrow, few)):
            ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
            got = layer(x)
            assert got.shape == ref.shape and got.is_contiguous()
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Only the wide layer on few rows qualifies (the narrow one has < 256 columns a thread).
    assert spy.calls == 1
    with torch.enable_grad():
        assert wide(few).requires_grad  # recording a graph: nn.Linear
    assert spy.calls == 1
    onednn = cpu.Linear(64, 1024, cpu_matmul="onednn")
    if cpu.onednn_linear_available():
        with torch.inference_mode():
            onednn(few)
        assert spy.calls == 1  # built for oneDNN: never the BLAS column blocks


@pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile needs a C compiler"
)
def test_linear_compiles() -> None:
    """Under torch.compile the layer is plain nn.Linear (oneDNN's op needs constant weights)."""
    layer = cpu.Linear(16, 32, cpu_matmul=LIBRARIES[-1])
    x = torch.randn(4, 16)
    with torch.no_grad():
        got = torch.compile(layer)(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_cpu_matmul_library_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto picks oneDNN on AVX-512 and the BLAS on AVX2; the setting overrides; bad values
    are named with the fix, at load."""
    from agrifm_pipeline.errors import SettingsError

    onednn = cpu.onednn_linear_available()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert cpu.cpu_matmul_library("auto") == ("onednn" if onednn else "blas")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu.cpu_matmul_library("auto") == "blas"
    assert cpu.cpu_matmul_library("") == "blas"
    assert cpu.cpu_matmul_library(" BLAS ") == "blas"
    if onednn:
        assert cpu.cpu_matmul_library("onednn") == "onednn"
    with pytest.raises(
        SettingsError, match=r"AGRIFM_PIPELINE_CPU_MATMUL='mkl-ish'.*auto, blas, onednn"
    ):
        cpu.cpu_matmul_library("mkl-ish")
    monkeypatch.setenv(cpu.CPU_MATMUL_ENV, "fastest")
    with pytest.raises(SettingsError, match="AGRIFM_PIPELINE_CPU_MATMUL"):
        load_encoder(tiny_checkpoint("p444"))


@pytest.mark.parametrize("library", LIBRARIES)
def test_recorded_cpu_matmul_is_what_ran(monkeypatch: pytest.MonkeyPatch, library: str) -> None:
    """The library is resolved once, at load, into every layer: a later change of the
    setting (or another engine loaded with another one) changes nothing that is already
    built, and the lineage's cpu_matmul names the kernels that ran."""
    from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions

    other = "blas" if library == "onednn" else LIBRARIES[-1]
    monkeypatch.setenv(cpu.CPU_MATMUL_ENV, library)
    engine = EmbeddingEngine.create(tiny_checkpoint("p444"), options=InferenceOptions(device="cpu"))
    monkeypatch.setenv(cpu.CPU_MATMUL_ENV, other)
    second = EmbeddingEngine.create(tiny_checkpoint("p444"), options=InferenceOptions(device="cpu"))
    assert engine.record()["cpu_matmul"] == library
    assert second.record()["cpu_matmul"] == other
    linears = [m for m in engine.model.modules() if isinstance(m, cpu.Linear)]
    assert linears and {m.cpu_matmul for m in linears} == {library}
    spy = _Spy(torch.ops.mkldnn._linear_pointwise)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", spy)
    engine.embed(torch.randn(2, 4, 10, 32, 32))
    assert (spy.calls > 0) == (library == "onednn")
    assert spy.calls in (0, len(linears))  # every linear layer, once
    bf16 = EmbeddingEngine.create(
        tiny_checkpoint("p444"), options=InferenceOptions(device="cpu", precision="bfloat16")
    )
    assert bf16.record()["cpu_matmul"] is None  # autocast's kernels, not ours


def test_bf16_on_cpu_without_bf16_instructions_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 where the CPU multiplies it in software is slow: said when the engine is made,
    with the fix."""
    import warnings

    import agrifm_pipeline.inference as inference
    from agrifm_pipeline.errors import PerformanceWarning

    options = inference.InferenceOptions(device="cpu", precision="bfloat16")
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: False)
    with pytest.warns(PerformanceWarning, match="precision='float32'"):
        inference.EmbeddingEngine.create(tiny_checkpoint("p444"), options=options)
    monkeypatch.setattr(inference, "native_bf16_cpu", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PerformanceWarning)
        inference.EmbeddingEngine.create(tiny_checkpoint("p444"), options=options)
        inference.EmbeddingEngine.create(
            tiny_checkpoint("p444"), options=inference.InferenceOptions(device="cpu")
        )


# --- the per-shape cache ------------------------------------------------------------------


def test_shape_cache_keeps_the_most_recent_and_follows_its_source() -> None:
    cache = ShapeCache(maxsize=2)
    built: list[str] = []

    def make(name: str) -> torch.Tensor:
        built.append(name)
        return torch.zeros(1)

    for key in ("a", "b", "a", "c", "a", "b"):
        cache.get(key, functools.partial(make, key))
    assert built == ["a", "b", "c", "b"]  # "b" was the least recently used when "c" came
    assert len(cache) == 2
    table = torch.ones(3)
    first = cache.get("t", lambda: table * 2, depends_on=table)
    assert cache.get("t", lambda: table * 2, depends_on=table) is first
    with torch.no_grad():
        table.add_(1)  # an in-place edit
    assert torch.equal(cache.get("t", lambda: table * 2, depends_on=table), torch.full((3,), 4.0))
    table.requires_grad_(True)
    with torch.enable_grad():
        assert cache.get("t", lambda: table * 2, depends_on=table).requires_grad  # not cached
    cache.clear()
    assert len(cache) == 0


def test_loading_takes_the_checkpoints_tensors_without_a_second_copy(
    fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder is built without storage and the tensors read from a checkpoint become
    its parameters (no copy of the weights); a state dict handed in by a caller is copied,
    so changing it afterwards leaves the model alone; a tensor in another dtype is
    converted; and the outputs are the reference ones either way."""
    import agrifm_pipeline.model.weights as ckpt

    path = fixtures_dir / "tiny_p444.pth"
    read: dict[str, dict[str, torch.Tensor]] = {}

    def keep(resolved: object) -> dict[str, torch.Tensor]:
        read["tensors"] = ckpt.read_checkpoint(path)
        return read["tensors"]

    monkeypatch.setattr(ckpt, "checkpoint_tensors", keep)
    model = load_encoder(path)
    weight = read["tensors"]["encoder.S2_patch_emd.weights"]
    assert model.patch_embed.proj.weight.data_ptr() == weight.data_ptr()
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert not any(p.requires_grad for p in model.parameters())

    state = dict(torch.load(path, weights_only=True))
    given = load_encoder(state)
    before = given.patch_embed.proj.weight.clone()
    state["encoder.S2_patch_emd.weights"].zero_()
    assert torch.equal(given.patch_embed.proj.weight, before)

    doubled = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    assert load_encoder(doubled).patch_embed.proj.weight.dtype == torch.float32

    ref = tiny_case("p444", "t8_64x64")
    with torch.no_grad():
        np.testing.assert_allclose(
            model(torch.from_numpy(ref.x)).numpy(), ref["encoder_features"], atol=ATOL, rtol=RTOL
        )
