#!/usr/bin/env python
"""Encoder throughput: chips/s, counted FLOP/s, and their share of the machine's matmul rate.

Everything is measured in one process and one run, so the ratios compare like
with like:

* the dense matmul rate (2048², fp32 and bf16; in fp32 on a CPU the faster of
  MKL and oneDNN, the two libraries PyTorch ships) before and after the model runs,
  and again just before and after each row: a row's "share of matmul" is its
  GFLOP/s over the mean of its own two rates (the JSON also has the
  conservative share, over the highest rate seen);
* FLOPs per chip counted with ``torch.utils.flop_counter`` on our encoder;
* our encoder as the product runs it (``EmbeddingEngine.forward``: bfloat16 is
  the engine's autocast over weights it cast once) at each (patch, T, batch,
  precision): seconds per chip (median of ``--repeats`` after warm-up),
  chips/s, GFLOP/s, share of matmul rate, peak resident memory of the row;
  with the official code in the run, the timed
  calls of the two alternate (ours, official, official, ours, ...), so a slow
  phase of a shared machine slows both rather than one;
* the official AgriFM code built from its source tree, with the same weights
  and inputs, when ``--official-repo`` or ``RS_EMBED_AGRIFM_REPO_PATH`` names a
  checkout (otherwise that column is left out, and the run says so);
* with ``--kernels``, each CPU kernel choice of the encoder against its
  alternative at the encoder's own shapes (see :func:`kernel_rows`): the fp32
  linear on the BLAS, in column blocks and on oneDNN; bf16 attention fused and
  explicit; the patch embedding per sample and per batch;
* with ``--baseline REV``, our own encoder as it was at git revision REV
  (fp32 rows; same weights and inputs, timed interleaved like the official
  code), and the largest difference between the two outputs: the before and
  after of a change to the encoder, measured in one process.

The JSON written (``--json``) records the machine, its CPU flags, the torch,
numpy, MKL and oneDNN versions and the command line beside the rows; the
committed results are in ``bench/results/``.

Usage::

    python bench/bench_encoder.py                           # p444, T=8, 224², batch 1/4/8, fp32+bf16
    python bench/bench_encoder.py --patch p444 p422 --frames 8 32 --official-repo ~/src/AgriFM
    python bench/bench_encoder.py --device cuda --batch 16 32 64 --precision bfloat16
    python bench/bench_encoder.py --batch 4 --precision float32 --baseline HEAD~1
    python bench/bench_encoder.py --kernels --json bench/results/kernels.json
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agrifm_pipeline.inference import EmbeddingEngine, InferenceOptions
from agrifm_pipeline.model import (
    EncoderConfig,
    cpu,
    load_encoder,
    untrained_state_dict,
)

PATCHES = {"p444": (4, 4, 4), "p422": (4, 2, 2)}


def cpu_name() -> str:
    """The CPU's model name and family/model numbers from /proc/cpuinfo (Linux), else platform's."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.machine())
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')})"


#: The CPU flags that decide which kernels are fast here.
_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")


def cpu_flags() -> list[str]:
    """This CPU's vector-extension flags from /proc/cpuinfo (Linux), else []."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.partition(":")[2].split()
                return sorted(f for f in flags if f.startswith(_FLAG_PREFIXES))
    except OSError:
        pass
    return []


def library_versions() -> dict[str, str | None]:
    """torch, numpy, and the MKL and oneDNN builds inside torch (from its build config)."""
    import numpy

    found: dict[str, str | None] = {
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "mkl": None,
        "onednn": None,
    }
    for line in torch.__config__.show().splitlines():
        text = line.strip().lstrip("- ")
        if "Math Kernel Library" in text:
            found["mkl"] = text
        elif "oneDNN" in text or "MKL-DNN" in text:
            found["onednn"] = text
    return found


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 2.0
) -> float:
    """Dense n×n matmul GFLOP/s (median of timed repeats).

    In fp32 on a CPU, PyTorch ships two matmul libraries: ``a @ b`` goes to
    MKL, and the encoder's linear layers may go to oneDNN (see ``model.cpu.Linear``).
    Both are timed and the faster one is the machine's rate, so the encoder is
    never measured against a slower denominator than the kernels it could use.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    kernels = [lambda: a @ b]
    if device.type == "cpu" and dtype == torch.float32 and cpu.onednn_linear_available():
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    rates = []
    for kernel in kernels:
        for _ in range(3):
            kernel()
        _sync(device)
        times: list[float] = []
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / len(kernels) or len(times) < 5:
            t0 = time.perf_counter()
            kernel()
            _sync(device)
            times.append(time.perf_counter() - t0)
        rates.append(2 * n**3 / statistics.median(times) / 1e9)
    return max(rates)


