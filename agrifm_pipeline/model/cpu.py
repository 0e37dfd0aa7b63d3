"""CPU kernels of the AgriFM encoder, and the choice of matmul library for them.

PyTorch ships two fp32 matmul libraries on x86-64 CPUs: its BLAS (MKL) behind
``nn.Linear``, and oneDNN behind ``torch.ops.mkldnn._linear_pointwise``. Which
one is faster at this encoder's shapes depends on the CPU's vector width, so
the library is a setting (:func:`cpu_matmul_library`), resolved once when a
model is loaded and copied into every :class:`Linear` as it is built. Nothing
here reads the environment or a global during a forward pass.

Every kernel here computes the same values as the plain PyTorch op it stands
in for (the reference-fixture tests run through them); they differ only in
speed. ``bench/bench_encoder.py --kernels`` times each choice against its
alternative at the encoder's shapes; results are in ``bench/results/`` (see
``docs/performance.md``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from agrifm_pipeline.errors import SettingsError

CPU_MATMUL_ENV = "AGRIFM_PIPELINE_CPU_MATMUL"
CPU_MATMUL_CHOICES = ("auto", "blas", "onednn")
CPU_MATMUL_LIBRARIES = ("blas", "onednn")

#: A linear layer with at most this many input rows runs on the BLAS as one matmul
#: per thread, each over its share of the output columns (:func:`linear_by_column_blocks`).
SPLIT_ROWS_MAX = 256
#: ... when the process runs this many threads (more was not measured) ...
SPLIT_THREADS = range(2, 5)
#: ... and each thread gets at least this many output columns.
SPLIT_MIN_COLUMNS = 256


def onednn_linear_available() -> bool:
    """True when this PyTorch build has oneDNN's linear op."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


def cpu_matmul_library(setting: str | None = None) -> str:
    """``"onednn"`` or ``"blas"``: the library for the encoder's fp32 linear layers on a CPU.

    ``setting`` (default: ``AGRIFM_PIPELINE_CPU_MATMUL``, else ``auto``) is one of
    ``blas`` (PyTorch's default, MKL on x86-64 builds), ``onednn``, or ``auto``.
    ``auto`` picks oneDNN on CPUs with AVX-512 and the BLAS otherwise: each was
    the faster of the two at this encoder's matmul shapes on that kind of CPU
    (``bench/bench_encoder.py --kernels``, ``linear_fp32`` rows). The two agree
    to about 1e-6, and the choice is recorded with every embedding.

    Raises:
        SettingsError: an unknown value, or ``onednn`` on a build without it.
    """
    raw = os.environ.get(CPU_MATMUL_ENV, "") if setting is None else setting
    value = str(raw).strip().lower() or "auto"
    if value not in CPU_MATMUL_CHOICES:
        raise SettingsError(
            f"{CPU_MATMUL_ENV}={raw!r} is not known; use one of {', '.join(CPU_MATMUL_CHOICES)}"
        )
    available = onednn_linear_available()
    if value == "onednn" and not available:
        raise SettingsError(
            f"{CPU_MATMUL_ENV}=onednn but this PyTorch build has no oneDNN linear op; "
            "use 'auto' or 'blas'"
        )
    if value == "auto":
        wide = torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
        value = "onednn" if available and wide else "blas"
    return value


def native_bf16_cpu() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX) for oneDNN.

    Without it PyTorch's bf16 matmuls on a CPU run in software, many times
    slower than fp32.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def recording_graph() -> bool:
    """True when autograd is recording a graph (in-place updates and the kernels here are off)."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def linear_by_column_blocks(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, parts: int
) -> torch.Tensor:
    """``F.linear`` as ``parts`` matmuls side by side, each on N / parts output columns.

    The weight (N, K) is viewed, not copied, as ``parts`` transposed blocks; one
    ``baddbmm`` runs them, a thread each, and the (parts, M, N / parts) result is
    laid back out as (M, N). Every output element is the same dot product as in
    ``F.linear``, so the values are identical.
    """
    k, n = weight.shape[1], weight.shape[0]
    rows = x.reshape(-1, k)  # (M, K)
    m = rows.shape[0]
    w = weight.view(parts, n // parts, k).transpose(1, 2)  # (parts, K, N/parts)
    b = bias.view(parts, 1, n // parts)
    y = torch.baddbmm(b, rows.expand(parts, m, k), w)  # (parts, M, N/parts)
    return y.transpose(0, 1).reshape(*x.shape[:-1], n)  # (..., N)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) with faster fp32 CPU inference.

    ``cpu_matmul`` (``"blas"`` or ``"onednn"``, see :func:`cpu_matmul_library`) is
    fixed when the layer is built. It applies to fp32 CPU inputs when no autograd
    graph is recorded, no autocast is active and ``torch.compile`` is not
    tracing (Inductor lowers ``nn.Linear`` itself, and oneDNN's op needs constant
    weights); every other call is ``nn.Linear``:

    * ``onednn``: ``torch.ops.mkldnn._linear_pointwise``, which also writes into
      a fresh output instead of copying the bias first;
    * ``blas`` with few rows (at most ``SPLIT_ROWS_MAX``; one chip's tokens in
      the last stages at batch 1), 2-4 threads and at least ``SPLIT_MIN_COLUMNS``
      output columns a thread: one matmul per thread over its share of the
      columns (:func:`linear_by_column_blocks`). MKL appears to split such a
      matmul by rows, each thread packing the whole weight
      (``bench_encoder.py --kernels``: ``blas`` against ``column_blocks``);
    * ``blas`` otherwise: ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        cpu_matmul: str = "blas",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if cpu_matmul not in CPU_MATMUL_LIBRARIES:
            raise ValueError(f"cpu_matmul={cpu_matmul!r}; use one of {CPU_MATMUL_LIBRARIES}")
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.cpu_matmul = cpu_matmul

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, cpu_matmul={self.cpu_matmul}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not recording_graph()
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()
        ):
            if self.cpu_matmul == "onednn":
                return torch.ops.mkldnn._linear_pointwise(
                    x.contiguous(), self.weight, self.bias, "none", [], ""
                )
            if self.bias is not None and x.numel() <= SPLIT_ROWS_MAX * x.shape[-1]:
                parts = torch.get_num_threads()
                n = self.out_features
                if parts in SPLIT_THREADS and n % parts == 0 and n // parts >= SPLIT_MIN_COLUMNS:
                    return linear_by_column_blocks(x, self.weight, self.bias, parts)
        return F.linear(x, self.weight, self.bias)


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """softmax(q kᵀ / √d + bias) v as two batched matmuls and a softmax: (..., N, hd).

    Used for bfloat16 on a CPU, where PyTorch's fused attention kernel was found
    slower than this on the encoder's small windows (49-392 tokens) and strided
    q/k/v (``bench_encoder.py --kernels``: ``attention_bf16`` rows). The (N, N)
    scores are small at window sizes. fp32 keeps the fused kernel, which never
    holds the scores.
    """
    scores = torch.matmul(q, k.transpose(-2, -1))  # (..., N, N)
    scores.mul_(q.shape[-1] ** -0.5).add_(bias)
    return torch.matmul(scores.softmax(-1), v)  # (..., N, hd)


def use_explicit_attention(q: torch.Tensor) -> bool:
    """Whether attention on ``q`` takes :func:`explicit_attention` (bf16 on a CPU)."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16