def count_flops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """FLOPs of one forward, attention counted as its two matmuls (the math kernel).

    Fused attention kernels are counted differently by the flop counter; the
    math kernel's count is the one the official model gives, so ratios compare.
    The counter knows ATen's matmuls, not oneDNN's linear op, so ``model``
    should be built with ``cpu_matmul="blas"`` (the same FLOPs either way).
    """
    with (
        torch.no_grad(),
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False) as counter,
    ):
        model(x)
    return float(counter.get_total_flops())


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def bf16_accuracy(
    fp32: Callable[[torch.Tensor], torch.Tensor],
    low: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> dict[str, float]:
    """bf16 against fp32 on the same input: pooled cosine (min over chips), grid relative error."""
    with torch.inference_mode():
        a, b = fp32(x).float(), low(x).float()
    cos = torch.nn.functional.cosine_similarity(a.mean((2, 3)), b.mean((2, 3)), dim=1)
    return {
        "bf16_pooled_cosine_min": cos.min().item(),
        "bf16_grid_rel_error": ((a - b).norm() / a.norm()).item(),
    }


def _call(
    fn: Callable[[torch.Tensor], torch.Tensor], autocast: torch.dtype | None, x: torch.Tensor
) -> None:
    if autocast is not None:
        with torch.autocast(device_type=x.device.type, dtype=autocast):
            fn(x)
    else:
        fn(x)


def time_interleaved(
    fns: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype | None]],
    x: torch.Tensor,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> dict[str, tuple[float, float | None, float]]:
    """Median seconds per call, peak memory (MB) and median CPU seconds per call (the
    process's, all threads) of each ``name: (fn, autocast)``.

    The timed calls alternate between the encoders (A B, B A, A B, ...), so a
    slow phase of a shared machine falls on both instead of on whichever ran
    then. CPU time counts the work done rather than the waiting, so on a host
    shared with other work it varies less than the wall clock (with one thread,
    ``OMP_NUM_THREADS=1``, it is free of the threads' spin-waiting too). Each
    peak is taken over one call of its own after the warm-up (on a CPU, the
    process's resident high-water mark reset just before it).
    """
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu_times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, float | None] = {}
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                _call(*fns[n], x)
        _sync(device)
        for n in names:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                _call(*fns[n], x)
                _sync(device)
                peaks[n] = torch.cuda.max_memory_allocated(device) / 2**20
            else:
                reset = _reset_peak_rss()
                _call(*fns[n], x)
                peaks[n] = _peak_rss_mb() if reset else None
        for r in range(repeats):
            for n in names if r % 2 == 0 else reversed(names):
                t0, c0 = time.perf_counter(), time.process_time()
                _call(*fns[n], x)
                _sync(device)
                times[n].append(time.perf_counter() - t0)
                cpu_times[n].append(time.process_time() - c0)
    return {
        n: (statistics.median(times[n]), peaks[n], statistics.median(cpu_times[n])) for n in names
    }


def load_baseline(rev: str) -> tuple[Any, str]:
    """``agrifm_pipeline.model`` as it was at git revision ``rev``, and that revision's
    short hash; importable beside today's package.

    The package is taken from ``git archive`` into a temporary directory under
    another name (its own imports rewritten to it), so both versions live in one
    process and are timed against each other.
    """
    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()
    name = f"agrifm_pipeline_at_{sha}"
    tmp = Path(tempfile.mkdtemp(prefix="agrifm-baseline-"))
    archive = subprocess.run(
        ["git", "archive", "--format=tar", rev, "agrifm_pipeline"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "agrifm_pipeline").rename(tmp / name)
    for path in (tmp / name).rglob("*.py"):
        path.write_text(re.sub(r"\bagrifm_pipeline\b", name, path.read_text()))
    sys.path.insert(0, str(tmp))
    return importlib.import_module(f"{name}.model"), sha


def _time_each(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each no-argument call, the calls interleaved (A B, B A, ...)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.inference_mode():
        for n in names:
            fns[n]()
        for r in range(repeats):
            for n in names if r % 2 == 0 else reversed(names):
                t0 = time.perf_counter()
                fns[n]()
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


#: (stage, layer, rows, in, out): the full encoder's linear layers at the row counts
#: they see (p444, T=8, 224²): stage 3 at batch 1 and 8 (49 and 392 rows), stage 2
#: at batch 1 and 8 (196, 1568), stage 0 one sample at a time (6272).
KERNEL_LINEARS = [
    (3, "qkv", 49, 1024, 3072),
    (3, "fc1", 49, 1024, 4096),
    (3, "fc2", 49, 4096, 1024),
    (3, "fc1", 392, 1024, 4096),
    (2, "qkv", 196, 512, 1536),
    (2, "fc1", 196, 512, 2048),
    (2, "fc2", 196, 2048, 512),
    (2, "fc1", 1568, 512, 2048),
    (0, "fc1", 6272, 128, 512),
    (0, "fc2", 6272, 512, 128),
]
#: (stage, windows x batch, heads, tokens, head dim) for bf16 attention.
KERNEL_ATTENTION = [(0, 64, 4, 98, 32), (2, 4, 16, 49, 32), (3, 1, 32, 49, 32), (0, 8, 4, 392, 32)]


def kernel_rows(repeats: int, force_bf16: bool) -> list[dict[str, Any]]:
    """Each CPU kernel choice in ``model/cpu.py`` and ``model/agrifm.py`` against its
    alternative, at the encoder's shapes; values are checked equal before timing."""
    from agrifm_pipeline.model.agrifm import PatchEmbed3D

    rows: list[dict[str, Any]] = []
    threads = torch.get_num_threads()
    for stage, layer, m, k, n in KERNEL_LINEARS:
        x = torch.randn(m, k)
        w, bias = torch.randn(n, k) / k**0.5, torch.randn(n)
        fns: dict[str, Callable[[], object]] = {
            "blas": partial(torch.nn.functional.linear, x, w, bias)
        }
        if n % threads == 0 and n // threads >= cpu.SPLIT_MIN_COLUMNS and threads > 1:
            fns["column_blocks"] = partial(cpu.linear_by_column_blocks, x, w, bias, threads)
        if cpu.onednn_linear_available():
            fns["onednn"] = partial(torch.ops.mkldnn._linear_pointwise, x, w, bias, "none", [], "")
        with torch.inference_mode():
            ref = fns["blas"]()
            for name, fn in fns.items():
                torch.testing.assert_close(fn(), ref, atol=1e-4, rtol=1e-4, msg=name)
        secs = _time_each(fns, repeats)
        rows.append(
            {
                "kernel": "linear_fp32",
                "stage": stage,
                "layer": layer,
                "shape": [m, k, n],
                "gflops": {name: 2 * m * k * n / s / 1e9 for name, s in secs.items()},
            }
        )
        print(
            f"# linear fp32 stage {stage} {layer} {m}x{k}->{n}: "
            + ", ".join(f"{name} {g:.0f}" for name, g in rows[-1]["gflops"].items())
            + " GFLOP/s",
            flush=True,
        )
    if cpu.native_bf16_cpu() or force_bf16:
        for stage, batch, heads, tokens, hd in KERNEL_ATTENTION:
            qkv = torch.randn(batch, tokens, 3, heads, hd).to(torch.bfloat16)
            q, k_, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided, as in the model
            bias = torch.randn(1, heads, tokens, tokens).to(torch.bfloat16)
            att: dict[str, Callable[[], object]] = {
                "fused": partial(
                    torch.nn.functional.scaled_dot_product_attention, q, k_, v, attn_mask=bias
                ),
                "explicit": partial(cpu.explicit_attention, q, k_, v, bias),
            }
            secs = _time_each(att, repeats)
            rows.append(
                {
                    "kernel": "attention_bf16",
                    "stage": stage,
                    "shape": [batch, heads, tokens, hd],
                    "seconds": secs,
                }
            )
            print(
                f"# attention bf16 stage {stage} {batch}x{heads}x{tokens}x{hd}: "
                + ", ".join(f"{name} {1e3 * t:.2f} ms" for name, t in secs.items()),
                flush=True,
            )
    embed = PatchEmbed3D((4, 4, 4), 10, 128)
    chips = torch.randn(8, 8, 10, 224, 224)
    secs = _time_each(
        {"per_sample": lambda: embed(chips), "whole_batch": lambda: embed.project(chips)},
        repeats,
    )
    rows.append({"kernel": "patch_embed", "shape": list(chips.shape), "seconds": secs})
    print(
        "# patch embed 8 chips: "
        + ", ".join(f"{name} {1e3 * t:.1f} ms" for name, t in secs.items()),
        flush=True,
    )
    return rows


def best_vs_best(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per patch, T and precision: each encoder at its fastest batch, and the ratio.

    A user of either encoder would run it at its own best batch, which need not
    be the same one; the per-row ratios compare equal batches.
    """
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        if "official_chips_per_s" in r:
            groups.setdefault((r["patch"], r["frames"], r["precision"]), []).append(r)
    out = []
    for (patch, frames, prec), rs in groups.items():
        ours = max(rs, key=lambda r: r["chips_per_s"])
        theirs = max(rs, key=lambda r: r["official_chips_per_s"])
        out.append(
            {
                "patch": patch,
                "frames": frames,
                "precision": prec,
                "batch": ours["batch"],
                "chips_per_s": ours["chips_per_s"],
                "official_batch": theirs["batch"],
                "official_chips_per_s": theirs["official_chips_per_s"],
                "speedup": ours["chips_per_s"] / theirs["official_chips_per_s"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--patch", nargs="+", default=["p444"], choices=sorted(PATCHES))
    ap.add_argument("--frames", nargs="+", type=int, default=[8])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument(
        "--precision", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"]
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="untrained:<seed> weights, full size")
    ap.add_argument("--official-repo", default=os.environ.get("RS_EMBED_AGRIFM_REPO_PATH"))
    ap.add_argument(
        "--kernels",
        action="store_true",
        help="time each CPU kernel choice against its alternative instead of the encoder",
    )
    ap.add_argument(
        "--baseline",
        metavar="REV",
        help="also time our encoder as it was at this git revision (fp32 rows)",
    )
    ap.add_argument("--json", default="bench/results/bench_encoder.json")
    ap.add_argument(
        "--force-bf16",
        action="store_true",
        help="time bfloat16 on a CPU without bf16 instructions too (software bf16: very slow)",
    )
    ap.add_argument(
        "--matmul-n", type=int, default=None, help="matmul size (default 2048 CPU, 8192 GPU)"
    )
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if (
        device.type == "cpu"
        and "bfloat16" in args.precision
        and not cpu.native_bf16_cpu()
        and not args.force_bf16
    ):
        args.precision = [p for p in args.precision if p != "bfloat16"]
        print(
            f"# bfloat16 left out: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no "
            "AVX512-BF16 or AMX, so bf16 matmuls run in software (--force-bf16 times them anyway)"
        )
        if not args.precision:
            return 0
    env: dict[str, Any] = {
        "command": " ".join(["python", *sys.argv]) if argv is None else f"main({argv!r})",
        "torch": torch.__version__,
        "libraries": library_versions(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_matmul_ours": cpu.cpu_matmul_library() if device.type == "cpu" else None,
        "bf16_native_cpu": cpu.native_bf16_cpu(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        # Other work on a shared host shows here (1, 5 and 15 minute averages).
        "load_average_start": list(os.getloadavg()),
    }
    print(
        f"# torch {env['torch']} on {env['device_name'] or env['machine']}, {env['torch_threads']} threads"
        + (
            f"; CPU {env['cpu_capability']}, our fp32 linears on {env['cpu_matmul_ours']}"
            if device.type == "cpu"
            else ""
        )
    )
    if args.kernels:
        kernels = kernel_rows(args.repeats, args.force_bf16)
        _write(Path(args.json), {"env": env, "kernels": kernels})
        return 0
    mm_n = args.matmul_n or (8192 if device.type == "cuda" else 2048)
    env["matmul_n"] = mm_n
    rates_before = {p: matmul_rate(getattr(torch, p), device, mm_n) for p in args.precision}
    print("# matmul GFLOP/s before: " + ", ".join(f"{p} {r:.0f}" for p, r in rates_before.items()))

    baseline_module = None
    if args.baseline:
        baseline_module, env["baseline_revision"] = load_baseline(args.baseline)
    official_available = bool(args.official_repo)
    if not official_available:
        print(
            "# no official AgriFM tree given (--official-repo / RS_EMBED_AGRIFM_REPO_PATH): column left out"
        )

    rows: list[dict[str, Any]] = []
    for patch in args.patch:
        cfg = EncoderConfig(patch_size=PATCHES[patch])
        state = untrained_state_dict(args.seed, cfg)
        spec = f"untrained:{args.seed}" + ("" if patch == "p444" else f":{patch}")
        # FLOPs first, on a model of its own that is then freed (so it is not resident
        # while the rows' peak memory is taken).
        counted = load_encoder(state, device=device, cpu_matmul="blas")
        gflops = {
            t: count_flops(counted, torch.randn(1, t, 10, args.size, args.size, device=device))
            / 1e9
            for t in args.frames
        }
        del counted
        # Ours as the product runs it: the engine's forward (bfloat16 is its autocast
        # over matmul weights it cast once); the official model gets autocast around
        # its fp32 weights, as a caller would.
        engines = {
            prec: EmbeddingEngine.create(
                spec, options=InferenceOptions(device=str(device), precision=prec)
            )
            for prec in {"float32", *args.precision}
        }
        ours = engines["float32"]
        baseline = (
            baseline_module.load_encoder(state, device=device)
            if baseline_module is not None
            else None
        )
        official = None
        if official_available:
            from agrifm_pipeline.model.official import load_official_encoder
            from agrifm_pipeline.settings import load_settings

            official = load_official_encoder(
                state, settings=load_settings(repo_path=args.official_repo), device=str(device)
            )
        for t in args.frames:
            gflop = gflops[t]
            for prec in args.precision:
                autocast = None if prec == "float32" else torch.bfloat16
                for b in args.batch:
                    x = torch.randn(b, t, 10, args.size, args.size, device=device)
                    # The row's own denominator: the matmul rate measured just before and
                    # just after it (a shared machine's rate drifts over a run).
                    rate_in = matmul_rate(getattr(torch, prec), device, mm_n, seconds=1.0)
                    fns: dict[
                        str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype | None]
                    ]
                    fns = {"ours": (engines[prec].forward, None)}
                    if official is not None:
                        fns["official"] = (official, autocast)
                    if baseline is not None and autocast is None:
                        fns["baseline"] = (baseline, None)
                    try:
                        timed = time_interleaved(fns, x, device, args.repeats, args.warmup)
                    except torch.OutOfMemoryError:
                        print(
                            f"# {patch} T={t} batch {b} {prec}: out of memory, skipped", flush=True
                        )
                        torch.cuda.empty_cache()
                        continue
                    sec, peak, cpu_sec = timed["ours"]
                    row: dict[str, Any] = {
                        "patch": patch,
                        "frames": t,
                        "size": args.size,
                        "batch": b,
                        "precision": prec,
                        "gflop_per_chip": gflop,
                        "s_per_chip": sec / b,
                        "chips_per_s": b / sec,
                        "gflops": gflop * b / sec,
                        "peak_mb": peak,
                        "cpu_s_per_chip": cpu_sec / b,
                        "cpu_matmul": engines[prec].cpu_matmul,
                    }
                    if autocast is not None:
                        row.update(bf16_accuracy(ours.forward, engines[prec].forward, x[:2]))
                    if "official" in timed:
                        osec, opeak, ocpu = timed["official"]
                        row.update(
                            official_s_per_chip=osec / b,
                            official_chips_per_s=b / osec,
                            official_peak_mb=opeak,
                            official_cpu_s_per_chip=ocpu / b,
                            speedup_vs_official=osec / sec,
                        )
                    if "baseline" in timed and baseline is not None:
                        bsec, bpeak, bcpu = timed["baseline"]
                        with torch.inference_mode():
                            diff = (ours.forward(x) - baseline(x)).abs().max().item()
                        row.update(
                            baseline_s_per_chip=bsec / b,
                            baseline_peak_mb=bpeak,
                            baseline_cpu_s_per_chip=bcpu / b,
                            speedup_vs_baseline=bsec / sec,
                            max_abs_diff_vs_baseline=diff,
                        )
                    rate_out = matmul_rate(getattr(torch, prec), device, mm_n, seconds=1.0)
                    row["matmul_gflops_row"] = [rate_in, rate_out]
                    row["share_of_matmul"] = row["gflops"] / statistics.mean([rate_in, rate_out])
                    row["share_of_matmul_conservative"] = row["gflops"] / max(
                        rate_in, rate_out, rates_before[prec]
                    )
                    rows.append(row)
                    _print_row(row)
        del ours, engines, official, baseline

    rates_after = {p: matmul_rate(getattr(torch, p), device, mm_n) for p in args.precision}
    print("# matmul GFLOP/s after: " + ", ".join(f"{p} {r:.0f}" for p, r in rates_after.items()))
    best = best_vs_best(rows)
    for b in best:
        print(
            f"# best batch, {b['patch']} T={b['frames']} {b['precision']}: ours "
            f"{b['chips_per_s']:.2f} chips/s (batch {b['batch']}), official "
            f"{b['official_chips_per_s']:.2f} (batch {b['official_batch']}): "
            f"{b['speedup']:.2f}x"
        )
    _write(
        Path(args.json),
        {
            "env": env,
            "matmul_gflops_before": rates_before,
            "matmul_gflops_after": rates_after,
            "rows": rows,
            "best_vs_best": best,
        },
    )
    return 0


def _write(out: Path, result: dict[str, Any]) -> None:
    result["env"]["load_average_end"] = list(os.getloadavg())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# wrote {out}")


_HEADER_DONE = False


def _print_row(row: dict[str, Any]) -> None:
    global _HEADER_DONE
    cols = [
        "patch",
        "T",
        "batch",
        "prec",
        "GFLOP/chip",
        "s/chip",
        "chips/s",
        "GFLOP/s",
        "of matmul",
        "matmul",
        "peak MB",
    ]
    if "official_s_per_chip" in row:
        cols += ["official s/chip", "ours/official", "official peak MB"]
    if "baseline_s_per_chip" in row:
        cols += ["baseline s/chip", "ours/baseline", "max diff"]
    cols += ["bf16 cos", "bf16 relerr"]
    if not _HEADER_DONE:
        print(" | ".join(f"{c:>10}" for c in cols))
        _HEADER_DONE = True
    peak = row["peak_mb"]
    vals = [
        row["patch"],
        row["frames"],
        row["batch"],
        {"float32": "fp32", "bfloat16": "bf16"}[row["precision"]],
        f"{row['gflop_per_chip']:.1f}",
        f"{row['s_per_chip']:.3f}",
        f"{row['chips_per_s']:.2f}",
        f"{row['gflops']:.0f}",
        f"{100 * row['share_of_matmul']:.0f}%",
        f"{statistics.mean(row['matmul_gflops_row']):.0f}",
        "-" if peak is None else f"{peak:.0f}",
    ]
    if "official_s_per_chip" in row:
        opeak = row["official_peak_mb"]
        vals += [
            f"{row['official_s_per_chip']:.3f}",
            f"{row['speedup_vs_official']:.2f}x",
            "-" if opeak is None else f"{opeak:.0f}",
        ]
    if "baseline_s_per_chip" in row:
        vals += [
            f"{row['baseline_s_per_chip']:.3f}",
            f"{row['speedup_vs_baseline']:.2f}x",
            f"{row['max_abs_diff_vs_baseline']:.1e}",
        ]
    if "bf16_pooled_cosine_min" in row:
        vals += [f"{row['bf16_pooled_cosine_min']:.5f}", f"{row['bf16_grid_rel_error']:.4f}"]
    else:
        vals += ["-", "-"]
    print(" | ".join(f"{v!s:>10}" for v in vals), flush=True)


if __name__ == "__main__":
    sys.exit(main())
